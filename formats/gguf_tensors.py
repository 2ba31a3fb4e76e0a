"""The tensors of a GGUF file for a run: names, storage types, bytes, and the q/k row permutation.

Quantized weights are packed by `formats.gguf_pack` from the record's codes and parameters (nothing
is re-rounded); FP tensors are stored F32 (2-D ones optionally F16 when that is exact). Names come
from gguf-py's `TensorNameMap`.

llama.cpp's `llama` architecture rotates adjacent pairs (GPT-J style) while transformers rotates
halves, so for Llama/Mistral the q/k rows are permuted within each head, as llama.cpp's converter
does. A permutation moves whole rows, and every GGUF block lies inside one row, so permuting the
*packed* rows (and per-row parameters with them) is exact. Qwen2/Qwen3 use NEOX RoPE: no permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lfq_export.arch import ArchAdapter, adapter_for_config
from lfq_export.errors import FormatError
from lfq_export.record import QuantizedModel, QuantizedTensor

from .gguf_metadata import rope_freq_factors

__all__ = [
    "TensorSpec",
    "plan_tensors",
    "tensor_data",
    "qk_row_order",
    "gguf_names",
    "read_weights",
    "reference_rows",
    "adapter_of",
    "FP_TYPES",
    "ROPE_FREQS",
]

T = gguf.GGMLQuantizationType
FP_TYPES = {"f32": T.F32, "f16": T.F16}
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file (its bytes are produced on demand by `tensor_data`).

    Attributes:
        gguf_name: e.g. `blk.0.attn_q.weight`.
        hf_name: the record's name (`model.layers.0.self_attn.q_proj.weight`); "" for generated tensors.
        ggml_type: storage type.
        shape: element shape in numpy order (`(out, in)` or `(n,)`).
        row_order: file row j holds HF row `row_order[j]` (q/k permutation), or None.
    """

    gguf_name: str
    hf_name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    row_order: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in (T.F32, T.F16)

    @property
    def n_bytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // block * size

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of the array `tensor_data` returns: bytes `[rows, row_bytes]` for block types."""
        if not self.quantized:
            return self.shape
        block, size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return (self.shape[0], self.shape[1] // block * size)


def adapter_of(record: QuantizedModel) -> ArchAdapter:
    cfg = type("Cfg", (), {"model_type": record.config.get("model_type"),
                           "architectures": record.config.get("architectures")})
    return adapter_for_config(cfg)


def qk_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """HF rotate-half rows → llama.cpp adjacent-pair rows: file row j = HF row `order[j]`."""
    if n_rows % n_head or (n_rows // n_head) % 2:
        raise FormatError(f"cannot permute {n_rows} q/k rows for {n_head} heads (head size must be even)")
    hd = n_rows // n_head
    return np.arange(n_rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def _row_order(hf_name: str, adapter: ArchAdapter, config: dict[str, Any], n_rows: int) -> np.ndarray | None:
    if not adapter.permute_qk_for_gguf:
        return None
    if ".self_attn.q_proj." in hf_name:
        return qk_row_order(n_rows, int(config["num_attention_heads"]))
    if ".self_attn.k_proj." in hf_name:
        return qk_row_order(n_rows, int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    return None


def gguf_names(record: QuantizedModel, adapter: ArchAdapter) -> dict[str, str]:
    """HF tensor name → GGUF tensor name, for every tensor of the record."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[adapter.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch, record.n_layers)
    hf = [f"{n}.weight" for n in record.quantized] + list(record.fp)
    out = {}
    for n in hf:
        g = name_map.get_name(n, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise FormatError(f"tensor {n} has no GGUF name for architecture {adapter.gguf_arch}")
        out[n] = g
    return out


def _check_complete(record: QuantizedModel, adapter: ArchAdapter, names: dict[str, str]) -> None:
    """llama.cpp needs the embedding, the final norm, and an output head unless the embedding is tied."""
    need = [f"{adapter.embedding}.weight", f"{adapter.final_norm}.weight"]
    if not record.tied:
        need.append(f"{adapter.lm_head}.weight")
    missing = [n for n in need if n not in names]
    if missing:
        raise FormatError(f"the run has no {', '.join(missing)}; the record is incomplete (re-run quantize)")


def _storage_type(record: QuantizedModel, hf_name: str, fp_type: str, dequantize_all: bool) -> gguf.GGMLQuantizationType:
    qt = _quantized(record, hf_name)
    if qt is not None and not dequantize_all:
        from .gguf_pack import ggml_type_for

        qtype = ggml_type_for(qt.grid)
        if qtype is None:
            raise FormatError(f"{qt.name}: grid {qt.grid.name} has no exact GGUF type")
        return qtype
    if qt is not None or record.fp[hf_name].dim() == 1:
        return T.F32
    return FP_TYPES[fp_type]


def _quantized(record: QuantizedModel, hf_name: str) -> QuantizedTensor | None:
    return record.quantized.get(hf_name[: -len(".weight")]) if hf_name.endswith(".weight") else None


def _sort_key(gguf_name: str) -> tuple[int, int, str]:
    if gguf_name.startswith("blk."):
        return (1, int(gguf_name.split(".")[1]), gguf_name)
    return (0 if gguf_name.startswith("token_embd") else 2, 0, gguf_name)


def plan_tensors(record: QuantizedModel, *, fp_type: str = "f32", dequantize_all: bool = False) -> list[TensorSpec]:
    """Every tensor of the file, in llama.cpp's usual order (token_embd, blocks, output).

    `dequantize_all` stores the record's exact weights as F32 instead of packing them: the control
    file that separates llama.cpp's arithmetic from the storage format in `verify`."""
    if fp_type not in FP_TYPES:
        raise FormatError(f"--gguf-fp-type must be one of {', '.join(FP_TYPES)}, not {fp_type!r}")
    adapter = adapter_of(record)
    names = gguf_names(record, adapter)
    _check_complete(record, adapter, names)
    specs = []
    for hf_name in sorted(names, key=lambda n: _sort_key(names[n])):
        qt = _quantized(record, hf_name)
        shape = tuple(qt.shape) if qt is not None else tuple(record.fp[hf_name].shape)
        qtype = _storage_type(record, hf_name, fp_type, dequantize_all)
        if len(shape) == 2 and shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise FormatError(f"{hf_name}: row length {shape[1]} is not a multiple of the {qtype.name} block")
        specs.append(TensorSpec(names[hf_name], hf_name, qtype, shape, _row_order(hf_name, adapter, record.config, shape[0])))
    factors = rope_freq_factors(record.config)
    if factors is not None:
        specs.append(TensorSpec(ROPE_FREQS, "", T.F32, factors.shape))
    return specs


def tensor_data(record: QuantizedModel, spec: TensorSpec) -> np.ndarray:
    """The bytes (block types) or float array of one tensor, in file row order."""
    if spec.gguf_name == ROPE_FREQS:
        factors = rope_freq_factors(record.config)
        assert factors is not None
        return factors
    qt = _quantized(record, spec.hf_name)
    if qt is not None and spec.quantized:
        from .gguf_pack import pack_tensor

        qtype, data = pack_tensor(qt.grid, qt.codes, qt.params)
        data = np.asarray(data, dtype=np.uint8)
        if qtype != spec.ggml_type or data.shape != spec.data_shape:
            raise FormatError(f"{qt.name}: the packer returned {qtype.name} {data.shape}, "
                              f"expected {spec.ggml_type.name} {spec.data_shape}")
    elif qt is not None:
        data = qt.dequantize().detach().numpy()
    else:
        data = record.fp[spec.hf_name].detach().to(torch.float32).cpu().numpy()
        if spec.ggml_type == T.F16:
            h = data.astype(np.float16)
            if not np.array_equal(h.astype(np.float32), data):
                raise FormatError(f"{spec.hf_name} is not exactly representable as F16; export it as F32 "
                                  "(--gguf-fp-type f32)")
            data = h
    if spec.row_order is not None:
        data = data[spec.row_order]
    return np.ascontiguousarray(data)


def reference_rows(record: QuantizedModel, hf_name: str, hf_rows: np.ndarray) -> np.ndarray:
    """The record's exact float32 weight rows (dequantized for quantized tensors)."""
    mod = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else None
    qt = record.quantized.get(mod) if mod is not None else None
    if qt is None:
        return record.fp[hf_name].detach().to(torch.float32).numpy()[hf_rows]
    out = qt.shape[0]
    idx = torch.as_tensor(hf_rows, dtype=torch.long)
    if all(v.dim() >= 1 and v.shape[0] == out for v in qt.params.values()):
        params = {k: v[idx] for k, v in qt.params.items()}
        return qt.grid.dequantize(qt.codes[idx], params).detach().numpy()
    return qt.dequantize().detach().numpy()[hf_rows]


def _dequantize(t: Any) -> np.ndarray:
    """A reader tensor as float32 in numpy row order ([rows, cols] for 2-D)."""
    qtype = T(int(t.tensor_type))
    if qtype == T.F32:
        return np.asarray(t.data, dtype=np.float32)
    if qtype == T.F16:
        return np.asarray(t.data, dtype=np.float16).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), qtype)


def read_weights(path: Path, record: QuantizedModel) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized by gguf-py, un-permuted, under the record's HF names.

    Tensors the record has no name for (e.g. `rope_freqs.weight`) are returned under their GGUF names."""
    adapter = adapter_of(record)
    to_hf = {g: h for h, g in gguf_names(record, adapter).items()}
    reader = gguf.GGUFReader(str(path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = _dequantize(t)
        hf = to_hf.get(t.name, t.name)
        order = _row_order(hf, adapter, record.config, w.shape[0]) if hf != t.name else None
        if order is not None:
            w = w[np.argsort(order)]
        out[hf] = w
    return out
