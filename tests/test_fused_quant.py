"""The fused fake-quantization kernel (`grids.fused`) beyond the per-grid checks of test_gguf_grids.py:
rows split over threads give the same bits as one thread, the kernel can be switched off, and the
compute dtype `auto` picks bf16 only on hardware with bf16 matmuls."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lfq_export.grids.fused as fused
from lfq_export.errors import SchemeError
from lfq_export.grids import AffineGrid, fake_quantize
from lfq_export.grids.gguf import GGUF_GRIDS
from lfq_export.quantize import QuantizeOptions, native_bf16, resolve_compute_dtype


def _grads(grid, w0, s0, z0, d0, g_out):
    w = w0.clone().requires_grad_()
    scale = s0.clone().requires_grad_()
    zero = None if grid.symmetric else z0.clone().requires_grad_()
    d = d0.clone().requires_grad_()
    out = fake_quantize(grid, w, grid.project(scale, zero), d)
    (out * g_out).sum().backward()
    return [out.detach(), w.grad, scale.grad, d.grad] + ([] if zero is None else [zero.grad])


@pytest.mark.parametrize("grid", [AffineGrid(3, 64), AffineGrid(4, 0, sym=True), GGUF_GRIDS["gguf:q4_k"]()],
                         ids=lambda g: g.name)
def test_threads_give_the_same_bits(grid, monkeypatch):
    """Every output row is computed by exactly one thread in a fixed order: 1, 2 and 3 workers agree
    bit for bit (value and every gradient), and the value is the grid's own dequantization."""
    assert fused.fused_available(torch.zeros(1)), "the fused kernel did not compile (CI has a C compiler)"
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(67, 512, generator=gen) * 0.02  # 67 rows: uneven splits
    s0, z0 = grid.effective(grid.init_params(w0))
    d0 = torch.rand(w0.shape, generator=gen) * 0.2 + 0.9
    g_out = torch.randn(w0.shape, generator=gen)
    results = []
    for n in (1, 2, 3):
        monkeypatch.setattr(fused, "_threads", lambda n=n: n)
        results.append(_grads(grid, w0, s0 * 1.02, z0, d0, g_out))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    params = grid.project(s0 * 1.02, None if grid.symmetric else z0)
    expect = grid.dequantize(grid.choose_codes(w0, params, d0), params)
    assert torch.equal(results[0][0], expect)


def test_kernel_can_be_switched_off():
    """LFQ_EXPORT_FUSED_QUANT=0 keeps the eager implementation (and nothing is compiled)."""
    code = "import torch, lfq_export.grids.fused as f; print(f.fused_available(torch.zeros(1)))"
    env = {**os.environ, "LFQ_EXPORT_FUSED_QUANT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_kernel_refuses_what_it_cannot_take():
    assert not fused.fused_available(torch.zeros(1, dtype=torch.float64))
    assert not fused.fused_available(torch.zeros(1, dtype=torch.bfloat16))


def test_compute_dtype_auto_follows_the_hardware():
    assert resolve_compute_dtype("auto", "cpu") == ("bfloat16" if native_bf16("cpu") else "float32")
    assert resolve_compute_dtype("float32", "cpu") == "float32"
    assert resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(SchemeError):
        resolve_compute_dtype("float8", "cpu")
    expected = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert QuantizeOptions().block_settings().compute_dtype == expected
