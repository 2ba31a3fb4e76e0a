"""`affine`: integer codes, integer zero point, one fp16 scale per group: `w = s·(q − z)`.

Exact in GPTQ (v1 needs z ∈ [1, 2^b−1]; sym z = 2^(b−1)), AWQ (4-bit container), compressed-tensors
(pack-quantized), ONNX MatMulNBits (uint8 zero points) and GGUF Q8_0/Q5_0/Q6_K containers.

Evaluation: `float32(s) * (float32(q) − float32(z))`. `s` has 11 significant bits and `|q − z| < 2^8`,
so the product needs at most 19 bits: it is exact in float32, hence identical in every engine that
widens to fp32 first (and the value every fp16 engine rounds from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SchemeError
from .base import FP16_MIN_NORMAL, Grid, Params, register_grid, ste_fp16, ste_round

__all__ = ["AffineGrid", "AFFINE_BITS", "AFFINE_GROUPS"]

AFFINE_BITS = (2, 3, 4, 8)
AFFINE_GROUPS = (0, 32, 64, 128)  # 0 = per output channel

#: clipping ratios tried by the RTN search (shrink the range, keep the best weight MSE per group)
_CLIP_RATIOS = torch.linspace(1.0, 0.55, 19)


@register_grid
@dataclass(frozen=True)
class AffineGrid(Grid):
    """`w = s·(q − z)`, b-bit unsigned codes, fp16 `s` per (row, group), integer `z`.

    Attributes:
        bit_width: 2, 3, 4 or 8.
        group_size: 32, 64, 128, or 0 for one group per output channel.
        sym: symmetric (z fixed at 2^(b−1), no zero tensor) or asymmetric (learned integer z).
        zero_min: lowest allowed zero point (1 when GPTQ v1 export is requested: z = 0 has no
            consistent encoding there), highest is 2^b − 1.
    """

    kind = "affine"
    value_is_effective_affine = True
    bit_width: int = 4
    group_size: int = 128
    sym: bool = False
    zero_min: int = 0

    def __post_init__(self) -> None:
        if self.bit_width not in AFFINE_BITS:
            raise SchemeError(f"affine grid: bits {self.bit_width} not in {AFFINE_BITS}")
        if self.group_size not in AFFINE_GROUPS:
            raise SchemeError(f"affine grid: group size {self.group_size} not in 32/64/128 or per-channel")
        if not 0 <= self.zero_min < self.qmax_value:
            raise SchemeError(f"affine grid: zero_min {self.zero_min} out of range")

    # Grid.qmax is a ClassVar elsewhere; here it depends on the instance.
    @property
    def qmax_value(self) -> int:
        return (1 << self.bit_width) - 1

    @property
    def qmax(self) -> int:  # type: ignore[override]
        return self.qmax_value

    @property
    def bits(self) -> int:
        return self.bit_width

    @property
    def fixed_zero(self) -> int | None:
        return (1 << (self.bit_width - 1)) if self.sym else None

    @property
    def name(self) -> str:
        g = "ch" if self.group_size == 0 else f"g{self.group_size}"
        z = "sym" if self.sym else ("asym" if self.zero_min == 0 else f"asym-z{self.zero_min}+")
        return f"affine/b{self.bit_width}/{g}/{z}"

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == 0 else self.group_size

    def row_multiple(self) -> int:
        return 1 if self.group_size == 0 else self.group_size

    def param_spec(self, out_features: int, in_features: int):
        ng = in_features // self.group_size_for(in_features)
        spec = {"scale": ((out_features, ng), torch.float16)}
        if not self.sym:
            spec["zero"] = ((out_features, ng), torch.uint8)
        return spec

    # ---- exact -------------------------------------------------------------------------------
    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        out, inn = codes.shape
        g = self.group_size_for(inn)
        s = params["scale"].to(torch.float32).unsqueeze(-1)  # [out, ng, 1]
        z = self._zero(params).unsqueeze(-1)
        q = codes.to(torch.float32).reshape(out, inn // g, g)
        return (s * (q - z)).reshape(out, inn)

    def _zero(self, params: Params) -> torch.Tensor:
        if self.sym:
            return torch.full_like(params["scale"], self.fixed_zero, dtype=torch.float32)
        return params["zero"].to(torch.float32)

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        return params["scale"].to(torch.float32), self._zero(params)

    # ---- RTN ---------------------------------------------------------------------------------
    def init_params(self, w: torch.Tensor, search: bool = False) -> Params:
        w = w.detach().float()
        out, inn = w.shape
        wg = w.reshape(out, inn // self.group_size_for(inn), -1)
        lo, hi = wg.amin(-1), wg.amax(-1)
        if not search:
            return self._params_from_range(lo, hi)
        best = self._params_from_range(lo, hi)
        best_err = self._group_err(w, best)
        for r in _CLIP_RATIOS[1:]:
            cand = self._params_from_range(lo * r, hi * r)
            err = self._group_err(w, cand)
            better = err < best_err
            best = {k: torch.where(better, cand[k], best[k]) for k in best}
            best_err = torch.minimum(err, best_err)
        return best

    def _group_err(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        out, inn = w.shape
        wq = self.dequantize(self.quantize(w, params), params)
        return (wq - w).pow(2).reshape(out, inn // self.group_size_for(inn), -1).sum(-1)

    def _params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> Params:
        """Min-max parameters for ranges `[lo, hi]` (per group)."""
        return self.project(*self.scale_zero_from_range(lo, hi))

    # ---- learnable ---------------------------------------------------------------------------
    def project(self, scale: torch.Tensor, zero: torch.Tensor | None) -> Params:
        s = ste_fp16(torch.clamp(scale, min=FP16_MIN_NORMAL))
        if not torch.isfinite(s).all():
            raise SchemeError(f"{self.name}: a group scale overflows fp16 (weights larger than ~{65504 * self.qmax:.3g})")
        if self.sym:
            return {"scale": s}
        assert zero is not None
        z = torch.clamp(ste_round(zero), self.zero_min, self.qmax)
        return {"scale": s, "zero": z}
