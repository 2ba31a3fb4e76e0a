"""Write a run as one GGUF file, check it, publish it atomically.

Order: tensor infos first (types and shapes are known without packing), then each tensor is packed
and written one at a time, so memory holds one tensor, not the model. The file is written under a
temporary name next to the output; before the rename it must pass `check_file`:

1. size: header + every tensor's `n_blocks · block_bytes`, each start aligned to `general.alignment`,
   equals the file size (a truncated or mis-sized tensor cannot slip through);
2. gguf-py's `GGUFReader` reads back the same names, types, shapes and offsets;
3. a sample of rows of every tensor, dequantized by `gguf.quants.dequantize` and un-permuted, equals
   the record's exact weights bit for bit (the full comparison is `verify`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from lfq_export.atomic import atomic_file
from lfq_export.errors import FormatError
from lfq_export.record import QuantizedModel

from .gguf_metadata import arch_metadata, file_type_for, write_arch_metadata
from .gguf_tensors import TensorSpec, adapter_of, plan_tensors, reference_rows, tensor_data
from .gguf_vocab import vocab_metadata, write_vocab

log = logging.getLogger(__name__)
# gguf-py logs every file's endianness and tensor count at INFO: noise next to our own summary line
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

__all__ = ["write_gguf", "check_file", "SAMPLE_ROWS"]

#: rows per tensor compared bit for bit before publishing (spread over the tensor)
SAMPLE_ROWS = 16


def _model_name(record: QuantizedModel) -> str:
    src = str(record.report.get("model") or record.config.get("_name_or_path") or "model")
    return Path(src.rstrip("/")).name.removesuffix(".gguf") or "model"


def write_gguf(record: QuantizedModel, out: Path, options: dict[str, Any], *, dequantize_all: bool = False) -> Path:
    """Write `record` to `out` (atomically, checked). Options: `gguf_fp_type`, `gguf_tokenizer_pre`,
    `overwrite`, `progress`. `dequantize_all` writes the F32 control file used by `verify`."""
    adapter = adapter_of(record)
    specs = plan_tensors(record, fp_type=options.get("gguf_fp_type") or "f32", dequantize_all=dequantize_all)
    block_types = [s.ggml_type for s in specs if s.quantized]
    ftype = gguf.LlamaFileType.ALL_F32 if dequantize_all else file_type_for(record.scheme, block_types)
    kv = arch_metadata(record.config, adapter.gguf_arch, _model_name(record), int(ftype))
    vocab = vocab_metadata(record.tokenizer_dir, int(record.config["vocab_size"]), record.config,
                           options.get("gguf_tokenizer_pre"))
    out = Path(out)
    with atomic_file(out, overwrite=bool(options.get("overwrite")),
                     check=lambda tmp: check_file(tmp, record, specs)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), adapter.gguf_arch)
        try:
            write_arch_metadata(writer, kv)
            write_vocab(writer, vocab)
            for s in specs:
                dtype = np.uint8 if s.quantized else (np.float16 if s.ggml_type == gguf.GGMLQuantizationType.F16 else np.float32)
                writer.add_tensor_info(s.gguf_name, s.data_shape, np.dtype(dtype), s.n_bytes,
                                       raw_dtype=s.ggml_type if s.quantized else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for s in tqdm(specs, desc=f"writing {out.name}", unit="tensor", disable=not options.get("progress", False)):
                writer.write_tensor_data(tensor_data(record, s))
        finally:
            writer.close()
    log.log(logging.DEBUG if dequantize_all else logging.INFO, "wrote %s (%d tensors, %.1f MB)", out, len(specs),
            out.stat().st_size / 1e6)
    return out


def _expected_size(data_start: int, specs: list[TensorSpec], alignment: int) -> tuple[int, list[int]]:
    offsets, pos = [], data_start
    for s in specs:
        pos = -(-pos // alignment) * alignment
        offsets.append(pos)
        pos += s.n_bytes
    return -(-pos // alignment) * alignment, offsets


def check_file(path: Path, record: QuantizedModel, specs: list[TensorSpec]) -> None:
    """Size, read-back and bit-exact sample checks of a written file; raises FormatError on any mismatch."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises many types on a bad file
        raise FormatError(f"{path}: the written GGUF does not read back ({e})") from None
    if [t.name for t in reader.tensors] != [s.gguf_name for s in specs]:
        raise FormatError(f"{path}: tensor list read back differs from the one written")
    size, offsets = _expected_size(int(reader.data_offset), specs, int(reader.alignment))
    if Path(path).stat().st_size != size:
        raise FormatError(f"{path}: file has {Path(path).stat().st_size} bytes, the header and tensor types need {size}")
    for t, s, off in zip(reader.tensors, specs, offsets):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if int(t.tensor_type) != int(s.ggml_type) or shape != tuple(s.shape) or int(t.data_offset) != off:
            raise FormatError(f"{path}: {s.gguf_name} reads back as {t.tensor_type.name} {shape} at {t.data_offset}, "
                              f"written as {s.ggml_type.name} {s.shape} at {off}")
        if s.hf_name:
            _check_sample(t, s, record)


def _check_sample(t: Any, s: TensorSpec, record: QuantizedModel) -> None:
    rows = s.shape[0] if len(s.shape) == 2 else 1
    file_rows = np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(np.int64))
    data = np.asarray(t.data)
    if len(s.shape) == 1:
        got, want = data.astype(np.float32), reference_rows(record, s.hf_name, np.arange(s.shape[0]))
    else:
        part = data[file_rows]
        if s.quantized:
            got = gguf.quants.dequantize(part, s.ggml_type)
        else:
            got = part.astype(np.float32)
        hf_rows = s.row_order[file_rows] if s.row_order is not None else file_rows
        want = reference_rows(record, s.hf_name, hf_rows)
    if got.shape != want.shape or not np.array_equal(got, want):  # value equality: ±0 are the same weight
        bad = int((got != want).sum()) if got.shape == want.shape else -1
        raise FormatError(f"{s.gguf_name}: {bad} sampled weights differ from the run's exact weights after "
                          f"writing as {s.ggml_type.name}; the file was not published")
