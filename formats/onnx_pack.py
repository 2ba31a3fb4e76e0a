"""Pack one quantized linear into `com.microsoft::MatMulNBits` inputs, without re-rounding anything.

MatMulNBits (ONNX Runtime contrib op, domain `com.microsoft`) computes `Y = A · Wᵀ` with

    W[n, k] = scales[n, k // block_size] · (q[n, k] − zp[n, k // block_size])

- `B` uint8 `[N, k_blocks, block_size·bits/8]`: codes LSB-first along K inside each block
  (4-bit: even k in the low nibble; 2-bit: k mod 4 at bits 2·(k mod 4)); a last partial block is
  padded with zero codes, which the op ignores.
- `scales` `[N, k_blocks]` in the activation dtype (fp32 here by default; fp16 scales widen exactly).
- `zero_points` uint8 `[N, ceil(k_blocks·bits/8)]`, the same LSB-first packing along the blocks;
  absent ⇒ `2^(bits−1)` for every block.
- bits ∈ {2, 4, 8}; block_size a power of two ≥ 16 (MLAS has fast kernels up to 256).

What we store, per grid:
- `affine` b ∈ {2, 4, 8}: codes, fp16 scales and integer zeros as they are; symmetric grids omit the
  zero points (their zero 2^(b−1) is the op's default).
- `affine` b = 3: codes in a 4-bit container (values 0..7), zero points always written (a 3-bit
  symmetric zero is 4, the 4-bit default would be 8).
- group size G ∈ {32, 64, 128}: block_size = G. Per-channel (one group per row): block_size = the
  largest power of two in [16, 256] dividing K, with the row's scale/zero repeated in every block
  (identical values, one fast kernel); if 16 does not divide K, one padded block of the next power
  of two ≥ K.
- other grids with a fixed integer zero and one effective scale per power-of-two group (GGUF
  q4_0/q5_0/q8_0/q3_k/q6_k style): through `grid.effective`, after checking per tensor that
  `scale·(q − zero)` reproduces `grid.dequantize` bit for bit. Grids with a float offset
  (`d·q + m`: q4_1/q5_1/q2_k/q4_k/q5_k) are refused: see `FLOAT_ZERO_REASON`.

The packer checks its own output once (`W` above == `QuantizedTensor.dequantize()` bitwise) before
anything is written; `verify` checks the written file again with the independent `unpack_onnx`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from lfq_export.errors import FormatError
from lfq_export.grids import AffineGrid, Grid
from lfq_export.record import QuantizedTensor

__all__ = [
    "MNB_BITS",
    "MnbWeight",
    "FLOAT_ZERO_REASON",
    "container_bits",
    "block_size_for",
    "grid_reason",
    "pack_tensor",
    "concat_rows",
]

#: bit widths ONNX Runtime's CPU kernel accepts ("Only 2b, 4b and 8b quantization is supported")
MNB_BITS = (2, 4, 8)
#: MLAS has packed kernels for these block lengths; larger blocks fall back to dequantize-then-sgemm
_FAST_BLOCKS = (256, 128, 64, 32, 16)

FLOAT_ZERO_REASON = (
    "its offset form d·q + m needs a float zero point, and ORT evaluates float zero points as "
    "q·s + fl(−s·zp): q = 0 gives fl(−d·zp), which equals m for no fp32 zp in 11.2% of fp16 (d, m) "
    "mantissa pairs (exhaustive check in formats/onnx_float_zp.py; about as often for k-quant sub-block "
    "products), so such groups cannot be stored exactly; 8-bit containers take no float zero points on CPU"
)


@dataclass
class MnbWeight:
    """The inputs of one MatMulNBits node (one linear, or several fused along N).

    Attributes:
        K, N: in and out features.
        bits: container width (2, 4 or 8).
        block_size: quantization block along K.
        B: uint8 `[N, k_blocks, block_size·bits/8]`.
        scales: float32 `[N, k_blocks]` (cast to the activation dtype when written).
        zero_points: uint8 `[N, ceil(k_blocks·bits/8)]`, or None for the default `2^(bits−1)`.
        rows: (HF module name, first row, end row) of every linear held, in N order.
        notes: how the grid was mapped (for the export report).
    """

    K: int
    N: int
    bits: int
    block_size: int
    B: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    rows: list[tuple[str, int, int]] = field(default_factory=list)
    notes: tuple[str, ...] = ()

    @property
    def k_blocks(self) -> int:
        return self.B.shape[1]

    def signature(self) -> tuple[int, int, int, bool]:
        """Weights with equal signatures can share one node (concatenated along N)."""
        return (self.K, self.bits, self.block_size, self.zero_points is not None)


# ---- capability ----------------------------------------------------------------------------
def container_bits(bits: int) -> int | None:
    """The narrowest MatMulNBits width holding `bits`-bit codes, or None."""
    for b in MNB_BITS:
        if bits <= b:
            return b
    return None


def block_size_for(group: int, in_features: int) -> int:
    """MatMulNBits block_size for groups of `group` elements in rows of `in_features`.

    A power-of-two group ≥ 16 is its own block. A whole-row group (per-channel) becomes the largest
    fast block dividing the row (the row's parameters repeat per block), else one padded block."""
    if group != in_features:
        if group >= 16 and group & (group - 1) == 0:
            return group
        raise FormatError(f"group size {group} is not a power of two ≥ 16 (MatMulNBits block_size)")
    for b in _FAST_BLOCKS:
        if in_features % b == 0:
            return b
    return 1 << max(4, (in_features - 1).bit_length())


def grid_reason(grid: Grid) -> str | None:
    """None if MatMulNBits stores `grid` exactly, else the reason (one line)."""
    if isinstance(grid, AffineGrid):
        return None if container_bits(grid.bits) else f"{grid.bits}-bit codes do not fit a 2/4/8-bit container"
    if container_bits(grid.bits) is None:
        return f"{grid.name}: {grid.bits}-bit codes do not fit a 2/4/8-bit MatMulNBits container"
    if grid.fixed_zero is None:
        return f"{grid.name}: {FLOAT_ZERO_REASON}"
    return _probe_reason(grid)


@lru_cache(maxsize=None)
def _probe_reason(grid: Grid) -> str | None:
    """Check on a sample that a fixed-zero grid's dequantization is one product `s·(q − z)`.

    The grid's code is the authority on its evaluation order (two-level scales, say); a grid that
    rounds differently is refused here, before any quantization, instead of failing at export."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=gen) * 0.05
    try:
        params = grid.init_params(w)
        codes = grid.quantize(w, params)
        _per_group(grid, codes, params)
        exact = _spec_dequant_matches(grid, codes, params)
    except Exception as e:  # noqa: BLE001 - another module's grid: any failure is a refusal, not a crash
        return f"{grid.name}: not storable as MatMulNBits ({type(e).__name__}: {e})"
    if not exact:
        return f"{grid.name}: its dequantization is not one fp32 product s·(q − z) as MatMulNBits computes it"
    return None


# ---- packing -------------------------------------------------------------------------------
def _per_group(grid: Grid, codes: torch.Tensor, params: dict) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per finest group: float32 scale `[N, groups]`, integer zero `[N, groups]` (None = the grid's
    fixed zero is the container default), and the group size."""
    n, k = codes.shape
    g = grid.group_size_for(k)
    bits = container_bits(grid.bits)
    assert bits is not None
    if isinstance(grid, AffineGrid):
        scale = params["scale"].to(torch.float32).numpy()
        zero = None if grid.sym else params["zero"].numpy().astype(np.int64)
        if grid.sym and grid.fixed_zero != 1 << (bits - 1):
            zero = np.full(scale.shape, grid.fixed_zero, np.int64)  # 3-bit sym: zero 4 ≠ 4-bit default 8
        return scale, zero, g
    s, z = grid.effective(params)
    scale = s.detach().to(torch.float32).reshape(n, k // g).numpy()
    zf = z.detach().to(torch.float32).reshape(n, k // g).numpy()
    if not np.array_equal(zf, np.round(zf)) or zf.min() < 0 or zf.max() > (1 << bits) - 1:
        raise FormatError(f"{grid.name}: zero points are not integers in [0, {(1 << bits) - 1}]")
    zero = zf.astype(np.int64)
    if np.all(zero == 1 << (bits - 1)):
        zero = None
    return scale, zero, g


def _spec_dequant_matches(grid: Grid, codes: torch.Tensor, params: dict) -> bool:
    scale, zero, g = _per_group(grid, codes, params)
    bits = container_bits(grid.bits)
    n, k = codes.shape
    z = np.full(scale.shape, 1 << (bits - 1), np.float32) if zero is None else zero.astype(np.float32)
    q = codes.numpy().astype(np.float32).reshape(n, k // g, g)
    w = (scale[..., None] * (q - z[..., None])).reshape(n, k)
    ref = grid.dequantize(codes, params).detach().to(torch.float32).numpy()
    return np.array_equal(w.view(np.uint32), ref.view(np.uint32))


def _pack_lsb(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis LSB-first, `8 // bits` values per byte (zero-padded to whole bytes)."""
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    v = values.astype(np.uint8)
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= v[..., j] << np.uint8(bits * j)
    return out


def pack_tensor(qt: QuantizedTensor, scale_dtype: np.dtype = np.float32) -> MnbWeight:
    """MatMulNBits inputs for one quantized linear; raises `FormatError` if not exact."""
    grid = qt.grid
    why = grid_reason(grid)
    if why:
        raise FormatError(f"{qt.name}: {why}")
    bits = container_bits(grid.bits)
    assert bits is not None
    n, k = qt.shape
    scale, zero, g = _per_group(grid, qt.codes, qt.params)
    bs = block_size_for(g, k)
    rep = max(1, g // bs)  # per-channel rows repeat their parameters in every block
    kb = -(-k // bs)
    scale_b = np.repeat(scale, rep, axis=1)[:, :kb]
    zero_b = None if zero is None else np.repeat(zero, rep, axis=1)[:, :kb]
    _check_scales(qt.name, scale_b, scale_dtype)
    q = qt.codes.numpy()
    if kb * bs != k:
        q = np.concatenate([q, np.zeros((n, kb * bs - k), np.uint8)], axis=1)
    B = _pack_lsb(q.reshape(n, kb, bs), bits)
    zp = None if zero_b is None else _pack_lsb(zero_b, bits)
    mw = MnbWeight(k, n, bits, bs, B, scale_b.astype(np.float32), zp, [(qt.name, 0, n)],
                   notes=_notes(grid, bits, bs, g, k))
    _self_check(qt, mw, zero_b)
    return mw


def _check_scales(name: str, scales: np.ndarray, scale_dtype: np.dtype) -> None:
    if not np.isfinite(scales).all():
        raise FormatError(f"{name}: non-finite scale")
    if np.dtype(scale_dtype) != np.float32:
        back = scales.astype(scale_dtype).astype(np.float32)
        if not np.array_equal(back, scales):
            raise FormatError(f"{name}: scales are not exactly representable in {np.dtype(scale_dtype).name}; "
                              "export with --onnx-dtype float32")


def _self_check(qt: QuantizedTensor, mw: MnbWeight, zero_b: np.ndarray | None) -> None:
    """The op's formula on our packed parameters equals the record's dequantization bitwise."""
    n, k = qt.shape
    bs, kb = mw.block_size, mw.k_blocks
    z = np.full((n, kb), 1 << (mw.bits - 1), np.float32) if zero_b is None else zero_b.astype(np.float32)
    q = np.zeros((n, kb * bs), np.float32)
    q[:, :k] = qt.codes.numpy()
    w = (mw.scales[..., None] * (q.reshape(n, kb, bs) - z[..., None])).reshape(n, kb * bs)[:, :k]
    ref = qt.dequantize().to(torch.float32).numpy()
    if not np.array_equal(w.view(np.uint32), ref.view(np.uint32)):
        bad = int((w != ref).sum())
        raise FormatError(f"{qt.name}: {qt.grid.name} is not exactly s·(q − z) per block ({bad} elements differ); "
                          "this grid cannot be exported to onnx")


def _notes(grid: Grid, bits: int, bs: int, g: int, k: int) -> tuple[str, ...]:
    notes = []
    if grid.bits != bits:
        notes.append(f"{grid.bits}-bit codes stored exactly in the {bits}-bit container")
    if g == k and k > bs:
        notes.append(f"per-channel rows of {k} stored as blocks of {bs} with the row's scale/zero repeated")
    if g == k and k < bs:
        notes.append(f"per-channel rows of {k} stored as one padded block of {bs}")
    return tuple(notes)


def concat_rows(weights: list[MnbWeight]) -> MnbWeight:
    """Fuse weights that read the same input into one node, concatenated along N (exact: rows are
    independent in B, scales and zero points)."""
    first = weights[0]
    if any(w.signature() != first.signature() for w in weights):
        raise ValueError("only weights with equal K, bits, block size and zero-point presence can be fused")
    rows, off = [], 0
    for w in weights:
        rows += [(name, a + off, b + off) for name, a, b in w.rows]
        off += w.N
    zps = [w.zero_points for w in weights]
    return MnbWeight(
        first.K, off, first.bits, first.block_size,
        np.concatenate([w.B for w in weights]), np.concatenate([w.scales for w in weights]),
        None if zps[0] is None else np.concatenate(zps), rows,
        notes=tuple(dict.fromkeys(n for w in weights for n in w.notes)),
    )
