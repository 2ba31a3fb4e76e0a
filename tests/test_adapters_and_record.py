"""Every family on a tiny model: load, quantize (near-lossless 8-bit), simulate ≈ FP; the record
round-trips bit for bit; unsupported architectures are refused with the supported list."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lfq_export.arch import SUPPORTED_FAMILIES
from lfq_export.errors import InputError, RecordError
from lfq_export.model_io import resolve_model
from lfq_export.record import QuantizedModel, read_manifest
from lfq_export.simulate import simulate

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_simulate_close_to_fp(family, tiny_model_factory, rtn_run):
    d = tiny_model_factory(family, tie_word_embeddings=(family == "qwen3"))
    src = resolve_model(d)
    assert src.adapter.family == family
    run = rtn_run(d, "w8g32")
    record = QuantizedModel.load(run)
    assert len(record.quantized) == 7 * src.n_layers
    if family == "qwen2":
        assert any(k.endswith("q_proj.bias") for k in record.fp)
    if family == "qwen3":
        assert any(k.endswith("q_norm.weight") for k in record.fp)
    fp = AutoModelForCausalLM.from_pretrained(str(d)).eval()
    sim = simulate(record)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp(ids).logits, sim(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert rel < 2e-2, rel  # 8-bit g32 on random weights: ~0.9 % measured
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) > 0.97
    # the simulated weights are exactly the grid's dequantization
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(sim.get_submodule(name).weight, record.quantized[name].dequantize())


def test_record_round_trip_bit_identical(tiny_model_factory, rtn_run, tmp_path):
    run = rtn_run(tiny_model_factory("llama"), "w3g32")
    r1 = QuantizedModel.load(run)
    out = tmp_path / "copy"
    out.mkdir()
    r1.save(out)
    r2 = QuantizedModel.load(out)
    assert r1.quantized.keys() == r2.quantized.keys()
    for n, q in r1.quantized.items():
        assert torch.equal(q.codes, r2.quantized[n].codes)
        assert all(torch.equal(v, r2.quantized[n].params[k]) for k, v in q.params.items())
        assert q.grid == r2.quantized[n].grid
    assert all(torch.equal(v, r2.fp[k]) for k, v in r1.fp.items())


def test_record_refuses_other_version_and_incomplete(tiny_model_factory, rtn_run, tmp_path):
    run = rtn_run(tiny_model_factory("llama"), "w4g32")
    m = read_manifest(run)
    m["record_version"] = 999
    (run / "record.json").write_text(json.dumps(m))
    with pytest.raises(RecordError, match="record version 999 is not supported"):
        QuantizedModel.load(run)
    with pytest.raises(RecordError, match="not a run directory"):
        QuantizedModel.load(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InputError) as e:
        resolve_model(tmp_path)
    msg = str(e.value)
    assert "unsupported architecture 'gpt2'" in msg
    assert all(f in msg for f in SUPPORTED_FAMILIES)


def test_package_names_resolve_lazily_without_recursion():
    """`lfq_export.QuantizeOptions` etc. on a fresh interpreter: the lazy lookup once recursed
    forever because `from . import quantize` asks the package for the name it is resolving."""
    import subprocess
    import sys

    code = (
        "import sys, lfq_export as L\n"
        "assert 'torch' not in sys.modules\n"
        "assert L.QuantizeOptions.__name__ == 'QuantizeOptions'\n"
        "assert callable(L.quantize.quantize) and callable(L.simulate.simulate)\n"
        "assert L.QuantizedModel.__name__ == 'QuantizedModel'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
