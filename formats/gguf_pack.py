"""Byte packers for GGUF tensors: a grid's codes and parameters → ggml block bytes, moved, never re-rounded.

`pack_tensor(grid, codes, params)` returns the ggml type and a uint8 array `[out, row_bytes]` to hand
to `gguf.GGUFWriter.add_tensor(name, data, raw_dtype=qtype)`. Every row is the concatenation of
its blocks; all multi-byte fields are little-endian; `fp16` is IEEE half. Per block (ggml-common.h):

    Q4_0  (32 w, 18 B)  d:fp16 | qs[16]            qs[j] = q[j] | q[j+16] << 4
    Q4_1  (32 w, 20 B)  d:fp16 | m:fp16 | qs[16]
    Q5_0  (32 w, 22 B)  d:fp16 | qh[4] | qs[16]    qh = uint32, bit i = bit 4 of q[i]; qs of the low 4 bits
    Q5_1  (32 w, 24 B)  d:fp16 | m:fp16 | qh[4] | qs[16]
    Q8_0  (32 w, 34 B)  d:fp16 | qs[32]:int8       qs[i] = q[i] − 128
    Q2_K (256 w, 84 B)  scales[16] | qs[64] | d | dmin
                        scales[j] = sc_j | m_j << 4; weight e = 128n + 32k + l → qs[32n + l] bits 2k..2k+1
    Q3_K (256 w, 110 B) hmask[32] | qs[64] | scales[12] | d
                        low 2 bits of q as Q2_K's qs; bit 2 of weight e = 32b + l → hmask[l] bit b;
                        u_j = sc_j + 32 (6 bits): low nibble in scales[j] (j < 8) or the high nibble of
                        scales[j − 8]; its top 2 bits in scales[8 + j % 4] at bit 2·(j // 4)
    Q4_K (256 w, 144 B) d | dmin | scales[12] | qs[128]
                        j < 4: scales[j] = sc_j, scales[j+4] = m_j (6 bits each);
                        j ≥ 4: scales[j+4] = (sc_j & 15) | (m_j & 15) << 4, sc_j >> 4 in bits 6-7 of
                        scales[j−4], m_j >> 4 in bits 6-7 of scales[j]  (ggml get_scale_min_k4);
                        weight e = 64c + 32h + l → qs[32c + l], low nibble if h = 0 else high
    Q5_K (256 w, 176 B) d | dmin | scales[12] | qh[32] | qs[128]
                        qs of the low 4 bits as Q4_K; bit 4 of weight e = 32j + l → qh[l] bit j
    Q6_K (256 w, 210 B) ql[128] | qh[64] | scales[16]:int8 | d
                        weight e = 128n + 64h + t (t < 64): low 4 bits → ql[64n + t], nibble h;
                        weight e = 128n + 32k + l: top 2 bits → qh[32n + l] bits 2k..2k+1

`AffineGrid` (`w = s·(q − z)`, fp16 s) is stored in the smallest exact legacy container, with d = s
repeated for each 32-block of its group (per-channel groups too; in_features % 32 == 0):

    sym 4-bit, and every 2/3-bit grid (q − z ∈ [−8, 7])   → Q4_0, code q − z + 8    4.5 bpw
    asym 4-bit (q − z ∈ [−15, 15])                        → Q5_0, code q − z + 16   5.5 bpw
    sym 8-bit (q − z ∈ [−128, 127])                       → Q8_0, int8 q − z        8.5 bpw
    asym 8-bit: not exact in any GGUF type (q − z spans [−255, 255]) → refused

The bpw cost is the container's, whatever the grid's own size: w4g128 asym (≈ 4.2 bpw in GPTQ-style
storage) takes 5.5 bpw as Q5_0, w2/w3 take 4.5 bpw as Q4_0, w8 sym 8.5 bpw; a group larger than 32
repeats its fp16 scale in every block (16 bits per 32 weights). d·(code − c) equals s·(q − z) bit for
bit because code − c = q − z is the same integer and both products are exact in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lfq_export.errors import FormatError
from lfq_export.grids import AffineGrid, Grid

__all__ = ["ggml_type_for", "pack_tensor", "affine_container", "GGUF_KIND_TYPES"]

Q = GGMLQuantizationType

#: grid kind → ggml type of the GGUF grids
GGUF_KIND_TYPES: dict[str, GGMLQuantizationType] = {
    "gguf:q4_0": Q.Q4_0,
    "gguf:q4_1": Q.Q4_1,
    "gguf:q5_0": Q.Q5_0,
    "gguf:q5_1": Q.Q5_1,
    "gguf:q8_0": Q.Q8_0,
    "gguf:q2_k": Q.Q2_K,
    "gguf:q3_k": Q.Q3_K,
    "gguf:q4_k": Q.Q4_K,
    "gguf:q5_k": Q.Q5_K,
    "gguf:q6_k": Q.Q6_K,
}

#: legacy container → the unsigned code that stands for q − z = 0
_CONTAINER_ZERO = {Q.Q4_0: 8, Q.Q5_0: 16, Q.Q8_0: 128}

Fields = dict[str, np.ndarray]


def affine_container(grid: AffineGrid) -> GGMLQuantizationType | None:
    """Smallest legacy type that holds `grid` exactly, or None (asym 8-bit)."""
    if grid.bit_width in (2, 3) or (grid.bit_width == 4 and grid.sym):
        return Q.Q4_0
    if grid.bit_width == 4:
        return Q.Q5_0
    return Q.Q8_0 if grid.sym else None


def ggml_type_for(grid: Grid) -> GGMLQuantizationType | None:
    """The ggml type that stores `grid` exactly, or None when no GGUF type can."""
    if isinstance(grid, AffineGrid):
        return affine_container(grid)
    return GGUF_KIND_TYPES.get(grid.kind)


def pack_tensor(
    grid: Grid, codes: torch.Tensor, params: dict[str, torch.Tensor]
) -> tuple[GGMLQuantizationType, np.ndarray]:
    """Pack one quantized weight into ggml block bytes.

    Args:
        grid: a GGUF grid (`gguf:*`) or an `AffineGrid` with a legacy container.
        codes: uint8 `[out, in]` in `[0, grid.qmax]`.
        params: the grid's parameters (storage dtypes, or float tensors holding exactly those values).

    Returns:
        `(qtype, data)`: data is uint8 `[out, in / block · bytes_per_block]`;
        `gguf.quants.dequantize(data, qtype)` equals `grid.dequantize(codes, params)` bit for bit.

    Raises:
        FormatError: no GGUF type holds the grid, the row length does not tile into blocks, or the
            codes/params are not on the grid's lattice.
    """
    qtype = ggml_type_for(grid)
    if qtype is None:
        raise FormatError(
            f"{grid.name}: no GGUF type stores this grid exactly (use a gguf:* grid, or affine ≤ 4-bit / sym 8-bit)"
        )
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise FormatError(f"{grid.name}: codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    out, inn = codes.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if inn % block or inn % grid.row_multiple():
        raise FormatError(f"{grid.name}: row length {inn} is not a multiple of {qtype.name}'s block of {block}")
    if int(codes.max()) > grid.qmax:
        raise FormatError(f"{grid.name}: code {int(codes.max())} exceeds the grid maximum {grid.qmax}")
    try:
        stored = grid.to_storage(params, out, inn)
    except AssertionError as e:
        raise FormatError(f"{grid.name}: parameters are not on the grid's lattice ({e})") from None
    q = codes.detach().cpu().numpy()
    fields = {k: v.cpu().numpy() for k, v in stored.items()}
    if isinstance(grid, AffineGrid):
        q, fields = _affine_to_legacy(grid, qtype, q, fields)
    data = _PACKERS[qtype](q.reshape(out, inn // block, block), fields, inn // block)
    assert data.shape == (out, inn // block, type_size), (qtype, data.shape)
    return qtype, np.ascontiguousarray(data.reshape(out, -1))


# ---- AffineGrid → legacy container ------------------------------------------------------------
def _affine_to_legacy(
    grid: AffineGrid, qtype: GGMLQuantizationType, q: np.ndarray, fields: Fields
) -> tuple[np.ndarray, Fields]:
    """Codes `q − z + c` in the container and `d` = the group's scale for each of its 32-blocks."""
    out, inn = q.shape
    g = grid.group_size_for(inn)
    if grid.sym:
        z = np.full(fields["scale"].shape, grid.fixed_zero, dtype=np.int16)
    else:
        z = fields["zero"].astype(np.int16)
    code = q.reshape(out, inn // g, g).astype(np.int16) - z[..., None] + _CONTAINER_ZERO[qtype]
    if code.min() < 0 or code.max() > 2 * _CONTAINER_ZERO[qtype] - 1:  # unreachable for valid codes
        raise FormatError(f"{grid.name}: q − z leaves {qtype.name}'s range")
    d = np.repeat(fields["scale"], g // 32, axis=1)  # [out, in/32] fp16
    return code.reshape(out, inn).astype(np.uint8), {"d": d}


# ---- byte helpers -----------------------------------------------------------------------------
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """fp16 `[..., n]` → its little-endian bytes `[..., n, 2]`."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _bits_at(parts: np.ndarray, width: int, axis: int) -> np.ndarray:
    """OR together `parts[k] << width·k` along `axis` (uint8)."""
    shape = [1] * parts.ndim
    shape[axis] = -1
    shifts = (np.arange(parts.shape[axis], dtype=np.uint8) * width).reshape(shape)
    return np.bitwise_or.reduce(parts << shifts, axis=axis).astype(np.uint8)


def _per_block(f: np.ndarray, nb: int) -> np.ndarray:
    """A per-sub-block field `[out, nb·k]` as `[out, nb, k]`."""
    return f.reshape(f.shape[0], nb, -1)


# ---- legacy blocks: q [out, nb, 32] -----------------------------------------------------------
def _qs4(q: np.ndarray) -> np.ndarray:
    return _nibbles(q[..., :16], q[..., 16:])  # [out, nb, 16]


def _qh5(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")  # [out, nb, 4] = LE uint32


def _pack_q4_0(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"]), _qs4(q)], axis=-1)


def _pack_q4_1(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"]), _f16_bytes(f["m"]), _qs4(q)], axis=-1)


def _pack_q5_0(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"]), _qh5(q), _qs4(q)], axis=-1)


def _pack_q5_1(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"]), _f16_bytes(f["m"]), _qh5(q), _qs4(q)], axis=-1)


def _pack_q8_0(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    return np.concatenate([_f16_bytes(f["d"]), q ^ np.uint8(0x80)], axis=-1)  # uint8 q − 128 as int8


# ---- K-quant super-blocks: q [out, nb, 256] ---------------------------------------------------
def _qs2(q: np.ndarray) -> np.ndarray:
    """2-bit fields: weight 128n + 32k + l → byte 32n + l, bits 2k. `[out, nb, 64]`."""
    out, nb = q.shape[:2]
    return _bits_at((q & 3).reshape(out, nb, 2, 4, 32), 2, axis=3).reshape(out, nb, 64)


def _qs4k(q: np.ndarray) -> np.ndarray:
    """4-bit fields: weight 64c + 32h + l → byte 32c + l, nibble h. `[out, nb, 128]`."""
    out, nb = q.shape[:2]
    x = q.reshape(out, nb, 4, 2, 32)
    return _nibbles(x[..., 0, :], x[..., 1, :]).reshape(out, nb, 128)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit (sc, m) pairs → 12 bytes (ggml get_scale_min_k4 layout). `[out, nb, 12]`."""
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = _nibbles(sc[..., 4:], m[..., 4:])
    return np.concatenate([lo, mid, hi], axis=-1).astype(np.uint8)


def _pack_q2_k(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    scales = _nibbles(_per_block(f["sc"], nb), _per_block(f["m"], nb))
    return np.concatenate([scales, _qs2(q), _f16_bytes(f["d"]), _f16_bytes(f["dmin"])], axis=-1)


def _pack_q3_k(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    out = q.shape[0]
    hmask = _bits_at(((q >> 2) & 1).reshape(out, nb, 8, 32), 1, axis=2)
    u = (_per_block(f["sc"], nb).astype(np.int16) + 32).astype(np.uint8)  # [out, nb, 16] in [0, 63]
    low = _nibbles(u[..., :8], u[..., 8:])
    high = _bits_at((u >> 4).reshape(out, nb, 4, 4), 2, axis=2)  # byte 8 + j%4, bits 2·(j//4)
    return np.concatenate([hmask, _qs2(q), low, high, _f16_bytes(f["d"])], axis=-1)


def _pack_q4_k(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    scales = _scales_k4(_per_block(f["sc"], nb), _per_block(f["m"], nb))
    return np.concatenate([_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), scales, _qs4k(q)], axis=-1)


def _pack_q5_k(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    out = q.shape[0]
    scales = _scales_k4(_per_block(f["sc"], nb), _per_block(f["m"], nb))
    qh = _bits_at(((q >> 4) & 1).reshape(out, nb, 8, 32), 1, axis=2)
    return np.concatenate([_f16_bytes(f["d"]), _f16_bytes(f["dmin"]), scales, qh, _qs4k(q)], axis=-1)


def _pack_q6_k(q: np.ndarray, f: Fields, nb: int) -> np.ndarray:
    out = q.shape[0]
    lo = (q & 0x0F).reshape(out, nb, 2, 2, 64)
    ql = _nibbles(lo[..., 0, :], lo[..., 1, :]).reshape(out, nb, 128)
    qh = _bits_at((q >> 4).reshape(out, nb, 2, 4, 32), 2, axis=3).reshape(out, nb, 64)
    scales = _per_block(f["sc"], nb).astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, _f16_bytes(f["d"])], axis=-1)


_PACKERS: dict[GGMLQuantizationType, Callable[[np.ndarray, Fields, int], np.ndarray]] = {
    Q.Q4_0: _pack_q4_0,
    Q.Q4_1: _pack_q4_1,
    Q.Q5_0: _pack_q5_0,
    Q.Q5_1: _pack_q5_1,
    Q.Q8_0: _pack_q8_0,
    Q.Q2_K: _pack_q2_k,
    Q.Q3_K: _pack_q3_k,
    Q.Q4_K: _pack_q4_k,
    Q.Q5_K: _pack_q5_k,
    Q.Q6_K: _pack_q6_k,
}
