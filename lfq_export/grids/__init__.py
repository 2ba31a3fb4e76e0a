"""Grids: the exact dequantization formula of every storage type (see `base.Grid`)."""

from .base import (
    FP16_MIN_NORMAL,
    Grid,
    Params,
    fake_quantize,
    grid_from_dict,
    register_grid,
    registered_grid_kinds,
    ste,
    ste_fp16,
    ste_round,
)
from .affine import AFFINE_BITS, AFFINE_GROUPS, AffineGrid

__all__ = [
    "FP16_MIN_NORMAL",
    "Grid",
    "Params",
    "fake_quantize",
    "grid_from_dict",
    "register_grid",
    "registered_grid_kinds",
    "ste",
    "ste_fp16",
    "ste_round",
    "AFFINE_BITS",
    "AFFINE_GROUPS",
    "AffineGrid",
]
