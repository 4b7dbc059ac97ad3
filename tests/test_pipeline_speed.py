"""The pipeline's speed options: FP8 compute (`from_pretrained(fp8_compute=True)` / `enable_fp8_compute`) in any
order with VRAM management."""
from __future__ import annotations

import pytest
import torch

from flux_core.fp8 import Fp8Linear, is_fp8_compute
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.vram import GiB, SimulatedDevice
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

CALL = dict(prompt="a cat", negative_prompt="blurry", cfg_scale=2.0, height=48, width=64, seed=0, num_inference_steps=2,
            t5_sequence_length=16, progress_bar_cmd=None, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    make_diffusers_pipeline(tmp)
    return tmp / FOLDER_NAME


def load(folder, **kwargs) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu",
                                             model_configs=[ModelConfig(path=str(folder))], **kwargs)


def test_fp8_compute_from_pretrained_equals_the_method_and_any_order_with_vram_management(folder):
    by_flag = load(folder, fp8_compute=True)
    assert is_fp8_compute(by_flag.dit) and not is_fp8_compute(by_flag.vae)
    reference = by_flag(**CALL)

    after = load(folder)
    after.enable_vram_management(vram_limit=0, device=SimulatedDevice(16 * GiB))  # everything streams
    assert after.enable_fp8_compute() == "scaled_mm"
    managed = after.vram.models["dit"]
    assert any(isinstance(u.module, Fp8Linear) for u in managed.units)   # the manager holds the converted layers
    assert after.vram.budget == 0 and managed.compute_dtype == torch.bfloat16
    assert (after(**CALL) == reference).all()

    before = load(folder)
    before.enable_fp8_compute()
    before.enable_vram_management(vram_limit=0, device=SimulatedDevice(16 * GiB))
    assert (before(**CALL) == reference).all()
    assert not (load(folder)(**CALL) == reference).all()   # bf16 compute gives another image


def test_fp8_compute_without_a_dit_names_the_slot():
    with pytest.raises(RuntimeError, match="cannot compute in FP8: the pipeline has no dit"):
        FluxImagePipeline(device="cpu").enable_fp8_compute()


def test_fp8_compute_loads_the_dit_converted_and_resident(folder):
    pipe = load(folder, fp8_compute=True)
    assert pipe.vram is None and pipe.dit.img_in.weight.device.type == "cpu"
    layer = pipe.dit.double_blocks[0].img_attn.qkv
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn


def test_compile_pipeline_equals_eager_and_reports_attention(folder, monkeypatch, caplog):
    """compile_pipeline compiles the DiT's blocks (flux_core.compile, whose own tests compile with inductor); here the
    aot_eager backend keeps the CPU cost down: the graphs are traced, fullgraph, with no recompile over the steps and
    the two CFG branches, inside the pipeline's attention context."""
    import functools

    import flux_core.pipeline as pipeline_module
    from flux_core.compile import compile_dit, is_compiled

    monkeypatch.setattr(pipeline_module, "compile_dit", functools.partial(compile_dit, backend="aot_eager"))
    call = {**CALL, "num_inference_steps": 3}
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(folder))])
    with caplog.at_level("INFO", logger="flux_core"):
        eager = pipe(**call)
        pipe.compile_pipeline()
        assert is_compiled(pipe.dit)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = pipe(**call)
            pipe(**call)
    assert abs(compiled - eager).max() <= 1e-5
    line = "attention: flash > math on cpu, float32"
    assert [r.getMessage() for r in caplog.records if "attention:" in r.getMessage()] == [
        f"FluxImagePipeline: {line}"]   # logged once over three runs
    assert pipe.reported_attention == {line}


def test_compile_pipeline_refused_under_vram_management(folder):
    from flux_core.compile import CompileRefused
    pipe = load(folder)
    pipe.enable_vram_management(vram_limit=0, device=SimulatedDevice(16 * GiB))
    with pytest.raises(CompileRefused, match="vram_limit|enable_vram_management"):
        pipe.compile_pipeline()
