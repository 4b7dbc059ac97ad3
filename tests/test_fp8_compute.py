"""FP8 compute (flux_core.fp8) on the CPU, where torch._scaled_mm runs the same FP8 product with row-wise scales:
the layer against plain float32 matmuls of the same quantized values, a tiny DiT against its float32 self, the
scaled_mm and storage-only paths against each other, the VRAM manager moving the layers in float8, LoRA hook mode,
and the per-device path decision."""
import gc

import pytest
import torch
from torch import nn

from flux_core.fp8 import (FP8_COMPUTE_PARTS, SCALE_NAME, Fp8Linear, OutputDifference, decide_fp8_path,
                           enable_fp8_compute, fp8_compute_difference, fp8_compute_path, fuse_refusal,
                           storage_only_fp8)
from flux_core.loading.loader import load_model
from flux_core.lora import clear_lora, load_lora
from flux_core.lora import LoraError
from flux_core.models.dit import DiTExtras
from flux_core.teacache import TeaCache
from flux_core.vram import SimulatedDevice, VRAMManager, store_model
from tests.test_vram import Audit
from tests.tiny_dit import dit_inputs, make_diffusers_dit, write_bfl_dit

E4M3 = torch.float8_e4m3fn


def reference_quantize(t):
    """Per-row e4m3 quantization written out with plain torch ops: the dequantized values, in float64."""
    t = t.double()
    scale = (t.abs().amax(dim=-1, keepdim=True) / 448).float().double()
    return (t / scale).float().to(E4M3).double() * scale


def one_layer(in_features=48, out_features=80, bias=True, seed=0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.double_blocks = nn.ModuleList([nn.Linear(in_features, out_features, bias=bias)])
    return holder.requires_grad_(False)


def test_layer_equals_float64_matmul_of_the_same_fp8_values():
    holder = one_layer()
    linear = holder.double_blocks[0]
    weight, bias = linear.weight.clone(), linear.bias.clone()
    assert enable_fp8_compute(holder, "cpu") == "scaled_mm"
    assert type(linear) is Fp8Linear and linear.weight.dtype == E4M3
    assert getattr(linear, SCALE_NAME).dtype == torch.float32 and getattr(linear, SCALE_NAME).shape == (80,)
    assert set(holder.state_dict()) == {"double_blocks.0.weight", "double_blocks.0.bias", "double_blocks.0.weight_scale"}
    x = torch.randn(2, 5, 48) * torch.linspace(0.01, 30, 48)  # tokens of any leading shape, channels of mixed sizes
    got = linear(x)
    expected = reference_quantize(x) @ reference_quantize(weight).T + bias.double()
    assert got.shape == (2, 5, 80) and got.dtype == torch.float32
    # Measured 1.0e-7 relative (float32 accumulation order); one per-tensor input scale instead of per-row scales
    # gives 2.8e-2.
    assert ((got.double() - expected).norm() / expected.norm()).item() < 2e-6
    assert linear(x[0, 0]).shape == (80,)                       # a single vector
    assert torch.allclose(linear(x[0, 0]), got[0, 0], rtol=1e-6, atol=1e-5)
    xb = x.bfloat16()
    bf16 = linear(xb)
    expected = reference_quantize(xb) @ reference_quantize(weight).T + bias.double()
    # bf16 output and bias: measured 2.4e-3 (bf16 keeps 8 significant bits: 2e-3 relative per value).
    assert bf16.dtype == torch.bfloat16 and ((bf16.double() - expected).norm() / expected.norm()).item() < 3e-3


def test_weights_already_in_fp8_keep_their_codes_with_scale_one():
    holder = one_layer()
    store_model(holder, weight_dtype=E4M3)
    codes = holder.double_blocks[0].weight.clone()
    enable_fp8_compute(holder)
    linear = holder.double_blocks[0]
    assert torch.equal(linear.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(linear.weight_scale, torch.ones(80))
    enable_fp8_compute(holder)  # idempotent: nothing is quantized twice
    assert torch.equal(linear.weight.view(torch.uint8), codes.view(torch.uint8))


def test_dims_not_multiple_of_16_take_the_storage_only_path():
    holder = one_layer(in_features=40, out_features=24)
    enable_fp8_compute(holder)
    linear = holder.double_blocks[0]
    x = torch.randn(3, 40)
    real_weight = linear.weight.float() * linear.weight_scale[:, None]
    assert torch.equal(linear(x), nn.functional.linear(x, real_weight, linear.bias))


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_bfl_dit(make_diffusers_dit(seed=3), tmp_path_factory.mktemp("fp8") / "dit.safetensors")


def load(path, dtype=torch.float32):
    return load_model(path, {"axes_dim": (4, 6, 6)}, torch_dtype=dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_tiny_dit_fp8_compute_against_float32_and_storage_only(dit_file):
    x = dit_inputs(32)
    full = load(dit_file)
    expected = full(**x)
    dit = load(dit_file)
    assert enable_fp8_compute(dit) == "scaled_mm"
    converted = {n for n, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    linears = {n for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    assert converted == {n for n in linears if n.split(".")[0] in FP8_COMPUTE_PARTS} and len(converted) == 26
    assert dit.img_in.weight.dtype == dit.final_layer.linear.weight.dtype == torch.float32
    got = dit(**x)
    error = rel(got, expected)
    # Measured 0.050 (weights and activations rounded to e4m3 with per-row scales; bound 1.2x). The same DiT with
    # only its weight matrices cast to e4m3 (the storage mode, no scales) measures 0.074, below.
    assert 0.005 < error < 0.06
    plain_fp8 = store_model(load(dit_file), weight_dtype=E4M3)
    VRAMManager("cpu").add("dit", plain_fp8, torch.float32)
    assert error < rel(plain_fp8(**x), expected)
    with storage_only_fp8():
        storage_only = dit(**x)
    # The two paths differ by the activations' rounding only: measured 0.037 (storage-only alone: 0.038 from float32).
    assert rel(got, storage_only) < 0.045 and 0 < rel(storage_only, expected) < error

    # TeaCache is unaffected: its probe (the first block's modulation) runs in FP8 like the rest.
    cache = TeaCache(3, 100.0)
    first = dit(**x, extras=DiTExtras(tea_cache=cache))
    assert torch.equal(first, got) and torch.allclose(dit(**x, extras=DiTExtras(tea_cache=cache)), got, atol=1e-5)
    assert cache.stats.skipped_steps == [1]


def test_fp8_compute_difference_reports_against_the_model_as_it_was(dit_file):
    x = dit_inputs(32)
    dit = load(dit_file)
    expected = dit(**x)
    path, diff = fp8_compute_difference(dit, lambda m: m(**x))
    assert path == "scaled_mm" and isinstance(dit.double_blocks[0].img_attn.qkv, Fp8Linear)
    again = OutputDifference.of(dit(**x), expected)
    assert diff == again and 0 < diff.mean_abs <= diff.max_abs and 0.005 < diff.relative < 0.06


@pytest.mark.parametrize("budget", [0, None])
def test_vram_manager_moves_fp8_layers_uncast(dit_file, budget):
    x = dit_inputs(32)
    dit = load(dit_file)
    before = sum(t.nbytes for t in [*dit.parameters(), *dit.buffers()])
    enable_fp8_compute(dit)
    expected = dit(**x)
    layers = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    total = sum(t.nbytes for t in [*dit.parameters(), *dit.buffers()])
    # float32 weights became 1-byte codes, plus a float32 scale per output row
    assert before - total == sum(3 * m.weight.numel() - 4 * m.out_features for m in layers)
    device = SimulatedDevice()
    vram = VRAMManager(device, budget, prefetch=budget == 0)
    vram.add("dit", dit, torch.float32)
    vram.load_models_to_device(["dit"])
    assert vram.resident_bytes == (0 if budget == 0 else total)  # fp8 weights count 1 byte each
    seen = []

    def arrives(module, args):
        seen.append((module.weight.dtype, module.weight_scale.dtype, device.holds(module.weight)))
    handles = [m.register_forward_pre_hook(arrives) for m in dit.modules() if isinstance(m, Fp8Linear)]
    audit = Audit(dit, vram, device)
    for _ in range(2):  # the second call runs on prefetched copies where prefetch is on
        assert torch.equal(dit(**x), expected)
    audit.remove()
    for h in handles:
        h.remove()
    assert set(seen) == {(E4M3, torch.float32, True)}
    assert vram.largest_unit_bytes() >= max(m.weight.numel() * 5 for m in dit.modules() if isinstance(m, Fp8Linear))
    assert audit.max_seen <= (budget or total) + vram.largest_unit_bytes() + vram.prefetch_window_bytes()
    if budget == 0:
        assert vram.prefetch_stats.used > 0
    vram.remove("dit")
    gc.collect()
    assert device.live_bytes == 0


def test_bf16_compute_under_the_manager(dit_file):
    x = {k: (v.bfloat16() if v.is_floating_point() and k in ("img", "txt", "y") else v) for k, v in dit_inputs(32).items()}
    dit = load(dit_file, torch.bfloat16)
    enable_fp8_compute(dit)
    expected = dit(**x)
    vram = VRAMManager(SimulatedDevice(), 0, prefetch=True)
    vram.add("dit", dit, torch.bfloat16)
    vram.load_models_to_device(["dit"])
    assert dit(**x).dtype == torch.bfloat16 and torch.equal(dit(**x), expected)


def lora_for(dit, rank=4):
    torch.manual_seed(5)
    lora = {}
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "single_blocks.1.linear1",
                 "single_blocks.0.linear2"):
        layer = dit.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features) * 0.3
        lora[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank) * 0.3
        lora[f"{key}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_hooks_on_fp8_compute_layers(dit_file):
    x = dit_inputs(32)
    full = load(dit_file)
    lora = lora_for(full)
    full_base = full(**x)
    load_lora(full, dict(lora))
    full_delta = full(**x) - full_base

    dit = load(dit_file)
    enable_fp8_compute(dit)
    base = dit(**x)
    report = load_lora(dit, dict(lora))
    assert report.mode == "hook"
    delta = dit(**x) - base
    base_error = rel(base, full_base)
    # The LoRA's own path runs in float32 on top of the FP8 output: its effect differs from the float32 DiT's only
    # through the base's FP8 rounding (measured 0.058 against a base error of 0.050); the LoRA matters (its effect is
    # 1.6x the output's norm) and keeps its full strength (measured 0.995).
    assert rel(full_delta, full_base) > 0.1
    assert rel(delta, full_delta) < 2 * base_error + 0.01
    assert abs(delta.norm() / full_delta.norm() - 1) < 0.05
    clear_lora(dit)
    assert torch.equal(dit(**x), base)


def test_fuse_refusal_message():
    holder = one_layer()
    assert fuse_refusal(holder.double_blocks[0]) is None
    enable_fp8_compute(holder)
    assert "hotload=True or None" in fuse_refusal(holder.double_blocks[0])


def test_fusing_a_lora_is_refused(dit_file):
    dit = load(dit_file)
    enable_fp8_compute(dit)
    weights = {n: t.clone() for n, t in dit.state_dict().items()}
    with pytest.raises(LoraError, match=r"enable_fp8_compute.*hotload=True or None"):
        load_lora(dit, lora_for(dit), hotload=False)
    assert all(torch.equal(t.view(torch.uint8) if t.dtype == E4M3 else t,
                           weights[n].view(torch.uint8) if t.dtype == E4M3 else weights[n])
               for n, t in dit.state_dict().items())


def test_refusals_are_listed_at_once(dit_file):
    dit = load(dit_file).requires_grad_(True)
    VRAMManager(SimulatedDevice(), 0).add("dit", dit, torch.float32)
    with pytest.raises(ValueError, match=r"(?s)being trained.*requires_grad_\(False\).*VRAMManager") as e:
        enable_fp8_compute(dit)
    assert not any(isinstance(m, Fp8Linear) for m in dit.modules())  # nothing converted
    assert str(e.value).count(";") >= 1
    dit.requires_grad_(False)
    vram = VRAMManager(SimulatedDevice(), 0)
    converted = load(dit_file)
    enable_fp8_compute(converted)
    vram.add("dit", converted, torch.float32)
    assert enable_fp8_compute(converted) == "scaled_mm"  # converted already: a no-op, even under the manager
    fused = load(dit_file)
    load_lora(fused, lora_for(fused), hotload=False)
    with pytest.raises(ValueError, match="4 layers hold fused LoRAs.*clear_lora first"):
        enable_fp8_compute(fused)
    clear_lora(fused)
    enable_fp8_compute(fused)
    with torch.device("meta"):
        meta = one_layer()
    with pytest.raises(ValueError, match=r"1 layers have no weights loaded \(meta device"):
        enable_fp8_compute(meta)
    with pytest.raises(ValueError, match="no Linear layers in double_blocks / single_blocks"):
        enable_fp8_compute(nn.Sequential(nn.Linear(16, 16)).requires_grad_(False))


@pytest.mark.parametrize("facts, expected", [
    (("cuda", (8, 9)), "scaled_mm"),             # Ada (RTX 4090, L40S)
    (("cuda", (9, 0)), "scaled_mm"),             # Hopper (H100, H200)
    (("cuda", (12, 0)), "scaled_mm"),            # Blackwell (RTX 5090)
    (("cuda", (8, 6)), "storage-only (compute capability 8.6"),   # Ampere (RTX 3090, A6000)
    (("cuda", (8, 0)), "storage-only (compute capability 8.0"),   # A100
    (("cpu", None), "scaled_mm"),
    (("mps", None), "storage-only (no FP8 matmul on mps)"),
])
def test_path_decision_per_device(facts, expected):
    assert decide_fp8_path(*facts).startswith(expected)


def test_path_decision_without_scaled_mm_or_on_rocm():
    assert decide_fp8_path("cpu", None, has_scaled_mm=False).startswith("storage-only (this torch")
    assert decide_fp8_path("cuda", (9, 4), rocm=True).startswith("storage-only (ROCm")
    assert fp8_compute_path("cpu") == "scaled_mm" and fp8_compute_path(torch.device("cpu")) == "scaled_mm"


def test_pipeline_image_difference_against_bf16(tmp_path):
    """The accuracy README states: a whole generation (tiny random pipeline, 3 steps, CFG 2) with the DiT computing in
    FP8 against the same generation in bf16."""
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    make_diffusers_pipeline(tmp_path)
    call = dict(prompt="a cat", negative_prompt="blurry", cfg_scale=2.0, height=48, width=64, seed=0,
                num_inference_steps=3, t5_sequence_length=16, progress_bar_cmd=None, output_type="np")

    def pipe():
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu",
                                                 model_configs=[ModelConfig(path=str(tmp_path / FOLDER_NAME))])
    fp8 = pipe()
    path, diff = fp8_compute_difference(fp8.dit, lambda dit: torch.from_numpy(fp8(**call)))
    # Images in [0, 1]: measured mean |difference| 0.0166 (max 0.14); FP8 storage alone (weights cast, bf16 compute)
    # measures 0.0170, bf16 against float32 0.0038, another seed 0.24. Bound 1.2x.
    assert path == "scaled_mm" and 0.004 < diff.mean_abs < 0.02
