"""`lfq-export info`: a human summary of a run directory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .record import read_manifest

__all__ = ["describe_run"]


def describe_run(run: Path, as_json: bool = False) -> str:
    m = read_manifest(Path(run))
    if as_json:
        return json.dumps({k: v for k, v in m.items() if k != "config"}, indent=1)
    rep = m.get("report", {})
    grids = Counter(json.dumps(q["grid"], sort_keys=True) for q in m["quantized"].values())
    lines = [
        f"run:      {run}  (status {m['status']}, record v{m['record_version']})",
        f"model:    {rep.get('model', '?')}  family {m['family']}, {m['config'].get('num_hidden_layers')} blocks",
        f"scheme:   {m['scheme']}   formats: {', '.join(m.get('formats') or []) or '-'}",
        f"method:   {rep.get('settings', {}).get('method', '?')}  final loss {rep.get('settings', {}).get('final_loss', '?')}",
        f"tensors:  {len(m['quantized'])} quantized, {len(rep.get('kept_fp', {}))} kept in FP",
    ]
    for g, n in grids.most_common():
        lines.append(f"          {n:4d} × {json.loads(g)}")
    for name, why in rep.get("kept_fp", {}).items():
        lines.append(f"  kept FP: {name}: {why}")
    blocks = rep.get("blocks", [])
    if blocks and "init" in blocks[0]:
        lines.append("block  loss  initial      final        seconds")
        for b in blocks:
            key = "kl" if b.get("loss") == "ce" else "mse"
            lines.append(f"{b['index']:5d}  {b.get('loss', ''):4s}  {b['init'].get(key, float('nan')):11.5g}  "
                         f"{b['final'].get(key, float('nan')):11.5g}  {b.get('seconds', 0):8.1f}")
    if "timings" in rep:
        lines.append(f"total:    {rep['timings'].get('total_seconds')} s, peak RSS {rep.get('peak_rss_mb')} MB")
    return "\n".join(lines)
