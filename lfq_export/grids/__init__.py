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
from .gguf import GGUF_GRIDS, GGUFQ2_K, GGUFQ3_K, GGUFQ4_0, GGUFQ4_1, GGUFQ4_K, GGUFQ5_0, GGUFQ5_1, GGUFQ5_K, GGUFQ6_K, GGUFQ8_0

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
    "GGUF_GRIDS",
    "GGUFQ4_0",
    "GGUFQ4_1",
    "GGUFQ5_0",
    "GGUFQ5_1",
    "GGUFQ8_0",
    "GGUFQ2_K",
    "GGUFQ3_K",
    "GGUFQ4_K",
    "GGUFQ5_K",
    "GGUFQ6_K",
]
