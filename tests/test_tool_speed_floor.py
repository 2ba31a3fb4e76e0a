"""tools/bench_speed_floor.py: the floor of a run is the schedule's plain steps and propagations."""

import importlib
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def floor_tool():
    sys.path.insert(0, str(TOOLS))
    try:
        yield importlib.import_module("bench_speed_floor")
    finally:
        sys.path.remove(str(TOOLS))


def test_floor_adds_up_the_schedule_and_its_parts(floor_tool):
    a = floor_tool.parse_args(["--iters", "10"])
    best = {"plain step": 0.05, "lfq-export block": 0.6, "propagation": 0.5}
    split = {"plain step": {"gemm": 0.5, "attention": 0.2, "other": 0.3},
             "propagation": {"gemm": 0.6, "attention": 0.1, "other": 0.3}}
    runs = {"auto-round": {"wall_s": 100.0}, "lfq-export": {"wall_s": 80.0}}
    out = floor_tool.summarise(a, 4, best, split, runs)
    rows = [sec for _, sec in out["rows"]]
    # 4 blocks × 10 steps × 50 ms + 7 propagations × 0.5 s
    assert rows == pytest.approx([100.0, 80.0, 5.5, 2.0 * 0.7 + 3.5 * 0.7, 2.0 * 0.5 + 3.5 * 0.6])
    assert out["ours_over_plain_step"] == pytest.approx(0.06 / 0.05)
    assert "| 0.80 |" in out["table"] and "| 0.06 |" in out["table"]  # ratios to auto-round's run


def test_floor_table_without_the_whole_runs(floor_tool):
    a = floor_tool.parse_args(["--no-runs"])
    split = {"plain step": {"gemm": 1.0, "attention": 0.0, "other": 0.0},
             "propagation": {"gemm": 1.0, "attention": 0.0, "other": 0.0}}
    out = floor_tool.summarise(a, 2, {"plain step": 0.01, "lfq-export block": 1.0, "propagation": 0.1}, split, {})
    assert [name.split(":")[0] for name, _ in out["rows"]][0] == "floor"
    assert "| — |" in out["table"]
