"""Activation stores: RAM fp32/bf16 and disk-backed memmaps hold what was put in."""

import pytest
import torch

from lfq_export.activations import ActivationStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offload", [False, True])
def test_store_round_trip(tmp_path, dtype, offload):
    st = ActivationStore((5, 7, 3), dtype, tmp_path if offload else None)
    x = torch.randn(5, 7, 3)
    st.set(slice(0, 2), x[:2])
    st.set(slice(2, 5), x[2:])
    got = st.get([4, 0, 2])
    assert got.dtype == torch.float32
    assert torch.equal(got, x[[4, 0, 2]].to(dtype).float())
    st.close()
    assert not list(tmp_path.glob("act-*"))


def test_bf16_offload_quantize_matches_ram(tiny_model_factory, tinystories_text, tmp_path):
    from lfq_export.quantize import QuantizeOptions, quantize
    from lfq_export.record import QuantizedModel

    model = tiny_model_factory("llama")
    common = dict(scheme="w4g32", method="omniquant", calib=str(tinystories_text), nsamples=4, seqlen=32, iters=3,
                  act_dtype="bfloat16", progress=False)
    a = QuantizedModel.load(quantize(str(model), tmp_path / "a", QuantizeOptions(**common)))
    b = QuantizedModel.load(quantize(str(model), tmp_path / "b", QuantizeOptions(**common, offload_dir=str(tmp_path / "off"))))
    for n in a.quantized:
        assert torch.equal(a.quantized[n].codes, b.quantized[n].codes)
