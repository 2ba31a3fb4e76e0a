"""Cost of the LFQ final block against one MSE block, measured side by side on real activations.

    python tools/profile_final_block.py                              # SmolLM2-135M-Instruct, W4, OmniQuant
    python tools/profile_final_block.py --ce-token-fraction 0.25 --profile

The FP model is run once on the calibration windows to get the real inputs of the last two blocks;
then block L−2 is optimised with the block-output MSE and block L−1 with the LFQ soft CE, with the
same method, schedule and batch (`BlockRunner._optimise_block`, exactly what `quantize` runs).
`--trajectory RUN` uses a real run's quantized blocks 0..L−2 for the inputs, as in `quantize`.
Each variant is timed `--repeats` times alternately (the machine is shared); the table gives the
best time of each and the ratio. `--profile` prints a cProfile breakdown of one LFQ block.
Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"
SMOLLM2 = ASSETS / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
C4 = ASSETS / "text" / "c4_realnewslike_sample.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--scheme", default="w4")
    p.add_argument("--method", default="omniquant")
    p.add_argument("--calib", default=str(C4))
    p.add_argument("--calib-field", default="prefix,gold_completion")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--heldout", type=int, default=8, help="extra calibration windows for held-out KL (not trained on)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--trajectory", type=Path, default=None, metavar="RUN",
                   help="feed the blocks the quantized trajectory of this finished run (its blocks 0..L−2), as "
                   "quantize does, instead of the FP one; the targets stay the FP blocks on the FP trajectory")
    p.add_argument("--ce-token-fraction", nargs="+", default=["auto", "1"],
                   help="LFQ variants to time (fraction of each batch's tokens sent through the head, or auto)")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="as lfq-export quantize --compute-dtype (default auto)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="cProfile one LFQ block (the first variant)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_out" / "final_block")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from blockdata import block_inputs, fp_output
    from lfq_export.blockwise import BlockRunner, _layer_kwargs
    from lfq_export.quantize import QuantizeOptions, model_shapes
    from lfq_export.calibration import load_calibration, parse_calib
    from lfq_export.model_io import resolve_model
    from lfq_export.schemes import SchemeContext, plan_quantization

    torch.manual_seed(0)
    src = resolve_model(a.model)
    n = src.n_layers
    ids = load_calibration(parse_calib(a.calib, a.calib_field), src.tokenizer(), a.nsamples + a.heldout,
                           a.seqlen, 0)
    model = src.load_model()
    hidden = int(src.config.hidden_size)

    def inputs(net, rows: range):
        return block_inputs(net, ids, rows, (n - 2, n - 1), hidden)

    rows_train, rows_held = range(a.nsamples), range(a.nsamples, a.nsamples + a.heldout)
    fp_train, fp_held = inputs(model, rows_train), inputs(model, rows_held)  # the targets' inputs
    train, held = fp_train, fp_held  # the student's inputs
    if a.trajectory is not None:  # as in a real run: blocks 0..L−2 already quantized (that run's codes)
        from lfq_export.record import QuantizedModel
        from lfq_export.simulate import simulate

        qmodel = simulate(QuantizedModel.load(a.trajectory))
        train, held = inputs(qmodel, rows_train), inputs(qmodel, rows_held)
        del qmodel
    del model
    plan = plan_quantization(a.scheme, SchemeContext(src.adapter, src.config, model_shapes(src)), (), True)

    def variant(name: str, fraction: float) -> tuple[float, dict[str, float]]:
        """name: `mse` (block L−2, the reference cost), `mse-final` or `ce` (block L−1)."""
        loss = "ce" if name == "ce" else "mse"
        opts = QuantizeOptions(scheme=a.scheme, method=a.method, final_loss=loss, iters=a.iters, lr=a.lr,
                               ce_token_fraction=fraction, compute_dtype=a.compute_dtype, progress=False)
        runner = BlockRunner(src, opts.block_settings(), progress=False)
        skeleton = src.skeleton()
        k = n - 2 if name == "mse" else n - 1
        kw = _layer_kwargs(src, skeleton, runner._embedding(skeleton), a.seqlen)[k]
        block = runner._fp_block(skeleton, k)
        target, held_target = (fp_output(block, kw, s[k]) for s in (fp_train, fp_held))
        head = runner._logit_head(skeleton) if k == n - 1 else None
        grids = plan.block_grids(src.adapter.block_prefix(k))
        t = time.perf_counter()
        runner._optimise_block(block, k, grids, kw, train[k], target, head if loss == "ce" else None)
        seconds = time.perf_counter() - t
        quality = (runner._evaluate(block, kw, held[k], held_target, head, list(range(a.heldout)))
                   if head is not None else {})
        return seconds, quality

    fractions = [None if f == "auto" else float(f) for f in a.ce_token_fraction]
    variants = [("mse", 1.0), ("mse-final", 1.0)] + [("ce", f) for f in fractions]
    times: dict[str, list[float]] = {f"{v} {f}": [] for v, f in variants}
    quality: dict[str, dict[str, float]] = {}
    for _ in range(a.repeats):
        for v, f in variants:
            seconds, quality[f"{v} {f}"] = variant(v, f)
            times[f"{v} {f}"].append(seconds)
            print(f"{v} token fraction {f}: {seconds:.1f} s {quality[f'{v} {f}']}", flush=True)
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(variant, "ce", fractions[0])
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    best = {k: min(v) for k, v in times.items()}
    mse = best["mse 1.0"]
    lines = ["| block | loss | tokens through the head | best time (s) | × MSE block | held-out KL | held-out top-1 |",
             "|---|---|---|---|---|---|---|"]
    for v, f in variants:
        key, q = f"{v} {f}", quality[f"{v} {f}"]
        lines.append(f"| {n - 2 if v == 'mse' else n - 1} | {'ce' if v == 'ce' else 'mse'} | "
                     f"{_fraction_label(v, f, src)} | {best[key]:.1f} | {best[key] / mse:.2f} | "
                     f"{q.get('kl', float('nan')):.4f} | {q.get('top1_agreement', float('nan')):.4f} |")
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                    "times": times, "best": best, "heldout": quality}, indent=1))
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


def _fraction_label(variant: str, fraction: float | None, src) -> str:
    if variant != "ce":
        return "—"
    if fraction is not None:
        return f"{fraction:.0%}"
    from lfq_export.blockwise import auto_token_fraction

    n = src.n_layers - 1
    block = sum(src.tensor(f"{m}.weight").numel() for m in src.adapter.linear_names(src.n_layers)
                if m.startswith(src.adapter.block_prefix(n)))
    head = src.tensor(f"{src.adapter.lm_head}.weight" if f"{src.adapter.lm_head}.weight" in src.weight_map
                      else f"{src.adapter.embedding}.weight").numel()
    return f"auto ({auto_token_fraction(block, head):.1%})"


if __name__ == "__main__":
    sys.exit(main())
