"""Architecture metadata for GGUF: the `general.*` and `{arch}.*` keys llama.cpp's loader reads.

Covers the llama (Llama, Mistral), qwen2 and qwen3 architectures: sizes, head counts, `key_length` /
`value_length` (= head_dim, which differs from hidden/heads in e.g. Qwen3), RoPE base and scaling
(linear, yarn, and Llama-3's `rope_freqs` factor tensor), RMSNorm epsilon, `general.file_type` and
`general.quantization_version`. The values come from the run's HF config only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import gguf
import numpy as np

from lfq_export.errors import FormatError

log = logging.getLogger(__name__)

__all__ = ["arch_metadata", "write_arch_metadata", "rope_freq_factors", "head_dim", "rope_parameters", "file_type_for"]

V = gguf.GGUFValueType


def head_dim(config: dict[str, Any]) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else int(config["hidden_size"]) // int(config["num_attention_heads"])


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers-5 form (`rope_parameters`), also from older `rope_theta`/`rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    old = config.get("rope_scaling") or {}
    for k, v in old.items():
        params.setdefault("rope_type" if k == "type" else k, v)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _n_kv(config: dict[str, Any]) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def arch_metadata(config: dict[str, Any], arch: str, name: str, file_type: int) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """Every metadata key except the architecture and tokenizer ones: key → (value, GGUF type)."""
    hd = head_dim(config)
    kv: dict[str, tuple[Any, gguf.GGUFValueType]] = {
        gguf.Keys.General.TYPE: ("model", V.STRING),
        gguf.Keys.General.NAME: (name, V.STRING),
        gguf.Keys.General.FILE_TYPE: (int(file_type), V.UINT32),
        gguf.Keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, V.UINT32),
    }
    a = {
        gguf.Keys.LLM.VOCAB_SIZE: (int(config["vocab_size"]), V.UINT32),
        gguf.Keys.LLM.CONTEXT_LENGTH: (int(config.get("max_position_embeddings", 2048)), V.UINT32),
        gguf.Keys.LLM.EMBEDDING_LENGTH: (int(config["hidden_size"]), V.UINT32),
        gguf.Keys.LLM.BLOCK_COUNT: (int(config["num_hidden_layers"]), V.UINT32),
        gguf.Keys.LLM.FEED_FORWARD_LENGTH: (int(config["intermediate_size"]), V.UINT32),
        gguf.Keys.Attention.HEAD_COUNT: (int(config["num_attention_heads"]), V.UINT32),
        gguf.Keys.Attention.HEAD_COUNT_KV: (_n_kv(config), V.UINT32),
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: (float(config.get("rms_norm_eps", 1e-6)), V.FLOAT32),
        gguf.Keys.Attention.KEY_LENGTH: (hd, V.UINT32),
        gguf.Keys.Attention.VALUE_LENGTH: (hd, V.UINT32),
        gguf.Keys.Rope.DIMENSION_COUNT: (hd, V.UINT32),
    }
    rope = rope_parameters(config)
    a[gguf.Keys.Rope.FREQ_BASE] = (float(rope["rope_theta"]), V.FLOAT32)
    a.update(_rope_scaling(rope, config))
    kv.update({k.format(arch=arch): v for k, v in a.items()})
    _warn_sliding_window(config, arch)
    return kv


def _rope_scaling(rope: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    kind = rope["rope_type"]
    R = gguf.Keys.Rope
    if kind == "default":
        return {}
    if kind == "llama3":
        return {}  # carried by the rope_freqs.weight tensor (see rope_freq_factors)
    if kind == "linear":
        return {R.SCALING_TYPE: ("linear", V.STRING), R.SCALING_FACTOR: (float(rope["factor"]), V.FLOAT32)}
    if kind == "yarn":
        out = {
            R.SCALING_TYPE: ("yarn", V.STRING),
            R.SCALING_FACTOR: (float(rope["factor"]), V.FLOAT32),
            R.SCALING_ORIG_CTX_LEN: (int(rope.get("original_max_position_embeddings")
                                         or config.get("max_position_embeddings")), V.UINT32),
        }
        for hf_key, key in (("beta_fast", R.SCALING_YARN_BETA_FAST), ("beta_slow", R.SCALING_YARN_BETA_SLOW)):
            if rope.get(hf_key) is not None:
                out[key] = (float(rope[hf_key]), V.FLOAT32)
        return out
    raise FormatError(f"RoPE scaling {kind!r} is not supported by the GGUF writer (supported: default, linear, yarn, llama3)")


def _warn_sliding_window(config: dict[str, Any], arch: str) -> None:
    sw = config.get("sliding_window")
    use = config.get("use_sliding_window", True)
    if sw and use and int(sw) < int(config.get("max_position_embeddings", 0)):
        log.warning("the model uses a %d-token sliding window; llama.cpp's %s architecture attends to the whole "
                    "context, so outputs differ beyond %d tokens", int(sw), arch, int(sw))


def rope_freq_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama-3.x RoPE scaling as llama.cpp's `rope_freqs.weight` (float32, head_dim/2), or None.

    llama.cpp divides each rotary frequency by its factor; transformers multiplies the inverse
    frequency by `(1 − smooth)/factor + smooth` in the medium band, so the factor is its reciprocal."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    dim = head_dim(config)
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = np.empty(dim // 2, dtype=np.float64)
    for i, f in enumerate(inv_freq):
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out[i] = 1.0
        elif wavelen > old_ctx / low:
            out[i] = factor
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out.astype(np.float32)


def write_arch_metadata(writer: gguf.GGUFWriter, kv: dict[str, tuple[Any, gguf.GGUFValueType]]) -> None:
    for key, (value, vtype) in kv.items():
        writer.add_key_value(key, value, vtype)


#: ggml type → llama.h file type, for runs whose scheme is not a gguf mix (the majority type decides)
_FTYPE_OF_TYPE = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "Q6_K": "MOSTLY_Q6_K",
}


def file_type_for(scheme: str, block_types: list[gguf.GGMLQuantizationType]) -> gguf.LlamaFileType:
    """`general.file_type`: the llama-quantize file type of a gguf scheme, else the majority block type's."""
    if scheme.startswith("gguf:"):
        from lfq_export.gguf_schemes import llama_ftype_name

        return gguf.LlamaFileType[f"MOSTLY_{llama_ftype_name(scheme)}"]
    if not block_types:
        return gguf.LlamaFileType.ALL_F32
    names = [t.name for t in block_types]
    majority = max(set(names), key=names.count)
    return gguf.LlamaFileType[_FTYPE_OF_TYPE.get(majority, "GUESSED")]
