"""bench/train_step.py --cache runs end to end at a tiny size, so it cannot rot: the model folder and dataset build,
data_process, the uncached (--task sft) and cached (--task sft:train) trainer runs each go through their subprocess, and
it returns every number it prints. No timing is asserted."""
from __future__ import annotations

import math

import pytest
from tests.bench_scripts import bench_script

TINY = ["--cache", "--blocks", "1", "1", "--img-side", "2", "--txt-tokens", "8", "--runs", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    with bench_script("train_step") as module:
        yield module


@pytest.mark.slow
def test_train_step_bench_compares_cached_and_uncached(bench, capsys):
    result = bench.main(TINY)
    assert set(result["step"]) == {"uncached", "cached"}
    assert set(result["peak"]) == {"data_process", "uncached", "cached"}
    numbers = [*result["step"].values(), *result["cpu"].values(), *result["peak"].values(), *result["ratio"].values(),
               result["data_process_seconds"]]
    assert all(math.isfinite(n) and n > 0 for n in numbers)
    # The cached run loads the DiT alone: it holds less than the run that also loads T5 (43M parameters), CLIP and
    # the VAE, whatever the machine's speed.
    assert result["peak"]["cached"] < result["peak"]["uncached"]
    assert result["params"]["text_encoder_2"] > 4e7
    assert "ratio cached/uncached: time" in capsys.readouterr().out
