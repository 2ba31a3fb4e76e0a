"""Random models built from configs, for tests and scale benchmarks (no hub needed).

Weights are random but shaped like a trained model (small normal init, unit norms), saved as a
safetensors HF directory with a real tokenizer copied in, so every code path — loading,
calibration, export, engines — runs on them exactly as on a downloaded model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

__all__ = ["build_synthetic_model", "FAMILY_CONFIGS", "default_tokenizer_dir"]

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def default_tokenizer_dir() -> Path | None:
    """The stories260K tokenizer (512 tokens, SentencePiece) from the shared assets, if present."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "assets" / "models" / "stories260K-hf"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "assets" / "models" / "stories260K-hf"
        if cand.is_dir():
            return cand
    return None


def build_synthetic_model(
    family: str,
    out_dir: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.05,
) -> Path:
    """Write a random `family` model to `out_dir` and return it.

    The tokenizer defaults to stories260K's (vocab 512); `vocab_size` must then be ≥ 512."""
    import transformers

    cfg_cls = getattr(transformers, FAMILY_CONFIGS[family][0])
    model_cls = getattr(transformers, FAMILY_CONFIGS[family][1])
    kwargs = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if family == "qwen2":
        kwargs["use_sliding_window"] = False
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(init_std * torch.randn_like(p))
    model = model.to(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _copy_tokenizer(tokenizer_dir or default_tokenizer_dir(), out_dir)
    return out_dir


def write_random_checkpoint(
    family: str,
    out_dir: Path,
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int = 512,
    tokenizer_dir: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    seed: int = 0,
    init_std: float = 0.02,
) -> Path:
    """Write a random model of any size tensor by tensor (never the whole model in memory).

    Used to show that quantization memory stays flat in the number of blocks (tools/bench_memory.py).
    Shards are `model-0000k-of-0000n.safetensors` with an index, like a hub checkpoint."""
    import json

    import transformers
    from safetensors.torch import save_file

    cfg_cls = getattr(transformers, FAMILY_CONFIGS[family][0])
    model_cls = getattr(transformers, FAMILY_CONFIGS[family][1])
    config = cfg_cls(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = model_cls(config)
    shapes = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    written: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        save_file(current, str(out_dir / f"shard-{len(written)}.safetensors"))
        written.append(list(current))

    for name, shape in shapes.items():
        t = (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * init_std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = t
        size += nbytes
    flush()
    weight_map = {}
    for i, keys in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        (out_dir / f"shard-{i}.safetensors").rename(out_dir / name)
        weight_map.update({k: name for k in keys})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(str(out_dir))
    _copy_tokenizer(tokenizer_dir or default_tokenizer_dir(), out_dir)
    return out_dir


def _copy_tokenizer(tok: str | Path | None, out_dir: Path) -> None:
    """Give a synthetic checkpoint a real tokenizer, so exports and engines can tokenize for it."""
    if tok is None:
        return
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tok) / f).is_file():
            shutil.copy2(Path(tok) / f, out_dir / f)
