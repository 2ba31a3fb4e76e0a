"""Peak memory of a quantization run versus model size and number of blocks.

lfq-export streams the checkpoint block by block (`safe_open`), so peak RSS is about one block's
weights (FP + learner state) plus the calibration activations, the embedding and — for the LFQ block —
the LM head and the teacher cache; not the whole model. This benchmark shows it:

    python tools/bench_memory.py                 # stories260K, SmolLM2-135M, synthetic 1B, depth sweep
    python tools/bench_memory.py --quick         # small synthetic models only

Each run is `lfq-export quantize --method blockap` (the largest learner state: FP weights, scales and
zeros with Adam moments; LFQ final block; 2 steps per block: memory does not depend on the step count)
in its own process under `/usr/bin/time`. Writes results.json, results.md and bench_memory.png to --out.
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
C4 = ASSETS / "text" / "c4_realnewslike_sample.jsonl"


def synthetic(out: Path, layers: int, hidden: int, inter: int, heads: int, kv: int, vocab: int) -> Path:
    from lfq_export.synthetic import write_random_checkpoint

    d = out / f"synthetic-h{hidden}-l{layers}"
    if not (d / "model.safetensors.index.json").is_file():
        write_random_checkpoint("llama", d, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                                num_heads=heads, num_kv_heads=kv, vocab_size=vocab)
    return d


def n_params(model_dir: Path) -> int:
    from lfq_export.model_io import resolve_model

    src = resolve_model(model_dir)
    total = 0
    for name in src.weight_map:
        shape = src._handle(src.weight_map[name]).get_slice(name).get_shape()
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def run(model: Path | str, out: Path, a) -> dict:
    cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "lfq_export.cli", "quantize", str(model),
           "--scheme", a.scheme, "--method", "blockap", "--iters", "2", "--calib", str(C4), "--calib-field",
           "prefix,gold_completion", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--out", str(out),
           "--overwrite", "--no-progress", "--skip-unquantizable"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    rss_kb, _ = r.stderr.strip().splitlines()[-1].split()
    return {"peak_rss_mb": int(rss_kb) / 1024, "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_out/memory"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scheme", default="w4g64")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, Path | str]] = []
    if not a.quick:
        models += [("stories260K-hf", ASSETS / "models" / "stories260K-hf"),
                   ("SmolLM2-135M", ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf")]
        width = dict(hidden=2048, inter=5632, heads=16, kv=4, vocab=32000)
        depths = (4, 8, 20)
    else:
        width = dict(hidden=512, inter=1408, heads=8, kv=2, vocab=512)
        depths = (2, 4, 8)
    for layers in depths:
        models.append((f"synthetic h{width['hidden']} × {layers} blocks", synthetic(a.out / "models", layers, **width)))
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for label, model in models:
        if label in results:
            continue
        print(f"== {label}", flush=True)
        from lfq_export.model_io import resolve_model

        src = resolve_model(model)
        entry = {"params": n_params(src.path), "blocks": src.n_layers,
                 "checkpoint_mb": sum(f.stat().st_size for f in Path(src.path).glob("*.safetensors")) / 2**20}
        entry.update(run(model, a.out / "runs" / label.replace(" ", "_").replace("×", "x"), a))
        results[label] = entry
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps(entry), flush=True)
    lines = ["| model | parameters | blocks | checkpoint (MB) | peak RSS (MB) | wall (s) |", "|---|---|---|---|---|---|"]
    for label, e in results.items():
        lines.append(f"| {label} | {e['params'] / 1e6:.1f} M | {e['blocks']} | {e['checkpoint_mb']:.0f} | "
                     f"{e['peak_rss_mb']:.0f} | {e['wall_s']:.0f} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, a.out / "bench_memory.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [e["checkpoint_mb"] for e in results.values()]
    ys = [e["peak_rss_mb"] for e in results.values()]
    ax.plot(xs, xs, "--", color="grey", label="whole checkpoint in memory")
    ax.scatter(xs, ys, zorder=3, label="lfq-export peak RSS")
    for (label, e), x, y in zip(results.items(), xs, ys):
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("checkpoint size on disk (MB)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
