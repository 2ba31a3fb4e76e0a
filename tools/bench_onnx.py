"""Benchmark our ONNX export against onnxruntime-genai's own model builder on one model.

For each ONNX model directory (ours at accuracy_level 0 and 4, the builder's int4 and fp32):
- speed with onnxruntime-genai on CPU: prefill tokens/s and greedy decode tokens/s (best of
  `--repeats`, since the machine is shared), and the on-disk size;
- quality against the FP model (HF transformers, fp32) on WikiText-2 test windows: mean KL(FP‖model)
  per token and top-1 agreement, computed from onnxruntime logits. Our record's own simulation
  (`simulate()`) is a row too: at accuracy_level 0 the export must match it.

Writes `results.json`, `results.md` and `bench_onnx.png` to `--out`, and prints the table.

    python tools/bench_onnx.py --out bench_out/onnx            # SmolLM2-135M-Instruct, w4g32 RTN
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.onnx_verify import OrtDecoder  # noqa: E402
from lfq_export.compare import kl_per_token  # noqa: E402

__all__ = ["main"]

log = logging.getLogger("bench_onnx")

DEFAULT_MODEL = ROOT.parent / "shared/assets/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = ROOT.parent / "shared/assets/text/wikitext2_raw_test.txt"
PROMPT = ("The history of the city begins in the early medieval period, when a small settlement grew up around "
          "a river crossing. Over the following centuries")


# ---- inputs -----------------------------------------------------------------------------------------
def hf_model_dir(model: str, work: Path) -> Path:
    """The model as an HF directory the genai builder accepts (it needs `architectures`)."""
    from lfq_export.model_io import resolve_model

    src = Path(resolve_model(model).path)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("architectures"):
        return src
    fixed = work / "hf_model"
    if not fixed.exists():
        fixed.mkdir(parents=True)
        for f in src.iterdir():  # hard links (model_io refuses symlinks that leave the directory)
            if f.is_file():
                try:
                    os.link(f, fixed / f.name)
                except OSError:
                    shutil.copy2(f, fixed / f.name)
        (fixed / "config.json").unlink()
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[cfg["model_type"]]
        (fixed / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}, indent=1))
    return fixed


def text_windows(tokenizer: Any, path: Path, n_tokens: int, seqlen: int) -> list[np.ndarray]:
    with open(path, encoding="utf-8") as f:
        text = f.read(n_tokens * 12)
    ids = np.asarray(tokenizer(text)["input_ids"][: n_tokens], np.int64)
    return [ids[i: i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]


# ---- the models -------------------------------------------------------------------------------------
def our_exports(hf_dir: Path, work: Path, scheme: str, method: str) -> tuple[Path, dict[str, Path]]:
    from lfq_export.export import export_run
    from lfq_export.quantize import QuantizeOptions, quantize

    run = work / f"run_{scheme}_{method}"
    if not (run / "record.json").is_file():
        t = time.perf_counter()
        quantize(str(hf_dir), run, QuantizeOptions(scheme=scheme, method=method, progress=True, overwrite=True))
        log.info("quantized %s in %.1fs", run, time.perf_counter() - t)
    outs = {}
    for level in (0, 4):
        out = work / f"ours_{scheme}_acc{level}"
        if not (out / "model.onnx").is_file():
            t = time.perf_counter()
            export_run(run, "onnx", out, {"onnx_accuracy_level": level, "overwrite": True})
            log.info("exported %s in %.1fs", out, time.perf_counter() - t)
        outs[f"ours {scheme} ({method}), acc 0" if level == 0 else f"ours {scheme} ({method}), acc 4"] = out
    return run, outs


def builder_export(hf_dir: Path, work: Path, precision: str, extra: tuple[str, ...] = (), tag: str = "") -> Path:
    """Run `python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu [--extra_options ...]`."""
    out = work / f"builder_{precision}{tag}"
    if not (out / "model.onnx").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(work / "builder_cache")]
        if extra:
            cmd += ["--extra_options", *extra]
        log.info("running: %s", " ".join(cmd))
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log.info("builder %s took %.1fs", precision, time.perf_counter() - t)
    return out


# ---- measurements -----------------------------------------------------------------------------------
def speed(model_dirs: dict[str, Path], prompt_ids: list[int], new_tokens: int, repeats: int) -> dict[str, dict]:
    """Prefill and greedy decode throughput in onnxruntime-genai, best of `repeats`.

    The models take turns (one run each per round) so that load from other processes on a shared
    machine hits all of them alike; the first round only warms up."""
    import onnxruntime_genai as og

    models = {name: og.Model(str(d)) for name, d in model_dirs.items()}
    best = {name: {"prefill_tok_s": 0.0, "decode_tok_s": 0.0} for name in models}
    total = len(prompt_ids) + new_tokens
    for round_ in tqdm(range(repeats + 1), desc="speed rounds"):
        for name, model in models.items():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(np.asarray([prompt_ids], np.int32))
            t1 = time.perf_counter()
            n = 0
            while not gen.is_done():
                gen.generate_next_token()
                n += 1
            t2 = time.perf_counter()
            del gen
            if round_ > 0:
                b = best[name]
                b["prefill_tok_s"] = max(b["prefill_tok_s"], len(prompt_ids) / (t1 - t0))
                b["decode_tok_s"] = max(b["decode_tok_s"], n / (t2 - t1))
    return best


def quality(logits_fn, fp_logits: list[np.ndarray], windows: list[np.ndarray]) -> dict[str, float]:
    kls, agree = [], []
    for ids, ref in zip(windows, fp_logits):
        got = logits_fn(ids)
        kls.append(kl_per_token(ref, got))
        agree.append(ref.argmax(-1) == got.argmax(-1))
    return {"kl_mean": float(np.concatenate(kls).mean()), "top1_agreement": float(np.concatenate(agree).mean())}


def dir_size_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.suffix in (".onnx", ".data")) / 2**20


# ---- report -----------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | size (MB) | prefill tok/s | decode tok/s | KL(FP‖model) | top-1 vs FP |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = lambda k: f"{r[k]:.1f}" if r.get(k) is not None else "—"  # noqa: E731
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") is not None else "—"
        lines.append(f"| {r['name']} | {size} | {sp('prefill_tok_s')} | {sp('decode_tok_s')} | "
                     f"{r['kl_mean']:.4g} | {r['top1_agreement']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 2), sharey=True)
    a.barh(names, [r.get("decode_tok_s") or 0.0 for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r.get("decode_tok_s") is None:
            a.text(0.5, i, "(no engine run)", va="center", fontsize=8)
    a.set_xlabel("greedy decode tokens/s (onnxruntime-genai, CPU)")
    b.barh(names, [r["kl_mean"] for r in rows], color="tab:orange")
    for i, r in enumerate(rows):
        b.text(r["kl_mean"], i, f" {r['kl_mean']:.3g}", va="center", fontsize=8)
    b.set_xlabel("mean KL(FP‖model) per token, WikiText-2 test")
    a.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF directory or GGUF file of the FP model")
    p.add_argument("--scheme", default="w4g32", help="our scheme (the builder's int4 uses block 32, symmetric RTN)")
    p.add_argument("--method", default="rtn", help="our quantization method")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "onnx", help="output directory")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text for KL vs FP")
    p.add_argument("--kl-tokens", type=int, default=1024, help="tokens of text for KL")
    p.add_argument("--seqlen", type=int, default=256, help="window length for KL")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens generated per speed run")
    p.add_argument("--repeats", type=int, default=5, help="speed rounds (best is kept; models take turns)")
    p.add_argument("--no-builder", action="store_true", help="skip the onnxruntime-genai builder models")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "torchao", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lfq_export.record import QuantizedModel
    from lfq_export.simulate import simulate

    hf_dir = hf_model_dir(args.model, work)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    windows = text_windows(tok, args.text, args.kl_tokens, args.seqlen)
    prompt_ids = tok(PROMPT)["input_ids"]
    fp_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def torch_logits(model):
        def run(ids):
            with torch.no_grad():
                return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()
        return run

    fp_logits = [torch_logits(fp_model)(w) for w in tqdm(windows, desc="FP logits")]
    del fp_model

    run, models = our_exports(hf_dir, work, args.scheme, args.method)
    if not args.no_builder:
        models["genai builder int4 (block 32, acc 4, int4 head)"] = builder_export(hf_dir, work, "int4")
        models["genai builder int4 (block 32, acc 4, FP head)"] = builder_export(
            hf_dir, work, "int4", ("shared_embeddings=false", "nodes_to_exclude=/lm_head/MatMul"), "_fp_head")
        models["genai builder fp32"] = builder_export(hf_dir, work, "fp32")

    rows = [{"name": f"ours {args.scheme} ({args.method}), torch simulate()", "size_mb": None,
             **quality(torch_logits(simulate(QuantizedModel.load(run))), fp_logits, windows)}]
    for name, d in tqdm(models.items(), desc="KL vs FP"):
        dec = OrtDecoder(d)
        rows.append({"name": name, "dir": str(d), "size_mb": dir_size_mb(d), **quality(dec.logits, fp_logits, windows)})
        del dec
    speeds = speed(models, prompt_ids, args.new_tokens, args.repeats)
    for row in rows[1:]:
        row.update(speeds[row["name"]])
        log.info("%s: %s", row["name"], {k: v for k, v in row.items() if k not in ("name", "dir")})

    import onnxruntime
    import onnxruntime_genai

    meta = {"model": args.model, "hf_dir": str(hf_dir), "scheme": args.scheme, "method": args.method,
            "kl_tokens": sum(len(w) for w in windows), "seqlen": args.seqlen, "prompt_tokens": len(prompt_ids),
            "new_tokens": args.new_tokens, "repeats": args.repeats, "cpu_count": os.cpu_count(),
            "load_avg": os.getloadavg(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__,
            "command": " ".join(["python", "tools/bench_onnx.py"] + (argv or sys.argv[1:]))}
    md = table(rows)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    plot(rows, args.out / "bench_onnx.png",
         f"{Path(args.model).name}: our MatMulNBits export vs onnxruntime-genai builder")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
