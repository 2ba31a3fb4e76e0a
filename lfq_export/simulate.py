"""`simulate(record)`: a PyTorch model whose weights are the record's exact dequantized weights.

This is the reference every export is verified against: file dequant == these weights bit for bit,
engine logits ≈ this model's logits within the engine's arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .record import QuantizedModel

__all__ = ["simulate", "model_from_config"]


def model_from_config(config: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """An empty (meta-device) HF causal LM for a config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def simulate(record: QuantizedModel, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The quantized model as a float model on CPU (eval mode).

    A tied model whose embedding was quantized keeps one shared tensor; if the embedding and
    the head were quantized differently the model is untied so each keeps its own weight."""
    state = record.dequantized_state_dict()
    config = dict(record.config)
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    if config.get("tie_word_embeddings"):
        if head in state and emb in state and not torch.equal(state[head], state[emb]):
            config["tie_word_embeddings"] = False
        elif head not in state:
            state[head] = state[emb]
    model = model_from_config(config, dtype)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"simulate: missing {missing}, unexpected {unexpected}")
    _reset_rotary(model)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    return model.eval()


def _reset_rotary(model: nn.Module) -> None:
    """Rebuild rotary-embedding modules on CPU: their buffers are computed, not stored, so
    `to_empty` leaves them uninitialised."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "config"):
                setattr(parent, child_name, type(child)(config=child.config))
