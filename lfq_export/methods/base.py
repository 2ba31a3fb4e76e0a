"""Block quantization methods: how one linear's grid parameters (and codes) are learned.

A method turns an FP weight and its grid into a `LinearQuantizer`: a module whose learnable tensors
are the method's own (clipping strengths, division scales, weights...), whose `fake_weight()` is the
exact grid weight as a differentiable function of them, and whose `finalize()` returns the codes
and storable parameters of that same weight. Because both run the grid's one `dequantize`, the
weight the optimiser saw last is the weight that gets exported, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..grids import Grid, Params

__all__ = ["MethodConfig", "LinearQuantizer", "register_method", "get_method", "METHODS"]


@dataclass(frozen=True)
class MethodConfig:
    """Optimisation settings of one block (the final block may override iters/lr).

    Attributes:
        iters: optimisation steps per block (0 = round-to-nearest initialisation only).
        lr: learning rate of the method's main parameters.
        batch_size: calibration sequences per step.
        weight_lr: Block-AP's learning rate of the FP weights themselves.
        rtn_search: initialise with the grid's error-minimising search instead of plain min-max.
        wd: AdamW weight decay.
    """

    iters: int
    lr: float
    batch_size: int = 1
    weight_lr: float = 0.0
    rtn_search: bool = False
    wd: float = 0.0


class LinearQuantizer(nn.Module, ABC):
    """Learnable quantization of one linear weight inside its grid."""

    def __init__(self, weight: torch.Tensor, grid: Grid):
        super().__init__()
        self.grid = grid
        self.register_buffer("w_fp", weight.detach().to(torch.float32).clone(), persistent=False)

    @abstractmethod
    def fake_weight(self) -> torch.Tensor:
        """Exact grid weight, differentiable w.r.t. the method's parameters."""

    @abstractmethod
    def current_params(self) -> Params:
        """Grid parameters (projected, float32) at the current state."""

    def param_groups(self, cfg: MethodConfig) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": cfg.lr}]

    @torch.no_grad()
    def finalize(self) -> tuple[torch.Tensor, Params]:
        """Codes (uint8) and parameters in storage dtypes, of exactly `fake_weight()`."""
        params = self.current_params()
        codes = self.grid.choose_codes(self.source_weight(), params, self.divisor())
        out, inn = self.w_fp.shape
        return codes.to(torch.uint8), self.grid.to_storage(params, out, inn)

    @classmethod
    def link(cls, learners: list[LinearQuantizer]) -> None:
        """Let the learners of one block share work (called once, after they are built). Default: none."""

    def source_weight(self) -> torch.Tensor:
        """The weight codes are chosen from (Block-AP learns it; others use the FP weight)."""
        return self.w_fp

    def divisor(self) -> torch.Tensor | None:
        """FlexRound's element-wise division (None for other methods)."""
        return None


METHODS: dict[str, type] = {}


def register_method(name: str):
    def deco(cls):
        METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type:
    if name not in METHODS:
        raise KeyError(name)
    return METHODS[name]
