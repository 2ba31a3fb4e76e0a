"""`verify` against the wrong run says so: weights_exact false, the differing tensors, exit code 1."""

import json

import pytest

from lfq_export.cli import main


@pytest.mark.parametrize("fmt", ["gptq", "onnx"])
def test_verify_other_run(fmt, tiny_model_factory, rtn_run, tmp_path, capsys):
    model = tiny_model_factory("llama")
    run_a = rtn_run(model, "w4g32", formats=(fmt,))
    run_b = rtn_run(model, "w4g64")
    export = next(p for p in run_a.iterdir() if p.is_dir() and p.name not in ("blocks", "tokenizer"))
    capsys.readouterr()
    assert main(["verify", str(export), "--run", str(run_a), "--no-engine", "--json", str(tmp_path / "ok.json")]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["weights_exact"] is True
    code = main(["verify", str(export), "--run", str(run_b), "--no-engine", "--json", str(tmp_path / "bad.json")])
    out = capsys.readouterr().out
    assert code == 1 and "weights_exact=False" in out
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert bad["weights_exact"] is False
    assert bad.get("mismatches") or bad.get("weights", {}).get("mismatches"), bad.keys()
