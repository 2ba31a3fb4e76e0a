"""Schemes: a name the user types → one grid per tensor, checked against the model and the formats.

`w4g128`-style names map every block linear to one `affine` grid. Other families (GGUF mixes such
as `gguf:q4_k_m`) register a resolver with `register_scheme_family`. `plan_quantization` then
applies the requested formats' constraints, refuses what cannot be stored exactly — before any
compute, naming the formats that can hold it — and returns the plan the quantizer follows.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .arch import ArchAdapter
from .errors import FormatError, SchemeError
from .formats_api import FormatAdapter, get_format, registered_formats
from .grids import AffineGrid, Grid

__all__ = [
    "resolve_scheme_grids",
    "scheme_family",
    "SchemeContext",
    "QuantPlan",
    "plan_quantization",
    "register_scheme_family",
    "SchemeFamily",
    "affine_grid_for",
    "AFFINE_SCHEME_RE",
    "list_schemes",
]

AFFINE_SCHEME_RE = re.compile(r"^w(?P<bits>[2348])(?:g(?P<group>32|64|128))?(?P<sym>-sym)?$")


@dataclass(frozen=True)
class SchemeContext:
    """What a scheme resolver may look at."""

    adapter: ArchAdapter
    config: Any
    shapes: dict[str, tuple[int, int]]  # module name → (out, in), block linears and head/embedding
    keep_head_fp: bool = False

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def block_linears(self) -> list[str]:
        return self.adapter.linear_names(self.n_layers)


@dataclass(frozen=True)
class QuantPlan:
    """The per-tensor decisions of one run.

    Attributes:
        scheme: the name asked for.
        grids: module name → grid, for every tensor that is quantized (block linears first;
            the embedding/head only when the scheme quantizes them).
        kept_fp: module name → reason, for tensors left in FP (`--skip-unquantizable`).
        notes: human-readable remarks for the report (fallbacks, containers).
    """

    scheme: str
    grids: dict[str, Grid]
    kept_fp: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def block_grids(self, prefix: str) -> dict[str, Grid]:
        return {n: g for n, g in self.grids.items() if n.startswith(prefix)}

    def head_grids(self, adapter: ArchAdapter) -> dict[str, Grid]:
        return {n: g for n, g in self.grids.items() if adapter.block_index(n + ".weight") is None}


Resolver = Callable[[str, SchemeContext], tuple[dict[str, Grid], list[str]]]


@dataclass(frozen=True)
class SchemeFamily:
    """A family of scheme names.

    Attributes:
        matches: does a name belong to this family?
        resolve: name, context → (module name → grid, notes for the report).
        names: the names to list in help and the schemes table.
        grids_of: name → the distinct grids it may use (model-independent; for capability tables).
        quantizes_head: does the scheme quantize the embedding/LM head (unless --keep-head-fp)?
    """

    matches: Callable[[str], bool]
    resolve: Resolver
    names: Callable[[], list[str]]
    grids_of: Callable[[str], list[Grid]]
    quantizes_head: Callable[[str], bool] = lambda s: False


_FAMILIES: list[SchemeFamily] = []
_EXTRA_MODULES = ("lfq_export.gguf_schemes",)
_loaded = False


def register_scheme_family(family: SchemeFamily) -> None:
    _FAMILIES.append(family)


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _EXTRA_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def affine_grid_for(scheme: str) -> AffineGrid | None:
    m = AFFINE_SCHEME_RE.match(scheme)
    if not m:
        return None
    return AffineGrid(bit_width=int(m["bits"]), group_size=int(m["group"] or 0), sym=bool(m["sym"]))


def _affine_names() -> list[str]:
    names = ["w4", "w3", "w2", "w8", "w4g128", "w4g64", "w4g32", "w3g128", "w3g64", "w2g64", "w2g32", "w8g128"]
    return names + [n + "-sym" for n in names]


def _resolve_affine(scheme: str, ctx: SchemeContext) -> tuple[dict[str, Grid], list[str]]:
    grid = affine_grid_for(scheme)
    assert grid is not None
    return {n: grid for n in ctx.block_linears()}, []


register_scheme_family(SchemeFamily(
    matches=lambda s: AFFINE_SCHEME_RE.match(s) is not None,
    resolve=_resolve_affine,
    names=_affine_names,
    grids_of=lambda s: [affine_grid_for(s)],
))


def scheme_family(scheme: str) -> SchemeFamily:
    _load_families()
    for fam in _FAMILIES:
        if fam.matches(scheme):
            return fam
    raise SchemeError(f"unknown scheme {scheme!r}; known: {', '.join(list_schemes())}")


def resolve_scheme_grids(scheme: str) -> list[Grid]:
    """The distinct grids a scheme can use, independent of a model (for the schemes table)."""
    return scheme_family(scheme).grids_of(scheme)


def list_schemes() -> list[str]:
    _load_families()
    return [n for fam in _FAMILIES for n in fam.names()]


def plan_quantization(
    scheme: str,
    ctx: SchemeContext,
    formats: Sequence[str] = (),
    skip_unquantizable: bool = False,
) -> QuantPlan:
    """Resolve `scheme` for this model and these formats, or refuse with a one-line reason."""
    _load_families()
    for fam in _FAMILIES:
        if fam.matches(scheme):
            grids, notes = fam.resolve(scheme, ctx)
            break
    else:
        raise SchemeError(f"unknown scheme {scheme!r}; known: {', '.join(list_schemes())}")
    adapters = [get_format(f) for f in formats]
    grids = {n: _constrained(g, adapters) for n, g in grids.items()}
    kept_fp: dict[str, str] = {}
    for name in list(grids):
        out_f, in_f = ctx.shapes[name]
        try:
            grids[name].check_shape(out_f, in_f, name)
        except SchemeError as e:
            if not skip_unquantizable:
                raise
            kept_fp[name] = str(e).split("; or pass --skip-unquantizable")[0]
            del grids[name]
    _check_formats(scheme, grids, ctx, adapters)
    return QuantPlan(scheme, grids, kept_fp, tuple(notes))


def _constrained(grid: Grid, adapters: list[FormatAdapter]) -> Grid:
    for a in adapters:
        grid = a.constrain(grid)
    return grid


def _reason(fmt: FormatAdapter, name: str, shape: tuple[int, int], grid: Grid) -> str | None:
    return fmt.supports(grid) or fmt.check_tensor(name, shape, grid)


def _check_formats(scheme: str, grids: dict[str, Grid], ctx: SchemeContext, adapters: list[FormatAdapter]) -> None:
    for fmt in adapters:
        for name, grid in grids.items():
            why = _reason(fmt, name, ctx.shapes[name], grid)
            if why is not None:
                can = [f for f in registered_formats() if _holds_all(get_format(f), grids, ctx)]
                raise FormatError(
                    f"scheme {scheme} cannot be stored exactly in {fmt.name}: {name} ({grid.name}): {why}; "
                    f"formats that can hold it: {', '.join(can) if can else 'none'}"
                )


def _holds_all(fmt: FormatAdapter, grids: dict[str, Grid], ctx: SchemeContext) -> bool:
    return all(_reason(fmt, n, ctx.shapes[n], fmt.constrain(g)) is None for n, g in grids.items())
