"""Type selection against the oracle itself: `llama-quantize --dry-run` on an F32 GGUF of the same
model must pick, tensor for tensor, the types `select_types` picks (built by tools/build_llama_tools.sh;
skipped when the binary is absent)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from formats.gguf_tensors import adapter_of, gguf_names
from formats.gguf_write import write_gguf
from lfq_export.gguf_schemes import MIXES, select_types
from lfq_export.model_io import resolve_model
from lfq_export.record import QuantizedModel
from lfq_export.schemes import SchemeContext
from lfq_export.quantize import model_shapes

TOOLS = Path(os.environ.get("LLAMA_TOOLS", Path.home() / ".cache" / "lfq-export" / "llama-tools" / "bin"))
QUANTIZE = TOOLS / "llama-quantize"
pytestmark = pytest.mark.skipif(not QUANTIZE.is_file(), reason="llama-quantize not built (tools/build_llama_tools.sh)")

_LINE = re.compile(r"\]\s+(\S+)\s+- \[.*->.*\((\w+)\)\s*$")

MODELS = {  # 256-multiple rows with GQA 4; 320-wide rows (fallbacks everywhere but ffn_down); tied qwen2
    "llama-gqa4": ("llama", dict(hidden_size=256, intermediate_size=512, num_layers=8, num_heads=8, num_kv_heads=2)),
    "llama-320": ("llama", dict(hidden_size=320, intermediate_size=768, num_layers=16, num_heads=5, num_kv_heads=5)),
    "qwen2-tied": ("qwen2", dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2,
                                 tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def f32_models(tiny_model_factory, tmp_path_factory):
    out = {}
    for key, (family, dims) in MODELS.items():
        src = resolve_model(tiny_model_factory(family, **dims))
        record = QuantizedModel(config=src.config.to_dict(), family=family, scheme="fp32",
                                fp={n: src.tensor(n) for n in src.weight_map}, tokenizer_dir=src.path)
        path = write_gguf(record, tmp_path_factory.mktemp("f32") / f"{key}.gguf", {})
        to_hf = {g: h.removesuffix(".weight") for h, g in gguf_names(record, adapter_of(record)).items()}
        out[key] = (src, path, to_hf)
    return out


def llama_quantize_types(path: Path, ftype: str, pure: bool, tmp: Path) -> dict[str, str]:
    cmd = [str(QUANTIZE), "--dry-run"] + (["--pure"] if pure else []) + [str(path), str(tmp / "x.gguf"), ftype]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(TOOLS)})
    assert res.returncode == 0, res.stderr[-2000:]
    return {m[1]: m[2].lower() for m in map(_LINE.search, (res.stdout + res.stderr).splitlines()) if m}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mix", list(MIXES))
def test_mix_types_equal_llama_quantize(mix, model, f32_models, tmp_path):
    src, path, to_hf = f32_models[model]
    ctx = SchemeContext(src.adapter, src.config, model_shapes(src))
    ours = select_types(f"gguf:{mix}", ctx).types
    theirs = {to_hf[g]: t for g, t in llama_quantize_types(path, mix.upper(), False, tmp_path).items()}
    assert theirs == ours


@pytest.mark.parametrize("t", ["q2_k", "q4_k", "q5_1"])
def test_pure_block_types_equal_llama_quantize_pure(t, f32_models, tmp_path):
    src, path, to_hf = f32_models["llama-320"]
    ctx = SchemeContext(src.adapter, src.config, model_shapes(src))
    ours = {m: x for m, x in select_types(f"gguf:{t}-pure", ctx).types.items() if m.startswith("model.layers.")}
    ftype = {"q2_k": "Q2_K", "q4_k": "Q4_K_M", "q5_1": "Q5_1"}[t]  # --pure: every tensor the ftype's default type
    theirs = {to_hf[g]: x for g, x in llama_quantize_types(path, ftype, True, tmp_path).items()
              if g.startswith("blk.")}
    assert theirs == ours
