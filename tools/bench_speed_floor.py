"""How far a whole lfq-export run is from the least any block-wise learner pays on this machine,
measured side by side with auto-round.

    python tools/bench_speed_floor.py                     # SmolLM2-135M-Instruct, W3g64, OmniQuant + LFQ (~10 min)
    python tools/bench_speed_floor.py --no-runs           # only the block measurements (~2 min)

In one invocation:
- one uninterrupted `lfq-export quantize` run and one auto-round run, with bench_quality.py's settings
  and code (same windows, steps, batch, length);
- on block L−2's real weights and inputs, timed `--repeats` times alternately: a *plain step* — the FP
  decoder layer with every linear weight learnable, no quantizer at all, MSE to the FP output, fused
  AdamW, at the run's batch, length and compute dtype — the forward, backward and update that any
  block-wise learner (ours, auto-round's SignRound) must do; lfq-export's own block
  (`BlockRunner._optimise_block`, what `quantize` runs); and one propagation of the calibration set
  through the block (a run does 2L − 1 of them: the FP and the quantized trajectories);
- torch.profiler splits the plain step and the propagation into GEMMs, attention and the rest.

The floor of a run is L × iters × plain step + (2L − 1) × propagation: the run with the quantizer's own
cost, start-up and evaluation at zero. Its GEMM and GEMM + attention parts show what is left at zero
cost for everything else. Writes results.json, results.md and speed_floor.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_quality import C4, SMOLLM2, autoround_available, run_autoround, run_method  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SMOLLM2), help="model (default: the SmolLM2-135M-Instruct asset)")
    p.add_argument("--scheme", default="w3g64", help="affine scheme (default w3g64)")
    p.add_argument("--method", default="omniquant", help="base method of the lfq-export run and block (default omniquant)")
    p.add_argument("--final-loss", default="ce", choices=["ce", "mse"], help="final block loss of the whole run")
    p.add_argument("--calib", default=str(C4), help="calibration source (default: the C4 sample)")
    p.add_argument("--calib-field", default="prefix,gold_completion")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="as lfq-export quantize --compute-dtype (default auto)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repetitions of the block measurements")
    p.add_argument("--no-runs", action="store_true", help="skip the two whole runs (block measurements only)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "speed_floor")
    a = p.parse_args(argv)
    a.extra = f"--compute-dtype {a.compute_dtype}"  # bench_quality's run helpers read these
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from blockdata import block_inputs
    from lfq_export.activations import ActivationStore
    from lfq_export.blockwise import BlockRunner, _layer_kwargs
    from lfq_export.calibration import load_calibration, parse_calib
    from lfq_export.model_io import resolve_model
    from lfq_export.quantize import QuantizeOptions, model_shapes
    from lfq_export.schemes import SchemeContext, plan_quantization

    torch.manual_seed(a.seed)
    src = resolve_model(a.model)
    n, hidden, k = src.n_layers, int(src.config.hidden_size), src.n_layers - 2
    ids = load_calibration(parse_calib(a.calib, a.calib_field), src.tokenizer(), a.nsamples, a.seqlen, a.seed)
    inputs = block_inputs(src.load_model(), ids, range(a.nsamples), (k,), hidden)[k]
    opts = QuantizeOptions(scheme=a.scheme, method=a.method, final_loss="mse", iters=a.iters,
                           compute_dtype=a.compute_dtype, progress=False)
    runner = BlockRunner(src, opts.block_settings(), progress=False)
    skeleton = src.skeleton()
    kw = _layer_kwargs(src, skeleton, runner._embedding(skeleton), a.seqlen)[k]
    plan = plan_quantization(a.scheme, SchemeContext(src.adapter, src.config, model_shapes(src)), (), True)
    prefix = src.adapter.block_prefix(k)
    grids = plan.block_grids(prefix)
    cfg = runner.s.block_cfg

    def copy(store: ActivationStore) -> ActivationStore:
        out = ActivationStore(store.shape, torch.float32, None)
        out.set(slice(0, len(store)), store.get(slice(0, len(store))))
        return out

    def propagation():
        """One no-grad pass of the calibration set through the FP block, as `quantize` propagates."""
        store, block = copy(inputs), runner._fp_block(skeleton, k)
        return lambda: runner._propagate(block, kw, store)

    target = copy(inputs)
    runner._propagate(runner._fp_block(skeleton, k), kw, target)

    def plain_block(iters: int):
        """`iters` plain steps: the FP layer's linear weights learnt directly, nothing quantized."""
        block = runner._fp_block(skeleton, k)
        block.requires_grad_(False)
        params = [block.get_submodule(name[len(prefix):]).weight for name in grids]
        for w in params:
            w.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
        gen = torch.Generator().manual_seed(a.seed)

        def steps() -> None:
            for _ in range(iters):
                idx = torch.randperm(len(inputs), generator=gen)[: cfg.batch_size].tolist()
                with runner._autocast():
                    y = block(inputs.get(idx), **kw)
                torch.nn.functional.mse_loss(y.float(), target.get(idx)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return steps

    def our_block():
        """lfq-export's MSE block: learners, steps, evaluation and finalisation, no propagation."""
        block, q_in = runner._fp_block(skeleton, k), copy(inputs)
        return lambda: runner._optimise_block(block, k, grids, kw, q_in, target, None)

    plain_block(3)()  # warm-up: oneDNN primitives, allocator
    times: dict[str, list[float]] = {"plain step": [], "lfq-export block": [], "propagation": []}
    for r in range(a.repeats):
        times["plain step"].append(_timed(plain_block(a.iters)) / a.iters)
        times["lfq-export block"].append(_timed(our_block()))
        times["propagation"].append(_timed(propagation()))
        print(f"repeat {r + 1}: " + ", ".join(f"{key} {v[-1]:.3f} s" for key, v in times.items()), flush=True)
    best = {key: min(v) for key, v in times.items()}
    split = {"plain step": _split(plain_block(10)), "propagation": _split(propagation())}

    runs: dict[str, dict] = {}
    if not a.no_runs:
        a.out.mkdir(parents=True, exist_ok=True)
        print("== lfq-export run", flush=True)
        runs["lfq-export"] = run_method(a, a.scheme, a.method, a.final_loss, a.out / "run_lfq_export")
        if autoround_available():
            print("== auto-round run", flush=True)
            runs["auto-round"] = run_autoround(a, a.scheme, a.out / "run_autoround")
    result = summarise(a, n, best, split, runs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"args": {key: str(v) for key, v in vars(a).items()},
                                                    "times": times, "best": best, "split": split,
                                                    "runs": runs, **result}, indent=1))
    (a.out / "results.md").write_text(result["table"] + "\n")
    plot(result["rows"], runs.get("auto-round", {}).get("wall_s"), a.out / "speed_floor.png")
    print(result["table"])
    return 0


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _split(fn) -> dict[str, float]:
    """Shares of self CPU time in GEMMs, attention (forward and backward) and everything else."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    parts = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name = ev.key
        part = ("gemm" if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
                else "attention" if "scaled_dot_product" in name else "other")
        parts[part] += ev.self_cpu_time_total
    total = sum(parts.values()) or 1.0
    return {key: v / total for key, v in parts.items()}


def summarise(a, n: int, best: dict[str, float], split: dict[str, dict[str, float]], runs: dict) -> dict:
    """The floor of a whole run from the block measurements, beside the measured runs."""
    steps = n * a.iters * best["plain step"]
    props = (2 * n - 1) * best["propagation"]
    floor = {part: steps * split["plain step"][part] + props * split["propagation"][part]
             for part in ("gemm", "attention", "other")}
    rows: list[tuple[str, float]] = []
    if "auto-round" in runs:
        rows.append(("auto-round run (measured)", runs["auto-round"]["wall_s"]))
    if "lfq-export" in runs:
        rows.append((f"lfq-export run (measured; {a.method}, final loss {a.final_loss})", runs["lfq-export"]["wall_s"]))
    rows += [
        ("floor: L × iters × plain step + (2L−1) × propagation", steps + props),
        ("GEMMs + attention of the floor", floor["gemm"] + floor["attention"]),
        ("GEMMs of the floor", floor["gemm"]),
    ]
    ar = runs.get("auto-round", {}).get("wall_s")
    lines = ["| | seconds | × auto-round |", "|---|---|---|"]
    lines += [f"| {name} | {sec:.0f} | {sec / ar:.2f} |" if ar else f"| {name} | {sec:.0f} | — |" for name, sec in rows]
    ours_step = best["lfq-export block"] / a.iters
    lines += ["", "| per block L−2 | best of repeats | GEMM | attention | rest |", "|---|---|---|---|---|",
              _part_row("plain step (ms)", 1e3 * best["plain step"], split["plain step"]),
              f"| lfq-export block / iters (ms; steps, evaluation, finalisation) | {1e3 * ours_step:.1f} | | | |",
              _part_row("propagation of the calibration set (s)", best["propagation"], split["propagation"])]
    return {"rows": rows, "floor_parts": floor, "table": "\n".join(lines),
            "ours_over_plain_step": ours_step / best["plain step"]}


def _part_row(name: str, value: float, shares: dict[str, float]) -> str:
    return (f"| {name} | {value:.3g} | {shares['gemm']:.0%} | {shares['attention']:.0%} | "
            f"{shares['other']:.0%} |")


def plot(rows: list[tuple[str, float]], autoround_s: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.2))
    names = [name for name, _ in rows][::-1]
    ax.barh(names, [sec for _, sec in rows][::-1], color="#4c72b0")
    if autoround_s and math.isfinite(autoround_s):
        ax.axvline(autoround_s / 2, color="#c44e52", linestyle="--", label="½ × auto-round (the target)")
        ax.legend(loc="lower right")
    ax.set_xlabel("seconds")
    ax.set_title("A whole run against its floor on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
