"""The one small registry through which `lfq_export` finds export formats.

A format is one module in `formats/` that subclasses `FormatAdapter` and decorates it with
`@register_format`. It receives the `QuantizedModel` record and nothing else of the quantizer.
It declares, as data, what it can store exactly (`supports`), may tighten a grid so that storage is
exact (`constrain`, e.g. GPTQ v1 needs zero points ≥ 1), writes files (`export`) and checks them
(`verify`).
"""

from __future__ import annotations

import argparse
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from .errors import FormatError
from .grids import Grid
from .record import QuantizedModel

__all__ = [
    "FormatAdapter",
    "register_format",
    "get_format",
    "registered_formats",
    "detect_format",
    "HEAD_NAMES",
]

#: module names of the embedding and LM head (all supported families)
HEAD_NAMES = ("model.embed_tokens", "lm_head")

_FORMATS: dict[str, type[FormatAdapter]] = {}
_BUILTIN_MODULES = ("formats.gguf", "formats.gptq", "formats.awq", "formats.compressed_tensors", "formats.onnx")
_loaded = False


def register_format(cls: type[FormatAdapter]) -> type[FormatAdapter]:
    if cls.name in _FORMATS and _FORMATS[cls.name] is not cls:
        raise RuntimeError(f"format {cls.name!r} registered twice")
    _FORMATS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but a dependency of it is missing: say so
                raise


def registered_formats() -> list[str]:
    _load_builtin()
    return sorted(_FORMATS)


def get_format(name: str) -> FormatAdapter:
    _load_builtin()
    key = name.lower().replace("_", "-")
    if key not in _FORMATS:
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(registered_formats()) or 'none'}")
    return _FORMATS[key]()


def detect_format(path: Path) -> FormatAdapter:
    """The format of an exported file or directory."""
    for name in registered_formats():
        fmt = _FORMATS[name]()
        if fmt.detect(Path(path)):
            return fmt
    raise FormatError(f"{path}: not an export lfq-export recognises (formats: {', '.join(registered_formats())})")


class FormatAdapter(ABC):
    """One export format. Subclasses set `name`, `output_is_dir` and implement the methods."""

    name: ClassVar[str]
    output_is_dir: ClassVar[bool] = True
    #: may this format hold a quantized embedding / LM head?
    quantized_head: ClassVar[bool] = False

    # ---- capability (checked before any compute) ----------------------------------------------
    @abstractmethod
    def supports(self, grid: Grid) -> str | None:
        """None if `grid` is stored exactly, else the reason it is not (one line)."""

    def constrain(self, grid: Grid) -> Grid:
        """The grid to optimise in so that storage is exact (default: unchanged)."""
        return grid

    def check_tensor(self, name: str, shape: tuple[int, int], grid: Grid | None) -> str | None:
        """Per-tensor refusal reason (shape limits of the container), or None."""
        if grid is not None and name in HEAD_NAMES and not self.quantized_head:
            return f"{self.name} keeps the embedding and LM head unquantized (engines reject quantized heads)"
        return None

    def preflight(self, config: dict[str, Any], tokenizer_dir: Path, options: dict[str, Any]) -> None:
        """Check, before any compute, what the export will need from the model besides its weights
        (e.g. a tokenizer the format can carry). Raises `FormatError`; default: nothing to check."""

    # ---- I/O ---------------------------------------------------------------------------------
    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        """Format-specific options for `export`/`quantize` (prefix them with the format name)."""

    @abstractmethod
    def default_output_name(self, record: QuantizedModel) -> str:
        """File or directory name used by `quantize --format` inside the run directory."""

    @abstractmethod
    def export(self, record: QuantizedModel, out: Path, options: dict[str, Any]) -> Path:
        """Write `out` atomically (temporary name, checks, rename). Returns the written path."""

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """True if `path` is an export of this format."""

    @abstractmethod
    def verify(self, path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
        """Weights bit for bit against the record, and the real engine against `simulate()`.

        Returns at least `weights_exact`, `engine`, `top1_agreement`, `kl_mean`, `tokens_match`."""
