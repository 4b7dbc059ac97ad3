"""Load / Apply ControlNet (FluxCore) and the sampler's handling of `fluxcore_controlnets`, on tiny models: the same
numbers as FluxImagePipeline's controlnet_inputs (which tests/test_controlnet_pipeline.py checks against diffusers
and DiffSynth), branches, chaining, percents, the tiled DiT, VRAM placement and the errors."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux_core import ControlNetInput
from flux_core.adapters import DiTCall
from flux_core.model_config import ModelConfig
from flux_core.model_state import state_of
from flux_core.pipeline import FluxImagePipeline
from nodes import comfy_bridge
from nodes.conditioning import FluxCoreTextEncode
from nodes.controlnet_nodes import (CONTROLNETS_KEY, FluxCoreApplyControlNet, FluxCoreControlNetLoader,
                                    controlnet_payloads, percent_range)
from nodes.loaders import NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet, xlabs_controlnet_state_dict

H, W = 48, 64
CONTROLNETS = {"union": dict(seed=21, num_mode=10), "plain": dict(seed=22, num_layers=1, num_single_layers=0),
               "inpaint": dict(seed=23, extra_condition_channels=4)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_cn")
    models_dir, _ = make_models_dir(tmp)
    for name, kw in CONTROLNETS.items():
        write_diffusers_controlnet(make_diffusers_controlnet(**kw), models_dir / "controlnet" / f"tiny-{name}")
    save_file(xlabs_controlnet_state_dict(), str(models_dir / "controlnet" / "flux-canny-controlnet-v3.safetensors"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded.update({name: FluxCoreControlNetLoader().load(f"tiny-{name}")[0] for name in CONTROLNETS})
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"])),
        *(ModelConfig(path=str(models_dir / "controlnet" / f"tiny-{name}")) for name in CONTROLNETS)])
    yield dict(dir=models_dir, pipe=pipe, **loaded)
    mp.undo()


ID = {name: i for i, name in enumerate(CONTROLNETS)}  # controlnet_id in the pipeline


def encode(models, text):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=16)[0]


def picture(seed, size=(40, 30)):
    """A random 8-bit picture as PIL and as the IMAGE LoadImage gives (another size than the latent's)."""
    pil = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return pil, torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255)[None]


def sample(models, positive, negative, steps=3, cfg=1.0, **kw):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    return FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=3, steps=steps, cfg=cfg, **kw)[0]


def pipeline_latent(models, controlnet_inputs, steps=3, cfg=1.0, **kw):
    """The pipeline's final latent as raw VAE latent (what the sampler's LATENT holds)."""
    with torch.no_grad():
        scaled = models["pipe"](prompt="a cat", negative_prompt="", cfg_scale=cfg, height=H, width=W, seed=3,
                                num_inference_steps=steps, t5_sequence_length=16, output_type="latent",
                                progress_bar_cmd=None, controlnet_inputs=controlnet_inputs, **kw)
    return models["vae"].model.module.to_comfy_latent(scaled)


def apply(models, positive, negative, name, image, mode="none", strength=1.0, start=0.0, end=1.0, mask=None):
    return FluxCoreApplyControlNet().apply(positive, negative, models[name], image, models["vae"], mode, strength,
                                           start, end, mask)


# ---------------------------------------------------------------- the same numbers as the pipeline
def test_union_controlnet_through_nodes_equals_the_pipeline(models):
    pil, image = picture(1)
    positive, negative = apply(models, encode(models, "a cat"), encode(models, ""), "union", image, "depth",
                               strength=0.7, start=0.0, end=0.5)
    got = sample(models, positive, negative, steps=5)["samples"]
    expected = pipeline_latent(models, [ControlNetInput(controlnet_id=ID["union"], image=pil, scale=0.7, start=1.0,
                                                        end=0.5, processor_id="depth")], steps=5)
    # Measured 0 (the same float32 computations; latent std 4.5). Without the ControlNet the latent moves by 3.06;
    # the range read the other way (start=0.5, end=0: active over the last half instead of the first) by 4.28.
    # The percent conversion's own exactness at step boundaries: test_percents_are_... below.
    assert (got - expected).abs().max().item() <= 1e-5
    plain = sample(models, encode(models, "a cat"), encode(models, ""), steps=5)["samples"]
    assert (got - plain).abs().max().item() > 0.05


def test_two_chained_apply_nodes_equal_two_controlnet_inputs_under_true_cfg(models):
    (pil_a, image_a), (pil_b, image_b) = picture(2), picture(3, (64, 48))
    positive, negative = apply(models, encode(models, "a cat"), encode(models, ""), "union", image_a, "canny",
                               strength=0.8)
    positive, negative = apply(models, positive, negative, "plain", image_b, strength=1.3, start=0.25, end=1.0)
    assert [p.controlnet.name for p in positive[0][1][CONTROLNETS_KEY]] == ["tiny-union", "tiny-plain"]
    assert all(a is b for a, b in zip(positive[0][1][CONTROLNETS_KEY], negative[0][1][CONTROLNETS_KEY]))
    got = sample(models, positive, negative, steps=5, cfg=2.0)["samples"]
    expected = pipeline_latent(models, [
        ControlNetInput(controlnet_id=ID["union"], image=pil_a, scale=0.8, processor_id="canny"),
        ControlNetInput(controlnet_id=ID["plain"], image=pil_b, scale=1.3, start=0.75, end=0.0)], steps=5, cfg=2.0)
    # Measured 0; the second ControlNet left out moves the latent by 5.89 (asserted below).
    assert (got - expected).abs().max().item() <= 1e-5
    first_only = pipeline_latent(models, [
        ControlNetInput(controlnet_id=ID["union"], image=pil_a, scale=0.8, processor_id="canny")], steps=5, cfg=2.0)
    assert (got - first_only).abs().max().item() > 0.01


def test_inpainting_controlnet_with_a_native_mask_equals_the_pipeline(models):
    pil, image = picture(4, (64, 48))
    mask = torch.zeros(1, 48, 64)
    mask[:, 8:40, 16:48] = 1.0  # LoadImage's MASK: 1 where painted in the mask editor
    positive, negative = apply(models, encode(models, "a cat"), encode(models, ""), "inpaint", image, mask=mask,
                               strength=0.9)
    got = sample(models, positive, negative)["samples"]
    expected = pipeline_latent(models, [ControlNetInput(controlnet_id=ID["inpaint"], image=pil, inpaint_mask=mask[0],
                                                        scale=0.9)])
    assert (got - expected).abs().max().item() <= 1e-5  # measured 0; an all-zero mask instead moves it by 1.61
    other_mask = torch.zeros_like(mask)
    positive, negative = apply(models, encode(models, "a cat"), encode(models, ""), "inpaint", image,
                               mask=other_mask, strength=0.9)
    assert (sample(models, positive, negative)["samples"] - got).abs().max().item() > 0.01  # the mask matters


def test_tiled_dit_with_a_controlnet_equals_the_pipelines_tiled_run(models, monkeypatch):
    pil, image = picture(5, (64, 48))
    positive, negative = apply(models, encode(models, "a cat"), encode(models, ""), "plain", image, strength=0.7)
    got = sample(models, positive, negative, tiled_dit=True, tile_size=4, tile_stride=2)["samples"]
    expected = pipeline_latent(models, [ControlNetInput(controlnet_id=ID["plain"], image=pil, scale=0.7)],
                               tiled=True, tile_size=4, tile_stride=2)
    # Measured 0. The untiled run differs by 1.48 (6x8 latent in six 4x4 tiles: positions restart per tile).
    assert (got - expected).abs().max().item() <= 1e-5
    untiled = sample(models, positive, negative)["samples"]
    assert (got - untiled).abs().max().item() > 0.01


# ---------------------------------------------------------------- branches and percents
def test_a_payload_only_in_positive_runs_only_in_the_positive_branch(models):
    _, image = picture(6)
    pos_cn, neg_cn = apply(models, encode(models, "a cat"), encode(models, ""), "plain", image)
    positive, negative = encode(models, "a cat"), encode(models, "")
    (payload, branches), = controlnet_payloads("n", {"positive": pos_cn, "negative": negative})
    assert branches == {"positive"}
    (_, branches), = controlnet_payloads("n", {"positive": positive, "negative": neg_cn})
    assert branches == {"negative"}
    (_, branches), = controlnet_payloads("n", {"positive": pos_cn, "negative": neg_cn})
    assert branches == {"positive", "negative"}
    both = sample(models, pos_cn, neg_cn, cfg=2.0)["samples"]
    pos_only = sample(models, pos_cn, negative, cfg=2.0)["samples"]
    neg_only = sample(models, positive, neg_cn, cfg=2.0)["samples"]
    none = sample(models, positive, negative, cfg=2.0)["samples"]
    # Under cfg 2, v = 2 * posi - nega: each branch's ControlNet moves the result on its own (measured 8.5 to 26.3).
    for a, b in ((both, pos_only), (both, neg_only), (pos_only, none), (neg_only, none), (pos_only, neg_only)):
        assert (a - b).abs().max().item() > 0.01
    # cfg 1 runs the positive branch only: a payload in negative changes nothing, one in positive all.
    assert torch.equal(sample(models, positive, neg_cn)["samples"], sample(models, positive, negative)["samples"])
    assert torch.equal(sample(models, pos_cn, negative)["samples"], sample(models, pos_cn, neg_cn)["samples"])


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 11, 28, 30])
def test_percents_are_the_fraction_of_steps_in_diffsynths_start_end(steps):
    """ComfyUI's start/end percent as StepRange: active at step i of N exactly when start <= i / (N - 1) <= end,
    decided with exact fractions of the percents as typed (3-decimal widgets). A lone step is at 1 (the last step,
    DiffSynth's progress 0), so a range must reach end_percent 1 to act on a one-step run."""
    typed = [f"{k / 20:g}" for k in range(21)] + ["0.333", "0.667", "0.001", "0.999", "0.3333333333333333"]
    for start in typed:
        for end in typed:
            if Fraction(end) < Fraction(start):
                continue
            steps_range = percent_range(float(start), float(end))
            for i in range(steps):
                at = 1 - Fraction(steps - 1 - i, max(steps - 1, 1))  # i / (N - 1); 1 when N = 1
                assert steps_range.contains(DiTCall(step=i, num_steps=steps)) == \
                    (Fraction(start) <= at <= Fraction(end)), (steps, i, start, end)


# ---------------------------------------------------------------- errors and warnings
@pytest.mark.parametrize("name,kw,match", [
    ("union", dict(mode="none"), r"FluxCoreApplyControlNet, input 'union_mode': tiny-union is a union ControlNet; "
                                 r"pick the mode"),
    ("plain", dict(mode="canny"), r"input 'union_mode': tiny-plain is not a union ControlNet .* set union_mode to none"),
    ("plain", dict(mask=torch.ones(1, 8, 8)), r"input 'mask': tiny-plain is not an inpainting ControlNet"),
    ("inpaint", dict(), r"input 'mask': tiny-inpaint is an inpainting ControlNet; connect a mask"),
    ("plain", dict(start=0.6, end=0.4), r"input 'end_percent': 0.4 is before start_percent 0.6"),
])
def test_apply_refuses_what_the_controlnet_cannot_take(models, name, kw, match):
    _, image = picture(7)
    with pytest.raises(NodeInputError, match=match):
        apply(models, encode(models, "a cat"), encode(models, ""), name, image, **kw)


def test_apply_names_every_problem_at_once_and_strength_zero_adds_nothing(models):
    _, image = picture(7)
    with pytest.raises(NodeInputError, match=r"input 'union_mode'.*; input 'mask'.*; input 'end_percent'"):
        apply(models, encode(models, "a"), encode(models, ""), "union", image, mask=torch.ones(1, 8, 8), start=1.0,
              end=0.0)
    positive, negative = encode(models, "a"), encode(models, "")
    assert apply(models, positive, negative, "plain", image, strength=0.0) == (positive, negative)


@pytest.mark.parametrize("file,match", [
    ("flux-canny-controlnet-v3.safetensors", r"FluxCoreControlNetLoader, input 'controlnet_name': .*XLabs"),
    ("missing.safetensors", r"FluxCoreControlNetLoader, input 'controlnet_name': missing.safetensors not found"),
    ("../vae/tiny-vae", r"FluxCoreControlNetLoader, input 'controlnet_name': .*no '\.\.'"),
])
def test_loader_refuses_files_that_are_no_flux_controlnet(models, file, match):
    with pytest.raises(NodeInputError, match=match):
        FluxCoreControlNetLoader().load(file)


def test_loader_refuses_another_kind_of_model_by_name(models):
    import shutil
    target = models["dir"] / "controlnet" / "a-vae"
    if not target.exists():
        shutil.copytree(models["dir"] / "vae" / NAMES["vae"], target)
    with pytest.raises(NodeInputError, match=r"FluxCoreControlNetLoader, input 'controlnet_name': .*(VAE|vae)"):
        FluxCoreControlNetLoader().load("a-vae")


def test_sampler_refuses_tiled_dit_with_teacache_and_odd_tiles(models):
    from nodes.vram_nodes import FluxCoreTeaCache
    cached, = FluxCoreTeaCache().apply(models["dit"], 0.4)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, input 'tiled_dit': the model has TeaCache"):
        FluxCoreSampler().sample(cached, encode(models, "a"), encode(models, ""), latent, seed=0, steps=1,
                                 tiled_dit=True)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, inputs 'tile_size' and 'tile_stride': "):
        FluxCoreSampler().sample(models["dit"], encode(models, "a"), encode(models, ""), latent, seed=0, steps=1,
                                 tiled_dit=True, tile_size=16, tile_stride=32)


def test_a_control_image_batch_that_does_not_fit_the_latent_is_refused(models):
    image = torch.rand(3, 48, 64, 3)
    positive, negative = apply(models, encode(models, "a"), encode(models, ""), "plain", image)
    latent, = FluxCoreEmptyLatent().generate(W, H, 2)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, input 'positive' \(fluxcore_controlnets\[0\], "
                                             r"tiny-plain\): its image is a batch of 3, the latent a batch of 2"):
        FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=0, steps=1)


def test_native_controlnet_entries_are_named_with_the_fluxcore_nodes_to_use(models, caplog):
    import logging
    positive = [[t, {**d, "control": object(), "control_apply_to_uncond": False}] for t, d in encode(models, "a")]
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        sample(models, positive, encode(models, ""), steps=1)
    warned = [r.getMessage() for r in caplog.records if "conditioning entry" in r.getMessage()]
    assert warned == ["FluxCoreSampler: conditioning entry 'control' (on 'positive') is ignored; it is a ControlNet "
                      "from ComfyUI's own Apply ControlNet, which FluxCore's sampler cannot run: load the ControlNet "
                      "with \"Load ControlNet (FluxCore)\" and apply it with \"Apply ControlNet (FluxCore)\" instead."]
    caplog.clear()
    _, image = picture(8)
    positive, negative = apply(models, encode(models, "a"), encode(models, ""), "plain", image)
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        sample(models, positive, negative, steps=1, cfg=2.0)
    assert not [r for r in caplog.records if "conditioning entry" in r.getMessage()]


# ---------------------------------------------------------------- memory and cost
def test_controlnets_join_the_offloaded_dits_vram_manager_for_the_run(models, monkeypatch):
    from flux_core.vram import SimulatedDevice
    from nodes import vram_nodes
    from nodes.loaders import FluxCoreDiTLoader
    from nodes.vram_nodes import FluxCoreVRAMOptions
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]  # modules of their own: the shared ones stay unplaced
    controlnet, = FluxCoreControlNetLoader().load("tiny-union")
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=8.0)
    _, image = picture(9)
    positive, negative = FluxCoreApplyControlNet().apply(encode(models, "a cat"), encode(models, ""), controlnet,
                                                         image, models["vae"], "tile", 0.8, 0.0, 1.0)
    seen = []
    original = comfy_bridge.Progress.update

    def update(self, value, preview=None):
        manager = state_of(dit.model.module).vram_placement[1]
        seen.append((sorted(manager.models), manager.resident_bytes))
        return original(self, value, preview)

    monkeypatch.setattr(comfy_bridge.Progress, "update", update)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    out, = FluxCoreSampler().sample(offloaded, positive, negative, latent, seed=3, steps=2)
    nbytes = lambda m: sum(t.untyped_storage().nbytes() for t in [*m.parameters(), *m.buffers()])
    assert seen[0] == (["controlnet.0", "dit"], nbytes(dit.model.module) + nbytes(controlnet.model.module))
    manager = state_of(dit.model.module).vram_placement[1]
    assert sorted(manager.models) == ["dit"] and manager.resident_bytes == 0 and device.live_bytes == 0
    assert not any(device.holds(p) for p in controlnet.model.module.parameters())
    plain_positive, plain_negative = FluxCoreApplyControlNet().apply(
        encode(models, "a cat"), encode(models, ""), models["union"], image, models["vae"], "tile", 0.8, 0.0, 1.0)
    expected = sample(models, plain_positive, plain_negative, steps=2)["samples"]
    assert (out["samples"] - expected).abs().max().item() <= 1e-5  # measured 0: the same float32 weights


def test_an_fp8_controlnet_computes_through_a_vram_manager_close_to_full_precision(models):
    fp8, = FluxCoreControlNetLoader().load("tiny-union", weight_dtype="fp8_e4m3fn")
    module = fp8.model.module
    assert module.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    _, image = picture(10)
    runs = []
    for handle in (fp8, models["union"]):
        positive, negative = FluxCoreApplyControlNet().apply(encode(models, "a cat"), encode(models, ""), handle,
                                                             image, models["vae"], "gray", 1.0, 0.0, 1.0)
        runs.append(sample(models, positive, negative, steps=2)["samples"])
    none = sample(models, encode(models, "a cat"), encode(models, ""), steps=2)["samples"]
    # FP8 weights computed in bf16: measured 0.66 from full precision, against 9.56 that the ControlNet moves it
    # (a ControlNet that ran unscaled FP8 numbers or not at all would be off by the latter's order).
    assert (runs[0] - runs[1]).abs().max().item() < 0.25 * (runs[1] - none).abs().max().item()
    assert module.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn  # storage kept
    assert state_of(module).compute is None  # the run's manager let it go


def test_cost_check_counts_controlnet_passes_and_tiles(models, monkeypatch):
    from flux_core.run_cost import dit_forward_flops
    from nodes import sampler as sampler_module
    calls = []
    monkeypatch.setattr(sampler_module, "check_run_cost", lambda dit, device, batch, image, text, steps, passes,
                        what, work, stacklevel, **kwargs: calls.append((image, steps, passes, work)))
    _, image = picture(11)
    positive, negative = apply(models, encode(models, "a"), encode(models, ""), "union", image, "canny")
    sample(models, positive, negative, steps=2, cfg=2.0, tiled_dit=True, tile_size=4, tile_stride=2)
    (tokens, steps, passes, work), = calls
    dit = models["dit"].model.module
    text = positive[0][0].shape[1]
    assert tokens == 4 and steps == 2 * 6  # 4x4-latent tiles (2x2 tokens), six of them on the 6x8 latent
    ratio = dit_forward_flops(models["union"].model.module, tokens, text) / dit_forward_flops(dit, tokens, text)
    assert passes == pytest.approx(2 + 2 * ratio) and ratio > 0.1
    assert "6 tile(s)" in work and "ControlNets (1)" in work
