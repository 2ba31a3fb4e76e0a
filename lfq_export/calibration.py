"""Calibration data: `nsamples` token windows of `seqlen` tokens, deterministic for a seed.

Sources (`--calib`):
- a local `.txt` file: documents separated by blank lines;
- a local `.jsonl` file: one JSON object per line, text in `--calib-field` (comma-separated
  fields are joined with a space, e.g. `prefix,gold_completion` for the C4 sample);
- an HF dataset `name[:config]:split` (needs a reachable hub, or a local dataset directory);
- `self`: sequences sampled from the FP model itself (seeded), which needs no data at all.

Text sources are tokenized per document (the tokenizer's BOS policy applies), concatenated into one
stream, cut into non-overlapping `seqlen` windows, and `nsamples` windows are drawn with the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import CalibrationError

__all__ = ["CalibSpec", "parse_calib", "load_calibration", "read_documents", "tokenize_stream"]


@dataclass(frozen=True)
class CalibSpec:
    """A parsed `--calib` value. `kind` is one of txt, jsonl, dataset, self."""

    kind: str
    source: str
    fields: tuple[str, ...] = ("text",)
    config: str | None = None
    split: str | None = None


def parse_calib(spec: str, field: str = "text") -> CalibSpec:
    """Parse and check a `--calib` value without reading it (cheap; runs before any compute)."""
    fields = tuple(f.strip() for f in field.split(",") if f.strip())
    if not fields:
        raise CalibrationError("--calib-field is empty; name the JSON field(s) that hold the text")
    if spec == "self":
        return CalibSpec("self", "self")
    p = Path(spec).expanduser()
    if p.suffix in (".txt", ".jsonl", ".json") or p.exists():
        if not p.is_file():
            raise CalibrationError(f"calibration file {spec} does not exist")
        if p.stat().st_size == 0:
            raise CalibrationError(f"calibration file {spec} is empty")
        if p.suffix in (".jsonl", ".json"):
            return CalibSpec("jsonl", str(p), fields)
        return CalibSpec("txt", str(p), fields)
    parts = spec.split(":")
    if len(parts) in (2, 3) and all(parts):
        name, split = parts[0], parts[-1]
        config = parts[1] if len(parts) == 3 else None
        return CalibSpec("dataset", name, fields, config, split)
    raise CalibrationError(f"--calib {spec!r}: not a file, not 'self', and not a dataset as name[:config]:split")


def read_documents(spec: CalibSpec) -> list[str]:
    """The text documents of a txt/jsonl/dataset source (empty documents dropped)."""
    if spec.kind == "txt":
        text = Path(spec.source).read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in text.replace("\r\n", "\n").split("\n\n")]
    elif spec.kind == "jsonl":
        docs = _read_jsonl(Path(spec.source), spec.fields)
    elif spec.kind == "dataset":
        docs = _read_dataset(spec)
    else:
        raise AssertionError(spec.kind)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration source {spec.source} contains no text")
    return docs


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(obj, dict) or k not in obj]
            if missing:
                have = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
                raise CalibrationError(f"{path}:{lineno}: no field {missing[0]!r} (fields here: {have}); "
                                       "set --calib-field")
            docs.append(" ".join(str(obj[k]) for k in fields))
    return docs


def _read_dataset(spec: CalibSpec) -> list[str]:
    try:
        import datasets

        local = Path(spec.source)
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except Exception as e:  # noqa: BLE001 - offline hub, unknown dataset, bad split: one user problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CalibrationError(f"dataset {spec.source}: cannot load ({first}); use a local .txt/.jsonl file or 'self'") from None
    missing = [k for k in spec.fields if k not in ds.column_names]
    if missing:
        raise CalibrationError(f"dataset {spec.source}: no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); "
                               "set --calib-field")
    return [" ".join(str(row[k]) for k in spec.fields) for row in ds]


def tokenize_stream(docs: list[str], tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize documents into one 1-D stream (stops early once `max_tokens` are reached)."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=True)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def load_calibration(
    spec: CalibSpec,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    model: Any = None,
) -> torch.Tensor:
    """`[nsamples, seqlen]` token ids. `model` is needed (and only used) for `self`."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples ≥ 1 and seqlen ≥ 2 (got {nsamples}, {seqlen})")
    if spec.kind == "self":
        if model is None:
            raise AssertionError("self-generated calibration needs the FP model")
        return self_generate(model, tokenizer, nsamples, seqlen, seed)
    docs = read_documents(spec)
    # shuffle documents with the seed so a truncated read is still a random sample
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    stream = tokenize_stream([docs[i] for i in order], tokenizer, max_tokens=4 * nsamples * seqlen)
    n_windows = stream.numel() // seqlen
    if n_windows < nsamples:
        raise CalibrationError(
            f"calibration source {spec.source} has {stream.numel()} tokens: too little for "
            f"{nsamples} samples × {seqlen} tokens ({nsamples * seqlen}); lower --nsamples/--seqlen or add text"
        )
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    pick = torch.randperm(n_windows, generator=g)[:nsamples].sort().values
    return windows[pick].clone()


@torch.no_grad()
def self_generate(model: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int, batch: int = 8) -> torch.Tensor:
    """Sample `nsamples` sequences of exactly `seqlen` tokens from the model (temperature 1).

    Each starts from BOS (or EOS if there is no BOS) and sampling continues past EOS, so every
    sequence has the full length and no padding is needed."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        start = 0
    g = torch.Generator().manual_seed(seed)
    out = []
    for b0 in tqdm(range(0, nsamples, batch), desc="self-calibration", unit="batch", leave=False):
        n = min(batch, nsamples - b0)
        ids = torch.full((n, 1), start, dtype=torch.long)
        past = None
        cur = ids
        for _ in range(seqlen - 1):
            o = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            ids = torch.cat([ids, nxt], dim=1)
            cur = nxt
        out.append(ids)
    return torch.cat(out)
