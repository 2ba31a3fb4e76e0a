"""GGUF writer: every type round-trips bit for bit on all four families, metadata, permutation, RoPE
scaling, refusals and post-write checks, and llama.cpp parity on real models.

Tolerance tiers: weights exact (gguf-py's dequantize vs the record, `compare_weights`); llama.cpp's
F32 control within float summation noise; the quantized file within a multiple of the deviation
llama.cpp's activation rounding causes on the same tokens (`formats.gguf_engine.TOLERANCE`).
"""

from __future__ import annotations

import dataclasses
import shutil

import gguf
import numpy as np
import pytest
import torch

from formats.gguf import GGUFFormat
from formats.gguf_metadata import rope_freq_factors
from formats.gguf_tensors import qk_row_order, read_weights
from formats.gguf_verify import file_report, verify_gguf
from formats.gguf_write import check_file, write_gguf
from formats.gguf_tensors import plan_tensors
from lfq_export.compare import compare_weights
from lfq_export.errors import FormatError
from lfq_export.gguf_schemes import GGUF_TYPES, gguf_grid
from lfq_export.grids import AffineGrid
from lfq_export.model_io import resolve_model
from lfq_export.record import QuantizedModel, QuantizedTensor

pytestmark = pytest.mark.engine
T = gguf.GGMLQuantizationType
DIMS = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2)
QUICK = {"max_tokens": 64, "gen_tokens": 6, "prompts": ["Once upon a time"]}


def handmade_record(model_dir, types, head=("q8_0", "q6_k")) -> QuantizedModel:
    """RTN every block linear of `model_dir`, cycling through `types`; embedding/head as `head`."""
    src = resolve_model(model_dir)
    fp = {n: src.tensor(n) for n in src.weight_map}
    mods = src.adapter.linear_names(src.n_layers) + [src.adapter.embedding]
    if f"{src.adapter.lm_head}.weight" in fp:
        mods.append(src.adapter.lm_head)
    quantized = {}
    for i, mod in enumerate(mods):
        t = head[0] if mod == src.adapter.embedding else head[1] if mod == src.adapter.lm_head else types[i % len(types)]
        grid = gguf_grid(t)
        if fp[f"{mod}.weight"].shape[1] % grid.row_multiple():
            continue  # no GGUF block fits the row (stories' 172): stays FP, as --skip-unquantizable does
        w = fp.pop(f"{mod}.weight").float()
        params = grid.init_params(w)
        codes = grid.quantize(w, params)
        quantized[mod] = QuantizedTensor(mod, grid, codes, grid.to_storage(params, *codes.shape))
    return QuantizedModel(config=src.config.to_dict(), family=src.adapter.family, scheme="handmade",
                          quantized=quantized, fp=fp, tokenizer_dir=src.path)


def reference(record: QuantizedModel) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.dequantized_state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_type_round_trips_and_runs(family, tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory(family, **DIMS), GGUF_TYPES)
    out = GGUFFormat().export(record, tmp_path / "m.gguf", {})
    written = {T(int(t.tensor_type)).name for t in gguf.GGUFReader(str(out)).tensors}
    assert written >= {t.upper() for t in GGUF_TYPES} | {"F32"}
    cmp = compare_weights(reference(record), read_weights(out, record))
    assert cmp["weights_exact"], cmp["mismatches"]
    assert cmp["tensors_compared"] == len(record.quantized) + len(record.fp) and not cmp["missing_in_file"]
    result = verify_gguf(out, record, QUICK)
    assert result["file_size_ok"] and result["weights_exact"]
    assert result["control_ok"], result["control_f32"]  # names, permutation, norms, biases, metadata
    assert result["control_f32"]["rel_l2"] < 1e-4
    assert result["quantized_ok"], (result["rel_l2"], result["activation_rounding"])


def test_metadata_keys(tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory("qwen3", **DIMS), ["q4_k"])
    out = write_gguf(dataclasses.replace(record, scheme="gguf:q4_k_m"), tmp_path / "q3.gguf", {})
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.") and not k.startswith("tokenizer.ggml.t")}
    cfg = record.config
    assert f["general.architecture"] == "qwen3"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert f["qwen3.block_count"] == 2 and f["qwen3.embedding_length"] == 256
    assert f["qwen3.feed_forward_length"] == 512 and f["qwen3.context_length"] == cfg["max_position_embeddings"]
    assert f["qwen3.attention.head_count"] == 4 and f["qwen3.attention.head_count_kv"] == 2
    assert f["qwen3.attention.key_length"] == cfg["head_dim"] == 128  # not hidden/heads = 64
    assert f["qwen3.attention.value_length"] == 128
    assert f["qwen3.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    names = {t.name: T(int(t.tensor_type)) for t in r.tensors}
    assert names["blk.0.attn_q_norm.weight"] == T.F32 and names["blk.1.attn_k_norm.weight"] == T.F32
    assert names["output.weight"] == T.Q6_K and names["token_embd.weight"] == T.Q8_0


def test_qwen2_biases_and_tied_embedding(tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory("qwen2", tie_word_embeddings=True, **DIMS), ["q5_k"], head=("q6_k",))
    out = write_gguf(record, tmp_path / "q2.gguf", {})
    names = {t.name: T(int(t.tensor_type)) for t in gguf.GGUFReader(str(out)).tensors}
    assert "output.weight" not in names and names["token_embd.weight"] == T.Q6_K  # llama.cpp reuses token_embd
    for b in ("attn_q", "attn_k", "attn_v"):
        assert names[f"blk.0.{b}.bias"] == T.F32
    result = verify_gguf(out, record, QUICK)
    assert result["weights_exact"] and result["control_ok"] and result["quantized_ok"]


@pytest.mark.parametrize("family,permuted", [("llama", True), ("qwen2", False)])
def test_qk_rows_permuted_only_for_llama(family, permuted, tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory(family, **DIMS), ["q8_0"])
    out = write_gguf(record, tmp_path / "m.gguf", {})
    raw = {t.name: gguf.quants.dequantize(np.asarray(t.data), T(int(t.tensor_type))) for t in gguf.GGUFReader(str(out)).tensors}
    for proj, heads, tag in (("q_proj", 4, "attn_q"), ("k_proj", 2, "attn_k")):
        hf = record.quantized[f"model.layers.0.self_attn.{proj}"].dequantize().numpy()
        want = hf[qk_row_order(hf.shape[0], heads)] if permuted else hf
        assert np.array_equal(raw[f"blk.0.{tag}.weight"], want)
    assert not np.array_equal(qk_row_order(8, 1), np.arange(8))


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=16, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    factors = rope_freq_factors(cfg.to_dict())
    assert factors.shape == (64,) and factors[0] == 1.0 and factors[-1] == 8.0
    np.testing.assert_allclose(plain.numpy() / factors, scaled.numpy(), rtol=1e-6)


@pytest.mark.parametrize("family,rope", [
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}),
    ("llama", {"rope_type": "linear", "factor": 4.0}),
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_rope_scaling_control_matches_simulate(family, rope, tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory(family, **DIMS), ["q8_0"])
    record.config["rope_parameters"] = {**record.config["rope_parameters"], **rope}
    out = write_gguf(record, tmp_path / "rope.gguf", {})
    assert ("rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(out)).tensors}) == (rope["rope_type"] == "llama3")
    result = verify_gguf(out, record, {**QUICK, "max_tokens": 200})  # > original context: the scaling matters
    assert result["weights_exact"] and result["control_ok"], result["control_f32"]


def test_refusals(tiny_model_factory, tmp_path):
    fmt = GGUFFormat()
    assert fmt.supports(AffineGrid(8, 32, sym=False)) is not None  # q − z spans ±255: no GGUF type
    assert fmt.supports(AffineGrid(4, 32, sym=True)) is None and fmt.supports(gguf_grid("q3_k")) is None
    assert "not a multiple of Q4_K" in fmt.check_tensor("x", (64, 576), gguf_grid("q4_k"))
    assert fmt.check_tensor("x", (64, 576), gguf_grid("q5_0")) is None
    assert fmt.check_tensor("lm_head", (512, 256), gguf_grid("q6_k")) is None  # quantized heads are fine
    record = handmade_record(tiny_model_factory("llama", **DIMS), ["q4_0"])
    with pytest.raises(FormatError, match="not exactly representable as F16"):
        write_gguf(dataclasses.replace(record, quantized={k: v for k, v in record.quantized.items() if "embed" not in k},
                                       fp={**record.fp, "model.embed_tokens.weight": torch.randn(512, 256) * 0.05}),
                   tmp_path / "f16.gguf", {"gguf_fp_type": "f16"})
    assert not (tmp_path / "f16.gguf").exists() and not list(tmp_path.glob(".f16.gguf*"))
    incomplete = dataclasses.replace(record, quantized={k: v for k, v in record.quantized.items() if "embed" not in k})
    with pytest.raises(FormatError, match="model.embed_tokens.weight"):
        write_gguf(incomplete, tmp_path / "x.gguf", {})


def test_post_write_checks_catch_damage(tiny_model_factory, tmp_path):
    record = handmade_record(tiny_model_factory("llama", **DIMS), ["q4_k", "q5_0"])
    out = write_gguf(record, tmp_path / "m.gguf", {})
    specs = plan_tensors(record)
    check_file(out, record, specs)  # the published file passes
    bad = tmp_path / "bad.gguf"
    shutil.copy(out, bad)
    t = next(t for t in gguf.GGUFReader(str(bad)).tensors if t.name == "blk.0.attn_q.weight")
    with open(bad, "r+b") as fh:  # flip a byte of the first row (rows 0 and last are always sampled)
        fh.seek(int(t.data_offset) + 5)
        b = fh.read(1)
        fh.seek(int(t.data_offset) + 5)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(FormatError, match="differ from the run's exact weights"):
        check_file(bad, record, specs)
    with open(bad, "r+b") as fh:
        fh.truncate(out.stat().st_size - 64)
    with pytest.raises(FormatError):
        check_file(bad, record, specs)
    with pytest.raises(FormatError, match="not a readable GGUF"):
        file_report(bad)
    shutil.copy(out, bad)
    with open(bad, "ab") as fh:  # trailing garbage: readable, but not the size its header promises
        fh.write(b"\0" * 64)
    assert file_report(out)["file_size_ok"] and not file_report(bad)["file_size_ok"]
    with pytest.raises(FormatError, match="bytes, the header and tensor types need"):
        check_file(bad, record, specs)


def test_quantize_export_cli_and_verify(tiny_model_factory, rtn_run, tmp_path):
    from lfq_export.cli import main
    from lfq_export.export import verify_export

    run = rtn_run(tiny_model_factory("mistral", **DIMS), "gguf:q4_k_m", formats=("gguf",))
    auto = run / "model-q4_k_m.gguf"
    assert auto.is_file()
    out = tmp_path / "cli.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--no-progress"]) == 0
    assert out.read_bytes() == auto.read_bytes()  # deterministic
    result = verify_export(out, run, QUICK)
    assert result["weights_exact"] and result["engine_ok"], result
    # 2 layers: use_more_bits is true for layer 1 only → its attn_v and ffn_down, and the output, are Q6_K
    assert result["tensor_types"] == {"F32": 5, "Q4_K": 13, "Q6_K": 3}
