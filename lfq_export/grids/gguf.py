"""The GGUF grids, one import away: legacy 32-blocks (`gguf_legacy`) and K-quants (`gguf_kquants`).

`GGUF_GRIDS` maps each kind string (`gguf:q4_k`, ...) to its grid class; the packers that write
these grids' bytes are in `formats/gguf_pack.py`.
"""

from __future__ import annotations

from .base import Grid
from .gguf_kquants import QK_K, GGUFQ2_K, GGUFQ3_K, GGUFQ4_K, GGUFQ5_K, GGUFQ6_K
from .gguf_legacy import LEGACY_BLOCK, GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1, GGUFQ8_0

__all__ = [
    "GGUF_GRIDS",
    "QK_K",
    "LEGACY_BLOCK",
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

#: kind string → grid class, in llama.cpp's type order
GGUF_GRIDS: dict[str, type[Grid]] = {
    cls.kind: cls
    for cls in (GGUFQ4_0, GGUFQ4_1, GGUFQ5_0, GGUFQ5_1, GGUFQ8_0, GGUFQ2_K, GGUFQ3_K, GGUFQ4_K, GGUFQ5_K, GGUFQ6_K)
}
