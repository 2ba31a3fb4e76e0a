"""The grid interface: one storage type's exact dequantization formula and parameter lattice.

A grid is the single implementation of a storage type. The optimiser's forward pass, `simulate()`
and every packer call the same `dequantize`, so the codes and parameters the optimiser ends with
are the file's contents and packing never re-rounds anything.

Conventions shared by every grid
- A weight is `[out, in]` (HF `nn.Linear`); groups run along `in`, never straddle rows.
- Codes are unsigned integers in `[0, qmax]` stored as uint8 `[out, in]`. Formats with signed
  codes (GGUF Q8_0, ...) are described with a fixed zero (`q - 128`), so one code convention fits all.
- Parameters are a dict of tensors whose *storage* dtypes are declared by `param_spec`; the values
  are exactly representable in those dtypes (fp16 scales really are fp16 numbers).
- `dequantize` evaluates in float32 in the engine's order; it is differentiable when its inputs
  carry gradients (codes as float tensors through a straight-through estimator).
- The learnable path: a method proposes a continuous per-group `(scale, zero)` with `w ≈ scale·(q − zero)`;
  `project` maps it onto the storable lattice with straight-through rounding; `effective` gives the
  lattice's per-group `(scale, zero)` used to choose codes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from ..errors import SchemeError
from .fused import fused_available, fused_backward, fused_forward

__all__ = [
    "Grid",
    "Params",
    "register_grid",
    "grid_from_dict",
    "registered_grid_kinds",
    "ste_round",
    "ste_fp16",
    "ste",
    "fake_quantize",
    "FP16_MIN_NORMAL",
]

Params = dict[str, torch.Tensor]

#: smallest normal fp16; scales are kept at or above it so no engine meets a subnormal scale
FP16_MIN_NORMAL = 2.0**-14

_GRIDS: dict[str, type[Grid]] = {}


def register_grid(cls: type[Grid]) -> type[Grid]:
    """Class decorator: make a grid kind constructible from its serialized dict."""
    kind = cls.kind
    if kind in _GRIDS and _GRIDS[kind] is not cls:
        raise RuntimeError(f"grid kind {kind!r} registered twice")
    _GRIDS[kind] = cls
    return cls


def registered_grid_kinds() -> list[str]:
    return sorted(_GRIDS)


def grid_from_dict(d: dict[str, Any]) -> Grid:
    """Rebuild a grid from `Grid.to_dict()` output (the record's JSON)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _GRIDS:
        raise SchemeError(f"unknown grid kind {kind!r}; known: {', '.join(registered_grid_kinds())}")
    return _GRIDS[kind](**d)


def ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of `y`, gradient of `x` (straight-through). Without a graph to build (RTN searches,
    finalisation) it is `y` itself: the same value, since `y − x` is exact for the roundings used here."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return y
    return x + (y - x).detach()


def ste_round(x: torch.Tensor) -> torch.Tensor:
    return ste(x, torch.round(x))


def ste_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (kept in float32), straight-through."""
    return ste(x, x.detach().to(torch.float16).to(torch.float32))


@dataclass(frozen=True)
class Grid(ABC):
    """Base class. Subclasses are frozen dataclasses: their fields are the grid's configuration."""

    kind: ClassVar[str]
    #: codes are in [0, qmax]
    qmax: ClassVar[int]
    #: `dequantize(q)` is exactly fp32 `s·(q − z)` with `effective`'s `(s, z)`: the fused kernel then
    #: writes the value itself instead of the codes for `dequantize`
    value_is_effective_affine: ClassVar[bool] = False

    # ---- description -------------------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """Short human name, e.g. `affine/b4/g128/asym` or `gguf:q4_k`."""

    @abstractmethod
    def group_size_for(self, in_features: int) -> int:
        """Finest group (elements sharing one effective scale/zero) for this row length."""

    @abstractmethod
    def row_multiple(self) -> int:
        """`in_features` must be a multiple of this (group size, or a format's block)."""

    @abstractmethod
    def param_spec(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Storage shape and dtype of every parameter tensor."""

    @property
    def fixed_zero(self) -> int | None:
        """The constant zero of a symmetric grid (`w = s·(q − z0)`), or None if the zero is learned."""
        return None

    @property
    def symmetric(self) -> bool:
        """True when the zero is a constant (no zero parameter is learned)."""
        return self.fixed_zero is not None

    @property
    def bits(self) -> int:
        return int(self.qmax).bit_length()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def check_shape(self, out_features: int, in_features: int, tensor: str) -> None:
        """Refuse a tensor whose row length this grid cannot tile, naming a group size that works."""
        m = self.row_multiple()
        if in_features % m != 0:
            raise SchemeError(
                f"{tensor}: input dimension {in_features} is not a multiple of {m} required by {self.name}"
                f"{self._suggest(in_features)}; or pass --skip-unquantizable to keep it unquantized"
            )

    def _suggest(self, in_features: int) -> str:
        ok = [g for g in (128, 64, 32) if in_features % g == 0]
        if ok:
            return f" (group size {ok[0]} divides it)"
        return " (no group size 32/64/128 divides it; per-channel works)"

    # ---- exact path --------------------------------------------------------------------------
    @abstractmethod
    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        """Exact float32 weight `[out, in]`, evaluated in the engine's order. Differentiable."""

    @abstractmethod
    def init_params(self, w: torch.Tensor, search: bool = False) -> Params:
        """Round-to-nearest parameters from an FP weight (`search`: minimise weight MSE)."""

    def quantize(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Nearest codes for `w` under fixed parameters (uint8 `[out, in]`)."""
        with torch.no_grad():
            q = self.choose_codes(w.float(), self.as_float(params))
        return q.to(torch.uint8)

    # ---- learnable path ----------------------------------------------------------------------
    def scale_zero_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Continuous per-group `(scale, zero)` that maps `[lo, hi]` onto the code range.

        Symmetric grids use the whole signed range `[−z0, qmax − z0]` (llama.cpp's trick): the scale
        is the larger of the two sides' needs. Differentiable in `lo`, `hi` (OmniQuant's LWC uses it)."""
        z0 = self.fixed_zero
        if z0 is not None:
            return torch.maximum(-lo / z0, hi / (self.qmax - z0)), None
        s = (hi - lo) / self.qmax
        # a constant group has no range: give it a scale that still reaches its value
        s = torch.where(s > 0, s, torch.maximum(lo.abs(), hi.abs()) / self.qmax)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return s, -lo / safe

    @abstractmethod
    def project(self, scale: torch.Tensor, zero: torch.Tensor | None) -> Params:
        """Continuous per-group `(scale, zero)` → storable parameters, straight-through rounding."""

    @abstractmethod
    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Per finest group `(scale, zero)` such that `w ≈ scale·(q − zero)`; used to choose codes."""

    def choose_codes(self, w: torch.Tensor, params: Params, divisor: torch.Tensor | None = None) -> torch.Tensor:
        """Codes as float with a straight-through round: `clamp(round(w/(s·divisor) + z), 0, qmax)`.

        `divisor` (same shape as `w`) is FlexRound's learnable element-wise division; it changes
        which code is chosen, never the dequantization formula."""
        x = self.code_coordinates(w, *self.effective(params), divisor)
        return torch.clamp(ste_round(x), 0, self.qmax).reshape(w.shape)

    def code_coordinates(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                         divisor: torch.Tensor | None = None) -> torch.Tensor:
        """`w/(s·divisor) + z` per group, `[out, groups, g]`: the unrounded codes (a zero scale counts
        as 1, its group dequantizes to 0 whatever the code)."""
        out, inn = w.shape
        g = self.group_size_for(inn)
        s = s.unsqueeze(-1)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        wg = w.reshape(out, inn // g, g)
        if divisor is not None:
            wg = wg / divisor.reshape(out, inn // g, g)
        return torch.addcdiv(z.unsqueeze(-1), wg, safe)  # z + wg / safe in one pass

    # ---- storage -----------------------------------------------------------------------------
    def as_float(self, params: Params) -> Params:
        """Parameters as float32 tensors (exact: every storage dtype widens losslessly)."""
        return {k: v.to(torch.float32) for k, v in params.items()}

    def to_storage(self, params: Params, out_features: int, in_features: int) -> Params:
        """Cast parameters to their storage dtypes, checking the cast is lossless."""
        spec = self.param_spec(out_features, in_features)
        if set(spec) != set(params):
            raise AssertionError(f"{self.name}: parameters {sorted(params)} != spec {sorted(spec)}")
        stored: Params = {}
        for k, (shape, dtype) in spec.items():
            v = params[k].detach()
            s = v.to(dtype)
            if tuple(s.shape) != tuple(shape):
                raise AssertionError(f"{self.name}.{k}: shape {tuple(s.shape)} != {shape}")
            if not torch.equal(s.to(v.dtype), v):
                raise AssertionError(f"{self.name}.{k}: values are not exactly representable as {dtype}")
            stored[k] = s.contiguous()
        return stored

    def config_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))


def fake_quantize(
    grid: Grid, w: torch.Tensor, params: Params, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable quantize→dequantize inside the grid; the forward value is the exact grid weight.

    The gradient is the straight-through one of `s·(clamp(round(w/(s·divisor) + z), 0, qmax) − z)`
    with the grid's `effective` `(s, z)`; it reaches the grid's parameters through `effective`. It is
    formed in one function instead of a graph of a dozen weight-sized operations: the C kernel of
    `fused` (one pass forward, one backward) where it compiled, else `_StraightThroughQuant`'s
    eager passes. Both give the same value."""
    tracked = [t for t in (w, divisor, *params.values()) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tracked)):
        return grid.dequantize(grid.choose_codes(w, params, divisor), params)
    s, z = grid.effective(params)
    fn = _FusedStraightThroughQuant if fused_available(w, divisor, s, z) else _StraightThroughQuant
    return fn.apply(grid, w, s, z, divisor, {k: v.detach() for k, v in params.items()})


class _FusedStraightThroughQuant(torch.autograd.Function):
    """`_StraightThroughQuant` in the C kernel of `fused`: the same value (bit for bit) and gradient
    (up to the order of the per-group sums); nothing weight-sized is saved but the inputs."""

    @staticmethod
    def forward(ctx, grid: Grid, w, s, z, divisor, params: Params):  # type: ignore[override]
        w, s, z = w.detach().contiguous(), s.detach().contiguous(), z.detach().expand_as(s).contiguous()
        d = None if divisor is None else divisor.detach().contiguous()
        ctx.save_for_backward(w, d, s, z)
        ctx.qmax = grid.qmax
        affine = grid.value_is_effective_affine
        out = fused_forward(w, s, z, d, grid.qmax, affine)
        return out if affine else grid.dequantize(out, params)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, d, s, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        gw, gd, gs, gz = fused_backward(grad.float(), w, s, z, d, ctx.qmax, need[1], need[4] and d is not None,
                                        need[2], need[3])
        return None, gw, gs, gz, gd, None


class _StraightThroughQuant(torch.autograd.Function):
    """Value: `grid.dequantize` of the nearest codes (exact). Gradient, per group with
    `x = w/(s·d) + z`, `q = clamp(round(x))` and `m` = "x rounds inside the code range, s ≠ 0":
    ∂/∂w = m/d, ∂/∂d = −m·w/d², ∂/∂s = Σ (m ? q − x : q − z), ∂/∂z = −s·Σ (1 − m).
    Only `m` and `∂ŵ/∂s` are kept for the backward, which is then two or three passes over the weight."""

    @staticmethod
    def forward(ctx, grid: Grid, w, s, z, divisor, params: Params):  # type: ignore[override]
        x = grid.code_coordinates(w, s, z, divisor)
        r = torch.round(x)
        q = r.clamp(0, grid.qmax)
        # float 0/1 mask (bool tensors take CPU paths ~4x slower than float arithmetic): r − q is an integer
        inside = r.sub_(q).abs_().clamp_(max=1).neg_().add_(1)
        if bool((s == 0).any()):  # a zero-scale group dequantizes to 0 whatever its codes
            inside.mul_((s != 0).unsqueeze(-1))
        zz = z.unsqueeze(-1)
        sens = torch.sub(q, zz).sub_(x.sub_(zz).mul_(inside))  # ∂ŵ/∂s: q − x inside, q − z outside
        ctx.save_for_backward(w if ctx.needs_input_grad[4] else None, divisor, s, inside, sens)
        ctx.w_shape = w.shape
        return grid.dequantize(q.reshape(w.shape), params)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, divisor, s, inside, sens = ctx.saved_tensors
        g = grad.reshape(sens.shape)
        grad_w = grad_d = grad_s = grad_z = None
        if ctx.needs_input_grad[2]:
            grad_s = torch.linalg.vecdot(g, sens)
        if not any(ctx.needs_input_grad[i] for i in (1, 3, 4)):
            return None, None, grad_s, None, None, None
        g_in = g * inside
        if ctx.needs_input_grad[3]:
            grad_z = (g_in.sum(-1) - g.sum(-1)).mul_(s)
        if divisor is not None:
            dg = divisor.reshape(sens.shape)
            g_in = g_in.div_(dg)
            if ctx.needs_input_grad[4]:
                grad_d = (g_in * w.reshape(sens.shape)).div_(dg).neg_().reshape(ctx.w_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g_in.reshape(ctx.w_shape)
        return None, grad_w, grad_s, grad_z, grad_d, None
