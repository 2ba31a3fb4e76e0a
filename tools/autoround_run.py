"""Run auto-round's SignRound with the same calibration windows and settings as an lfq-export run,
and save its quantize-dequantized model for evaluation. Used by bench_quality.py.

    python tools/autoround_run.py --model DIR --scheme w3g64 --calib C4.jsonl --nsamples 64 --seqlen 256 \
        --iters 50 --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--scheme", required=True, help="lfq-export affine scheme name, e.g. w4, w3g64")
    p.add_argument("--calib", required=True)
    p.add_argument("--calib-field", default="text")
    p.add_argument("--nsamples", type=int, required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=2, help="same as lfq-export's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    import torch
    from auto_round import AutoRound

    from lfq_export.calibration import load_calibration, parse_calib
    from lfq_export.model_io import resolve_model
    from lfq_export.schemes import affine_grid_for

    grid = affine_grid_for(a.scheme)
    if grid is None:
        raise SystemExit(f"auto-round comparison needs an affine scheme, not {a.scheme}")
    src = resolve_model(a.model)
    tok = src.tokenizer()
    ids = load_calibration(parse_calib(a.calib, a.calib_field), tok, a.nsamples, a.seqlen, a.seed)
    model = src.load_model()
    t0 = time.perf_counter()
    ar = AutoRound(
        model, tok, bits=grid.bit_width, group_size=grid.group_size or -1, sym=grid.sym,
        dataset=[ids[i : i + 1] for i in range(ids.shape[0])], iters=a.iters, nsamples=a.nsamples,
        seqlen=a.seqlen, batch_size=a.batch_size, seed=a.seed, device_map="cpu", enable_torch_compile=False,
    )
    ar.quantize()
    seconds = time.perf_counter() - t0
    # after quantize() the linears hold auto-round's quantize-dequantize weights (bf16 on CPU);
    # its "fake" export format restores the FP weights (auto-round 0.16.1), so save the model as is
    qmodel = ar.model.to(torch.float32)
    on_grid, off_grid = quantized_linears(qmodel, src, grid)
    # everything auto-round did not quantize goes back to the FP checkpoint's values (its CPU path keeps
    # the model in bf16), so the comparison with lfq-export's simulate() differs only in quantized weights
    quantized = {f"{n}.weight" for n in on_grid}
    with torch.no_grad():
        for name, t in qmodel.state_dict(keep_vars=True).items():
            if name not in quantized and name in src.weight_map:
                t.copy_(src.tensor(name).to(torch.float32))
    qmodel.save_pretrained(str(a.out / "fakequant"), safe_serialization=True)
    tok.save_pretrained(str(a.out / "fakequant"))
    (a.out / "autoround.json").write_text(json.dumps({
        "quantize_seconds": seconds, "torch": torch.__version__, "linears_quantized": len(on_grid),
        "linears_total": len(on_grid) + len(off_grid), "linears_left_fp": off_grid}))


def quantized_linears(model, src, grid) -> tuple[list[str], list[str]]:
    """Which block linears auto-round really quantized: a quantized weight has at most 2^bits distinct
    values in every group of a row (auto-round silently leaves layers whose shapes its kernels do not
    take in full precision, e.g. stories260K's 172-wide MLP)."""
    import torch

    names = src.adapter.linear_names(src.n_layers)
    on, off = [], []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        g = grid.group_size or w.shape[1]
        ok = w.shape[1] % g == 0
        if ok:
            groups = w.reshape(w.shape[0], -1, g).reshape(-1, g)
            ok = all(len(torch.unique(row)) <= 2**grid.bit_width for row in groups[:: max(1, len(groups) // 256)])
        (on if ok else off).append(name)
    return on, off


if __name__ == "__main__":
    main()
