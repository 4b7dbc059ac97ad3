"""bench/ipadapter_step.py runs end to end at a tiny size, so it cannot rot: its models build, each adapter is bound as
the pipeline binds it and moves the output (the bench refuses to time otherwise), and it returns every number it
prints, the encoder memory at the published shapes included. No timing is asserted."""
from __future__ import annotations

import math

import pytest
from tests.bench_scripts import bench_script

TINY = ["--heads", "1", "--blocks", "2", "2", "--infusenet-blocks", "1", "1", "--tokens", "16", "8", "--runs", "1",
        "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    with bench_script("ipadapter_step") as module:
        yield module


def test_ipadapter_step_bench_runs_at_a_tiny_size(bench, capsys):
    result = bench.main(TINY)
    adapters = set(bench.CONFIGS[1:])
    assert set(result["moved"]) == set(result["overhead"]) == set(result["flops"]) == adapters
    assert all(m > bench.MOVED for m in result["moved"].values())
    numbers = [*result["seconds"].values(), *result["overhead"].values(), *result["cpu_overhead"].values()]
    assert len(numbers) == 4 + 3 + 3 and all(math.isfinite(n) and n > 0 for n in numbers)
    assert all(r > 1 for r in [*result["flops"].values(), *result["flux_flops"].values()])
    printed = capsys.readouterr().out
    assert all(f"\n{c:13} " in printed for c in bench.CONFIGS)


def test_encoder_memory_at_the_published_shapes(bench):
    """Parameter counts of the meta-device models against the published ones: SigLIP so400m's vision tower 428.2M and
    CLIP ViT-L/14's 303.2M + its 768x1024 projection (transformers' own classes at the published configs), InstantX's
    ip-adapter.bin (image_proj 1152->2304->128x4096 + LayerNorm, 57 x 2 x 4096x3072) and XLabs' (768->4x4096 +
    LayerNorm, 19 x 2 x (4096x3072 + 3072))."""
    memory = bench.encoder_memory()
    instantx = 1152 * 2304 + 2304 + 2304 * 128 * 4096 + 128 * 4096 + 2 * 4096 + 57 * 2 * 4096 * 3072
    xlabs = 768 * 4 * 4096 + 4 * 4096 + 2 * 4096 + 19 * 2 * (4096 * 3072 + 3072)
    assert memory["InstantX IP-Adapter"]["params"] == instantx
    assert memory["XLabs IP-Adapter"]["params"] == xlabs
    assert round(memory["SigLIP so400m-patch14-384"]["params"] / 1e5) == 4282
    assert round(memory["CLIP ViT-L/14 (+projection)"]["params"] / 1e5) == 3032 + 8
    for m in memory.values():
        assert m["fp8"] < 0.51 * m["bf16"]  # the weight matrices are nearly all of it
    assert memory["InstantX IP-Adapter"]["kv"] == 89_653_248
