"""Interrupted runs: SIGTERM/SIGKILL mid-way leaves a resumable state; --resume gives identical codes."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lfq_export.quantize import partial_dir
from lfq_export.record import QuantizedModel


def _cmd(model, out, calib, *extra):
    return [sys.executable, "-m", "lfq_export.cli", "quantize", str(model), "--scheme", "w3g32", "--method",
            "omniquant", "--calib", str(calib), "--nsamples", "4", "--seqlen", "64", "--iters", "40",
            "--out", str(out), "--no-progress", *extra]


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timeout waiting for {path}")
        time.sleep(0.05)


def _same_codes(a, b):
    ra, rb = QuantizedModel.load(a), QuantizedModel.load(b)
    assert ra.quantized.keys() == rb.quantized.keys()
    for n in ra.quantized:
        assert torch.equal(ra.quantized[n].codes, rb.quantized[n].codes), n
        for k, v in ra.quantized[n].params.items():
            assert torch.equal(v, rb.quantized[n].params[k]), (n, k)


@pytest.fixture(scope="module")
def four_blocks(tiny_model_factory):
    return tiny_model_factory("llama", num_layers=4, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def reference_run(four_blocks, tinystories_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(four_blocks, out, tinystories_text), check=True, capture_output=True)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kill_and_resume_is_bit_identical(four_blocks, tinystories_text, reference_run, tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(four_blocks, out, tinystories_text), stderr=subprocess.PIPE, text=True)
    _wait_for(partial_dir(out) / "blocks" / "block_0001.safetensors", proc)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    err = proc.stderr.read()
    assert not out.exists(), "an unfinished run must not appear under the final name"
    assert partial_dir(out).is_dir()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130
        assert "resume with: lfq-export quantize" in err and err.strip().endswith("--resume")
        assert "Traceback" not in err
    # resuming without --resume is refused; with --resume it completes
    again = subprocess.run(_cmd(four_blocks, out, tinystories_text), capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    if sig == signal.SIGTERM:  # settings that change the codes cannot resume this run
        r = subprocess.run(_cmd(four_blocks, out, tinystories_text, "--resume", "--seed", "7"),
                           capture_output=True, text=True)
        assert r.returncode == 2 and "different settings" in r.stderr
    subprocess.run(_cmd(four_blocks, out, tinystories_text, "--resume"), check=True, capture_output=True)
    assert out.is_dir() and not partial_dir(out).exists()
    _same_codes(out, reference_run)


def test_stop_after_block_then_branch_final_loss(tiny_model_factory, tinystories_text, tmp_path):
    """Blocks 0..L-2 are shared by the MSE and the LFQ variant: stop before the last block, copy, finish
    each with its own final loss. The shared blocks are identical and the finished runs are complete."""
    import shutil

    from lfq_export.quantize import QuantizeOptions, quantize

    model = tiny_model_factory("llama", num_layers=3)
    base = dict(scheme="w3g32", method="omniquant", calib=str(tinystories_text), nsamples=4, seqlen=32, iters=4,
                progress=False)
    a = tmp_path / "a"
    work = quantize(str(model), a, QuantizeOptions(**base, final_loss="mse", stop_after_block=1))
    assert work == partial_dir(a) and not a.exists()
    shutil.copytree(partial_dir(a), partial_dir(tmp_path / "b"))
    quantize(str(model), a, QuantizeOptions(**base, final_loss="mse", resume=True))
    quantize(str(model), tmp_path / "b", QuantizeOptions(**base, final_loss="ce", resume=True))
    ra, rb = QuantizedModel.load(a), QuantizedModel.load(tmp_path / "b")
    assert [b["loss"] for b in rb.report["blocks"]] == ["mse", "mse", "ce"]
    shared = [n for n in ra.quantized if not n.startswith("model.layers.2.")]
    final = [n for n in ra.quantized if n.startswith("model.layers.2.")]
    assert shared and final
    assert all(torch.equal(ra.quantized[n].codes, rb.quantized[n].codes) for n in shared)
    # the last block was optimised with different losses, so its codes differ
    assert not all(torch.equal(ra.quantized[n].codes, rb.quantized[n].codes) for n in final)
