"""Quality benchmark: RTN vs each base method with MSE on every block vs the same method with the LFQ
final block (vs auto-round's SignRound when installed), same calibration and settings, one run.

    python tools/bench_quality.py                       # SmolLM2-135M-Instruct, W4 / W3g64 / W2g64
    python tools/bench_quality.py --quick               # stories260K-hf, small settings

Per run: WikiText-2 test perplexity, mean KL(FP‖Q) and top-1 agreement on that text, KL by position
and the greedy prefix the quantized model reproduces on 256-token FP-greedy answers to GSM8K questions
(chat template), quantization wall time and peak RSS (each run is its own uninterrupted process). Writes
`results.json` (resumable: finished runs are skipped), `results.md` and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = ASSETS / "models" / "stories260K-hf"
C4 = ASSETS / "text" / "c4_realnewslike_sample.jsonl"
WIKI = ASSETS / "text" / "wikitext2_raw_test.txt"
GSM8K = ASSETS / "text" / "gsm8k_test.jsonl"
TINYSTORIES = ASSETS / "text" / "tinystories_valid_head.txt"
STORY_PROMPTS = ["Once upon a time", "Tom and Lily went to the park.", "One day, a little cat",
                 "The big red ball", "Sara had a new toy.", "There was a tiny bird"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct asset; --quick: stories260K-hf)")
    p.add_argument("--quick", action="store_true", help="stories260K-hf with small settings (minutes)")
    p.add_argument("--schemes", default=None, help="comma-separated (default w4,w3g64,w2g64; quick: w4,w3g32)")
    p.add_argument("--methods", default="omniquant,flexround,blockap", help="base methods (each run with mse and ce)")
    p.add_argument("--no-autoround", action="store_true", help="skip auto-round even if installed")
    p.add_argument("--calib", default=str(C4), help="calibration source (default: the C4 sample)")
    p.add_argument("--calib-field", default="prefix,gold_completion")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--extra", default="", help="extra arguments for every lfq-export quantize run")
    p.add_argument("--eval-tokens", type=int, default=None, help="WikiText-2 tokens evaluated")
    p.add_argument("--prompts", type=int, default=None, help="GSM8K questions generated from")
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    q = a.quick
    a.model = a.model or str(STORIES if q else SMOLLM2)
    a.schemes = (a.schemes or ("w4,w3g32" if q else "w4,w3g64,w2g64")).split(",")
    a.nsamples = a.nsamples or (32 if q else 64)
    a.seqlen = a.seqlen or (128 if q else 256)
    a.iters = a.iters or (60 if q else 50)
    a.eval_tokens = a.eval_tokens or (8192 if q else 16384)
    a.prompts = a.prompts or (6 if q else 8)
    if q and a.calib == str(C4):
        a.calib, a.calib_field = str(TINYSTORIES), "text"
    return a


def _peak_rss_mb_of(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        rss = int(r.stderr.strip().splitlines()[-1]) / 1024
    except (ValueError, IndexError):
        rss = float("nan")
    return wall, rss, r


def _quantize_cmd(a, scheme: str, method: str, final_loss: str, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "lfq_export.cli", "quantize", a.model, "--scheme", scheme, "--method", method,
           "--final-loss", final_loss, "--out", str(out), "--no-progress", "--seed", str(a.seed), *extra]
    if method != "rtn":
        cmd += ["--calib", a.calib, "--calib-field", a.calib_field, "--nsamples", str(a.nsamples),
                "--seqlen", str(a.seqlen), "--iters", str(a.iters)]
    cmd += a.extra.split()
    if "--skip-unquantizable" not in cmd:
        cmd.append("--skip-unquantizable")
    return cmd


def _checked(cmd: list[str]) -> tuple[float, float]:
    wall, rss, r = _peak_rss_mb_of(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, rss


def _run_info(out: Path, wall: float, rss: float) -> dict:
    report = json.loads((out / "record.json").read_text())["report"]
    blocks = report.get("blocks", [])
    mse_secs = [b["seconds"] for b in blocks[:-1]]
    return {**_coverage(out), "wall_s": wall, "peak_rss_mb": rss,
            "block_seconds_mean": sum(mse_secs) / max(len(mse_secs), 1),
            "final_block_seconds": blocks[-1]["seconds"] if blocks else None,
            "final_block": blocks[-1] if blocks else None}


def _coverage(out: Path) -> dict:
    """How many block linears the run quantized (the rest were kept FP by --skip-unquantizable)."""
    rec = json.loads((out / "record.json").read_text())
    kept = [n for n in rec["report"].get("kept_fp", {}) if ".layers." in n]
    quantized = [n for n in rec["quantized"] if ".layers." in n]
    return {"linears_quantized": len(quantized), "linears_total": len(quantized) + len(kept),
            "linears_left_fp": kept}


def run_method(a, scheme: str, method: str, final_loss: str, out: Path) -> dict:
    """One uninterrupted `lfq-export quantize` process: its wall time is what a user waits."""
    wall, rss = _checked(_quantize_cmd(a, scheme, method, final_loss, out, "--overwrite"))
    return _run_info(out, wall, rss)


def run_autoround(a, scheme: str, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "autoround_run.py"), "--model", a.model, "--scheme", scheme,
           "--calib", a.calib, "--calib-field", a.calib_field, "--nsamples", str(a.nsamples), "--seqlen",
           str(a.seqlen), "--iters", str(a.iters), "--seed", str(a.seed), "--out", str(out)]
    wall, rss, r = _peak_rss_mb_of(cmd)
    if r.returncode != 0:
        raise RuntimeError(f"auto-round failed:\n{r.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": rss, **json.loads((out / "autoround.json").read_text())}


def autoround_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import auto_round"], capture_output=True).returncode == 0


def main() -> None:
    a = parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from lfq_export.evaluate import EvalOptions, FPReference, evaluate_model, plot_kl_by_position
    from lfq_export.model_io import resolve_model
    from lfq_export.record import QuantizedModel
    from lfq_export.simulate import simulate

    a.out.mkdir(parents=True, exist_ok=True)
    prompts_file = a.out / "prompts.txt"
    if a.quick:
        prompts_file.write_text("\n".join(STORY_PROMPTS[: a.prompts]) + "\n")
    else:
        qs = [json.loads(line)["question"].replace("\n", " ") for line in GSM8K.read_text().splitlines()[: a.prompts]]
        prompts_file.write_text("\n".join(qs) + "\n")
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    # runs are comparable when everything but the list of runs matches: more schemes or methods can be
    # added to an existing results.json later
    listing = ("schemes", "methods", "no_autoround")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in listing}
    if {k: v for k, v in results.get("settings", settings).items() if k not in listing} != settings:
        raise SystemExit(f"{results_path} was made with other settings; use another --out")
    results["settings"] = settings
    results["machine"] = _machine()
    runs = results.setdefault("runs", {})

    torch.manual_seed(a.seed)
    src = resolve_model(a.model)
    fp_model = src.load_model()
    tok = src.tokenizer()
    opts = EvalOptions(text=WIKI, max_tokens=a.eval_tokens, seqlen=512 if not a.quick else 256,
                       prompts=prompts_file, gen_tokens=a.gen_tokens, chat=not a.quick, progress=False)
    print("building FP reference (windows + greedy generations)...", flush=True)
    ref = FPReference.build(fp_model, tok, opts)
    with_ar = not a.no_autoround and autoround_available()
    plan = []  # scheme by scheme, so the runs whose times are compared ran close together
    for s in a.schemes:
        plan += [(s, "rtn", "mse")] + [(s, m, fl) for m in a.methods.split(",") for fl in ("mse", "ce")]
        plan += [(s, "autoround", "-")] if with_ar else []
    for scheme, method, final_loss in plan:
        key = f"{scheme}|{method}|{final_loss}"
        if key in runs:
            continue
        out = a.out / "runs" / key.replace("|", "_")
        print(f"== {key}", flush=True)
        if method == "autoround":
            info = run_autoround(a, scheme, out)
            qmodel = AutoModelForCausalLM.from_pretrained(str(out / "fakequant"), dtype=torch.float32).eval()
        else:
            info = run_method(a, scheme, method, final_loss, out)
            qmodel = simulate(QuantizedModel.load(out))
        metrics = evaluate_model(ref, qmodel)
        runs[key] = {"scheme": scheme, "method": method, "final_loss": final_loss, **info, **metrics}
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in runs[key].items() if not isinstance(v, (list, dict))}), flush=True)
    results["fp"] = {"ppl": runs[next(iter(runs))]["ppl_fp"] if runs else None}
    results_path.write_text(json.dumps(results, indent=1))
    write_table(results, a.out / "results.md")
    for s in a.schemes:
        curves = {f"{r['method']} {r['final_loss']}".replace(" -", ""): r["kl_by_position"]
                  for r in runs.values() if r["scheme"] == s and "kl_by_position" in r}
        plot_kl_by_position(curves, a.out / f"kl_by_position_{s}.png", title=f"KL(FP‖Q) by position, {s}")
    print((a.out / "results.md").read_text())


def _machine() -> dict:
    """The CPU the times were measured on and the compute dtype `auto` resolves to there."""
    import platform

    import torch

    from lfq_export.quantize import resolve_compute_dtype

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "compute_dtype": resolve_compute_dtype("auto", "cpu")}


def write_table(results: dict, path: Path) -> None:
    rows = ["| scheme | method | final block | WikiText-2 ppl | KL mean | top-1 | gen KL | gen top-1 | "
            "greedy prefix | quant time (s) | time / auto-round | final/MSE block time | peak RSS (MB) | "
            "linears quantized |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ar_wall = {r["scheme"]: r["wall_s"] for r in results["runs"].values() if r["method"] == "autoround"}
    for r in results["runs"].values():
        ratio = (r["final_block_seconds"] / r["block_seconds_mean"]
                 if r.get("final_block_seconds") and r.get("block_seconds_mean") else None)
        vs_ar = r["wall_s"] / ar_wall[r["scheme"]] if r["scheme"] in ar_wall else None
        rows.append(
            f"| {r['scheme']} | {r['method']} | {r['final_loss']} | {r.get('ppl', float('nan')):.3f} | "
            f"{r.get('kl_mean', float('nan')):.4f} | {r.get('top1_agreement', float('nan')):.3f} | "
            f"{r.get('gen_kl_mean', float('nan')):.4f} | {r.get('gen_top1_agreement', float('nan')):.3f} | "
            f"{r.get('gen_prefix_match_mean', float('nan')):.1f} | {r['wall_s']:.0f} | "
            f"{'' if vs_ar is None else f'{vs_ar:.2f}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('linears_quantized', '?')}/{r.get('linears_total', '?')} |")
    fp = next(iter(results["runs"].values()), {}).get("ppl_fp")
    rows.append(f"\nFP perplexity: {fp:.3f}" if fp else "")
    m = results.get("machine")
    if m:
        rows.append(f"\nMachine: {m['cpu']}, {m['threads']} threads, compute dtype {m['compute_dtype']}")
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
