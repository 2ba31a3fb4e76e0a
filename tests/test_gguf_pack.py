"""GGUF byte packers: every grid's bytes, read back by gguf-py's independent dequantizer, give the
grid's weights bit for bit; AffineGrid containers; refusals; a few hand-computed blocks."""

from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from formats.gguf_pack import GGUF_KIND_TYPES, ggml_type_for, pack_tensor
from lfq_export.errors import FormatError
from lfq_export.grids import AffineGrid
from lfq_export.grids.gguf import GGUF_GRIDS

from test_gguf_grids import bits, edge_weights, rtn  # noqa: E402  (same tests/ directory)

AFFINE = [AffineGrid(b, g, sym) for b, g, sym in itertools.product((2, 3, 4, 8), (0, 32, 64, 128), (False, True))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are small: one intra-op thread is faster and immune to a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gguf_py(data: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype)


@pytest.mark.parametrize("search", [False, True], ids=["rtn", "search"])
@pytest.mark.parametrize("kind", list(GGUF_GRIDS))
def test_packed_bytes_dequantize_to_the_grid_weights(kind, search):
    grid, w = GGUF_GRIDS[kind](), edge_weights(rows=40, cols=1536, seed=11)
    codes, params = rtn(grid, w, search)
    qtype, data = pack_tensor(grid, codes, params)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert qtype == GGUF_KIND_TYPES[kind] == ggml_type_for(grid)
    assert data.dtype == np.uint8 and data.shape == (w.shape[0], w.shape[1] // block * type_size)
    assert np.array_equal(bits(_gguf_py(data, qtype)), bits(grid.dequantize(codes, params).numpy()))


@pytest.mark.parametrize("kind", list(GGUF_GRIDS))
def test_float_params_pack_like_storage_params(kind):
    grid, w = GGUF_GRIDS[kind](), edge_weights(rows=12, cols=512, seed=12)
    params = grid.init_params(w)  # float32 tensors holding lattice values
    codes = grid.quantize(w, params)
    stored = grid.to_storage(params, *w.shape)
    assert np.array_equal(pack_tensor(grid, codes, params)[1], pack_tensor(grid, codes, stored)[1])


def test_random_codes_and_params_round_trip():
    """Arbitrary lattice points, not just RTN's: every code value and sub-scale value occurs."""
    g = torch.Generator().manual_seed(13)
    out, inn = 16, 512
    for kind, grid in ((k, GGUF_GRIDS[k]()) for k in GGUF_GRIDS):
        codes = torch.randint(0, grid.qmax + 1, (out, inn), generator=g, dtype=torch.uint8)
        params = {}
        for name, (shape, dtype) in grid.param_spec(out, inn).items():
            if dtype == torch.float16:
                params[name] = (torch.randn(shape, generator=g) * 0.01).to(torch.float16)
            else:
                lo, hi = {"gguf:q3_k": (-32, 31), "gguf:q6_k": (-128, 127), "gguf:q2_k": (0, 15)}.get(kind, (0, 63))
                params[name] = torch.randint(lo, hi + 1, shape, generator=g).to(dtype)
        qtype, data = pack_tensor(grid, codes, params)
        assert np.array_equal(bits(_gguf_py(data, qtype)), bits(grid.dequantize(codes, params).numpy())), kind


# ---- AffineGrid containers ---------------------------------------------------------------------
@pytest.mark.parametrize("grid", AFFINE, ids=lambda g: g.name)
def test_affine_grids_pack_into_the_smallest_exact_container(grid):
    expected = {2: Q.Q4_0, 3: Q.Q4_0, 4: Q.Q4_0 if grid.sym else Q.Q5_0, 8: Q.Q8_0 if grid.sym else None}[grid.bit_width]
    assert ggml_type_for(grid) == expected
    w = edge_weights(rows=12, cols=512, seed=14)[4:]  # one-signed, constant, large, spiky rows
    codes, params = rtn(grid, w, True)
    if expected is None:
        with pytest.raises(FormatError, match="no GGUF type"):
            pack_tensor(grid, codes, params)
        return
    qtype, data = pack_tensor(grid, codes, params)
    assert qtype == expected
    assert np.array_equal(bits(_gguf_py(data, qtype)), bits(grid.dequantize(codes, params).numpy()))


def test_affine_per_channel_needs_rows_in_blocks_of_32():
    grid = AffineGrid(4, 0, True)
    w = torch.randn(4, 48)
    codes, params = rtn(grid, w, False)
    with pytest.raises(FormatError, match="multiple of Q4_0's block of 32"):
        pack_tensor(grid, codes, params)


# ---- refusals ----------------------------------------------------------------------------------
def test_off_lattice_parameters_are_refused():
    grid = GGUF_GRIDS["gguf:q4_0"]()
    codes = torch.zeros(2, 64, dtype=torch.uint8)
    with pytest.raises(FormatError, match="lattice"):
        pack_tensor(grid, codes, {"d": torch.full((2, 2), 0.1)})  # 0.1 is not an fp16 value


def test_codes_beyond_the_grid_are_refused():
    grid = GGUF_GRIDS["gguf:q3_k"]()
    codes = torch.full((1, 256), 8, dtype=torch.uint8)
    with pytest.raises(FormatError, match="exceeds"):
        pack_tensor(grid, codes, {"d": torch.ones(1, 1, dtype=torch.float16), "sc": torch.ones(1, 16, dtype=torch.int8)})
    with pytest.raises(FormatError, match="uint8"):
        pack_tensor(grid, codes.float(), {})


# ---- hand-computed blocks ----------------------------------------------------------------------
def test_q8_0_block_bytes():
    grid = GGUF_GRIDS["gguf:q8_0"]()
    codes = torch.arange(32, dtype=torch.uint8).reshape(1, 32) * 8  # int8 values −128, −120, …, 120
    _, data = pack_tensor(grid, codes, {"d": torch.tensor([[1.0]], dtype=torch.float16)})
    assert data[0, :2].tolist() == [0x00, 0x3C]  # fp16 1.0, little-endian
    assert data[0, 2:].view(np.int8).tolist() == list(range(-128, 128, 8))


def test_q4_0_block_bytes():
    grid = GGUF_GRIDS["gguf:q4_0"]()
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.uint8)
    _, data = pack_tensor(grid, codes, {"d": torch.tensor([[-2.0]], dtype=torch.float16)})
    assert data[0, :2].tolist() == [0x00, 0xC0]  # fp16 −2.0
    assert data[0, 2:].tolist() == [j | (15 - j) << 4 for j in range(16)]


def test_q4_k_scale_bytes():
    """get_scale_min_k4: 6-bit sc/m of sub-blocks 4..7 split into nibbles and top bits."""
    grid = GGUF_GRIDS["gguf:q4_k"]()
    sc = torch.tensor([[1, 2, 3, 4, 63, 17, 33, 48]], dtype=torch.uint8)
    m = torch.tensor([[5, 6, 7, 8, 62, 16, 32, 0]], dtype=torch.uint8)
    one = torch.ones(1, 1, dtype=torch.float16)
    _, data = pack_tensor(grid, torch.zeros(1, 256, dtype=torch.uint8), {"d": one, "dmin": one, "sc": sc, "m": m})
    scales = data[0, 4:16].tolist()
    assert scales[:4] == [1 | 3 << 6, 2 | 1 << 6, 3 | 2 << 6, 4 | 3 << 6]
    assert scales[4:8] == [5 | 3 << 6, 6 | 1 << 6, 7 | 2 << 6, 8 | 0 << 6]
    assert scales[8:] == [15 | 14 << 4, 1 | 0 << 4, 1 | 0 << 4, 0 | 0 << 4]
