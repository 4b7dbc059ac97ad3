"""bench/demo.py runs end to end with the shipped demo files at one step, so it cannot rot: its size table adds up to
the files on disk and covers every shipped demo file, and it returns every number it prints. No timing is asserted."""
from __future__ import annotations

import math

import pytest

from flux_core import demo
from tests.bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("demo") as module:
        yield module


def test_demo_bench_runs_in_one_step(bench, capsys):
    result = bench.main(["--steps", "1", "--runs", "1", "--threads", "1"])
    shipped = demo.shipped_files()
    assert len(result["files"]) == len(shipped) and result["total_bytes"] == sum(p.stat().st_size for p in shipped)
    assert sum(result["rows"].values()) == result["total_bytes"]
    for slot in demo.FILES:   # each model file has its own row
        assert result["rows"]["models/" + demo.FILES[slot]] == demo.model_path(slot).stat().st_size
    assert result["rows"]["datasets/" + demo.STRIPES_DATASET + "/"] > 0
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("load_s", "reload_s", "first_s", "steady_s"))
    assert (result["steps"], result["size"], result["threads"]) == (1, (demo.HEIGHT, demo.WIDTH), 1)
    printed = capsys.readouterr().out
    assert f"total ({len(shipped)} files)" in printed and "steady image" in printed and "1 threads" in printed
