"""The affine grid: exact dequantization, storage round trip, RTN quality, learnable path."""

import itertools

import pytest
import torch

from lfq_export.errors import SchemeError
from lfq_export.grids import AffineGrid, fake_quantize, grid_from_dict

ALL = [AffineGrid(b, g, sym) for b, g, sym in itertools.product((2, 3, 4, 8), (0, 32, 64, 128), (False, True))]


def _weights(out=24, inn=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero group
    w[1] *= 1e-6  # tiny weights: scales near the fp16 normal limit
    w[2] = w[2].abs() + 0.01  # all-positive row (zero point at the edge)
    return w


@pytest.mark.parametrize("grid", ALL, ids=lambda g: g.name)
def test_dequant_matches_float64_reference(grid):
    w = _weights()
    params = grid.to_storage(grid.init_params(w, search=True), *w.shape)
    codes = grid.quantize(w, params)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= grid.qmax
    got = grid.dequantize(codes, params)
    gs = grid.group_size_for(w.shape[1])
    s = params["scale"].double().repeat_interleave(gs, dim=1)
    z = (params["zero"].double() if not grid.sym else torch.full_like(params["scale"].double(), grid.fixed_zero))
    ref = s * (codes.double() - z.repeat_interleave(gs, dim=1))
    # the product is exact in float32: the float64 reference rounds to the same float32 bits
    assert torch.equal(got, ref.float())
    assert params["scale"].dtype == torch.float16
    assert (params["scale"].float() >= 2.0**-14).all()


@pytest.mark.parametrize("grid", ALL[:8], ids=lambda g: g.name)
def test_round_trip_dict_and_storage(grid):
    assert grid_from_dict(grid.to_dict()) == grid
    w = _weights()
    p = grid.init_params(w)
    stored = grid.to_storage(p, *w.shape)
    assert torch.equal(grid.dequantize(grid.quantize(w, p), p), grid.dequantize(grid.quantize(w, stored), stored))


def test_search_never_worse_than_minmax():
    w = _weights(64, 512, seed=3)
    for grid in (AffineGrid(3, 64), AffineGrid(4, 0), AffineGrid(2, 32, True)):
        err = {}
        for search in (False, True):
            p = grid.init_params(w, search=search)
            err[search] = float((grid.dequantize(grid.quantize(w, p), p) - w).pow(2).sum())
        assert err[True] <= err[False]
        assert err[True] < 0.99 * err[False]  # the search finds real gains on gaussian weights


def test_zero_min_constraint_for_gptq():
    grid = AffineGrid(4, 32, zero_min=1)
    w = _weights()
    p = grid.init_params(w)
    assert int(p["zero"].min()) >= 1


def test_project_keeps_gradients_and_is_idempotent():
    grid = AffineGrid(4, 32)
    w = _weights()
    p0 = grid.init_params(w)
    s, z = grid.effective(p0)
    p1 = grid.project(s, z)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    s = s.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    loss = (fake_quantize(grid, w, grid.project(s, z)) - w).pow(2).sum()
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_refuses_bad_configs_and_shapes():
    with pytest.raises(SchemeError):
        AffineGrid(5, 32)
    with pytest.raises(SchemeError):
        AffineGrid(4, 48)
    with pytest.raises(SchemeError, match=r"mlp.down_proj: input dimension 172 is not a multiple of 64.*per-channel"):
        AffineGrid(4, 64).check_shape(64, 172, "mlp.down_proj")
    with pytest.raises(SchemeError, match="group size 32 divides it"):
        AffineGrid(4, 128).check_shape(64, 96, "x")
