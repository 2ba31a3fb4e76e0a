"""GGUF legacy block types as grids: `gguf:q4_0`, `q4_1`, `q5_0`, `q5_1`, `q8_0` (32 weights per block).

Exact formulas (float32, in ggml's order; `d`, `m` are fp16 per block, widened exactly):

| kind        | codes q  | dequant            | params (per 32-block)   | ggml C twin          | bytes/block |
|-------------|----------|--------------------|-------------------------|----------------------|-------------|
| gguf:q4_0   | [0, 15]  | `d * (q - 8)`      | d fp16                  | dequantize_row_q4_0  | 18 (4.5 bpw)|
| gguf:q5_0   | [0, 31]  | `d * (q - 16)`     | d fp16                  | dequantize_row_q5_0  | 22 (5.5 bpw)|
| gguf:q8_0   | [0, 255] | `d * (q - 128)`    | d fp16                  | dequantize_row_q8_0  | 34 (8.5 bpw)|
| gguf:q4_1   | [0, 15]  | `d * q + m`        | d fp16, m fp16          | dequantize_row_q4_1  | 20 (5.0 bpw)|
| gguf:q5_1   | [0, 31]  | `d * q + m`        | d fp16, m fp16          | dequantize_row_q5_1  | 24 (6.0 bpw)|

`d·(q − z0)` and `d·q` are exact in float32 (11 × ≤ 8 significant bits); `d·q + m` rounds once, in
the addition (so an FMA gives the same). Q8_0 stores `q − 128` as int8. `d` may be negative (the
symmetric types put the group's largest-magnitude weight on the code range's longer side, as
llama.cpp does) and may be an fp16 subnormal. Byte layouts are in `formats/gguf_pack.py`.

Parameter tensors: `d` fp16 `[out, in/32]` (+ `m` fp16 `[out, in/32]` for q4_1/q5_1).

Initialisation (`init_params`): `search=False` is llama.cpp's reference quantizer
(`quantize_row_*_ref`: `d = max/−8`, `max/−16`, `amax/127`, `(max − min)/qmax` with `m = min`),
but with `d`, `m` rounded to fp16 first and the codes chosen nearest on that stored lattice (ggml
picks codes with the unrounded scale), so its weight MSE is not above llama.cpp's (up to float
ties). `search=True` also tries shrunk ranges (and for the symmetric types the no-clip scale of
either sign) and least-squares refits, keeping per block whatever has the lowest exact error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grid, Params, register_grid, ste_fp16
from .gguf_common import (
    FP16_TINY,
    check_fp16_finite,
    nearest_codes,
    safe_divisor,
    signed_absmax,
    signed_range_scale,
)

__all__ = ["GGUFQ4_0", "GGUFQ4_1", "GGUFQ5_0", "GGUFQ5_1", "GGUFQ8_0", "LEGACY_BLOCK"]

#: weights per block of every legacy type
LEGACY_BLOCK = 32

#: range shrink factors tried by `init_params(search=True)`
_SHRINK = torch.linspace(1.0, 0.70, 16)[1:]

#: least-squares refit rounds tried by `init_params(search=True)`
_REFITS = 2

ScaleZero = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class _LegacyGrid(Grid):
    """Common part: one 32-weight block per group, RTN with an optional per-block search."""

    @property
    def name(self) -> str:
        return self.kind

    def group_size_for(self, in_features: int) -> int:
        return LEGACY_BLOCK

    def row_multiple(self) -> int:
        return LEGACY_BLOCK

    def init_params(self, w: torch.Tensor, search: bool = False) -> Params:
        w = w.detach().float()
        wg = w.reshape(w.shape[0], -1, LEGACY_BLOCK)
        best = self.project(*self._reference(wg))
        if not search:
            return best
        best_err = self._block_error(w, best)
        for cand in self._candidates(wg):
            best, best_err = self._keep_better(w, best, best_err, self.project(*cand))
        for _ in range(_REFITS):
            best, best_err = self._keep_better(w, best, best_err, self.project(*self._refit(w, best)))
        return best

    def _keep_better(
        self, w: torch.Tensor, best: Params, best_err: torch.Tensor, cand: Params
    ) -> tuple[Params, torch.Tensor]:
        """Per block, the parameters with the lower exact error."""
        err = self._block_error(w, cand)
        better = err < best_err
        return {k: torch.where(better, cand[k], best[k]) for k in best}, torch.minimum(err, best_err)

    def _block_error(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Exact squared weight error per block `[out, in/32]` with the codes `quantize` would choose."""
        wg = w.reshape(w.shape[0], -1, LEGACY_BLOCK)
        q = nearest_codes(wg, *self.effective(params), self.qmax)
        return (self._dequantize_blocks(q, params) - wg).pow(2).sum(-1)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        out, inn = codes.shape
        q = codes.to(torch.float32).reshape(out, -1, LEGACY_BLOCK)
        return self._dequantize_blocks(q, params).reshape(out, inn)

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        """The type's formula on float codes `[out, nb, 32]`."""
        raise NotImplementedError

    def _reference(self, wg: torch.Tensor) -> ScaleZero:
        """llama.cpp's reference (scale, zero) per block."""
        raise NotImplementedError

    def _candidates(self, wg: torch.Tensor) -> Iterator[ScaleZero]:
        raise NotImplementedError

    def _refit(self, w: torch.Tensor, params: Params) -> ScaleZero:
        """Least-squares (scale, zero) for the codes that `params` choose."""
        raise NotImplementedError


@dataclass(frozen=True)
class _SymLegacy(_LegacyGrid):
    """`w = d·(q − z0)` with one fp16 `d` per 32 weights (Q4_0, Q5_0, Q8_0)."""

    z0: ClassVar[int]

    @property
    def fixed_zero(self) -> int:
        return self.z0

    def param_spec(self, out_features: int, in_features: int):
        return {"d": ((out_features, in_features // LEGACY_BLOCK), torch.float16)}

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        d = params["d"].to(torch.float32).unsqueeze(-1)  # [out, nb, 1]
        return d * (q - self.z0)  # dequantize_row_q4_0: (q − 8)·d

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        d = params["d"].to(torch.float32)
        return d, torch.full_like(d, float(self.z0))

    def scale_zero_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, None]:
        return signed_range_scale(lo, hi, self.z0, self.qmax), None

    def project(self, scale: torch.Tensor, zero: torch.Tensor | None = None) -> Params:
        d = ste_fp16(scale) + 0.0  # + 0.0 turns −0 into +0
        check_fp16_finite(self.name, d)
        return {"d": d}

    def _reference(self, wg: torch.Tensor) -> ScaleZero:
        # quantize_row_q4_0_ref / q5_0: the largest-magnitude weight lands on code 0
        return signed_absmax(wg) / -self.z0, None

    def _candidates(self, wg: torch.Tensor) -> Iterator[ScaleZero]:
        ref = self._reference(wg)[0]
        fit = self.scale_zero_from_range(wg.amin(-1), wg.amax(-1))[0]
        yield fit, None
        for r in _SHRINK:
            yield ref * r, None
            yield fit * r, None

    def _refit(self, w: torch.Tensor, params: Params) -> ScaleZero:
        out = w.shape[0]
        lv = self.quantize(w, params).to(torch.float32).reshape(out, -1, LEGACY_BLOCK) - self.z0
        wg = w.reshape(out, -1, LEGACY_BLOCK)
        den = (lv * lv).sum(-1)
        s = (wg * lv).sum(-1) / safe_divisor(den)
        return torch.where(den > 0, s, params["d"].to(torch.float32)), None


@register_grid
@dataclass(frozen=True)
class GGUFQ4_0(_SymLegacy):
    """GGUF Q4_0: `w = d·(q − 8)`, q ∈ [0, 15], fp16 d per 32 (ggml `dequantize_row_q4_0`)."""

    kind = "gguf:q4_0"
    qmax = 15
    z0 = 8


@register_grid
@dataclass(frozen=True)
class GGUFQ5_0(_SymLegacy):
    """GGUF Q5_0: `w = d·(q − 16)`, q ∈ [0, 31], fp16 d per 32 (ggml `dequantize_row_q5_0`)."""

    kind = "gguf:q5_0"
    qmax = 31
    z0 = 16


@register_grid
@dataclass(frozen=True)
class GGUFQ8_0(_SymLegacy):
    """GGUF Q8_0: `w = d·(q − 128)`, q ∈ [0, 255] (stored as int8 q − 128), fp16 d per 32.

    Mirrors ggml `dequantize_row_q8_0`. llama.cpp's reference quantizer uses only ±127
    (`d = amax/127`); the grid also allows −128, which the search may use."""

    kind = "gguf:q8_0"
    qmax = 255
    z0 = 128

    def _reference(self, wg: torch.Tensor) -> ScaleZero:
        # quantize_row_q8_0_ref: symmetric ±127
        return wg.abs().amax(-1) / 127, None

    def _candidates(self, wg: torch.Tensor) -> Iterator[ScaleZero]:
        # with 255 levels clipping rarely pays: the sign trick, a no-clip fit and slight shrinks
        ref, fit = signed_absmax(wg) / -self.z0, self.scale_zero_from_range(wg.amin(-1), wg.amax(-1))[0]
        yield ref, None
        yield fit, None
        for r in (0.995, 0.99, 0.98):
            yield ref * r, None


@dataclass(frozen=True)
class _MinLegacy(_LegacyGrid):
    """`w = d·q + m` with fp16 `d` and fp16 float minimum `m` per 32 weights (Q4_1, Q5_1).

    `project` keeps `d ≥ 2⁻²⁴` (the smallest fp16), so every block has a usable step and
    `effective`'s zero `−m/d` is always defined."""

    def param_spec(self, out_features: int, in_features: int):
        nb = in_features // LEGACY_BLOCK
        return {"d": ((out_features, nb), torch.float16), "m": ((out_features, nb), torch.float16)}

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        d = params["d"].to(torch.float32).unsqueeze(-1)  # [out, nb, 1]
        m = params["m"].to(torch.float32).unsqueeze(-1)
        return d * q + m  # dequantize_row_q4_1: q·d + m

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        d = params["d"].to(torch.float32)
        m = params["m"].to(torch.float32)
        return d, torch.where(d != 0, -m / safe_divisor(d), torch.zeros_like(d))

    def project(self, scale: torch.Tensor, zero: torch.Tensor | None) -> Params:
        assert zero is not None, "q4_1/q5_1 need a zero"
        d = ste_fp16(torch.clamp(scale, min=FP16_TINY))
        m = ste_fp16(-scale * zero) + 0.0  # + 0.0 turns −0 into +0
        check_fp16_finite(self.name, d, m)
        return {"d": d, "m": m}

    def _reference(self, wg: torch.Tensor) -> ScaleZero:
        # quantize_row_q4_1_ref: d = (max − min)/qmax, m = min (a flat block gets step |w|/qmax)
        return self.scale_zero_from_range(wg.amin(-1), wg.amax(-1))

    def _candidates(self, wg: torch.Tensor) -> Iterator[ScaleZero]:
        lo, hi = wg.amin(-1), wg.amax(-1)
        for r in _SHRINK:
            yield self.scale_zero_from_range(lo * r, hi * r)
            yield self.scale_zero_from_range(lo * r, hi)
            yield self.scale_zero_from_range(lo, hi * r)

    def _refit(self, w: torch.Tensor, params: Params) -> ScaleZero:
        out = w.shape[0]
        q = self.quantize(w, params).to(torch.float32).reshape(out, -1, LEGACY_BLOCK)
        wg = w.reshape(out, -1, LEGACY_BLOCK)
        qc = q - q.mean(-1, keepdim=True)
        den = (qc * qc).sum(-1)
        s = (qc * wg).sum(-1) / safe_divisor(den)
        ok = (den > 0) & (s > 0)
        s = torch.where(ok, s, params["d"].float())
        mn = torch.where(ok, wg.mean(-1) - s * q.mean(-1), params["m"].float())
        return s, -mn / s


@register_grid
@dataclass(frozen=True)
class GGUFQ4_1(_MinLegacy):
    """GGUF Q4_1: `w = d·q + m`, q ∈ [0, 15], fp16 d and m per 32 (ggml `dequantize_row_q4_1`)."""

    kind = "gguf:q4_1"
    qmax = 15


@register_grid
@dataclass(frozen=True)
class GGUFQ5_1(_MinLegacy):
    """GGUF Q5_1: `w = d·q + m`, q ∈ [0, 31], fp16 d and m per 32 (ggml `dequantize_row_q5_1`)."""

    kind = "gguf:q5_1"
    qmax = 31
