"""The four ways to choose one linear's codes and grid parameters.

Every learner projects its parameters onto the grid's lattice with straight-through rounding
(`Grid.project`) and quantizes with the grid's own `choose_codes` + `dequantize`, so it optimises
*inside* the storage format.

- `rtn`: round to nearest after min-max (or the grid's error-minimising search). No parameters.
- `omniquant`: learnable weight clipping (LWC, OmniQuant ICLR'24): per group γ = σ(θ1), β = σ(θ2)
  shrink the max and min; scale/zero follow from the clipped range.
- `flexround`: learnable division (FlexRound ICML'23): `W_hat = s1·(round(W / (s1·S2·s3)) + z − z)`
  with per-group s1 (the stored scale), element-wise S2 and per-output-channel s3, zero fixed at init.
- `blockap`: Block-AP (EfficientQAT phase 1): learn the scale, the zero and the FP weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..grids import Grid, Params, fake_quantize
from .base import LinearQuantizer, MethodConfig, register_method

__all__ = ["RTNLearner", "OmniQuantLWC", "FlexRoundLearner", "BlockAPLearner"]


def _group_view(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    out, inn = w.shape
    return w.reshape(out, inn // grid.group_size_for(inn), -1)


@register_method("rtn")
class RTNLearner(LinearQuantizer):
    """Round to nearest: the grid's initialisation, nothing learned."""

    def __init__(self, weight: torch.Tensor, grid: Grid, cfg: MethodConfig):
        super().__init__(weight, grid)
        self._params = grid.init_params(self.w_fp, search=cfg.rtn_search)

    def current_params(self) -> Params:
        return self._params

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize(self.grid, self.w_fp, self._params)


#: OmniQuant initialises the clipping logits at 4 (σ(4) ≈ 0.982: almost no clipping); used where a
#: group's range is one-sided
_LWC_INIT = 4.0
#: largest initial clipping strength (logit ≈ 6.9): keeps the sigmoid's gradient alive
_LWC_MAX = 0.999


@register_method("omniquant")
class OmniQuantLWC(LinearQuantizer):
    """Learnable weight clipping: `[β·min, γ·max]` is mapped onto the grid's code range."""

    def __init__(self, weight: torch.Tensor, grid: Grid, cfg: MethodConfig):
        super().__init__(weight, grid)
        wg = _group_view(self.w_fp, grid)
        self.register_buffer("wmax", wg.amax(-1), persistent=False)
        self.register_buffer("wmin", wg.amin(-1), persistent=False)
        gamma0, beta0 = self._initial_clipping(grid)
        self.gamma_logit = nn.Parameter(torch.logit(gamma0))
        self.beta_logit = nn.Parameter(torch.logit(beta0))
        self._bank: _ClippingBank | None = None  # set by `link` (a plain reference, not a submodule)

    def _initial_clipping(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Start from the clipping implied by the grid's searched RTN parameters rather than OmniQuant's
        fixed σ(4) ≈ 0.98: for GGUF grids llama.cpp's search is far better than min-max (3× lower weight
        MSE on Q4_K), and a learner that starts worse than RTN rarely recovers in a CPU schedule."""
        s, z = grid.effective(grid.init_params(self.w_fp, search=True))
        a, b = -z * s, (grid.qmax - z) * s  # the code range in weight units (s < 0 flips it)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        default = torch.sigmoid(torch.tensor(_LWC_INIT))
        gamma = torch.where(self.wmax > 0, hi / self.wmax.clamp(min=1e-30), default)
        beta = torch.where(self.wmin < 0, lo / self.wmin.clamp(max=-1e-30), default)
        return gamma.clamp(0.05, _LWC_MAX), beta.clamp(0.05, _LWC_MAX)

    def current_params(self) -> Params:
        if self._bank is not None:
            return self._bank.params_of(self)
        return _clipped_params(self.grid, self.gamma_logit, self.beta_logit, self.wmax, self.wmin)

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize(self.grid, self.w_fp, self.current_params())

    @classmethod
    def link(cls, learners: list[LinearQuantizer]) -> None:
        """Learners with the same grid and group count (q/k/v/o/gate/up of a block; down) compute their
        parameters together (`_ClippingBank`): one set of ~30 small tensor operations a step, forward and
        backward, instead of one per linear. Elementwise, so every value is the same as computed alone."""
        groups: dict[tuple, list[OmniQuantLWC]] = {}
        for lrn in learners:
            if isinstance(lrn, OmniQuantLWC):
                groups.setdefault((lrn.grid, lrn.wmax.shape[1], lrn.wmax.device), []).append(lrn)
        for members in groups.values():
            if len(members) > 1:
                bank = _ClippingBank(members)
                for lrn in members:
                    lrn._bank = bank


def _clipped_params(grid: Grid, gamma_logit: torch.Tensor, beta_logit: torch.Tensor, wmax: torch.Tensor,
                    wmin: torch.Tensor) -> Params:
    """LWC: the range `[σ(β)·min, σ(γ)·max]` of every group, mapped onto the grid's code range."""
    hi = torch.sigmoid(gamma_logit) * wmax
    lo = torch.sigmoid(beta_logit) * wmin
    return grid.project(*grid.scale_zero_from_range(lo, hi))


class _ClippingBank:
    """The clipping parameters of several `OmniQuantLWC` learners of one grid, stacked along the rows.

    Each learner keeps its own `nn.Parameter`s (the optimiser is unchanged); per step the bank
    concatenates them, computes every group's parameters once and hands each learner its rows. The result
    is cached until a parameter changes (its version counter: the optimiser loop bumps it, since fused AdamW
    does not) or the grad mode does, so the 6 learners of a block share one computation per forward. Grids
    are row-wise (no group spans two rows), so the stacked computation is the per-learner one, element for
    element."""

    def __init__(self, members: list[OmniQuantLWC]):
        self.members = members
        self.grid = members[0].grid
        bounds = [0]
        for lrn in members:
            bounds.append(bounds[-1] + lrn.wmax.shape[0])
        self.rows = {id(lrn): (bounds[i], bounds[i + 1]) for i, lrn in enumerate(members)}
        self.wmax = torch.cat([lrn.wmax for lrn in members])
        self.wmin = torch.cat([lrn.wmin for lrn in members])
        self._key: tuple | None = None
        self._params: Params | None = None

    def params_of(self, learner: OmniQuantLWC) -> Params:
        key = (torch.is_grad_enabled(),) + tuple(t._version for lrn in self.members
                                                 for t in (lrn.gamma_logit, lrn.beta_logit))
        if key != self._key or self._params is None:
            gamma = torch.cat([lrn.gamma_logit for lrn in self.members])
            beta = torch.cat([lrn.beta_logit for lrn in self.members])
            self._params = _clipped_params(self.grid, gamma, beta, self.wmax, self.wmin)
            self._key = key
        a, b = self.rows[id(learner)]
        return {k: v[a:b] for k, v in self._params.items()}


@register_method("flexround")
class FlexRoundLearner(LinearQuantizer):
    """Learnable division scales; the zero point stays at its initial value."""

    def __init__(self, weight: torch.Tensor, grid: Grid, cfg: MethodConfig):
        super().__init__(weight, grid)
        init = grid.init_params(self.w_fp, search=True)
        s, z = grid.effective(init)
        # GGUF's symmetric types put the largest weight on the longer side of the code range, so their
        # scale may be negative: learn log|s1| and keep the sign
        self.register_buffer("sign", torch.where(s < 0, -1.0, 1.0), persistent=False)
        mag = s.abs()
        self.log_s1 = nn.Parameter(torch.where(mag > 0, mag, torch.ones_like(mag)).log())  # per group
        self.log_S2 = nn.Parameter(torch.zeros_like(self.w_fp))  # element-wise
        self.log_s3 = nn.Parameter(torch.zeros(self.w_fp.shape[0], 1))  # per output channel
        self.register_buffer("zero0", None if grid.symmetric else z.clone(), persistent=False)

    def current_params(self) -> Params:
        return self.grid.project(self.sign * self.log_s1.exp(), self.zero0)

    def divisor(self) -> torch.Tensor:
        return (self.log_S2 + self.log_s3).exp()

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize(self.grid, self.w_fp, self.current_params(), self.divisor())


@register_method("blockap")
class BlockAPLearner(LinearQuantizer):
    """Block-AP: scale, zero and the weights themselves are trained (two learning rates)."""

    def __init__(self, weight: torch.Tensor, grid: Grid, cfg: MethodConfig):
        super().__init__(weight, grid)
        init = grid.init_params(self.w_fp, search=cfg.rtn_search)
        s, z = grid.effective(init)
        self.scale = nn.Parameter(s.clone())
        self.zero = None if grid.symmetric else nn.Parameter(z.clone())
        self.weight = nn.Parameter(self.w_fp.clone())

    def current_params(self) -> Params:
        return self.grid.project(self.scale, self.zero)

    def source_weight(self) -> torch.Tensor:
        return self.weight

    def param_groups(self, cfg: MethodConfig) -> list[dict]:
        quant = [self.scale] + ([self.zero] if self.zero is not None else [])
        return [{"params": quant, "lr": cfg.lr}, {"params": [self.weight], "lr": cfg.weight_lr}]

    def fake_weight(self) -> torch.Tensor:
        return fake_quantize(self.grid, self.weight, self.current_params())
