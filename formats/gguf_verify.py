"""`verify` for GGUF: the file's structure, every weight bit for bit, then llama.cpp (`gguf_engine`).

Weights are read with gguf-py's `GGUFReader` and dequantized with `gguf.quants.dequantize` — an
implementation independent of ours — un-permuted, and compared with the record's exact weights
with `compare_weights` (bit for bit, ±0 equal).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lfq_export.compare import compare_weights
from lfq_export.errors import FormatError
from lfq_export.record import QuantizedModel

from .gguf_metadata import rope_freq_factors
from .gguf_tensors import ROPE_FREQS, read_weights

__all__ = ["verify_gguf", "file_report"]


def file_report(path: Path) -> dict[str, Any]:
    """Structure of a GGUF file: is its size exactly header + aligned tensor data? Types and bits per weight."""
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise FormatError(f"{path}: not a readable GGUF file ({e})") from None
    pos, align, ok_offsets = int(r.data_offset), int(r.alignment), True
    n_weights, types = 0, Counter()
    for t in r.tensors:
        pos = -(-pos // align) * align
        ok_offsets &= int(t.data_offset) == pos
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod([int(x) for x in t.shape]))
        pos += n // block * size
        n_weights += n
        types[qtype.name] += 1
    end = -(-pos // align) * align
    size = Path(path).stat().st_size
    arch = r.get_field("general.architecture")
    return {
        "file_size_ok": ok_offsets and size == end,
        "file_bytes": size,
        "architecture": None if arch is None else str(arch.contents()),
        "tensor_types": dict(sorted(types.items())),
        "bits_per_weight": round(8 * size / max(1, n_weights), 3),
    }


def verify_gguf(path: Path, record: QuantizedModel, options: dict[str, Any]) -> dict[str, Any]:
    result = file_report(path)
    model = None
    if options.get("engine", True):
        from lfq_export.simulate import simulate

        model = simulate(record)  # its weights are the record's exact weights: reuse them as the reference
        state = model.state_dict()
        reference = {k: state[k].numpy() for k in [f"{n}.weight" for n in record.quantized] + list(record.fp)}
    else:
        reference = {k: v.numpy() for k, v in record.dequantized_state_dict().items()}
    got = read_weights(path, record)
    factors = rope_freq_factors(record.config)
    rope = got.pop(ROPE_FREQS, None)
    weights = compare_weights(reference, got)
    if (factors is None) != (rope is None) or (factors is not None and not np.array_equal(factors, rope)):
        weights["weights_exact"] = False
        weights["mismatches"][ROPE_FREQS] = {"note": "rope_freqs.weight missing, unexpected or different"}
    result.update(weights)
    if options.get("engine", True):
        from .gguf_engine import engine_checks

        result.update(engine_checks(path, record, options, model))
    else:
        result.update({"engine": None, "top1_agreement": None, "kl_mean": None, "tokens_match": None})
    return result
