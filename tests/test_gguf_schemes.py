"""`gguf:*` schemes: per-tensor types against llama-quantize's rules (src/llama-quant.cpp).

The SmolLM2-135M tables are the types llama-quantize actually wrote for that model
(research/llamacpp_baseline.md, "Tensor types actually written"); the others follow the C rules by hand.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from lfq_export.arch import adapter_for_config
from lfq_export.errors import FormatError, SchemeError
from lfq_export.gguf_schemes import (
    fallback_type,
    gguf_scheme_names,
    llama_ftype_name,
    scheme_types,
    select_types,
    use_more_bits,
)
from lfq_export.schemes import SchemeContext, list_schemes, plan_quantization

SUFFIX = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def ctx_for(family="llama", *, hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, tied=True,
            keep_head_fp=False) -> SchemeContext:
    cfg = SimpleNamespace(model_type=family, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, tie_word_embeddings=tied, hidden_size=hidden)
    a = adapter_for_config(cfg)
    hd = hidden // heads
    dims = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
            "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    shapes = {n: dims[n.split(".", 3)[3]] for n in a.linear_names(layers)}
    shapes[a.embedding] = shapes[a.lm_head] = (vocab, hidden)
    return SchemeContext(a, cfg, shapes, keep_head_fp)


def by_category(types: dict[str, str]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for mod, t in types.items():
        key = SUFFIX.get(mod.split(".", 3)[3], mod) if mod.startswith("model.layers.") else mod
        out.setdefault(key, Counter())[t] += 1
    return out


def test_use_more_bits_matches_the_c_expression():
    # i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, C integer division; n = 32 → 0..3, 6, 9, ..., 27, 28..31
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # n = 30: 30/8 = 3, 7·30/8 = 26 → 14 layers, the Q6_K×14 llama-quantize wrote for SmolLM2
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


# llama-quantize's SmolLM2-135M tables (hidden 576: every 576-wide row falls back, tied embedding, 9/3 heads)
SMOLLM2 = {
    "gguf:q4_k_m": {"attn_q": {"q5_0": 30}, "attn_k": {"q5_0": 30}, "attn_v": {"q8_0": 14, "q5_0": 16},
                    "attn_output": {"q5_0": 30}, "ffn_gate": {"q5_0": 30}, "ffn_up": {"q5_0": 30},
                    "ffn_down": {"q6_k": 14, "q4_k": 16}, "model.embed_tokens": {"q8_0": 1}},
    "gguf:q5_k_m": {"attn_q": {"q5_1": 30}, "attn_v": {"q8_0": 14, "q5_1": 16}, "attn_output": {"q5_1": 30},
                    "ffn_down": {"q6_k": 14, "q5_k": 16}, "model.embed_tokens": {"q8_0": 1}},
    "gguf:q3_k_m": {"attn_q": {"q4_0": 30}, "attn_v": {"q5_0": 28, "q5_1": 2}, "attn_output": {"q5_0": 30},
                    "ffn_gate": {"q4_0": 30}, "ffn_down": {"q4_k": 29, "q5_k": 1}, "model.embed_tokens": {"q8_0": 1}},
    "gguf:q2_k": {"attn_q": {"q4_0": 30}, "attn_v": {"q4_0": 30}, "attn_output": {"q4_0": 30},
                  "ffn_up": {"q4_0": 30}, "ffn_down": {"q3_k": 30}, "model.embed_tokens": {"q8_0": 1}},
    "gguf:q6_k": {"attn_q": {"q8_0": 30}, "attn_v": {"q8_0": 30}, "ffn_down": {"q6_k": 30},
                  "model.embed_tokens": {"q8_0": 1}},
    "gguf:q8_0": {"attn_q": {"q8_0": 30}, "ffn_down": {"q8_0": 30}, "model.embed_tokens": {"q8_0": 1}},
    "gguf:q4_0": {"attn_v": {"q4_0": 30}, "ffn_down": {"q4_0": 30}, "model.embed_tokens": {"q8_0": 1}},
}


@pytest.mark.parametrize("scheme", sorted(SMOLLM2))
def test_smollm2_tables_match_llama_quantize(scheme):
    sel = select_types(scheme, ctx_for())
    cats = by_category(sel.types)
    for cat, want in SMOLLM2[scheme].items():
        assert dict(cats[cat]) == want, (scheme, cat)
    assert "lm_head" not in sel.types  # tied: llama.cpp has no output tensor, token_embd is the output
    if scheme == "gguf:q4_k_m":  # the attn_v/ffn_down layers with more bits are the use_more_bits ones
        more = [i for i in range(30) if sel.types[f"model.layers.{i}.mlp.down_proj"] == "q6_k"]
        assert more == [i for i in range(30) if use_more_bits(i, 30)]
        assert any("q4_k→q5_0 for 166" in n for n in sel.notes)


def test_mixes_on_256_multiple_rows_untied():
    ctx = ctx_for(hidden=256, inter=512, layers=8, heads=4, kv=2, vocab=512, tied=False)
    t = select_types("gguf:q4_k_m", ctx).types
    more = [i for i in range(8) if use_more_bits(i, 8)]
    assert more == [0, 3, 6, 7]
    assert [t[f"model.layers.{i}.self_attn.v_proj"] for i in range(8)] == ["q6_k" if i in more else "q4_k" for i in range(8)]
    assert t["lm_head"] == "q6_k" and t["model.embed_tokens"] == "q4_k"
    assert {t[f"model.layers.{i}.self_attn.q_proj"] for i in range(8)} == {"q4_k"}
    s = select_types("gguf:q4_k_s", ctx).types
    assert [s[f"model.layers.{i}.self_attn.v_proj"] for i in range(8)] == ["q5_k"] * 4 + ["q4_k"] * 4
    assert [s[f"model.layers.{i}.mlp.down_proj"] for i in range(8)] == ["q5_k"] + ["q4_k"] * 7
    assert select_types("gguf:q8_0", ctx).types["lm_head"] == "q8_0"
    assert select_types("gguf:q3_k_s", ctx).types == select_types("gguf:q3_k", ctx).types  # Q3_K_S is pure Q3_K


def test_q2_k_gqa_rule_and_pure_q2_k():
    gqa4 = select_types("gguf:q2_k", ctx_for(hidden=256, inter=512, layers=4, heads=8, kv=2, tied=False)).types
    gqa2 = select_types("gguf:q2_k", ctx_for(hidden=256, inter=512, layers=4, heads=4, kv=2, tied=False)).types
    assert gqa4["model.layers.0.self_attn.v_proj"] == "q4_k" and gqa2["model.layers.0.self_attn.v_proj"] == "q3_k"
    assert gqa2["model.layers.0.self_attn.o_proj"] == "q3_k" and gqa2["model.layers.0.mlp.down_proj"] == "q3_k"
    pure = select_types("gguf:q2_k-pure", ctx_for(hidden=256, inter=512, layers=4, heads=4, kv=2, tied=False)).types
    assert {t for m, t in pure.items() if m.startswith("model.layers.")} == {"q2_k"}
    assert pure["lm_head"] == "q6_k" and pure["model.embed_tokens"] == "q2_k"


def test_70b_attn_v_rule():
    big = ctx_for(hidden=256, inter=512, layers=80, heads=64, kv=8, tied=False)
    t = select_types("gguf:q4_k_m", big).types
    assert not use_more_bits(11, 80) and t["model.layers.11.self_attn.v_proj"] == "q5_k"  # Q4_K → Q5_K on 70B
    assert t["model.layers.0.self_attn.v_proj"] == "q6_k"
    mha = ctx_for(hidden=256, inter=512, layers=80, heads=64, kv=64, tied=False)  # llama 65B: no GQA, no bump
    assert select_types("gguf:q4_k_m", mha).types["model.layers.11.self_attn.v_proj"] == "q4_k"
    qwen3 = ctx_for("qwen3", hidden=256, inter=512, layers=80, heads=64, kv=8, tied=False)
    assert select_types("gguf:q4_k_m", qwen3).types["model.layers.11.self_attn.v_proj"] == "q4_k"


def test_fallback_chain():
    assert [fallback_type(t, 576) for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q8_0")] == \
        ["q4_0", "q4_0", "q5_0", "q5_1", "q8_0", "q4_1", "q8_0"]
    assert fallback_type("q4_k", 512) == "q4_k"
    assert fallback_type("q4_k", 172) is None and fallback_type("q8_0", 172) is None


def test_rows_not_multiple_of_32_refused_or_kept_fp():
    ctx = ctx_for(hidden=64, inter=172, layers=5, heads=8, kv=4, vocab=512)  # stories260K
    with pytest.raises(SchemeError, match="172 is not a multiple of 32.*--skip-unquantizable"):
        plan_quantization("gguf:q4_0", ctx)
    plan = plan_quantization("gguf:q4_0", ctx, ("gguf",), skip_unquantizable=True)
    assert sorted(plan.kept_fp) == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    assert plan.grids["model.embed_tokens"].name == "gguf:q8_0"  # 64-wide rows: Q6_K → Q8_0
    assert plan.grids["model.layers.0.self_attn.q_proj"].name == "gguf:q4_0"


def test_keep_head_fp_plans_no_head():
    sel = select_types("gguf:q4_k_m", ctx_for(keep_head_fp=True))
    assert "model.embed_tokens" not in sel.types and "lm_head" not in sel.types


def test_names_ftypes_and_refusals():
    names = gguf_scheme_names()
    for n in ("gguf:q4_k_m", "gguf:q4_k_s", "gguf:q5_k_m", "gguf:q3_k_m", "gguf:q2_k", "gguf:q6_k", "gguf:q8_0",
              "gguf:q4_0", "gguf:q4_1", "gguf:q5_0", "gguf:q5_1", "gguf:q3_k", "gguf:q4_k", "gguf:q5_k", "gguf:q2_k-pure"):
        assert n in names and n in list_schemes()
    assert llama_ftype_name("gguf:q4_k_m") == "Q4_K_M" and llama_ftype_name("gguf:q3_k") == "Q3_K_S"
    assert llama_ftype_name("gguf:q6_k-pure") == "Q6_K"
    with pytest.raises(SchemeError, match="unknown GGUF scheme"):
        select_types("gguf:q7_k", ctx_for())
    assert set(scheme_types("gguf:q4_k_m")) >= {"q4_k", "q6_k", "q5_0", "q8_0"}


def test_other_formats_refuse_gguf_grids_naming_gguf():
    ctx = ctx_for(hidden=256, inter=512, layers=2, heads=4, kv=2, vocab=512, tied=False)
    plan = plan_quantization("gguf:q4_k_m", ctx, ("gguf",))
    assert plan.grids["lm_head"].name == "gguf:q6_k"
    with pytest.raises(FormatError, match="formats that can hold it: gguf"):
        plan_quantization("gguf:q4_k_m", ctx, ("gptq",))


def test_schemes_table_lists_gguf():
    from lfq_export.export import schemes_table

    rows = {r.split("|")[1].strip(): r for r in schemes_table().splitlines()[2:]}
    header = [c.strip() for c in schemes_table().splitlines()[0].split("|")[1:-1]]
    cells = [c.strip() for c in rows["gguf:q4_k_m"].split("|")[1:-1]]
    assert cells[header.index("gguf")] == "yes" and cells[header.index("gptq")] == "—"
    cells = [c.strip() for c in rows["w4g32-sym"].split("|")[1:-1]]
    assert cells[header.index("gguf")] == "yes"  # affine sym 4-bit g32 fits Q4_0 exactly
