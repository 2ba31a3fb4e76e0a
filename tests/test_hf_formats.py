"""GPTQ, AWQ and compressed-tensors exports: packing tables, round trips through the independent
unpacker (bit for bit), transformers' real loaders against simulate(), refusals, SmolLM2.

Tolerance tiers: weights are exact (`torch.equal`). Engine logits are compared with simulate()
run on the weights the loader really holds (the control decides: the record itself, or the record
rounded once to fp16); gptqmodel's TorchQuantLinear and compressed-tensors run fp32 activations
(rel. tol 1e-5 of the largest logit), gptqmodel's AwqTorchLinear casts activations to fp16 (1e-2).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from formats.awq import AWQ_PACK_ORDER, pack_awq
from formats.compressed_tensors import pack_compressed_tensors
from formats.gptq import pack_gptq
from formats.hf_checkpoint import pack_bitstream, parse_size
from formats.unpack_hf import open_checkpoint, read_bitfields, unpack_checkpoint
from lfq_export.compare import compare_weights
from lfq_export.errors import FormatError
from lfq_export.formats_api import detect_format, get_format
from lfq_export.grids import AffineGrid
from lfq_export.record import QuantizedModel, QuantizedTensor

HF_FORMATS = ("gptq", "awq", "compressed-tensors")
DIMS = dict(hidden_size=128, intermediate_size=256)


# ---- packing tables (literal words) ------------------------------------------------------------
def test_pack_bitstream_literal_words():
    assert pack_bitstream(np.arange(8, dtype=np.uint8)[None], 4).view(np.uint32)[0, 0] == 0x76543210
    assert pack_bitstream(np.array([[1, 2, 3, 0] * 4], np.uint8), 2).view(np.uint32)[0, 0] == 0x39393939
    assert pack_bitstream(np.array([[0xAB, 0x01, 0xFF, 0x10]], np.uint8), 8).view(np.uint32)[0, 0] == 0x10FF01AB
    # 3-bit: 32 fields → 3 words; field 10 straddles words 0/1 (bits 30-31 | bit 0), field 21 words 1/2
    v = np.zeros((1, 32), np.uint8)
    v[0, 10], v[0, 21], v[0, 0], v[0, 31] = 0b111, 0b101, 0b011, 0b110
    words = pack_bitstream(v, 3).view(np.uint32)[0]
    assert list(words) == [0xC0000003, 0x80000001, 0xC0000002]


def test_read_bitfields_inverts_literal_words():
    words = np.array([[0xC0000003, 0x80000001, 0xC0000002]], np.uint32).view(np.int32)
    f = read_bitfields(words, 3, 32)[0]
    assert (f[0], f[10], f[21], f[31]) == (3, 7, 5, 6) and f.sum() == 21
    assert list(read_bitfields(np.array([[0x76543210]], np.uint32).view(np.int32), 4, 8)[0]) == list(range(8))


def test_awq_order_literal_word():
    # column j of a block of 8 holds value j: nibble i holds column AWQ_PACK_ORDER[i]
    grid = AffineGrid(bit_width=4, group_size=0, sym=False)
    codes = torch.arange(8, dtype=torch.uint8).repeat(8, 1).T.contiguous()  # [N=8, K=8], row n = n
    qt = QuantizedTensor("m", grid, codes,
                         {"scale": torch.ones(8, 1, dtype=torch.float16), "zero": torch.zeros(8, 1, dtype=torch.uint8)})
    words = pack_awq(qt)["qweight"].numpy().view(np.uint32)  # [K, N/8]
    assert AWQ_PACK_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert (words == 0x75316420).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ct_packing_equals_compressed_tensors_library(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    grid = AffineGrid(bit_width=bits, group_size=32, sym=False)
    codes = torch.randint(0, 1 << bits, (48, 96), generator=g, dtype=torch.uint8)
    zero = torch.randint(0, 1 << bits, (48, 3), generator=g, dtype=torch.uint8)
    qt = QuantizedTensor("m", grid, codes, {"scale": torch.ones(48, 3, dtype=torch.float16), "zero": zero})
    ours = pack_compressed_tensors(qt)
    off = 1 << (bits - 1)  # the library packs signed values q − 2^(b−1)
    assert torch.equal(ours["weight_packed"], pack_to_int32((codes.int() - off).to(torch.int8), bits))
    ref_zp = pack_to_int32((zero.int() - off).to(torch.int8), bits, packed_dim=0).contiguous()
    assert torch.equal(ours["weight_zero_point"], ref_zp)


def test_parse_size():
    assert parse_size("2GB") == 2 * 1000**3 and parse_size("1MiB") == 1024**2 and parse_size(1234) == 1234
    with pytest.raises(FormatError):
        parse_size("lots")


# ---- in-memory records with random codes on any grid -------------------------------------------
def random_record(base: QuantizedModel, grid: AffineGrid, seed: int = 0) -> QuantizedModel:
    """`base` with every quantized linear replaced by uniformly random codes/zeros and scales on `grid`
    (every bit pattern of the container is exercised, unlike RTN codes that cluster mid-range)."""
    g = torch.Generator().manual_seed(seed)
    quantized = {}
    for name, qt in base.quantized.items():
        n, k = qt.shape
        ng = k // grid.group_size_for(k)
        codes = torch.randint(0, grid.qmax + 1, (n, k), generator=g, dtype=torch.uint8)
        scale = (torch.rand(n, ng, generator=g) * 0.02 + 1e-3).to(torch.float16)
        params = {"scale": scale}
        if not grid.sym:
            params["zero"] = torch.randint(grid.zero_min, grid.qmax + 1, (n, ng), generator=g, dtype=torch.uint8)
        quantized[name] = QuantizedTensor(name, grid, codes, params)
    return dataclasses.replace(base, quantized=quantized)


@pytest.fixture(scope="module")
def llama_run(tiny_model_factory, rtn_run):
    return rtn_run(tiny_model_factory("llama", **DIMS), "w4g32", formats=HF_FORMATS)


@pytest.fixture(scope="module")
def llama_record(llama_run):
    return QuantizedModel.load(llama_run)


MATRIX = [(f, b, g, s) for f, bits in (("gptq", (2, 3, 4, 8)), ("awq", (2, 3, 4)), ("compressed-tensors", (2, 4, 8)))
          for b in bits for g in (32, 64, 128, 0) for s in (False, True)]


@pytest.mark.parametrize("fmt,bits,group,sym", MATRIX)
def test_round_trip_bit_exact(llama_record, tmp_path, fmt, bits, group, sym):
    adapter = get_format(fmt)
    grid = adapter.constrain(AffineGrid(bit_width=bits, group_size=group, sym=sym))
    assert adapter.supports(grid) is None
    record = random_record(llama_record, grid, seed=bits * 1000 + group + sym)
    out = adapter.export(record, tmp_path / fmt, {})
    assert detect_format(out).name == fmt
    got = unpack_checkpoint(out)
    ref = record.dequantized_state_dict()
    result = compare_weights(ref, got)
    assert result["weights_exact"], result["mismatches"]
    assert not result["missing_in_file"] and not result["extra_in_file"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and cfg["quantization_config"]["quant_method"] == fmt


def test_round_trip_detects_a_corrupted_word(llama_record, tmp_path):
    """The unpacker sees a single flipped bit (the round-trip test can fail)."""
    from safetensors.torch import load_file, save_file

    record = random_record(llama_record, AffineGrid(bit_width=4, group_size=32, sym=True))
    out = get_format("gptq").export(record, tmp_path / "g", {})
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.qweight"
    sd[name][3, 5] ^= 1 << 9
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = compare_weights(record.dequantized_state_dict(), unpack_checkpoint(out))
    assert not result["weights_exact"]
    assert list(result["mismatches"]) == ["model.layers.1.mlp.down_proj.weight"]
    assert result["mismatches"]["model.layers.1.mlp.down_proj.weight"]["n_diff"] == 1


# ---- transformers' real loaders -------------------------------------------------------------------
def _assert_engine_ok(r: dict) -> None:
    assert r["weights_exact"], r["weights"]["mismatches"]
    assert r["tokens_match"]
    assert r["control_exact"], r["control"]
    assert r["within_tolerance"], (r["vs_arithmetic_reference"], r["tolerance"])
    assert r["top1_agreement"] >= 0.95 and r["kl_mean"] < 1e-4


ENGINE_CASES = [
    ("gptq", 4, 32, False), ("gptq", 4, 128, True), ("gptq", 3, 64, False), ("gptq", 2, 0, True), ("gptq", 8, 64, False),
    ("awq", 4, 64, False), ("awq", 4, 32, True), ("awq", 3, 0, False), ("awq", 2, 128, False),
    ("compressed-tensors", 4, 32, False), ("compressed-tensors", 4, 128, True), ("compressed-tensors", 8, 0, True),
    ("compressed-tensors", 2, 64, False),
]


@pytest.mark.engine
@pytest.mark.parametrize("fmt,bits,group,sym", ENGINE_CASES)
def test_transformers_loader_matches_simulation(llama_record, tmp_path, fmt, bits, group, sym):
    adapter = get_format(fmt)
    record = random_record(llama_record, adapter.constrain(AffineGrid(bit_width=bits, group_size=group, sym=sym)))
    out = adapter.export(record, tmp_path / fmt, {})
    r = adapter.verify(out, record, {"max_tokens": 48})
    _assert_engine_ok(r)
    if fmt == "compressed-tensors":
        # sym: transformers' default compressed path, exact in fp32; asym: with transformers 5.23 +
        # compressed-tensors 0.19/0.20 the default load fails (recorded), dequantize=True loads it
        if sym:
            assert r["engine_mode"] == "compressed (default)"
        else:
            assert r["engine_mode"] == "compressed (default)" or "known failure" in r["default_load_error"]


@pytest.mark.engine
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_families_rtn_all_formats(tiny_model_factory, rtn_run, family):
    run = rtn_run(tiny_model_factory(family, **DIMS), "w4g64", formats=HF_FORMATS)
    record = QuantizedModel.load(run)
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in record.fp  # biases travel unquantized
    for fmt in HF_FORMATS:
        r = get_format(fmt).verify(run / fmt, record, {"max_tokens": 32})
        _assert_engine_ok(r)


@pytest.mark.engine
def test_tied_and_sharded_gptq(tiny_model_factory, rtn_run, tmp_path):
    from lfq_export.export import export_run, verify_export

    run = rtn_run(tiny_model_factory("llama", tie_word_embeddings=True, **DIMS), "w4g32-sym", formats=("gptq",))
    out = export_run(run, "gptq", tmp_path / "sharded", {"gptq_shard_size": "100KB"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert "lm_head.weight" not in index["weight_map"]  # tied: the config ties it
    r = verify_export(out, run, {"max_tokens": 32})
    _assert_engine_ok(r)


# ---- file contents ---------------------------------------------------------------------------------
def test_config_files_and_card(llama_run):
    gq = json.loads((llama_run / "gptq" / "config.json").read_text())["quantization_config"]
    assert gq | {} == json.loads((llama_run / "gptq" / "quantize_config.json").read_text())
    assert (gq["bits"], gq["group_size"], gq["desc_act"], gq["sym"], gq["checkpoint_format"]) == (4, 32, False, False, "gptq")
    aq = json.loads((llama_run / "awq" / "config.json").read_text())["quantization_config"]
    assert aq == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": None}
    legacy = json.loads((llama_run / "awq" / "quant_config.json").read_text())
    assert legacy == {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "gemm", "modules_to_not_convert": None}
    cq = json.loads((llama_run / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(cq)  # pydantic, extra="forbid" on the weight args
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric, w.group_size, str(getattr(w.strategy, "value", w.strategy))) == (4, False, 32, "group")
    assert cq["quantization_status"] == "compressed" and cq["format"] == "pack-quantized" and cq["ignore"] == ["lm_head"]
    for fmt in HF_FORMATS:
        d = llama_run / fmt
        assert (d / "tokenizer.model").is_file() and (d / "generation_config.json").is_file()
        card = (d / "README.md").read_text()
        assert "w4g32" in card and "affine/b4/g32/asym-z1+" in card and "rtn" in card and "14 linear layers" in card
    assert "refuses" in (llama_run / "gptq" / "README.md").read_text()  # asym GPTQ: not for vLLM
    assert "dequantize=True" in (llama_run / "compressed-tensors" / "README.md").read_text()


def test_sym_zero_words(llama_record, tmp_path):
    """Sym GPTQ stores z − 1 = 7 in every nibble; AWQ stores z = 8 explicitly with zero_point true."""
    rec = random_record(llama_record, AffineGrid(bit_width=4, group_size=64, sym=True))
    ck = open_checkpoint(get_format("gptq").export(rec, tmp_path / "g", {}))
    assert (ck.tensor("model.layers.0.mlp.up_proj.qzeros").view(np.uint32) == 0x77777777).all()
    ck = open_checkpoint(get_format("awq").export(rec, tmp_path / "a", {}))
    assert (ck.tensor("model.layers.0.mlp.up_proj.qzeros").view(np.uint32) == 0x88888888).all()
    assert ck.quantization_config["zero_point"] is True


def test_parity_json_in_card(llama_record, tmp_path):
    parity = {"weights_exact": True, "engine": "x", "top1_agreement": 1.0, "kl_mean": 1e-9}
    (tmp_path / "p.json").write_text(json.dumps(parity))
    out = get_format("awq").export(llama_record, tmp_path / "a", {"awq_parity_json": tmp_path / "p.json"})
    card = (out / "README.md").read_text()
    assert "- top1_agreement: `1.0`" in card and "Not measured" not in card


# ---- refusals and output safety -----------------------------------------------------------------------
def test_refuses_gptq_zero_point_zero(tiny_model_factory, rtn_run, tmp_path):
    from lfq_export.export import export_run

    run = rtn_run(tiny_model_factory("llama", **DIMS), "w4g32")  # not constrained for GPTQ: z may be 0
    with pytest.raises(FormatError) as e:
        export_run(run, "gptq", tmp_path / "g")
    msg = str(e.value)
    assert "zero point of 0" in msg and "awq" in msg.split("formats that can hold it:")[1]
    assert "gptq" not in msg.split("formats that can hold it:")[1]
    assert not (tmp_path / "g").exists()
    qt = next(QuantizedModel.load(run).iter_quantized())
    bad = QuantizedTensor(qt.name, qt.grid, qt.codes, {**qt.params, "zero": torch.zeros_like(qt.params["zero"])})
    with pytest.raises(FormatError, match="zero point 0"):
        pack_gptq(bad)


@pytest.mark.parametrize("scheme,fmt,words", [
    ("w3g64", "compressed-tensors", ["0.17", "gptq"]),
    ("w8g64", "awq", ["4-bit container", "compressed-tensors"]),
])
def test_refuses_schemes_up_front(tiny_model_factory, rtn_run, scheme, fmt, words):
    with pytest.raises(FormatError) as e:
        rtn_run(tiny_model_factory("llama", **DIMS), scheme, formats=(fmt,))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_refuses_shapes_and_heads():
    g4 = AffineGrid(bit_width=4, group_size=32, sym=False)
    for fmt in HF_FORMATS:
        assert "unquantized" in get_format(fmt).check_tensor("lm_head", (512, 128), g4)
        assert get_format(fmt).check_tensor("lm_head", (512, 128), None) is None
    assert "multiple of 8" in get_format("awq").check_tensor("model.layers.0.mlp.up_proj", (12, 64), g4)
    g3 = AffineGrid(bit_width=3, group_size=32, sym=True)
    assert "multiples of 32" in get_format("gptq").check_tensor("model.layers.0.mlp.up_proj", (48, 64), g3)
    assert get_format("gptq").check_tensor("model.layers.0.mlp.up_proj", (64, 64), g3) is None
    assert get_format("gptq").constrain(g4) == dataclasses.replace(g4, zero_min=1)
    assert get_format("awq").constrain(g4) == g4


def test_export_is_atomic_and_respects_overwrite(llama_record, tmp_path, monkeypatch):
    from lfq_export.errors import OutputError, VerificationError

    adapter = get_format("compressed-tensors")
    out = adapter.export(llama_record, tmp_path / "ct", {})
    with pytest.raises(OutputError):
        adapter.export(llama_record, out, {})
    before = (out / "model.safetensors").stat().st_mtime_ns

    def broken(*a, **k):
        raise VerificationError("decoded weights differ")
    monkeypatch.setattr(type(adapter), "_sample_check", broken)
    with pytest.raises(VerificationError):
        adapter.export(llama_record, out, {"overwrite": True})
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary directory left


def test_cli_export_and_verify(llama_run, tmp_path):
    from lfq_export.cli import main

    out = tmp_path / "awq-cli"
    assert main(["export", str(llama_run), "--format", "awq", "--out", str(out), "--awq-shard-size", "200KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert main(["verify", str(out), "--run", str(llama_run), "--no-engine", "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["weights_exact"] is True and v["tokens_match"] is True and v["engine"] is None


# ---- a real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.engine
def test_smollm2_w4g64_every_format(smollm2_source, rtn_run):
    """SmolLM2-135M-Instruct (tied head; hidden 576 = 9·64), one asymmetric w4g64 run exported to all
    three formats; every tensor bit-exact, transformers' loaders within their arithmetic on WikiText-2."""
    from lfq_export.export import verify_export

    run = rtn_run(smollm2_source.path, "w4g64", formats=HF_FORMATS)
    record = QuantizedModel.load(run)
    assert record.tied and len(record.quantized) == 30 * 7
    for fmt in HF_FORMATS:
        r = verify_export(run / fmt, run, {"max_tokens": 32})
        _assert_engine_ok(r)
        assert r["weights"]["tensors_compared"] == 30 * 9 + 2  # 7 linears + 2 norms per layer, embedding, final norm


def test_unpacker_rejects_ambiguous_gptq_zeros(llama_record, tmp_path):
    """A v1 qzeros field of 2^b − 1 (z = 0) and sym qzeros ≠ 2^(b−1) − 1 are refused, not guessed."""
    from safetensors.torch import load_file, save_file

    from formats.unpack_hf import unpack_gptq
    from lfq_export.errors import VerificationError

    out = get_format("gptq").export(random_record(llama_record, AffineGrid(bit_width=4, group_size=64, sym=True)),
                                    tmp_path / "g", {})
    sd = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    sd[f"{name}.qzeros"][0, 0] = 0x7777777F  # lowest field 15: z − 1 = −1 wrapped, i.e. z = 0
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="zero point 0"):
        unpack_gptq(open_checkpoint(out), name)
    sd[f"{name}.qzeros"][0, 0] = 0x77777776
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="sym is true"):
        unpack_gptq(open_checkpoint(out), name)


def test_verify_flags_a_different_tokenizer(llama_run, tmp_path, stories_dir):
    import shutil

    from lfq_export.export import verify_export

    out = tmp_path / "ct"
    shutil.copytree(llama_run / "compressed-tensors", out)
    (out / "tokenizer.json").unlink()  # fall back to a different SentencePiece model
    shutil.copy(stories_dir.parent / "llama2_tokenizer" / "tokenizer.model", out / "tokenizer.model")
    r = verify_export(out, llama_run, {"engine": False, "max_tokens": 32})
    assert r["weights_exact"] and r["tokens_match"] is False


@pytest.mark.engine
def test_onnxruntime_genai_builder_reads_asymmetric_gptq(llama_run, tmp_path):
    """onnxruntime-genai's model builder converts the asymmetric GPTQ v1 export (z ∈ [1, 15] stored
    as z − 1) into MatMulNBits; with the FP head kept out of its own int4 pass and accuracy_level 0
    its logits equal the simulation to fp32 round-off."""
    import subprocess
    import sys

    og = pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    out = tmp_path / "og"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama_run / "gptq"), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "cache"),
           "--extra_options", "accuracy_level=0", "nodes_to_exclude=/lm_head/MatMul"]
    subprocess.run(cmd, check=True, capture_output=True)
    from lfq_export.simulate import simulate

    record = QuantizedModel.load(llama_run)
    ids = torch.arange(3, 51)[None]
    with torch.no_grad():
        ref = simulate(record)(ids).logits[0].numpy()
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int64))
    logits = np.array(gen.get_output("logits")).reshape(-1, ref.shape[-1])[-ref.shape[0]:]
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
