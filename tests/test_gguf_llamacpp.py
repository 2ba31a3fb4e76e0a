"""llama.cpp parity on real models: stories260K (SentencePiece, legacy Q4_0 with the 172-wide
down_proj kept FP) and SmolLM2-135M-Instruct (byte-level BPE, the Q4_K_M mix; slow).

Each run is quantized and exported by the real pipeline (`rtn_run` with `formats=("gguf",)`), then
`verify_export` reads every weight back bit for bit and runs llama.cpp against `simulate()`.
"""

from __future__ import annotations

import gguf
import pytest

from lfq_export.export import verify_export

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def stories_run(rtn_run, stories_dir):
    return rtn_run(stories_dir, "gguf:q4_0", formats=("gguf",), skip_unquantizable=True)


def test_stories_q4_0_matches_simulate(stories_run, wikitext_test):
    path = stories_run / "model-q4_0.gguf"
    r = verify_export(path, stories_run, {"text": wikitext_test, "max_tokens": 256, "gen_tokens": 24})
    assert r["file_size_ok"] and r["weights_exact"] and r["tensors_compared"] == 47
    # five 172-wide down_proj stay F32 (no GGUF block fits), the tied embedding is Q8_0 (Q6_K fallback)
    assert r["tensor_types"] == {"F32": 16, "Q4_0": 30, "Q8_0": 1}
    assert r["control_ok"] and r["control_f32"]["rel_l2"] < 1e-5
    assert r["quantized_ok"] and r["top1_agreement"] > 0.9, (r["rel_l2"], r["activation_rounding"])
    # SentencePiece: exact except where llama.cpp always prefixes a space (leading whitespace, after <s>)
    assert r["tokens_match_except_known"], r["tokenization"]
    assert sum(t["match"] for t in r["tokenization"]) >= 3
    once = r["greedy"][0]
    assert once["prompt"] == "Once upon a time" and once["match"], once
    assert once["engine_text"].startswith(", there was a little girl")
    for g in r["greedy"]:
        assert g["match"] or g["explained_by_arithmetic"], g


def test_stories_file_metadata(stories_run):
    r = gguf.GGUFReader(str(stories_run / "model-q4_0.gguf"))
    f = {k: r.fields[k].contents() for k in ("general.architecture", "general.file_type", "llama.rope.dimension_count",
                                             "tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix",
                                             "tokenizer.ggml.add_bos_token")}
    assert f == {"general.architecture": "llama", "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_0,
                 "llama.rope.dimension_count": 8, "tokenizer.ggml.model": "llama",
                 "tokenizer.ggml.add_space_prefix": True, "tokenizer.ggml.add_bos_token": True}
    assert "output.weight" not in {t.name for t in r.tensors}


@pytest.mark.slow
def test_smollm2_q4_k_m_matches_simulate(rtn_run, smollm2_source, wikitext_test):
    run = rtn_run(smollm2_source.path, "gguf:q4_k_m", formats=("gguf",))
    path = run / "model-q4_k_m.gguf"
    r = verify_export(path, run, {"text": wikitext_test, "max_tokens": 192, "gen_tokens": 12,
                                  "prompts": ["The capital of France is", "Once upon a time"]})
    assert r["file_size_ok"] and r["weights_exact"] and r["tensors_compared"] == 272
    # llama-quantize's own Q4_K_M on this model: Q5_0 ×166, Q4_K ×16, Q6_K ×14, Q8_0 ×15 (research/llamacpp_baseline.md)
    assert r["tensor_types"] == {"F32": 61, "Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    assert r["control_ok"] and r["quantized_ok"], (r["control_f32"], r["rel_l2"], r["activation_rounding"])
    assert r["tokens_match"], r["tokenization"]  # byte-level BPE: exact, special tokens and chat template included
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    capital = next(g for g in r["greedy"] if g["prompt"] == "The capital of France is")
    assert capital["engine_text"].startswith(" Paris"), capital
    for g in r["greedy"]:
        assert g["match"] or g["explained_by_arithmetic"], g
