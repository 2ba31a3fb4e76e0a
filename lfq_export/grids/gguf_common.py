"""Shared pieces of the GGUF grids: llama.cpp's per-group scale searches (vectorised torch) and
small lattice helpers.

Each search works on a batch of groups `x: [G, n]` (float32) at once and returns the group's
continuous scale (and offset); the grids then put those onto their storable lattice. They follow
the algorithms of `ggml-quants.c` (read to learn, not copied):

- `make_qkx2`: asymmetric `x ≈ scale·L − offset`, L ∈ [0, nmax], weighted least squares over a
  sweep of trial inverse scales (`make_qkx2_quants`; used by Q2_K, Q4_K, Q5_K).
- `make_qx`: symmetric signed `x ≈ scale·l`, l ∈ [−nmax, nmax−1], x²-weighted least squares over
  19 trial inverse scales (`make_qx_quants`, rmse_type 1; used by Q6_K).
- `make_q3`: symmetric signed, x²-weighted coordinate descent on the codes (`make_q3_quants`
  with do_rmse; used by Q3_K).

Rounding is round-half-to-even like ggml's `nearest_int`. Float sums are taken in a different
order than the C loops, so a near-tie may resolve differently; the grids measure the result with
the exact dequantization, never rely on bit-equality with these searches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SchemeError

__all__ = [
    "GROUP_MAX_EPS",
    "FP16_TINY",
    "make_qkx2",
    "make_qx",
    "make_q3",
    "map_groups",
    "signed_absmax",
    "signed_range_scale",
    "ste_value",
    "check_fp16_finite",
    "safe_divisor",
    "nearest_codes",
]

#: ggml's threshold below which a group counts as all zero
GROUP_MAX_EPS = 1e-15

#: smallest positive fp16 (a subnormal): GGUF super-scales are kept at or above it when nonzero
FP16_TINY = 2.0**-24

#: element budget of one chunk of trial tensors ([groups, trials, n]); keeps memory to ~100 MB
_CHUNK_ELEMENTS = 1 << 22


def map_groups(
    fn: Callable[..., tuple[torch.Tensor, ...]], trials: int, *tensors: torch.Tensor, **kw
) -> tuple[torch.Tensor, ...]:
    """`fn(*chunks, **kw)` over row chunks of `tensors` (each `[G, n]`), sized so `G·trials·n` stays bounded."""
    g, n = tensors[0].shape
    per = max(1, _CHUNK_ELEMENTS // max(1, trials * n))
    parts = [fn(*(t[i : i + per] for t in tensors), **kw) for i in range(0, g, per)]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(len(parts[0])))


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last dim, with its sign (first one on ties)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def ste_value(x: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """Exactly `value` (broadcast to x), with the gradient of `x` (straight-through).

    Unlike `x + (value − x).detach()`, the forward value is exact even when value and x are far apart."""
    return torch.zeros_like(x) + value + (x - x.detach())


def safe_divisor(t: torch.Tensor) -> torch.Tensor:
    """`t` with zeros replaced by 1 (as `Grid.choose_codes` does for zero scales)."""
    return torch.where(t != 0, t, torch.ones_like(t))


def nearest_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """The values `Grid.choose_codes` gives, without the straight-through graph: `[..., groups, g]` float codes."""
    return torch.clamp(torch.round(wg / safe_divisor(scale)[..., None] + zero[..., None]), 0, qmax)


def check_fp16_finite(name: str, *tensors: torch.Tensor) -> None:
    """Refuse parameters that overflowed fp16 (weights far beyond any LLM's range)."""
    for t in tensors:
        if not torch.isfinite(t).all():
            raise SchemeError(f"{name}: a scale overflows fp16 (max 65504); the weights are too large for this type")


def _wsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """`num / den` where `den > 0`, else 0 (no inf/NaN ever forms)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def make_qkx2(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted asymmetric fit `x ≈ scale·L − offset` per group (mirrors ggml `make_qkx2_quants`).

    The group minimum is clamped to ≤ 0 (offset ≥ 0). Start from min/max, then for k = 0..nstep try
    the inverse scale `(nmax + rmin + rdelta·k)/(max − min)` with codes `round(iscale·(x − min))`;
    each trial refits (scale, min) by weighted least squares on its codes (min clamped to 0 when
    positive) and is kept if it lowers the weighted error (|·| when `use_mad`, else squared). As in
    the C loop, an accepted trial's min is used by the following trials. A flat group returns
    scale 0 and offset −min.

    Returns:
        (scale [G], offset [G]).
    """
    mn = x.amin(-1).clamp(max=0.0)
    mx = x.amax(-1)
    flat = mx == mn
    sum_w, sum_x = weights.sum(-1), _wsum(weights, x)

    def err(scale: torch.Tensor, mins: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * L + mins[:, None] - x
        return _wsum(weights, diff.abs() if use_mad else diff * diff)

    def codes(iscale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(iscale[:, None] * (x - mins[:, None])), 0, nmax)

    iscale = nmax / torch.where(flat, torch.ones_like(mx), mx - mn)
    scale = 1.0 / iscale
    best = err(scale, mn, codes(iscale, mn))
    for k in range(nstep + 1):
        rng = mx - mn
        L = codes((rmin + rdelta * k + nmax) / torch.where(rng > 0, rng, torch.ones_like(rng)), mn)
        sum_l, sum_l2, sum_xl = _wsum(weights, L), _wsum(weights, L * L), _wsum(weights * x, L)
        D = sum_w * sum_l2 - sum_l * sum_l
        t_scale = _div(sum_w * sum_xl - sum_x * sum_l, D)
        t_min = _div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = t_min > 0
        t_scale = torch.where(pos, _div(sum_xl, sum_l2), t_scale)
        t_min = torch.where(pos, torch.zeros_like(t_min), t_min)
        cur = err(t_scale, t_min, L)
        take = (D > 0) & (cur < best) & ~flat
        best = torch.where(take, cur, best)
        scale = torch.where(take, t_scale, scale)
        mn = torch.where(take, t_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn


#: trial order of make_qx_quants: the plain nmax first, then nmax − 0.9 … nmax + 0.9
_QX_STEPS = [0] + list(range(-9, 0)) + list(range(1, 10))


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor]:
    """x²-weighted symmetric fit `x ≈ scale·l`, l ∈ [−nmax, nmax−1] (ggml `make_qx_quants`, rmse_type 1).

    Trial inverse scales `−(nmax + 0.1·k)/max`, k = 0, −9..9 (max = signed element of largest
    magnitude); each gives codes and the least-squares scale `Σw·x·l / Σw·l²`; the trial with the
    largest `(Σw·x·l)²/Σw·l²` (= smallest weighted error) wins, earlier trials on ties. The scale's
    sign is opposite to the group's largest element (it maps to l = −nmax). All-zero group → 0.

    Returns:
        (scale [G],)
    """
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    steps = torch.tensor(_QX_STEPS, dtype=x.dtype) * 0.1
    iscale = -(steps + nmax)[None, :] / safe[:, None]  # [G, 19]
    xt = x.unsqueeze(1)
    lv = torch.clamp(torch.round(iscale[..., None] * xt), -nmax, nmax - 1)  # [G, 19, n]
    wx = xt * xt
    sumlx, suml2 = _wsum(wx * xt, lv), _wsum(wx, lv * lv)
    metric = torch.where(suml2 > 0, _div(sumlx * sumlx, suml2), -torch.inf)
    metric[:, 0] = torch.where(suml2[:, 0] > 0, metric[:, 0], torch.zeros_like(metric[:, 0]))  # C: best = 0
    k = metric.argmax(-1, keepdim=True)
    scale = _div(sumlx.gather(-1, k).squeeze(-1), suml2.gather(-1, k).squeeze(-1))
    return (torch.where(zero, torch.zeros_like(scale), scale),)


def make_q3(x: torch.Tensor, nmax: int, passes: int = 5) -> tuple[torch.Tensor]:
    """x²-weighted symmetric fit by coordinate descent on the codes (mirrors ggml `make_q3_quants`, do_rmse).

    Start from `l = round(−nmax·x/max)`; then up to `passes` sweeps over the positions: replace
    l_i by the code that is best for the least-squares scale of the other elements, when that
    raises `(Σw·x·l)²/Σw·l²`. The loop is over the n positions (vectorised over all groups); a
    sweep that changes nothing leaves the state as it is, so running every sweep equals stopping.

    Returns:
        (scale [G],) = Σw·x·l / Σw·l² (0 for all-zero groups).
    """
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    lv = torch.clamp(torch.round((-nmax / safe)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = _wsum(w * x, lv), _wsum(w, lv * lv)
    for _ in range(passes):
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], lv[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = torch.clamp(torch.round(_div(xi * sl2, slx)), -nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[:, i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = _div(sumlx, suml2)
    return (torch.where(zero, torch.zeros_like(scale), scale),)


def signed_range_scale(lo: torch.Tensor, hi: torch.Tensor, z0: int, qmax: int) -> torch.Tensor:
    """Signed scale of a symmetric grid `w = s·(q − z0)`, q ∈ [0, qmax], that covers `[lo, hi]` most finely.

    The code range `[−z0, qmax − z0]` is one longer on the negative side; a negative scale puts
    that side on the positive weights (llama.cpp's `d = max / −z0` trick). Of the two signs, the
    one with the smaller step that still reaches both ends is returned. Differentiable in lo, hi.
    """
    pos = torch.maximum(-lo / z0, hi / (qmax - z0))
    neg = torch.maximum(hi / z0, -lo / (qmax - z0))
    return torch.where(pos <= neg, pos, -neg)
