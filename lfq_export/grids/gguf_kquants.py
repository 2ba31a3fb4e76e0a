"""GGUF K-quants as grids: `gguf:q2_k`, `q3_k`, `q4_k`, `q5_k`, `q6_k` (super-blocks of 256 weights).

Two-level scales: one fp16 super-scale `d` (and `dmin`) per 256 weights, small integer sub-scales
per sub-block j of G weights. Exact formulas, float32, in ggml's order (`dequantize_row_q*_K`):

| kind      | q       | weight in sub-block j           | sub-scales per G               | bytes/256 (bpw) |
|-----------|---------|---------------------------------|--------------------------------|-----------------|
| gguf:q2_k | [0, 3]  | `(d * sc_j) * q - (dmin * m_j)` | sc, m uint8 [0, 15], G = 16    | 84 (2.625)      |
| gguf:q3_k | [0, 7]  | `(d * sc_j) * (q - 4)`          | sc int8 [−32, 31], G = 16      | 110 (3.4375)    |
| gguf:q4_k | [0, 15] | `(d * sc_j) * q - (dmin * m_j)` | sc, m uint8 [0, 63], G = 32    | 144 (4.5)       |
| gguf:q5_k | [0, 31] | `(d * sc_j) * q - (dmin * m_j)` | sc, m uint8 [0, 63], G = 32    | 176 (5.5)       |
| gguf:q6_k | [0, 63] | `(d * sc_j) * (q - 32)`         | sc int8 [−128, 127], G = 16    | 210 (6.5625)    |

Every product is exact in float32 (d has 11 significant bits, sc ≤ 7, q ≤ 6: ≤ 24 bits), so the
only rounding is the subtraction of the min term (an FMA gives the same). `d`/`dmin` may be fp16
subnormals (common for Q6_K: d ≈ max|w|/4096); the grid computes with the stored fp16 value,
whatever its precision. Byte layouts are in `formats/gguf_pack.py`.

Parameter tensors (out = rows, in = row length, in % 256 == 0):
- q2_k/q4_k/q5_k: `d`, `dmin` fp16 `[out, in/256]`; `sc`, `m` uint8 `[out, in/G]`.
- q3_k/q6_k: `d` fp16 `[out, in/256]`; `sc` int8 `[out, in/16]`.

Lattice rules (`project`, and what `init_params` ends with), per super-block:
- float-min types: `d = fp16(max_j s_j / T)`, `sc_j = clamp(round(s_j/d), 1, T)` with T = 15/63, the
  largest group pinned to `sc = T`; likewise `dmin`, `m_j ∈ [0, T]` from the offsets `s_j·z_j` (kept
  ≥ 0: llama.cpp clamps each group's minimum to ≤ 0). `sc ≥ 1` costs nothing (code 0 still gives
  `−dmin·m`) and keeps `effective`'s zero defined. A nonzero super-scale is kept ≥ 2⁻²⁴.
- signed types: `d = fp16(−s_top / L)` with s_top the sub-scale of largest magnitude and L = 32/128,
  `sc_j = clamp(round(s_j/d), −L, L−1)`, the top group pinned to `−L` (llama.cpp's sign trick).
Pinning the top keeps `project(*effective(p)) == p` for every output of `init_params`/`project`,
also when d is a coarse subnormal.

Initialisation: llama.cpp's reference searches (`quantize_row_q*_K_ref`: `make_qkx2_quants`,
`make_q3_quants`, `make_qx_quants`, see `gguf_common`), then the lattice rules above with the
codes chosen nearest on the fp16-rounded effective scales, then one pass that moves each
sub-block's integers (sc, m) to a least-squares refit or by ±1 (±1/±2 for the signed types) when
that lowers its exact weight error (d, dmin and the pinned groups stay, so the result is still a
fixed point). ggml sums in another order, so on inputs full of exact ties (weights that already sit
on a grid) its search may settle on a different but equally good fit; the refinement pass is what
makes the result match or beat llama.cpp's MSE there too. `search=True` also tries super-scales
stretched by ±1.5 % (each refined) per super-block and refines the winner once more.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Grid, Params, register_grid, ste_fp16, ste_round
from .gguf_common import (
    FP16_TINY,
    check_fp16_finite,
    make_q3,
    make_qkx2,
    make_qx,
    map_groups,
    nearest_codes,
    safe_divisor,
    signed_range_scale,
    ste_value,
)

__all__ = ["GGUFQ2_K", "GGUFQ3_K", "GGUFQ4_K", "GGUFQ5_K", "GGUFQ6_K", "QK_K"]

#: weights per super-block
QK_K = 256

#: super-scale stretch factors tried by `init_params(search=True)` (1.0 = llama.cpp's choice)
_SUPER_FACTORS = (1.0, 0.985, 1.015)


def _pin_top(x: torch.Tensor, q: torch.Tensor, top_idx: torch.Tensor, value: float) -> torch.Tensor:
    """Set `q` to exactly `value` at `top_idx` along the last dim (gradient of `x` there)."""
    mask = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, top_idx, True)
    return torch.where(mask, ste_value(x, value), q)


def _unsigned_two_level(v: torch.Tensor, top: int, lowest: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ≥ 0 per sub-block `[out, nsb, per]` → (fp16 super-scale `[out, nsb]`, sub-scales in [lowest, top])."""
    v = v.clamp(min=0)
    vmax = v.amax(-1)
    nz = vmax > 0
    d = torch.where(nz, torch.clamp(ste_fp16(vmax / top), min=FP16_TINY), torch.zeros_like(vmax))
    check_fp16_finite(name, d)
    x = v / safe_divisor(d).unsqueeze(-1)
    q = _pin_top(x, torch.clamp(ste_round(x), lowest, top), v.argmax(-1, keepdim=True), top)
    return d, torch.where(nz.unsqueeze(-1), q, torch.zeros_like(q))


def _signed_two_level(v: torch.Tensor, lim: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales `[out, nsb, per]` → (fp16 d `[out, nsb]`, sub-scales in [−lim, lim−1])."""
    idx = v.abs().argmax(-1, keepdim=True)
    vtop = v.gather(-1, idx).squeeze(-1)
    nz = vtop != 0
    d = ste_fp16(-vtop / lim)
    d = torch.where(nz & (d == 0), ste_value(d, -torch.sign(vtop) * FP16_TINY), d)
    d = torch.where(nz, d, torch.zeros_like(d)) + 0.0  # + 0.0 turns −0 into +0
    check_fp16_finite(name, d)
    x = v / safe_divisor(d).unsqueeze(-1)
    q = _pin_top(x, torch.clamp(ste_round(x), -lim, lim - 1), idx, -lim)
    return d, torch.where(nz.unsqueeze(-1), q, torch.zeros_like(q))


def _first_index_of(q: torch.Tensor, value: int) -> torch.Tensor:
    """Bool mask `[out, nsb, per]` of the first sub-block per super-block whose sub-scale equals `value`."""
    hit = q == value
    first = hit.to(torch.int8).argmax(-1, keepdim=True)
    return torch.zeros_like(hit).scatter_(-1, first, True) & hit


@dataclass(frozen=True)
class _KQuantGrid(Grid):
    """Common part of the K-quants: super-blocks of 256, sub-blocks of `sub` weights."""

    sub: ClassVar[int]
    #: integer keys of `params` that live per sub-block (refined by the search)
    sub_keys: ClassVar[tuple[str, ...]]

    @property
    def name(self) -> str:
        return self.kind

    @property
    def per(self) -> int:
        """Sub-blocks per super-block."""
        return QK_K // self.sub

    def group_size_for(self, in_features: int) -> int:
        return self.sub

    def row_multiple(self) -> int:
        return QK_K

    def _suggest(self, in_features: int) -> str:
        return " (K-quants tile rows in blocks of 256; llama.cpp falls back to q5_0/q5_1/q8_0 for such tensors)"

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """Per-super-block `[out, nsb]` → per-sub-block `[out, nsub]` (float32)."""
        return t.to(torch.float32).repeat_interleave(self.per, dim=1)

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sub-block `[out, nsub]` → `[out, nsb, per]`."""
        return t.reshape(t.shape[0], -1, self.per)

    # ---- RTN ---------------------------------------------------------------------------------
    def init_params(self, w: torch.Tensor, search: bool = False) -> Params:
        w = w.detach().float()
        ref = self._reference(w)
        if not search:
            return self._refine(w, ref)
        best, err = None, None
        for f in _SUPER_FACTORS:
            cand = self._refine(w, self._stretched(ref, f))
            cand_err = self._sub_error(w, cand).reshape(w.shape[0], -1, self.per).sum(-1)  # [out, nsb]
            best, err = (cand, cand_err) if best is None else self._keep_better(best, err, cand, cand_err)
        return self._refine(w, best)

    def _reference(self, w: torch.Tensor) -> Params:
        """llama.cpp's reference search per sub-block, then the lattice rules."""
        raise NotImplementedError

    def _stretched(self, params: Params, f: float) -> Params:
        """Re-project with every sub-block scale multiplied by `f` (moves the super-scale lattice)."""
        raise NotImplementedError

    def _keep_better(
        self, best: Params, err: torch.Tensor, cand: Params, cand_err: torch.Tensor
    ) -> tuple[Params, torch.Tensor]:
        """Per super-block, the candidate with the lower error (all of its parameters together)."""
        better = cand_err < err  # [out, nsb]
        sub = better.repeat_interleave(self.per, dim=1)
        pick = {k: torch.where(better if v.shape == better.shape else sub, cand[k], v) for k, v in best.items()}
        return pick, torch.minimum(err, cand_err)

    def _sub_error(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Exact squared weight error per sub-block `[out, nsub]` with the codes `quantize` would choose."""
        wg = w.reshape(w.shape[0], -1, self.sub)
        q = nearest_codes(wg, *self.effective(params), self.qmax)
        return (self._dequantize_blocks(q, params) - wg).pow(2).sum(-1)

    def dequantize(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        out, inn = codes.shape
        q = codes.to(torch.float32).reshape(out, -1, self.sub)
        return self._dequantize_blocks(q, params).reshape(out, inn)

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        """The type's formula on float codes `[out, nsub, sub]`."""
        raise NotImplementedError

    def _refine(self, w: torch.Tensor, params: Params) -> Params:
        """One pass of sub-scale moves: each sub-block keeps the (sc, m) with the lowest exact error.

        d, dmin and the pinned top sub-blocks never move, so a fixed point of `project` stays one."""
        best, err = params, self._sub_error(w, params)
        for cand in list(self._moves(w, params)):
            cand_err = self._sub_error(w, cand)
            better = cand_err < err
            best = {k: torch.where(better, cand[k], v) if k in self.sub_keys else v for k, v in best.items()}
            err = torch.minimum(err, cand_err)
        return best

    def _moves(self, w: torch.Tensor, params: Params) -> Iterator[Params]:
        raise NotImplementedError


@dataclass(frozen=True)
class _FloatMinK(_KQuantGrid):
    """`w = (d·sc_j)·q − (dmin·m_j)`: Q2_K, Q4_K, Q5_K."""

    sub_keys = ("sc", "m")
    #: largest sub-scale / sub-min (15 or 63)
    top: ClassVar[int]
    #: make_qkx2_quants settings of llama.cpp's reference quantizer for this type
    rmin: ClassVar[float]
    nstep: ClassVar[int]
    use_mad: ClassVar[bool]

    def param_spec(self, out_features: int, in_features: int):
        nsb, nsub = in_features // QK_K, in_features // self.sub
        return {
            "d": ((out_features, nsb), torch.float16),
            "dmin": ((out_features, nsb), torch.float16),
            "sc": ((out_features, nsub), torch.uint8),
            "m": ((out_features, nsub), torch.uint8),
        }

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        dl = self._expand(params["d"]) * params["sc"].to(torch.float32)  # [out, nsub]: d·sc
        ml = self._expand(params["dmin"]) * params["m"].to(torch.float32)  # dmin·m
        return dl.unsqueeze(-1) * q - ml.unsqueeze(-1)  # dequantize_row_q4_K: d1·q − m1

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._expand(params["d"]) * params["sc"].to(torch.float32)
        o = self._expand(params["dmin"]) * params["m"].to(torch.float32)
        return s, torch.where(s != 0, o / safe_divisor(s), torch.zeros_like(s))

    def scale_zero_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # llama.cpp clamps every group's minimum to ≤ 0: offsets are stored as −dmin·m, m ≥ 0
        return super().scale_zero_from_range(torch.clamp(lo, max=0.0), hi)

    def project(self, scale: torch.Tensor, zero: torch.Tensor | None) -> Params:
        assert zero is not None, f"{self.name} needs a zero"
        return self._project_offsets(scale, scale * zero)

    def _project_offsets(self, scale: torch.Tensor, offset: torch.Tensor) -> Params:
        """Per-sub-block scale and offset (`w ≈ scale·q − offset`) → storable params."""
        d, sc = _unsigned_two_level(self._blocks(scale), self.top, 1, self.name)
        dmin, m = _unsigned_two_level(self._blocks(offset), self.top, 0, self.name)
        return {"d": d, "dmin": dmin, "sc": sc.flatten(1), "m": m.flatten(1)}

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element weights of llama.cpp's search: `rms(group) + |x|` (Q4_K/Q5_K)."""
        return x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()

    def _reference(self, w: torch.Tensor) -> Params:
        x = w.reshape(-1, self.sub)
        kw = dict(nmax=self.qmax, rmin=self.rmin, rdelta=0.1, nstep=self.nstep, use_mad=self.use_mad)
        scale, offset = map_groups(make_qkx2, 8, x, self._weights(x), **kw)
        # a flat group (scale 0) still needs a step for its offset to stay expressible
        scale = torch.where((scale <= 0) & (offset > 0), offset / self.qmax, scale)
        return self._project_offsets(scale.reshape(w.shape[0], -1), offset.reshape(w.shape[0], -1))

    def _stretched(self, params: Params, f: float) -> Params:
        s, z = self.effective(params)
        return self._project_offsets(s * f, s * z)

    def _moves(self, w: torch.Tensor, params: Params) -> Iterator[Params]:
        sc, m = self._blocks(params["sc"]), self._blocks(params["m"])
        free_s = (params["d"] > 0).unsqueeze(-1) & ~_first_index_of(sc, self.top)
        free_m = (params["dmin"] > 0).unsqueeze(-1) & ~_first_index_of(m, self.top)

        def cand(new_sc: torch.Tensor, new_m: torch.Tensor) -> Params:
            new_sc = torch.where(free_s, torch.clamp(new_sc, 1, self.top), sc)
            new_m = torch.where(free_m, torch.clamp(new_m, 0, self.top), m)
            return {**params, "sc": new_sc.flatten(1), "m": new_m.flatten(1)}

        yield cand(*self._lsq_subscales(w, params))
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                if a or b:
                    yield cand(sc + a, m + b)

    def _lsq_subscales(self, w: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """Least-squares (scale, offset ≥ 0) of each sub-block for its current codes, on the sub-scale lattice."""
        out = w.shape[0]
        q = self.quantize(w, params).to(torch.float32).reshape(out, -1, self.sub)
        x = w.reshape(out, -1, self.sub)
        qm, xm = q.mean(-1), x.mean(-1)
        var = (q * q).mean(-1) - qm * qm
        s = ((q * x).mean(-1) - qm * xm) / safe_divisor(var.clamp(min=0))
        o = s * qm - xm
        l2 = (q * q).sum(-1)
        s = torch.where(o < 0, (q * x).sum(-1) / safe_divisor(l2), s)
        o = o.clamp(min=0)
        d, dmin = self._expand(params["d"]), self._expand(params["dmin"])
        sc = torch.round(s / safe_divisor(d))
        m = torch.round(o / safe_divisor(dmin))
        return self._blocks(sc), self._blocks(m)


@register_grid
@dataclass(frozen=True)
class GGUFQ2_K(_FloatMinK):
    """GGUF Q2_K: `w = (d·sc_j)·q − (dmin·m_j)`, q ∈ [0, 3], sc/m 4-bit per 16 (ggml `dequantize_row_q2_K`)."""

    kind = "gguf:q2_k"
    qmax = 3
    sub = 16
    top = 15
    rmin, nstep, use_mad = -0.5, 15, True

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()  # quantize_row_q2_K_ref weighs by |x|


@register_grid
@dataclass(frozen=True)
class GGUFQ4_K(_FloatMinK):
    """GGUF Q4_K: `w = (d·sc_j)·q − (dmin·m_j)`, q ∈ [0, 15], sc/m 6-bit per 32 (ggml `dequantize_row_q4_K`)."""

    kind = "gguf:q4_k"
    qmax = 15
    sub = 32
    top = 63
    rmin, nstep, use_mad = -1.0, 20, False


@register_grid
@dataclass(frozen=True)
class GGUFQ5_K(_FloatMinK):
    """GGUF Q5_K: `w = (d·sc_j)·q − (dmin·m_j)`, q ∈ [0, 31], sc/m 6-bit per 32 (ggml `dequantize_row_q5_K`)."""

    kind = "gguf:q5_k"
    qmax = 31
    sub = 32
    top = 63
    rmin, nstep, use_mad = -0.5, 15, False


@dataclass(frozen=True)
class _SignedK(_KQuantGrid):
    """`w = (d·sc_j)·(q − z0)` with signed int8 sub-scales: Q3_K, Q6_K."""

    sub = 16
    sub_keys = ("sc",)
    z0: ClassVar[int]
    #: sub-scales lie in [−lim, lim − 1]
    lim: ClassVar[int]

    @property
    def fixed_zero(self) -> int:
        return self.z0

    def param_spec(self, out_features: int, in_features: int):
        return {
            "d": ((out_features, in_features // QK_K), torch.float16),
            "sc": ((out_features, in_features // self.sub), torch.int8),
        }

    def _dequantize_blocks(self, q: torch.Tensor, params: Params) -> torch.Tensor:
        dl = self._expand(params["d"]) * params["sc"].to(torch.float32)  # [out, nsub]: d·sc
        return dl.unsqueeze(-1) * (q - self.z0)  # dequantize_row_q6_K: d·sc·(q − 32)

    def effective(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._expand(params["d"]) * params["sc"].to(torch.float32)
        return s, torch.full_like(s, float(self.z0))

    def scale_zero_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, None]:
        return signed_range_scale(lo, hi, self.z0, self.qmax), None

    def project(self, scale: torch.Tensor, zero: torch.Tensor | None = None) -> Params:
        d, sc = _signed_two_level(self._blocks(scale), self.lim, self.name)
        return {"d": d, "sc": sc.flatten(1)}

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _reference(self, w: torch.Tensor) -> Params:
        return self.project(self._scales(w.reshape(-1, self.sub)).reshape(w.shape[0], -1))

    def _stretched(self, params: Params, f: float) -> Params:
        return self.project(self.effective(params)[0] * f)

    def _moves(self, w: torch.Tensor, params: Params) -> Iterator[Params]:
        sc = self._blocks(params["sc"])
        free = (params["d"] != 0).unsqueeze(-1) & ~_first_index_of(sc, -self.lim)

        def cand(new_sc: torch.Tensor) -> Params:
            return {**params, "sc": torch.where(free, torch.clamp(new_sc, -self.lim, self.lim - 1), sc).flatten(1)}

        yield cand(self._lsq_subscales(w, params))
        for a in (-2, -1, 1, 2):
            yield cand(sc + a)

    def _lsq_subscales(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        out = w.shape[0]
        lv = self.quantize(w, params).to(torch.float32).reshape(out, -1, self.sub) - self.z0
        den = (lv * lv).sum(-1)
        s = (lv * w.reshape(out, -1, self.sub)).sum(-1) / safe_divisor(den)
        d = self._expand(params["d"])
        return self._blocks(torch.round(s / safe_divisor(d)))


@register_grid
@dataclass(frozen=True)
class GGUFQ3_K(_SignedK):
    """GGUF Q3_K: `w = (d·sc_j)·(q − 4)`, q ∈ [0, 7], sc ∈ [−32, 31] per 16 (ggml `dequantize_row_q3_K`)."""

    kind = "gguf:q3_k"
    qmax = 7
    z0 = 4
    lim = 32

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        return map_groups(make_q3, 1, x, nmax=4)[0]


@register_grid
@dataclass(frozen=True)
class GGUFQ6_K(_SignedK):
    """GGUF Q6_K: `w = (d·sc_j)·(q − 32)`, q ∈ [0, 63], sc ∈ [−128, 127] per 16 (ggml `dequantize_row_q6_K`)."""

    kind = "gguf:q6_k"
    qmax = 63
    z0 = 32
    lim = 128

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        return map_groups(make_qx, 19, x, nmax=32)[0]
