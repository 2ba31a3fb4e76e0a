"""The catalogue of bad inputs (README "Bad input"): each gets a one-line error naming the problem
and the fix, exit code 2, no traceback (unless --debug), and no output left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfq_export.cli import main
from lfq_export.quantize import partial_dir


def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, out: Path | None, *args, match: str) -> str:
    code, err = run_cli(capsys, *args)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists() and not partial_dir(out).exists(), "output left behind"
    return err


@pytest.fixture()
def model_copy(tiny_model_factory, tmp_path):
    """A private copy of a tiny llama we may damage."""
    d = tmp_path / "model"
    shutil.copytree(tiny_model_factory("llama"), d)
    return d


def q(model, out, *extra):
    return ("quantize", model, "--scheme", "w4g32", "--out", out, "--no-progress", *extra)


def test_unknown_architecture(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_refused(capsys, tmp_path / "o", *q(tmp_path / "m", tmp_path / "o"),
                   match="unsupported architecture 'gpt2' (GPT2LMHeadModel); supported families: llama, mistral, qwen2, qwen3")


def test_remote_code_needs_flag(capsys, model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"), match="pass --trust-remote-code")


def test_pickle_weights_need_flag_and_then_work(capsys, model_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("LFQ_EXPORT_CACHE", str(tmp_path / "cache"))
    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"), match="pass --allow-pickle")
    code, err = run_cli(capsys, *q(model_copy, tmp_path / "o", "--allow-pickle"))
    assert code == 0, err
    assert (tmp_path / "o" / "record.json").is_file()


def test_truncated_safetensors(capsys, model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"), match="is corrupt or truncated")


def test_truncated_gguf(capsys, smollm2_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    assert_refused(capsys, tmp_path / "o", *q(bad, tmp_path / "o"), match="corrupt or truncated GGUF")


def test_nan_weights(capsys, model_copy, tmp_path):
    state = load_file(model_copy / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, model_copy / "model.safetensors")
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"),
                   match="tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf")


def test_nan_during_optimisation_keeps_finished_blocks(capsys, tiny_model_factory, tinystories_text, tmp_path,
                                                       monkeypatch):
    import lfq_export.blockwise as bw

    real = bw.F.mse_loss
    calls = {"n": 0}

    def flaky(a, b, **kw):  # block 0 trains normally (3 steps); the first step of block 1 produces NaN
        out = real(a, b, **kw)
        if not a.requires_grad:  # evaluation passes
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(bw.F, "mse_loss", flaky)
    model = tiny_model_factory("llama", num_layers=3)
    out = tmp_path / "o"
    code, err = run_cli(capsys, *q(model, out, "--method", "omniquant", "--calib", tinystories_text,
                                   "--nsamples", "2", "--seqlen", "32", "--iters", "3"))
    assert code == 2 and "Traceback" not in err
    assert "block 1: the loss became nan" in err and "--resume" in err
    assert not out.exists()
    assert (partial_dir(out) / "blocks" / "block_0000.safetensors").is_file()
    assert not (partial_dir(out) / "blocks" / "block_0001.safetensors").exists()


@pytest.mark.parametrize(
    "calib,field,match",
    [
        ("missing.txt", "text", "does not exist"),
        ("empty.txt", "text", "is empty"),
        ("short.txt", "text", "too little for 8 samples × 64 tokens"),
        ("data.jsonl", "body", "no field 'body'"),
        ("no-such/dataset", "text", "not a file, not 'self', and not a dataset"),
    ],
)
def test_calibration_refusals(capsys, tiny_model_factory, tmp_path, calib, field, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Once upon a time.\n\nThe end.")
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    out = tmp_path / "o"
    assert_refused(capsys, out, *q(tiny_model_factory("llama"), out, "--method", "omniquant", "--calib",
                                   tmp_path / calib if "/" not in calib else calib, "--calib-field", field,
                                   "--nsamples", "8", "--seqlen", "64"), match=match)


def test_learnable_method_needs_calibration(capsys, tiny_model_factory, tmp_path):
    out = tmp_path / "o"
    assert_refused(capsys, out, *q(tiny_model_factory("llama"), out, "--method", "flexround"),
                   match="needs calibration data")


def test_unknown_scheme_lists_known(capsys, tiny_model_factory, tmp_path):
    out = tmp_path / "o"
    err = assert_refused(capsys, out, "quantize", tiny_model_factory("llama"), "--scheme", "w5g32", "--out", out,
                         match="unknown scheme 'w5g32'")
    assert "w4g128" in err


def test_group_does_not_divide(capsys, stories_dir, tmp_path):
    out = tmp_path / "o"
    assert_refused(capsys, out, "quantize", stories_dir, "--scheme", "w4g32", "--out", out,
                   match="model.layers.0.mlp.down_proj: input dimension 172 is not a multiple of 32")


def test_skip_unquantizable_keeps_fp_and_reports(capsys, stories_dir, tmp_path):
    out = tmp_path / "o"
    code, err = run_cli(capsys, "quantize", stories_dir, "--scheme", "w4g32", "--out", out, "--skip-unquantizable",
                        "--no-progress")
    assert code == 0, err
    kept = json.loads((out / "record.json").read_text())["report"]["kept_fp"]
    assert sorted(kept) == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]


def test_output_exists_needs_overwrite(capsys, tiny_model_factory, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, None, *q(tiny_model_factory("llama"), out), match="already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run_cli(capsys, *q(tiny_model_factory("llama"), out, "--overwrite"))
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "record.json").is_file()


def test_output_not_writable(capsys, tiny_model_factory):
    target = Path("/sys/fs/lfq-export-test/run")
    if Path("/sys/fs").exists():
        try:
            (Path("/sys/fs") / ".w").touch()
            (Path("/sys/fs") / ".w").unlink()
            pytest.skip("/sys/fs is writable here")
        except OSError:
            pass
    assert_refused(capsys, None, *q(tiny_model_factory("llama"), target), match="not writable")


def test_disk_full_while_writing(capsys, tiny_model_factory, tmp_path, monkeypatch):
    import lfq_export.record as rec
    from safetensors import SafetensorError

    real = rec.save_file
    calls = {"n": 0}

    def full(tensors, path, metadata=None):  # the second file hits a full disk half-way
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(rec, "save_file", full)
    out = tmp_path / "o"
    code, err = run_cli(capsys, *q(tiny_model_factory("llama"), out))
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert "disk full while writing" in err and "--resume" in err
    assert not out.exists()
    leftovers = [p.name for p in partial_dir(out).rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], "temporary files left behind"


def test_real_disk_full_on_tmpfs(capsys, tiny_model_factory, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated test covers the logic")
    try:
        out = mnt / "o"
        code, err = run_cli(capsys, *q(tiny_model_factory("llama", hidden_size=128, intermediate_size=256), out))
        assert code == 2 and "disk full while writing" in err, err
        assert not out.exists()
        assert not [p for p in mnt.rglob("*") if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_record_from_other_version(capsys, tiny_model_factory, rtn_run, tmp_path):
    run = rtn_run(tiny_model_factory("llama"), "w4g32")
    m = json.loads((run / "record.json").read_text())
    m["record_version"] = 0
    (run / "record.json").write_text(json.dumps(m))
    assert_refused(capsys, None, "info", run, match="record version 0 is not supported")


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lfq_export.cli", "quantize", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o"), "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputError" in r.stderr


# ---- security: nothing read from a model file may lead outside it or smuggle huge strings -----------
def test_shard_index_cannot_escape_the_model_directory(capsys, model_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy2(model_copy / "model.safetensors", outside)
    keys = list(load_file(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"),
                   match="file name '../elsewhere.safetensors' in a model file points outside the model directory")


def test_tokenizer_symlink_cannot_escape_the_model_directory(capsys, model_copy, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (model_copy / "special_tokens_map.json").unlink(missing_ok=True)
    (model_copy / "special_tokens_map.json").symlink_to(secret)
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o"),
                   match="'special_tokens_map.json' in a model file points outside the model directory")


def test_gguf_input_with_oversized_metadata_string(capsys, tmp_path):
    import gguf
    import numpy as np

    bad = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_name("x" * ((1 << 20) + 1))
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_refused(capsys, tmp_path / "o", *q(bad, tmp_path / "o"),
                   match="metadata general.name holds a string of 1048577 bytes (limit 1048576)")


def test_oversized_chat_template_refused_before_compute_for_gguf(capsys, model_copy, tmp_path):
    cfg_file = model_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg["chat_template"] = "{{ messages }}" + " " * (1 << 20)
    cfg_file.write_text(json.dumps(cfg))
    assert_refused(capsys, tmp_path / "o", *q(model_copy, tmp_path / "o", "--format", "gguf"),
                   match="chat template has 1048590 bytes (limit 1048576)")
