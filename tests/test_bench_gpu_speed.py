"""bench/gpu_speed.py runs end to end on the CPU (its small model, 2 steps), so the prepared GPU script cannot rot: every
row is measured (none failed), the bf16 rows are close to the reference row and the FP8 rows within the FP8 error.
No timing is asserted."""
from __future__ import annotations

import functools

import pytest

import flux_core.compile
from flux_core.compile import compile_dit
from tests.bench_scripts import bench_script


@pytest.mark.slow
def test_gpu_speed_runs_every_row_on_the_cpu(capsys, monkeypatch):
    # The compiled rows trace with aot_eager here (the script's rows and flow are under test; inductor's compile is
    # tests/test_compile.py's and test_cli_speed.py's): two inductor compiles cost ~40 s of CI on two cores.
    monkeypatch.setattr(flux_core.compile, "compile_dit", functools.partial(compile_dit, backend="aot_eager"))
    with bench_script("gpu_speed") as bench:
        rows = bench.main(["--cpu", "--steps", "2", "--no-save", "--threads", "2"])
    by_label = {r["label"]: r for r in rows}
    assert list(by_label) == ["eager bf16", "eager bf16, torch's default attention", "eager bf16 + TeaCache 0.4", "compiled bf16", "FP8 compute, eager",
                              "FP8 compute, compiled", "FP8 compute, compiled + TeaCache 0.4", "diffusers bf16, eager"]
    assert all("s_step" in r and r["s_step"] > 0 for r in rows), [r.get("note") for r in rows]
    assert by_label["eager bf16"]["diff"] == 0
    # bf16 rounding only (measured 3e-3 to 6e-3), FP8 quantization (measured 3e-2 to 4e-2) on a random small DiT
    assert by_label["eager bf16, torch's default attention"]["diff"] == 0   # the CPU's choice is torch's own
    for label in ("compiled bf16", "diffusers bf16, eager"):
        assert by_label[label]["diff"] < 0.02, label
    for label in ("FP8 compute, eager", "FP8 compute, compiled"):
        assert 0.005 < by_label[label]["diff"] < 0.1, label
        assert "fp8 path: scaled_mm" in by_label[label]["note"]
    assert "TeaCache positive: 2 of 2 steps computed" in by_label["eager bf16 + TeaCache 0.4"]["note"]
    assert "speedup" in capsys.readouterr().out
