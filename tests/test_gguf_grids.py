"""GGUF grids: exactness against ggml's C dequantizers, RTN quality against llama.cpp's own quantizer,
the lattice fixed point, gradients, and edge cases (zero / subnormal / one-signed / large groups).

Tolerance tiers: weights are compared bit for bit (uint32 views); weight MSE is compared with
llama.cpp's reference quantizer at `ours ≤ llama.cpp × (1 + 1e-3)` on a fixed seed (float sums in
another order may flip exact ties, nothing more).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from formats.gguf_pack import GGUF_KIND_TYPES, pack_tensor
from lfq_export.errors import SchemeError
from lfq_export.grids import AffineGrid, fake_quantize, grid_from_dict, registered_grid_kinds, ste_round
from lfq_export.grids.gguf import GGUF_GRIDS

KINDS = list(GGUF_GRIDS)
K_KINDS = [k for k in KINDS if k.endswith("_k")]
LEGACY_KINDS = [k for k in KINDS if not k.endswith("_k")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def edge_weights(rows: int = 24, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of varied magnitude plus the cases that break naive quantizers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w *= 10 ** (torch.rand(rows, 1, generator=g) * 2 - 1)  # row scales 0.1x .. 10x
    w[0] = 0.0  # all-zero row
    w[1, :256] = 0.0  # all-zero super-block
    w[1, 288:320] = 0.0  # all-zero legacy block / sub-blocks
    w[2] *= 1e-4  # super-scales in the fp16 subnormal range
    w[3] *= 1e-7  # d far below the smallest fp16
    w[4, :256] *= 1e-3  # a subnormal super-block next to normal ones
    w[5] = w[5].abs() + 0.01  # all positive
    w[6] = -w[6].abs() - 0.01  # all negative: negative minimums
    w[7, :32] = 0.123  # constant positive group
    w[7, 32:64] = -0.05  # constant negative group
    w[7, 64:80] = 1e-9  # constant tiny sub-block
    w[8] *= 300.0  # large weights
    w[9, ::37] = 1.0  # isolated spikes
    w[10, :16] = 0.0  # a zero sub-block inside a normal super-block
    return w


def rtn(grid, w: torch.Tensor, search: bool):
    params = grid.init_params(w, search=search)
    codes = grid.quantize(w, params)
    return codes, grid.to_storage(params, *w.shape)


def bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


# ---- ggml through ctypes ----------------------------------------------------------------------
class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    """libggml-base bundled with llama-cpp-python (its reference quantizers and dequantizers)."""
    spec = importlib.util.find_spec("llama_cpp")
    path = Path(spec.origin).parent / "lib" / "libggml-base.so" if spec and spec.origin else None
    if path is None or not path.exists():
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    # ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [
        ctypes.c_void_p
    ]
    return lib


def ggml_dequantize(lib, data: np.ndarray, qtype, shape) -> np.ndarray:
    """ggml's C `dequantize_row_*` (type traits' to_float) over a whole packed tensor."""
    data = np.ascontiguousarray(data)
    out = np.zeros(shape, np.float32)
    _TO_FLOAT(lib.ggml_get_type_traits(int(qtype)).contents.to_float)(data.ctypes.data, out.ctypes.data, out.size)
    return out


def llama_cpp_mse(lib, w: torch.Tensor, qtype) -> float:
    """Weight MSE of llama.cpp's reference quantizer (no imatrix): gguf-py for legacy types, ggml for K-quants."""
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    if qtype in {GGUF_KIND_TYPES[k] for k in K_KINDS}:
        data = np.zeros(gguf.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, data.ctypes.data, 0, x.shape[0], x.shape[1], None)
    else:
        data = gguf.quants.quantize(x, qtype)
    return float(((gguf.quants.dequantize(data, qtype) - x) ** 2).astype(np.float64).mean())


def our_mse(grid, w: torch.Tensor, search: bool) -> float:
    codes, params = rtn(grid, w, search)
    return float((grid.dequantize(codes, params) - w).double().pow(2).mean())


# ---- description ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_registered_and_dict_round_trip(kind):
    grid = GGUF_GRIDS[kind]()
    assert kind in registered_grid_kinds() and grid.name == kind
    assert grid_from_dict(grid.to_dict()) == grid and grid_from_dict(grid.to_dict()).kind == kind
    spec = grid.param_spec(4, 512)
    g = grid.group_size_for(512)
    assert g == (16 if kind in ("gguf:q2_k", "gguf:q3_k", "gguf:q6_k") else 32)
    assert grid.row_multiple() == (256 if kind in K_KINDS else 32)
    assert spec["d"] == ((4, 512 // grid.row_multiple()), torch.float16)
    if "sc" in spec:
        assert spec["sc"] == ((4, 512 // g), torch.int8 if grid.symmetric else torch.uint8)
    assert grid.bits == {15: 4, 31: 5, 255: 8, 3: 2, 7: 3, 63: 6}[grid.qmax]


def test_signed_storage_is_expressed_with_fixed_zeros():
    zeros = {k: GGUF_GRIDS[k]().fixed_zero for k in KINDS}
    assert zeros == {"gguf:q4_0": 8, "gguf:q4_1": None, "gguf:q5_0": 16, "gguf:q5_1": None, "gguf:q8_0": 128,
                     "gguf:q2_k": None, "gguf:q3_k": 4, "gguf:q4_k": None, "gguf:q5_k": None, "gguf:q6_k": 32}
    assert GGUF_GRIDS["gguf:q8_0"].qmax == 255


def test_k_quants_refuse_rows_that_do_not_tile():
    with pytest.raises(SchemeError, match="256"):
        GGUF_GRIDS["gguf:q4_k"]().check_shape(576, 576, "blk.0.ffn_gate")
    GGUF_GRIDS["gguf:q4_0"]().check_shape(576, 576, "blk.0.ffn_gate")


# ---- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("search", [False, True], ids=["rtn", "search"])
@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_is_ggml_c_bit_for_bit(ggml, kind, search):
    """Packed bytes → ggml's C dequantizer == grid.dequantize, on every edge case."""
    grid, w = GGUF_GRIDS[kind](), edge_weights()
    codes, params = rtn(grid, w, search)
    ours = grid.dequantize(codes, params)
    assert torch.isfinite(ours).all() and int(codes.max()) <= grid.qmax
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))  # all-zero row stays exactly zero
    qtype, data = pack_tensor(grid, codes, params)
    c_ref = ggml_dequantize(ggml, data, qtype, w.shape)
    assert np.array_equal(bits(c_ref), bits(ours.numpy()))


@pytest.mark.parametrize("kind", KINDS)
def test_fake_quantize_value_is_the_stored_weight(kind):
    """The optimiser's forward value (float params) equals the exported weight (storage params)."""
    grid, w = GGUF_GRIDS[kind](), edge_weights(seed=1)
    params = grid.init_params(w)
    stored = grid.to_storage(params, *w.shape)
    assert torch.equal(fake_quantize(grid, w, params), grid.dequantize(grid.quantize(w, stored), stored))


@pytest.mark.parametrize("search", [False, True], ids=["rtn", "search"])
@pytest.mark.parametrize("kind", KINDS)
def test_init_params_is_a_fixed_point_of_project(kind, search):
    grid, w = GGUF_GRIDS[kind](), edge_weights(seed=2)
    params = grid.init_params(w, search=search)
    again = grid.project(*grid.effective(params))
    assert set(again) == set(params)
    for k in params:
        assert torch.equal(again[k], params[k]), k


@pytest.mark.parametrize("kind", K_KINDS)
def test_k_quant_top_sub_scale_is_pinned(kind):
    """Like llama.cpp, every nonzero super-block uses the end of its sub-scale range."""
    grid, w = GGUF_GRIDS[kind](), edge_weights(seed=3)
    p = grid.init_params(w)
    sc = p["sc"].reshape(w.shape[0], -1, grid.per)
    nz = p["d"] != 0
    if grid.symmetric:
        assert ((sc == -grid.lim).any(-1) == nz).all()
    else:
        assert ((sc == grid.top).any(-1) == nz).all()
        assert ((p["m"].reshape(sc.shape) == grid.top).any(-1) == (p["dmin"] > 0)).all()
        assert (sc[nz] >= 1).all()


# ---- quality against llama.cpp ----------------------------------------------------------------
def _random_weights() -> torch.Tensor:
    return torch.randn(64, 1024, generator=torch.Generator().manual_seed(7)) * 0.02


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_matches_or_beats_llama_cpp_on_random_weights(ggml, kind):
    grid, w = GGUF_GRIDS[kind](), _random_weights()
    ref = llama_cpp_mse(ggml, w, GGUF_KIND_TYPES[kind])
    rtn_mse, search_mse = our_mse(grid, w, False), our_mse(grid, w, True)
    assert rtn_mse <= ref * (1 + 1e-3)
    assert search_mse <= rtn_mse * (1 + 1e-6)
    assert search_mse < 0.98 * ref  # the search finds real gains on gaussian weights


@pytest.fixture(scope="module")
def smollm2_down_proj(smollm2_gguf) -> torch.Tensor:
    """128 rows of SmolLM2-135M's layer-0 ffn_down (576 × 1536, stored Q4_1), read with gguf-py."""
    t = next(t for t in gguf.GGUFReader(smollm2_gguf).tensors if t.name == "blk.0.ffn_down.weight")
    return torch.from_numpy(gguf.quants.dequantize(t.data[:128], t.tensor_type).copy())


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_matches_or_beats_llama_cpp_on_smollm2(ggml, smollm2_down_proj, kind):
    """Real weights. They already sit on a Q4_1 g32 grid: exact ties everywhere (q4_1 reaches 0)."""
    grid, w = GGUF_GRIDS[kind](), smollm2_down_proj
    ref = llama_cpp_mse(ggml, w, GGUF_KIND_TYPES[kind])
    assert our_mse(grid, w, False) <= ref * (1 + 1e-3)
    assert our_mse(grid, w, True) <= ref * (1 + 1e-3)


# ---- learnable path ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_scale_and_zero(kind):
    grid, w = GGUF_GRIDS[kind](), edge_weights(rows=12, seed=4)[4:]  # incl. one-signed and constant rows
    s0, z0 = grid.effective(grid.init_params(w))
    scale = (s0 * 1.01).requires_grad_()
    # a zero point moves the weights only through the codes it pushes out of range (straight-through, the
    # rounding has no gradient): shift it far enough that the top codes clip
    zero = None if grid.symmetric else (z0 + 0.7).requires_grad_()
    wq = fake_quantize(grid, w, grid.project(scale, zero))
    (wq - w).pow(2).sum().backward()
    for t in (scale,) if zero is None else (scale, zero):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _composed_fake_quantize(grid, w, params, divisor=None):
    """The straight-through graph written out op by op (what `fake_quantize` fuses)."""
    s, z = grid.effective(params)
    x = grid.code_coordinates(w, s, z, divisor)
    q = torch.clamp(ste_round(x), 0, grid.qmax).reshape(w.shape)
    return grid.dequantize(q, params)


@pytest.fixture(params=["c-kernel", "eager"])
def straight_through_impl(request, monkeypatch):
    """Both implementations of `fake_quantize`'s fused straight-through function: the C kernel
    (`grids.fused`, which must have compiled here: CI has a C compiler) and the eager fallback."""
    import lfq_export.grids.base as base

    if request.param == "c-kernel":
        assert base.fused_available(torch.zeros(1)), "the fused fake-quantization kernel did not compile"
    else:
        monkeypatch.setattr(base, "fused_available", lambda *t: False)
    return request.param


@pytest.mark.parametrize("divisor", [False, True])
@pytest.mark.parametrize("kind", KINDS + ["affine/b4/ch", "affine/b3/g64", "affine/b4/g32/sym"])
def test_fused_straight_through_gradient_matches_the_composed_graph(kind, divisor, straight_through_impl):
    """`fake_quantize`'s hand-written backward (C kernel and eager) gives the autograd gradient of the
    op-by-op graph for the weight, the scale, the zero and FlexRound's divisor, on every grid (edge rows
    included), and its value bit for bit."""
    if kind.startswith("affine"):
        bits, group, *sym = kind.split("/")[1:]
        grid = AffineGrid(int(bits[1:]), 0 if group == "ch" else int(group[1:]), sym=bool(sym))
    else:
        grid = GGUF_GRIDS[kind]()
    w0 = edge_weights(rows=12, seed=6)
    s0, z0 = grid.effective(grid.init_params(w0))
    d0 = torch.rand(w0.shape, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.9
    g_out = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (_composed_fake_quantize, fake_quantize):
        w = w0.clone().requires_grad_()
        scale = (s0 * 1.05).requires_grad_()
        zero = None if grid.symmetric else (z0 + 0.3).requires_grad_()
        d = d0.clone().requires_grad_() if divisor else None
        out = fn(grid, w, grid.project(scale, zero), d)
        (out * g_out).sum().backward()
        results.append([out.detach()] + [None if t is None else t.grad for t in (w, scale, zero, d)])
    ref, got = results
    assert torch.equal(ref[0], got[0])
    # the composed graph forms the zero's gradient as s·m·g − s·g summed over a group: exactly 0 where no
    # code clips, up to float32 cancellation noise of the size of its terms
    terms = float(s0.abs().max()) * float(g_out.abs().max()) * grid.group_size_for(w0.shape[1])
    for name, r, g in zip(("weight", "scale", "zero", "divisor"), ref[1:], got[1:]):
        if r is not None:
            atol = 1e-6 * terms if name == "zero" else 1e-5 * float(r.abs().max()) + 1e-12
            torch.testing.assert_close(g, r, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_scale_zero_from_range_is_storable_and_finite(kind):
    grid, w = GGUF_GRIDS[kind](), edge_weights(seed=5)
    wg = w.reshape(w.shape[0], -1, grid.group_size_for(w.shape[1]))
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale, zero = grid.scale_zero_from_range(lo, hi)
    params = grid.project(scale, zero)
    grid.to_storage(params, *w.shape)  # exactly representable
    out = fake_quantize(grid, w, params)
    assert torch.isfinite(out).all()
    if kind in K_KINDS and not grid.symmetric:
        assert (zero >= 0).all()  # K-quant minimums are clamped to ≤ 0


def test_symmetric_range_uses_the_long_side():
    """q4_0 codes run from −8 to 7: a positive maximum goes to −8 with a negative scale."""
    grid = GGUF_GRIDS["gguf:q4_0"]()
    s, _ = grid.scale_zero_from_range(torch.tensor([-0.5]), torch.tensor([1.0]))
    assert s.item() == pytest.approx(-1.0 / 8)
    s, _ = grid.scale_zero_from_range(torch.tensor([-1.0]), torch.tensor([0.5]))
    assert s.item() == pytest.approx(1.0 / 8)


@pytest.mark.parametrize("kind", ["gguf:q4_0", "gguf:q4_1", "gguf:q4_k", "gguf:q6_k"])
def test_weights_beyond_fp16_are_refused(kind):
    w = torch.full((1, 256), 1e9)
    w[0, 0] = -1e9
    with pytest.raises(SchemeError, match="fp16"):
        GGUF_GRIDS[kind]().init_params(w)
