"""The onnxruntime-genai side of an ONNX export: `genai_config.json` and the tokenizer files.

onnxruntime-genai loads a directory holding `model.onnx`, `genai_config.json` and a Hugging Face
tokenizer (`tokenizer.json` + `tokenizer_config.json`). The config names the graph's inputs and
outputs, the attention geometry and the default search. `past_present_share_buffer` is true because
GroupQueryAttention appends to a preallocated KV buffer of `search.max_length` positions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lfq_export.record import QuantizedModel

__all__ = ["GENAI_CONFIG", "TOKENIZER_FILES", "genai_config", "write_genai_files", "special_ids"]

GENAI_CONFIG = "genai_config.json"
#: copied from the run's tokenizer directory when present
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
#: model types onnxruntime-genai knows as plain decoders; anything else is written as "decoder"
_GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def special_ids(record: QuantizedModel) -> tuple[int | None, int | list[int] | None, int | None]:
    """(bos, eos, pad) token ids: generation_config.json of the run wins over config.json, as in HF."""
    cfg = dict(record.config)
    gen_path = Path(record.tokenizer_dir) / "generation_config.json" if record.tokenizer_dir else None
    if gen_path is not None and gen_path.is_file():
        gen = json.loads(gen_path.read_text())
        cfg.update({k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if gen.get(k) is not None})
    eos = cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return cfg.get("bos_token_id"), eos, pad


def genai_config(record: QuantizedModel, context_length: int | None = None, filename: str = "model.onnx") -> dict[str, Any]:
    """The `genai_config.json` contents for our graph (greedy search by default)."""
    c = record.config
    heads = int(c["num_attention_heads"])
    head_size = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    ctx = int(context_length or c.get("max_position_embeddings") or 2048)
    bos, eos, pad = special_ids(record)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": head_size,
                "hidden_size": int(c["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": int(c["num_hidden_layers"]),
                "num_key_value_heads": int(c.get("num_key_value_heads") or heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": _GENAI_TYPES.get(str(c.get("model_type")), "decoder"),
            "vocab_size": int(c["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_files(record: QuantizedModel, out_dir: Path, context_length: int | None = None) -> list[str]:
    """Write `genai_config.json` and copy the tokenizer files into `out_dir`; returns the file names."""
    out_dir = Path(out_dir)
    (out_dir / GENAI_CONFIG).write_text(json.dumps(genai_config(record, context_length), indent=4))
    names = [GENAI_CONFIG]
    if record.tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(record.tokenizer_dir) / f
            if src.is_file():
                shutil.copy2(src, out_dir / f)
                names.append(f)
    return names
