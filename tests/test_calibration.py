"""Calibration sources and their refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lfq_export.calibration import load_calibration, parse_calib
from lfq_export.errors import CalibrationError


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(str(stories_dir))


def test_txt_windows_deterministic_and_seeded(tok, tinystories_text):
    spec = parse_calib(str(tinystories_text))
    a = load_calibration(spec, tok, 8, 64, seed=1)
    b = load_calibration(spec, tok, 8, 64, seed=1)
    c = load_calibration(spec, tok, 8, 64, seed=2)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8  # non-overlapping distinct windows


def test_jsonl_fields(tok, tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"prefix": f"Tom had {i} apples.", "gold_completion": " He ate one."})
                           for i in range(300)))
    ids = load_calibration(parse_calib(str(p), "prefix,gold_completion"), tok, 4, 32, seed=0)
    text = tok.decode(ids[0])
    assert "apples" in text or "ate" in text
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: no field 'text' \(fields here: gold_completion, prefix\)"):
        load_calibration(parse_calib(str(p)), tok, 4, 32, seed=0)


def test_too_short_empty_missing(tok, tmp_path):
    short = tmp_path / "s.txt"
    short.write_text("Once upon a time there was a cat.\n\nThe end.")
    with pytest.raises(CalibrationError, match=r"too little for 4 samples × 64 tokens \(256\)"):
        load_calibration(parse_calib(str(short)), tok, 4, 64, seed=0)
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="is empty"):
        parse_calib(str(empty))
    with pytest.raises(CalibrationError, match="does not exist"):
        parse_calib(str(tmp_path / "nope.txt"))
    blank = tmp_path / "b.txt"
    blank.write_text("\n\n   \n\n")
    with pytest.raises(CalibrationError, match="contains no text"):
        load_calibration(parse_calib(str(blank)), tok, 1, 8, seed=0)


def test_dataset_local_dir_and_unreachable(tok, tmp_path, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["Lily saw a big red ball in the park. " * 20] * 50})
    ds.save_to_disk(str(tmp_path / "ds"))
    ids = load_calibration(parse_calib(f"{tmp_path / 'ds'}:train"), tok, 4, 32, seed=0)
    assert ids.shape == (4, 32)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(CalibrationError, match="cannot load"):
        load_calibration(parse_calib("no-such-org/no-such-dataset:train"), tok, 1, 8, seed=0)


def test_self_generated(tok, stories_dir):
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir)).eval()
    a = load_calibration(parse_calib("self"), tok, 3, 20, seed=5, model=model)
    b = load_calibration(parse_calib("self"), tok, 3, 20, seed=5, model=model)
    assert a.shape == (3, 20) and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all()
    assert len(set(a[:, 1:].flatten().tolist())) > 10  # real sampled text, not a constant
