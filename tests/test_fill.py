"""FLUX.1-Fill (flux_core.flex) against diffusers' FluxFillPipeline on the same tiny weights (a 384-channel
FluxTransformer2DModel): whole runs with the same noise, image and mask; the condition against DiffSynth-Studio's
own FluxImageUnit_FillCondition (with inputs, and its zeros + all-ones default); loading; input errors."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image

from flux_core.flex import channel_adapter, check_channel_inputs
from flux_core.loading.loader import load_model
from flux_core.math import pack_latents
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.scheduler import explicit_sigmas
from tests.tiny_dit import make_diffusers_dit, write_bfl_dit, write_diffusers_dit
from tests.tiny_pipeline import make_components
from tests.tiny_train import one_thread  # noqa: F401 (module-wide autouse: tiny models run faster on one thread)
from tests.tiny_vae import reference_encode

H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
PROMPT = "a cat on a red chair"
RUN = dict(height=H, width=W, sigmas=SIGMAS, embedded_guidance=30.0, t5_sequence_length=16, progress_bar_cmd=None)
# Pixels in [0, 1]: measured 2.2e-6 (batch 1) and 2.7e-6 (batch 2) against diffusers (the bound: 1e-4
# relative). Mistakes seen to fail it and the DiffSynth condition test: the mask not binarised (kept grey after the
# resize), the mask resized bicubic instead of Lanczos (23 pixels cross one half), the 8x8 unshuffle in (dx, dy)
# order instead of (dy, dx), masked pixels set to -1 (black) instead of 0 (grey).
TOL = 1e-4


def random_image(seed, size=(W, H)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def soft_mask(size=(40, 30)):
    """A grey-level mask of another size: which pixels end up >= 0.5 after the Lanczos resize matters (a top band of
    random greys around one half: a bicubic resize puts 23 of its pixels on the other side)."""
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    a[size[1] // 4: 3 * size[1] // 4, size[0] // 3:] = 255
    a[:, : size[0] // 4] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    a[: size[1] // 4] = np.random.default_rng(0).integers(96, 160, (size[1] // 4, size[0]))
    return Image.fromarray(a)


def noise(seed=0, batch=1):
    return torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fill")
    components = make_components(tmp)
    components["transformer"] = make_diffusers_dit(seed=8, in_channels=384, out_channels=64)
    ref = FluxFillPipeline(**components)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp / "fill-tiny")
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(tmp / "fill-tiny"))])
    return types.SimpleNamespace(ref=ref, pipe=pipe, tmp=tmp)


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior for the masked image; DiffSynth and FluxCore encode to its mean:
    diffusers' own "argmax" mode."""
    import diffusers.pipelines.flux.pipeline_flux_fill as fill
    retrieve = fill.retrieve_latents
    monkeypatch.setattr(fill, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": retrieve(output, generator, "argmax"))


@pytest.mark.parametrize("batch", [1, 2])
def test_whole_run_matches_diffusers_fill_pipeline(tiny, posterior_mean, batch):
    image, mask = random_image(1, (128, 96)), soft_mask()
    x = noise(2, batch)
    prompts = [PROMPT, "a dog on a beach"][:batch]
    expected = tiny.ref(prompt=prompts, image=image, mask_image=mask, height=H, width=W, sigmas=SIGMAS,
                        num_inference_steps=len(SIGMAS), latents=pack_latents(x), guidance_scale=30.0,
                        max_sequence_length=16, output_type="np").images
    got = tiny.pipe(prompt=prompts, flux_fill_image=image, flux_fill_mask=mask, latents=x, output_type="np", **RUN)
    assert got.shape == expected.shape == (batch, H, W, 3)
    assert np.abs(got - expected).max() <= TOL
    plain = tiny.pipe(prompt=prompts, latents=x, output_type="np", **RUN)
    assert np.abs(got - plain).max() > 1e-2   # the image and mask matter (measured 0.57)


def their_fill(tiny, **inputs):
    """DiffSynth's own FluxImageUnit_FillCondition on a stand-in pipe: diffusers' VAE (posterior mean)."""
    from tests.diffsynth_ref import diffsynth_flux, tiny_diffsynth_channel_dit
    diffsynth_flux()
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.pipelines.flux_image import FluxImageUnit_FillCondition
    vae = tiny.ref.vae
    fake = types.SimpleNamespace(device="cpu", torch_dtype=torch.float32, dit=tiny_diffsynth_channel_dit(384),
                                 vae_encoder=lambda x, **kw: reference_encode(vae, x),
                                 load_models_to_device=lambda names: None)
    fake.preprocess_image = types.MethodType(BasePipeline.preprocess_image, fake)
    return FluxImageUnit_FillCondition().process(fake, inputs.get("flux_fill_image"), inputs.get("flux_fill_mask"),
                                                 H, W, False, 128, 64)["fill_condition"]


@pytest.mark.parametrize("given", [True, False])
def test_condition_is_diffsynths(tiny, given):
    inputs = dict(flux_fill_image=random_image(3, (128, 96)), flux_fill_mask=soft_mask()) if given else {}
    vae = tiny.ref.vae
    with torch.no_grad():
        adapter = channel_adapter(tiny.pipe.dit, lambda x: reference_encode(vae, x), H, W, 1,
                                  explicit_sigmas(SIGMAS), **inputs)
        expected = their_fill(tiny, **inputs)
    assert adapter.condition.shape == expected.shape == (1, 80, H // 8, W // 8)
    # Measured 0 for the mask channels, 1.0e-6 for the latent (the same VAE; [-1, 1] scaled in another float order).
    assert torch.equal(adapter.condition[:, 16:], expected[:, 16:])
    assert (adapter.condition[:, :16] - expected[:, :16]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["bfl", "diffusers_folder"])
def test_a_fill_dit_loads_with_its_config_from_shapes(tiny, layout, tmp_path):
    ref = tiny.ref.transformer
    if layout == "diffusers_folder":
        dit = load_model(write_diffusers_dit(ref, tmp_path / "transformer"), torch_dtype=torch.float32, kind="dit")
    else:
        dit = load_model(write_bfl_dit(ref, tmp_path / "fill.safetensors", prefix="model.diffusion_model."),
                         config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")
    assert (dit.params.in_channels, dit.params.out_channels, dit.params.depth) == (384, 64, 2)


def test_bad_inputs_are_refused_naming_each_parameter(tiny):
    fill = tiny.pipe.dit
    image, mask = random_image(0), soft_mask()
    cases = [
        (dict(flux_fill_image=image), "flux_fill_image is given without flux_fill_mask"),
        (dict(flux_fill_mask=mask), "flux_fill_mask is given without flux_fill_image"),
        (dict(flux_fill_image=random_image(0, (48, 48)), flux_fill_mask=mask), "flux_fill_image is 48x48"),
        (dict(flux_fill_image=image, flux_fill_mask=torch.zeros(24, 32)), "flux_fill_mask is a 32x24 tensor"),
        (dict(flex_control_image=image), "flex_control_image needs a FLEX.2 DiT"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            check_channel_inputs(fill, H, W, **kwargs)
    plain = types.SimpleNamespace(in_channels=64)
    with pytest.raises(ValueError, match="flux_fill_image, flux_fill_mask need a FLUX.1-Fill DiT .384.* has 64"):
        check_channel_inputs(plain, H, W, flux_fill_image=image, flux_fill_mask=mask)
    with pytest.raises(ValueError, match="flux_fill_mask is given without flux_fill_image"):
        tiny.pipe(prompt=PROMPT, latents=noise(), flux_fill_mask=mask, **RUN)
