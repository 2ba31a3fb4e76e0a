"""Peer comparison inside llama.cpp: llama.cpp's own quantizer vs lfq-export (RTN in the grid, and a
learnable method such as OmniQuant with the LFQ final block) at the same GGUF mixes.

    tools/build_llama_tools.sh                          # once: llama-quantize, llama-perplexity, llama-bench
    python tools/bench_llamacpp.py                      # SmolLM2-135M-Instruct, Q4_K_M and Q3_K_M
    python tools/bench_llamacpp.py --methods rtn --schemes q4_k_m --chunks 10   # quick

Steps: (1) an F32 GGUF of the FP model, written by lfq-export's GGUF writer from an unquantized
record (the reference); (2) `llama-quantize` of that file at each scheme (no imatrix); (3) `lfq-export
quantize --scheme gguf:<scheme> --format gguf` per method (each run its own process, reused when
its run directory exists); (4) `llama-perplexity --kl-divergence-base` on the reference, then
`--kl-divergence` for every file: llama.cpp's own logits give PPL, mean KL(FP‖Q) and same-top-1 %;
(5) `llama-bench` prompt (pp512) and generation (tg128) speed. Writes results.json, results.md and
kld_vs_size.png to --out, and logs the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"
SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = ASSETS / "text" / "wikitext2_raw_test.txt"
C4 = ASSETS / "text" / "c4_realnewslike_sample.jsonl"
DEFAULT_TOOLS = Path(os.environ.get("LFQ_EXPORT_CACHE", Path.home() / ".cache" / "lfq-export")) / "llama-tools" / "bin"

log = logging.getLogger("bench_llamacpp")

__all__ = ["main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SMOLLM2), help="HF directory or GGUF of the FP model")
    p.add_argument("--schemes", default="q4_k_m,q3_k_m", help="llama-quantize file types, lower case")
    p.add_argument("--methods", default="rtn,omniquant",
                   help="lfq-export methods (rtn needs no calibration); METHOD@SCHEME runs a method at one scheme only")
    p.add_argument("--calib", default=str(C4), help="calibration text for learnable methods")
    p.add_argument("--calib-field", default="prefix,gold_completion")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--text", type=Path, default=WIKI, help="evaluation text (WikiText-2 raw test)")
    p.add_argument("--ctx", type=int, default=512, help="llama-perplexity context")
    p.add_argument("--chunks", type=int, default=40, help="llama-perplexity chunks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions (0: skip speed)")
    p.add_argument("--tools", type=Path, default=DEFAULT_TOOLS, help="directory with the llama.cpp binaries")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "llamacpp")
    return p.parse_args(argv)


# ---- running things ------------------------------------------------------------------------------
def run(cmd: list[str], log_file: Path, env: dict[str, str] | None = None, stdout_only: bool = False) -> str:
    """Run a command, keep its output in `log_file`, raise with the tail of it on failure.

    Returns stdout + stderr (llama.cpp tools print their results to stderr), or stdout alone."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = res.stdout + res.stderr
    log_file.write_text(" ".join(cmd) + "\n\n" + out)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}), see {log_file}:\n{out[-2000:]}")
    log.info("  %s: %.0f s", Path(cmd[0]).name if cmd[0] != sys.executable else " ".join(cmd[2:4]), time.perf_counter() - t)
    return res.stdout if stdout_only else out


def tool(args: argparse.Namespace, name: str) -> str:
    path = args.tools / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build it with tools/build_llama_tools.sh (or pass --tools DIR)")
    return str(path)


def tool_env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "LD_LIBRARY_PATH": f"{args.tools}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def f32_reference(args: argparse.Namespace, dest: Path) -> Path:
    """The FP model as an F32 GGUF, through lfq-export's writer (an unquantized record)."""
    if dest.is_file():
        return dest
    import formats.gguf  # noqa: F401 - registers the format
    from formats.gguf_write import write_gguf
    from lfq_export.model_io import resolve_model
    from lfq_export.record import QuantizedModel

    src = resolve_model(args.model)
    record = QuantizedModel(config=src.config.to_dict(), family=src.adapter.family, scheme="fp32",
                            fp={n: src.tensor(n) for n in src.weight_map}, tokenizer_dir=src.path,
                            report={"model": args.model})
    write_gguf(record, dest, {"progress": True})
    return dest


def lfq_run(args: argparse.Namespace, method: str, scheme: str, runs: Path, logs: Path) -> tuple[Path, float | None]:
    """`lfq-export quantize` in its own process; returns the GGUF and the quantization wall time."""
    run_dir = runs / f"{method}-{scheme}"
    gguf_file = run_dir / f"model-{scheme}.gguf"
    if gguf_file.is_file():
        return gguf_file, json.loads((run_dir / "record.json").read_text())["report"].get("timings", {}).get("total_seconds")
    cmd = [sys.executable, "-m", "lfq_export.cli", "quantize", args.model, "--out", str(run_dir), "--scheme",
           f"gguf:{scheme}", "--method", method, "--format", "gguf", "--overwrite", "--no-progress"]
    if method != "rtn":
        cmd += ["--calib", args.calib, "--calib-field", args.calib_field, "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen), "--iters", str(args.iters)]
    t = time.perf_counter()
    run(cmd, logs / f"quantize-{method}-{scheme}.log")
    return gguf_file, round(time.perf_counter() - t, 1)


# ---- llama.cpp measurements ----------------------------------------------------------------------
_PPL = re.compile(r"Final estimate: PPL = ([\d.]+)")
_PPLQ = re.compile(r"Mean PPL\(Q\)\s*:\s*([\d.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([\d.eE+-]+)")
_TOP = re.compile(r"Same top p:\s*([\d.]+)")


def perplexity(args: argparse.Namespace, model: Path, base: Path, log_file: Path, make_base: bool) -> dict[str, float]:
    cmd = [tool(args, "llama-perplexity"), "-m", str(model), "-f", str(args.text), "-c", str(args.ctx),
           "--chunks", str(args.chunks), "-t", str(args.threads), "--kl-divergence-base", str(base)]
    if not make_base:
        cmd.append("--kl-divergence")
    out = run(cmd, log_file, tool_env(args))
    if make_base:
        return {"ppl": float(_PPL.search(out).group(1))}
    return {"ppl": float(_PPLQ.search(out).group(1)), "kld": float(_KLD.search(out).group(1)),
            "same_top_pct": float(_TOP.search(out).group(1))}


def speed(args: argparse.Namespace, models: list[Path], logs: Path) -> dict[str, dict[str, float]]:
    if args.bench_reps <= 0:
        return {}
    cmd = [tool(args, "llama-bench"), "-m", ",".join(map(str, models)), "-t", str(args.threads), "-p", "512",
           "-n", "128", "-r", str(args.bench_reps), "-o", "json"]
    rows = json.loads(run(cmd, logs / "bench.log", tool_env(args), stdout_only=True))
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        key = "pp512" if r["n_prompt"] else "tg128"
        out.setdefault(str(Path(r["model_filename"]).resolve()), {})[key] = round(float(r["avg_ts"]), 1)
    return out


# ---- report --------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    head = ("| quantizer | scheme | file MB | bpw | PPL | mean KLD | same top-1 % | pp512 t/s | tg128 t/s | quantize s |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    def cell(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [head]
    for r in rows:
        lines.append(f"| {r['quantizer']} | {r['scheme']} | {r['mb']:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} | "
                     f"{cell(r.get('kld'), '.5f')} | {cell(r.get('same_top_pct'), '.2f')} | "
                     f"{cell(r.get('pp512'), '.1f')} | {cell(r.get('tg128'), '.1f')} | {cell(r.get('quantize_s'), '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for q in sorted({r["quantizer"] for r in rows if "kld" in r}):
        pts = [r for r in rows if r["quantizer"] == q and "kld" in r]
        ax.scatter([r["mb"] for r in pts], [r["kld"] for r in pts], label=q)
        for r in pts:
            ax.annotate(r["scheme"], (r["mb"], r["kld"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL(FP ‖ Q), llama.cpp logits")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    out, logs, runs = args.out, args.out / "logs", args.out / "runs"
    for d in (out, logs, runs):
        d.mkdir(parents=True, exist_ok=True)
    schemes, methods = args.schemes.split(","), args.methods.split(",")
    ref = f32_reference(args, out / "reference-F32.gguf")
    n_params = _n_params(ref)
    files: list[tuple[str, str, Path, float | None]] = [("FP (F32)", "f32", ref, None)]
    for s in schemes:
        dest = out / f"llama-quantize-{s}.gguf"
        if not dest.is_file():
            log.info("llama-quantize %s", s.upper())
            t = time.perf_counter()
            run([tool(args, "llama-quantize"), str(ref), str(dest), s.upper(), str(args.threads)],
                logs / f"quantize-llamacpp-{s}.log", tool_env(args))
            files.append(("llama-quantize", s, dest, round(time.perf_counter() - t, 1)))
        else:
            files.append(("llama-quantize", s, dest, None))
    for entry in methods:
        m, _, only = entry.partition("@")
        for s in ([only] if only else schemes):
            log.info("lfq-export %s gguf:%s", m, s)
            path, secs = lfq_run(args, m, s, runs, logs)
            files.append((f"lfq-export {m}" + (" + LFQ" if m != "rtn" else ""), s, path, secs))
    base = out / "reference.kld"
    rows = []
    for i, (q, s, path, secs) in enumerate(files):
        label = f"{q} {s}"
        log.info("llama-perplexity: %s", label)
        stats = perplexity(args, path, base, logs / f"ppl-{re.sub(r'[^A-Za-z0-9]+', '-', label)}.log", make_base=(i == 0))
        size = path.stat().st_size
        rows.append({"quantizer": q, "scheme": s, "file": str(path), "mb": size / 1e6, "bpw": 8 * size / n_params,
                     "quantize_s": secs, **stats})
    log.info("llama-bench")
    sp = speed(args, [Path(r["file"]) for r in rows], logs)
    for r in rows:
        r.update(sp.get(str(Path(r["file"]).resolve()), {}))
    md = table(rows)
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    (out / "results.md").write_text(md + "\n")
    plot(rows, out / "kld_vs_size.png")
    log.info("\n%s\n\nwritten: %s", md, out)
    return 0


def _n_params(gguf_path: Path) -> int:
    import gguf
    import numpy as np

    return int(sum(int(np.prod([int(x) for x in t.shape])) for t in gguf.GGUFReader(str(gguf_path)).tensors))


if __name__ == "__main__":
    sys.exit(main())
