"""FLEX.2 Inputs (FluxCore) and FLUX.1-Fill from native InpaintModelConditioning (nodes/channel_nodes.py): the
sampler's adapters equal FluxImagePipeline's (flux_core.flex, itself checked against DiffSynth and diffusers) for the
same pictures; per-branch inputs; ComfyUI's resize; every node input error."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

from flux_core.flex import channel_adapter
from flux_core.scheduler import flux_sigmas
from nodes.channel_nodes import (CHANNEL_KEYS, FLEX_KEY, FlexPayload, FluxCoreFlexInputs, channel_adapters,
                                 comfy_resize)
from nodes.loaders import FluxCoreDiTLoader, NodeInputError
from tests.tiny_comfy import load_node_models, make_models_dir
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_train import one_thread  # noqa: F401 (module-wide autouse: tiny models run faster on one thread)

H, W = 48, 64
SIGMAS = flux_sigmas(5)
NODE = "FluxCoreSampler"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("channel_nodes")
    models_dir, ref = make_models_dir(tmp)
    make_diffusers_dit(seed=5, in_channels=196, out_channels=64, num_layers=8).save_pretrained(
        models_dir / "diffusion_models" / "tiny-flex")
    make_diffusers_dit(seed=8, in_channels=384, out_channels=64).save_pretrained(
        models_dir / "diffusion_models" / "tiny-fill")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded["flex"] = FluxCoreDiTLoader().load("tiny-flex")[0]
    loaded["fill"] = FluxCoreDiTLoader().load("tiny-fill")[0]
    yield types.SimpleNamespace(dir=models_dir, ref=ref, **loaded)
    mp.undo()


def picture(seed, size=(W, H)):
    """A random 8-bit picture as PIL and as the IMAGE LoadImage gives."""
    pil = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return pil, torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255)[None]


def grey_mask(size=(40, 30), binary=False):
    """A mask with grey levels (or 0/1) as PIL and as a MASK (B, H, W)."""
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    a[size[1] // 4: 3 * size[1] // 4, size[0] // 3:] = 255
    if not binary:
        a[:, : size[0] // 4] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    pil = Image.fromarray(a)
    return pil, torch.from_numpy(a.astype(np.float32) / 255)[None]


def conditioning(extra=None):
    return [[torch.zeros(1, 4, 32), {"pooled_output": torch.zeros(1, 32), **(extra or {})}]]


def vae_encode(models):
    module = models.vae.model.module
    return lambda x: module.encode(x.to(module.device, module.dtype)).float()


def test_flex_node_gives_the_pipelines_adapter(models):
    """A FLEX.2 payload (IMAGE and MASK tensors, another resolution of the output's shape) becomes the same adapter
    as FluxImagePipeline's from the PIL pictures: same channels, same control stop."""
    inpaint_pil, inpaint = picture(1, (128, 96))
    control_pil, control = picture(2)
    mask_pil, mask = grey_mask()
    positive, negative = FluxCoreFlexInputs().apply(conditioning(), conditioning(), models.vae, 0.7, 0.5, inpaint,
                                                    mask, control)
    dit = models.flex.model.module
    adapters = channel_adapters(NODE, {"positive": positive, "negative": negative}, dit, 2, H // 8, W // 8, SIGMAS,
                                {})
    assert len(adapters) == 1 and adapters[0].branches == {"positive", "negative"}  # one payload in both sides
    with torch.no_grad():
        expected = channel_adapter(dit, vae_encode(models), H, W, 2, SIGMAS, flex_inpaint_image=inpaint_pil,
                                   flex_inpaint_mask=mask_pil.convert("RGB"), flex_control_image=control_pil,
                                   flex_control_strength=0.7, flex_control_stop=0.5)
    got = adapters[0]
    assert got.condition.shape == expected.condition.shape == (2, 33, H // 8, W // 8)
    # Measured 0: the MASK tensor is resized as its 8-bit picture, the IMAGE read back to the same 8-bit picture.
    assert (got.condition - expected.condition).abs().max().item() <= 1e-6
    assert (got.uncondition - expected.uncondition).abs().max().item() <= 1e-6
    assert got.stop_sigma == expected.stop_sigma == float(SIGMAS[2])
    assert got.condition[:, 32].abs().max() > 0 and got.uncondition[:, 32].abs().max() == 0  # control part


def test_per_branch_inputs_and_defaults(models):
    """Only positive carries the payload (under true CFG): the negative branch gets the default adapter (zeros and
    an all-ones mask), as a side without inputs does in ComfyUI."""
    _, inpaint = picture(3)
    _, mask = grey_mask((W, H))
    positive, _ = FluxCoreFlexInputs().apply(conditioning(), conditioning(), models.vae, 0.5, 0.5, inpaint, mask)
    dit = models.flex.model.module
    adapters = channel_adapters(NODE, {"positive": positive, "negative": conditioning()}, dit, 1, H // 8, W // 8,
                                SIGMAS, {})
    by_branch = {a.branches: a for a in adapters}
    assert set(by_branch) == {frozenset({"positive"}), frozenset({"negative"})}
    default = by_branch[frozenset({"negative"})]
    assert default.condition[:, :16].abs().max() == 0 and bool((default.condition[:, 16] == 1).all())
    assert by_branch[frozenset({"positive"})].condition[:, :16].abs().max() > 0
    assert by_branch[frozenset({"positive"})].uncondition is None  # no control image: nothing to stop
    # A FLEX.2 DiT without the node samples text-to-image: the default for the whole run.
    plain, = channel_adapters(NODE, {"positive": conditioning()}, dit, 1, H // 8, W // 8, SIGMAS, {})
    assert torch.equal(plain.condition, default.condition)


def inpaint_model_conditioning(models, image: torch.Tensor, mask: torch.Tensor):
    """What native InpaintModelConditioning puts into the conditioning (from its documented behaviour): the raw
    latent of the picture with the pixels where round(mask) is 1 set to grey 0.5, and the mask (B, 1, H, W)."""
    keep = (1.0 - mask.round())[..., None]
    pixels = (image - 0.5) * keep + 0.5
    module = models.vae.model.module
    with torch.no_grad():
        latent = module.encode_raw((pixels.permute(0, 3, 1, 2) * 2 - 1).contiguous()).float()
    return {"concat_latent_image": latent, "concat_mask": mask.reshape(-1, 1, *mask.shape[-2:])}


def test_native_fill_keys_give_the_pipelines_fill_condition(models):
    """InpaintModelConditioning's keys on a Fill DiT give FluxImagePipeline's Fill channels for the same picture and
    a 0/1 mask at the output's size (where ComfyUI's and diffusers' mask handling agree)."""
    image_pil, image = picture(4)
    mask_pil, mask = grey_mask((W, H), binary=True)
    keys = inpaint_model_conditioning(models, image, mask)
    dit = models.fill.model.module
    got, = channel_adapters(NODE, {"positive": conditioning(keys)}, dit, 1, H // 8, W // 8, SIGMAS, {})
    with torch.no_grad():
        expected = channel_adapter(dit, vae_encode(models), H, W, 1, SIGMAS, flux_fill_image=image_pil,
                                   flux_fill_mask=mask_pil)
    assert got.condition.shape == expected.condition.shape == (1, 80, H // 8, W // 8)
    assert torch.equal(got.condition[:, 16:], expected.condition[:, 16:])
    # Measured 0 (grey set in [0, 1] then scaled is zero in [-1, 1] exactly here); the latent left raw (not scaled as
    # ComfyUI's process_latent_in does) moves it by order 0.1.
    assert (got.condition[:, :16] - expected.condition[:, :16]).abs().max().item() <= 1e-5
    # A plain DiT ignores the keys (ComfyUI does too: the latent's noise_mask still inpaints).
    assert channel_adapters(NODE, {"positive": conditioning(keys)}, models.dit.model.module, 1, H // 8, W // 8,
                            SIGMAS, {}) == []


def test_comfy_resize_cuts_the_centre_then_interpolates():
    """ComfyUI's common_upscale(..., "bilinear", "center"): a 4x6 latent to 2x2 loses one column on each side, then
    halves (bilinear at scale 1/2 averages 2x2 blocks)."""
    x = torch.arange(24.0).reshape(1, 1, 4, 6)
    expected = torch.tensor([[(1 + 2 + 7 + 8) / 4, (3 + 4 + 9 + 10) / 4], [(13 + 14 + 19 + 20) / 4, (15 + 16 + 21 + 22) / 4]])
    assert torch.equal(comfy_resize(x, 2, 2)[0, 0], expected)
    assert comfy_resize(x, 6, 4) is x


def test_bad_node_inputs_are_refused_naming_each_input(models):
    _, image = picture(5)
    _, mask = grey_mask()
    apply = FluxCoreFlexInputs().apply
    cases = [
        (dict(inpaint_mask=mask), "input 'inpaint_mask' is connected without 'inpaint_image'"),
        (dict(inpaint_image=image), "input 'inpaint_image' is connected without 'inpaint_mask'"),
        ({}, "nothing to add"),
        (dict(control_image=torch.zeros(8, 8)), r"input 'control_image': expected an IMAGE \(B, H, W, 3\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(NodeInputError, match=match):
            apply(conditioning(), conditioning(), models.vae, 0.5, 0.5, **kwargs)
    flex_dit, fill_dit, plain_dit = (m.model.module for m in (models.flex, models.fill, models.dit))
    payload = FlexPayload(vae=models.vae, control_image=image)
    with pytest.raises(NodeInputError, match="input 'positive': FLEX.2 Inputs .FluxCore. needs a FLEX.2 DiT .196.*"
                                             "has 64"):
        channel_adapters(NODE, {"positive": conditioning({FLEX_KEY: payload})}, plain_dit, 1, 6, 8, SIGMAS, {})
    with pytest.raises(NodeInputError, match="needs a FLEX.2 DiT .196 input channels., but the model has 384"):
        channel_adapters(NODE, {"positive": conditioning({FLEX_KEY: payload})}, fill_dit, 1, 6, 8, SIGMAS, {})
    keys = {"concat_latent_image": torch.zeros(1, 16, 6, 8), "concat_mask": torch.ones(1, 1, 48, 64)}
    with pytest.raises(NodeInputError, match="input 'negative': concat_latent_image / concat_mask .* FLEX.2 Inputs"):
        channel_adapters(NODE, {"positive": conditioning(), "negative": conditioning(keys)}, flex_dit, 1, 6, 8,
                         SIGMAS, {})
    square = FlexPayload(vae=models.vae, control_image=picture(6, (48, 48))[1])
    with pytest.raises(NodeInputError, match="input 'positive': FLEX.2 Inputs .FluxCore.'s control_image is 48x48 "
                                             "but the output is 64x48"):
        channel_adapters(NODE, {"positive": conditioning({FLEX_KEY: square})}, flex_dit, 1, 6, 8, SIGMAS, {})
    three = FlexPayload(vae=models.vae, control_image=image.repeat(3, 1, 1, 1))
    with pytest.raises(NodeInputError, match="control_image is a batch of 3, the latent a batch of 2"):
        channel_adapters(NODE, {"positive": conditioning({FLEX_KEY: three})}, flex_dit, 2, 6, 8, SIGMAS, {})
    with pytest.raises(NodeInputError, match="fluxcore_flex is a str; only FLEX.2 Inputs .FluxCore. makes"):
        channel_adapters(NODE, {"positive": conditioning({FLEX_KEY: "x"})}, flex_dit, 1, 6, 8, SIGMAS, {})
    with pytest.raises(NodeInputError, match=r"concat_latent_image must be a FLUX latent \(B, 16, h, w\)"):
        channel_adapters(NODE, {"positive": conditioning({"concat_latent_image": torch.zeros(1, 4, 6, 8)})},
                         fill_dit, 1, 6, 8, SIGMAS, {})


def sample(models, dit, positive, steps=5, seed=3, latent=None):
    from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
    latent = latent or FluxCoreEmptyLatent().generate(W, H, 1)[0]
    return FluxCoreSampler().sample(dit, positive, positive, latent, seed=seed, steps=steps)[0]["samples"]


def encode(models, text="a cat on a red chair"):
    from nodes.conditioning import FluxCoreTextEncode
    return FluxCoreTextEncode().encode(models.te, text, 3.5, t5_sequence_length=16)[0]


@pytest.mark.slow
def test_flex_sampler_run_equals_the_pipelines(models):
    """FLUX Sampler (FluxCore) with FLEX.2 Inputs (FluxCore) against FluxImagePipeline's FLEX.2 run (checked against
    DiffSynth's own loop in test_flex.py) with the same seed, steps and pictures."""
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    folder = models.dir / "diffusers" / "flux-tiny"
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models.dir / "diffusion_models" / "tiny-flex")), ModelConfig(path=str(folder / "vae")),
        ModelConfig(path=str(folder / "text_encoder")), ModelConfig(path=str(folder / "text_encoder_2"))],
        tokenizer_1_config=ModelConfig(path=str(folder / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(folder / "tokenizer_2")))
    inpaint_pil, inpaint = picture(7, (128, 96))
    control_pil, control = picture(8)
    mask_pil, mask = grey_mask()
    positive, _ = FluxCoreFlexInputs().apply(encode(models), encode(models), models.vae, 0.8, 0.5, inpaint, mask,
                                             control)
    got = sample(models, models.flex, positive)
    with torch.no_grad():
        expected = pipe(prompt="a cat on a red chair", height=H, width=W, seed=3, num_inference_steps=5,
                        embedded_guidance=3.5, t5_sequence_length=16, output_type="latent", progress_bar_cmd=None,
                        flex_inpaint_image=inpaint_pil, flex_inpaint_mask=mask_pil.convert("RGB"),
                        flex_control_image=control_pil, flex_control_strength=0.8, flex_control_stop=0.5)
    expected = models.vae.model.module.to_comfy_latent(expected)
    # Measured 0 (the same functions on the same tensors); a control stop one step off moves it by order 0.1.
    assert (got - expected).abs().max().item() <= 1e-5
    plain = sample(models, models.flex, encode(models))
    assert (got - plain).abs().max().item() > 1e-2


@pytest.mark.slow
def test_native_fill_workflow_equals_diffusers_fill_pipeline(models, monkeypatch):
    """InpaintModelConditioning's keys (noise_mask off) with a Fill DiT in FLUX Sampler (FluxCore), against diffusers'
    FluxFillPipeline on the same weights with the sampler's noise and sigmas, for a 0/1 mask."""
    import diffusers.pipelines.flux.pipeline_flux_fill as fill
    from diffusers import FluxFillPipeline

    from flux_core.math import pack_latents, unpack_latents
    from flux_core.sampling import make_noise
    retrieve = fill.retrieve_latents  # diffusers samples the posterior; ComfyUI, DiffSynth and FluxCore take its mean
    monkeypatch.setattr(fill, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": retrieve(output, generator, "argmax"))
    image_pil, image = picture(9)
    mask_pil, mask = grey_mask((W, H), binary=True)
    positive = [[t, {**extra, **inpaint_model_conditioning(models, image, mask)}] for t, extra in encode(models)]
    got = sample(models, models.fill, positive, steps=4)

    components = {k: v for k, v in models.ref.components.items()
                  if k not in ("image_encoder", "feature_extractor")}  # FluxPipeline's IP-Adapter slots
    components["transformer"] = FluxTransformer2DModel.from_pretrained(models.dir / "diffusion_models" / "tiny-fill")
    ref = FluxFillPipeline(**components)
    ref.set_progress_bar_config(disable=True)
    sigmas = flux_sigmas(4, 1.0, 3.0).tolist()
    expected = ref(prompt="a cat on a red chair", image=image_pil, mask_image=mask_pil, height=H, width=W,
                   sigmas=sigmas, num_inference_steps=4, latents=pack_latents(make_noise(1, H, W, 3)),
                   guidance_scale=3.5, max_sequence_length=16, output_type="latent").images
    expected = models.vae.model.module.to_comfy_latent(unpack_latents(expected, H // 8, W // 8))
    # Measured 8.6e-6 on raw latents up to 14 (relative 6e-7; the bound for Fill: 1e-4 relative); the mask's
    # 8x8 unshuffle transposed fails it.
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def test_keys_are_honoured_by_the_sampler():
    from nodes.conditioning import HONOURED_KEYS
    assert CHANNEL_KEYS <= HONOURED_KEYS
