"""bench/eligen_step.py runs end to end at a tiny size, so it cannot rot: its models build, EliGen is bound as the
pipeline binds it and moves the output (the bench refuses to time otherwise), the peak-memory child processes run,
and it returns every number it prints. No timing is asserted."""
from __future__ import annotations

import math

import pytest
from tests.bench_scripts import bench_script

TINY = ["--blocks", "1", "1", "--tokens", "16", "8", "--entities", "2", "3", "--runs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    with bench_script("eligen_step") as module:
        yield module


def test_eligen_step_bench_runs_at_a_tiny_size(bench, capsys):
    result = bench.main(TINY)
    assert set(result["moved"]) == set(result["overhead"]) == set(result["mask_bytes"]) == {2, 3}
    assert all(m > bench.MOVED for m in result["moved"].values())
    assert set(result["peak"]) == {0, 2, 3} and all(p >= 0 for p in result["peak"].values())
    numbers = [*result["seconds"].values(), *result["overhead"].values(), *result["cpu_overhead"].values()]
    assert all(math.isfinite(n) and n > 0 for n in numbers)
    # Two entities of 8 tokens beside an 8-token prompt and 16 image tokens: a 40-token sequence, float32.
    assert result["mask_bytes"][2] == 40 * 40 * 4
    assert 1 < result["flux_flops"][2] < result["flux_flops"][3]
    printed = capsys.readouterr().out
    assert "+2 entities" in printed and "+3 entities" in printed
