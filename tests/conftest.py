"""Shared fixtures: the real assets in ../shared/assets and tiny random models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _find_assets() -> Path | None:
    env = os.environ.get("LFQ_SHARED_ASSETS")
    cands = [Path(env)] if env else []
    cands += [ROOT.parent / "shared" / "assets", ROOT / "shared" / "assets"]
    for c in cands:
        if (c / "models").is_dir():
            return c
    return None


ASSETS = _find_assets()


def asset(*parts: str) -> Path:
    if ASSETS is None:
        pytest.skip("shared assets not found (set LFQ_SHARED_ASSETS)")
    p = ASSETS.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"asset {p} missing")
    return p


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """Real fp32 TinyStories Llama (260K params), HF layout, SentencePiece tokenizer."""
    return asset("models", "stories260K-hf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Real SmolLM2-135M-Instruct as a Q4_1 GGUF (the FP reference after dequantization)."""
    return asset("models", "smollm2-135m-instruct-q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_source(smollm2_gguf):
    """SmolLM2 resolved to its cached safetensors directory (converted once per machine)."""
    from lfq_export.model_io import resolve_model

    return resolve_model(smollm2_gguf)


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return asset("text", "wikitext2_raw_test.txt")


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return asset("text", "tinystories_valid_head.txt")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, stories_dir):
    """`make(family, **dims)` → directory of a random model of that family (cached per session).

    Defaults: hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads, vocab 512 with the
    stories260K SentencePiece tokenizer. K-quant tests need hidden/intermediate multiples of 256."""
    from lfq_export.synthetic import build_synthetic_model

    cache: dict[tuple, Path] = {}

    def make(family: str = "llama", **dims) -> Path:
        key = (family, tuple(sorted(dims.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_synthetic_model(family, d, tokenizer_dir=stories_dir, **dims)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def rtn_run(tmp_path_factory):
    """`run(model_dir, scheme, formats=(), **opts)` → a finished RTN run directory."""
    from lfq_export.quantize import QuantizeOptions, quantize

    def run(model, scheme: str, formats: tuple[str, ...] = (), **opts) -> Path:
        out = tmp_path_factory.mktemp("run") / "run"
        return quantize(str(model), out, QuantizeOptions(scheme=scheme, method="rtn", formats=tuple(formats),
                                                         progress=False, **opts))

    return run
