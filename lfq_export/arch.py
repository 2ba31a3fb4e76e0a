"""Architecture adapters: where each supported family keeps its embedding, blocks, linears and head.

The four supported families share the Llama module layout in transformers (`model.embed_tokens`,
`model.layers[i].self_attn.{q,k,v,o}_proj`, `model.layers[i].mlp.{gate,up,down}_proj`, `model.norm`,
`lm_head`); they differ in biases, q/k norms and how llama.cpp lays out rotary embeddings. An adapter
is data, so adding a family is one table row plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import InputError

__all__ = ["ArchAdapter", "adapter_for_config", "SUPPORTED_FAMILIES", "BLOCK_LINEARS", "FUSED_FAMILIES"]

#: the quantizable linears of one decoder block, in forward order (names relative to the block)
BLOCK_LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

#: linears that read the same input and that engines fuse (vLLM QKVParallelLinear, genai packed qkv):
#: they must share bits and group size
FUSED_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


@dataclass(frozen=True)
class ArchAdapter:
    """Names and conventions of one model family.

    Attributes:
        family: our name (llama, mistral, qwen2, qwen3).
        model_types: HF `config.model_type` values handled.
        gguf_arch: llama.cpp architecture string.
        permute_qk_for_gguf: llama.cpp uses adjacent-pair RoPE for this arch, so q/k rows are permuted.
        qkv_bias: q/k/v projections have biases (Qwen2).
        qk_norm: per-head RMSNorm on q and k (Qwen3).
    """

    family: str
    model_types: tuple[str, ...]
    gguf_arch: str
    permute_qk_for_gguf: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    # module paths (HF state-dict names)
    embedding: str = "model.embed_tokens"
    blocks: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    linears: tuple[str, ...] = BLOCK_LINEARS
    fused: tuple[tuple[str, ...], ...] = FUSED_FAMILIES

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks}.{i}."

    def linear_names(self, n_layers: int) -> list[str]:
        """Full HF names of every quantizable block linear."""
        return [f"{self.block_prefix(i)}{ln}" for i in range(n_layers) for ln in self.linears]

    def block_index(self, name: str) -> int | None:
        """Block index of a state-dict name, or None for embedding/norm/head."""
        prefix = self.blocks + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix) :].split(".", 1)[0])

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def get_embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embedding)

    def get_final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def get_lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head)

    def get_rotary(self, model: nn.Module) -> nn.Module:
        return model.get_submodule("model.rotary_emb")

    def tied(self, config: Any) -> bool:
        return bool(getattr(config, "tie_word_embeddings", False))


_ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter("llama", ("llama",), "llama", permute_qk_for_gguf=True),
    ArchAdapter("mistral", ("mistral",), "llama", permute_qk_for_gguf=True),
    ArchAdapter("qwen2", ("qwen2",), "qwen2", permute_qk_for_gguf=False, qkv_bias=True),
    ArchAdapter("qwen3", ("qwen3",), "qwen3", permute_qk_for_gguf=False, qk_norm=True),
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(a.family for a in _ADAPTERS)


def adapter_for_config(config: Any) -> ArchAdapter:
    """The adapter for an HF config, or a clear refusal listing the supported families."""
    model_type = getattr(config, "model_type", None)
    for a in _ADAPTERS:
        if model_type in a.model_types:
            return a
    archs = getattr(config, "architectures", None) or []
    raise InputError(
        f"unsupported architecture {model_type!r}{' (' + ', '.join(archs) + ')' if archs else ''}; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
    )
