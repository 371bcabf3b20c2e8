"""benchmarks/step_threads.py: its child processes time real steps and the report adds up."""

import json
import os

import pytest


@pytest.fixture
def bench(load_script):
    return load_script("benchmarks/step_threads.py")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_small_run_writes_consistent_figures(bench, tmp_path):
    out = tmp_path / "t.json"
    assert bench.main(["--batches", "8", "--examples", "400", "--repeats", "1",
                          "--out", str(out)]) == 0
    content = json.loads(out.read_text())
    runs = content["runs"]
    assert [(r["batch"], r["one_core"]) for r in runs] == [(8, False), (8, True)]
    for r in runs:
        assert r["steps"] == 50
        assert r["steps_per_s"] == pytest.approx(50 / r["wall_s"])
        assert r["examples_per_s"] == pytest.approx(8 * r["steps_per_s"])
        assert r["gflop_per_s"] == pytest.approx(4 * 8 * 2304 * 128 * r["steps_per_s"] / 1e9)
    pinned = next(r for r in runs if r["one_core"])
    assert pinned["cpu_per_wall"] < 1.3  # one core cannot give much more than a CPU second
    assert set(content["summary_best_steps_per_s"]) == {"8/all", "8/one"}
