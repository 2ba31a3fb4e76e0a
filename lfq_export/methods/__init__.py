"""Quantization methods (RTN, OmniQuant LWC, FlexRound, Block-AP) as per-linear learners."""

from .base import METHODS, LinearQuantizer, MethodConfig, get_method, register_method
from . import learners  # noqa: F401  (registers the methods)

__all__ = ["METHODS", "LinearQuantizer", "MethodConfig", "get_method", "register_method"]
