"""Export and verification entry points shared by the CLI and the Python API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_file, check_output_path
from .errors import FormatError
from .formats_api import detect_format, get_format, registered_formats
from .record import QuantizedModel

__all__ = ["export_run", "verify_export", "schemes_table", "SCHEMES_FOOTNOTE"]


def export_run(run: Path | str, fmt: str, out: Path | str, options: dict[str, Any] | None = None) -> Path:
    """Pack a finished run into `fmt` at `out` (refused before writing if `fmt` cannot hold it exactly)."""
    options = dict(options or {})
    adapter = get_format(fmt)
    out = Path(out)
    check_output_path(out, bool(options.get("overwrite")))
    record = QuantizedModel.load(run)
    problems = []
    for qt in record.iter_quantized():
        why = adapter.supports(qt.grid) or adapter.check_tensor(qt.name, qt.shape, qt.grid)
        if why is None and adapter.constrain(qt.grid) != qt.grid:
            why = f"needs the grid {adapter.constrain(qt.grid).name} (quantize with --format {adapter.name})"
        if why:
            problems.append(f"{qt.name} ({qt.grid.name}): {why}")
    if problems:
        can = [f for f in registered_formats() if _holds(get_format(f), record)]
        raise FormatError(f"run {run} cannot be stored exactly in {adapter.name}: {problems[0]}"
                          f"{f' (+{len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                          f"formats that can hold it: {', '.join(can) if can else 'none'}")
    return adapter.export(record, out, options)


def _holds(adapter, record: QuantizedModel) -> bool:
    return all(adapter.supports(q.grid) is None and adapter.check_tensor(q.name, q.shape, q.grid) is None
               and adapter.constrain(q.grid) == q.grid for q in record.iter_quantized())


def verify_export(path: Path | str, run: Path | str, options: dict[str, Any] | None = None,
                  json_out: Path | None = None) -> dict[str, Any]:
    """Weights bit for bit and the real engine against `simulate()`; optionally write JSON."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such export")
    adapter = detect_format(path)
    record = QuantizedModel.load(run)
    result = {"format": adapter.name, "path": str(path), "run": str(run)}
    result.update(adapter.verify(path, record, dict(options or {})))
    if json_out is not None:
        with atomic_file(Path(json_out), overwrite=True) as tmp:
            tmp.write_text(json.dumps(result, indent=1, default=str))
    return result


def schemes_table() -> str:
    """Markdown table: scheme → formats that store it exactly (for `lfq-export schemes`)."""
    from .schemes import list_schemes, scheme_family

    fmts = registered_formats()
    lines = ["| scheme | " + " | ".join(fmts) + " |", "|---|" + "---|" * len(fmts)]
    for scheme in list_schemes():
        fam = scheme_family(scheme)
        grids = fam.grids_of(scheme)
        cells = []
        for f in fmts:
            a = get_format(f)
            ok = all(a.supports(a.constrain(g)) is None for g in grids)
            needs_fp_head = fam.quantizes_head(scheme) and not a.quantized_head
            cells.append(("yes¹" if needs_fp_head else "yes") if ok else "—")
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SCHEMES_FOOTNOTE = "¹ with `--keep-head-fp` (the format keeps the embedding and LM head unquantized)"
