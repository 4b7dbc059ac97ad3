"""bench/controlnet_step.py runs end to end at a tiny size, so it cannot rot: its models build, save and load, its two
steps agree (the bench refuses to time otherwise) and it returns every number it prints. No timing is asserted."""
from __future__ import annotations

import math

import pytest
from tests.bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("controlnet_step") as module:
        yield module


TINY = ["--heads", "1", "--blocks", "2", "4", "--union-blocks", "1", "2", "--upscaler-blocks", "1", "0",
        "--tokens", "16", "8", "--runs", "1", "--threads", "1"]


def test_controlnet_step_bench_runs_at_a_tiny_size(bench, tmp_path, capsys):
    work = tmp_path / "work"
    result = bench.main([*TINY, "--work", str(work)])
    assert not work.exists()  # checkpoints removed afterwards
    assert set(result["errors"]) == set(bench.CONFIGS)
    assert all(e < bench.LIMITS["float32"] for e in result["errors"].values())
    numbers = [*result["seconds"].values(), *result["overhead"].values(), *result["ours_vs_diffusers"].values()]
    assert len(numbers) == 6 + 4 + 3 and all(math.isfinite(n) and n > 0 for n in numbers)
    printed = capsys.readouterr().out
    assert "outputs match" in printed and all(f"\n{c:7} " in printed for c in bench.CONFIGS)


def test_controlnet_step_bench_refuses_a_pair_it_cannot_check(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--upscaler-blocks", "4", "0"])
    assert "--upscaler-blocks 4 0: give the union net's double-block count (5)" in capsys.readouterr().err
