"""The node contract against references FluxCore did not write (not against FluxImagePipeline, which shares
flux_core.sampling with the nodes):

- LATENT is the raw VAE latent: equal to diffusers' AutoencoderKL on the same tiny VAE weights, and the DiT
  space is FLUX's published (raw - 0.1159) * 0.3611 (diffusers' FluxPipeline output, mapped back with those
  literal numbers);
- CONDITIONING has the structure native CLIPTextEncodeFlux / FluxGuidance / ReferenceLatent produce: a list of
  [tokens (B, L, T5 width), {"pooled_output": (B, CLIP width), "guidance": float, "reference_latents": [raw
  latent, ...]}] (4096 and 768 wide for FLUX's encoders), with the values diffusers' FluxPipeline.encode_prompt
  computes;
- image-to-image and inpainting equal diffusers' FluxImg2ImgPipeline / FluxInpaintPipeline with the same sigmas.
"""
import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img, pipeline_flux_inpaint
from PIL import Image

from nodes.conditioning import FluxCoreKontextReference, FluxCoreTextEncode
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from nodes.vae_nodes import FluxCoreVAEDecode, FluxCoreVAEEncode
from tests.tiny_comfy import load_node_models, make_models_dir

H, W = 48, 64
SHIFT, SCALE = 0.1159, 0.3611   # FLUX.1's published latent shift and scale (BFL's ae config, diffusers' vae config)
PROMPT, T5_LENGTH = "a cat sitting on a red chair", 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("references")
    models_dir, ref = make_models_dir(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    dit, te, vae = loaded["dit"], loaded["te"], loaded["vae"]
    yield dict(ref=ref, dit=dit, te=te, vae=vae)
    mp.undo()


def encode(tiny, text=PROMPT, guidance=3.5):
    return FluxCoreTextEncode().encode(tiny["te"], text, guidance, t5_sequence_length=T5_LENGTH)[0]


def random_image(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))


def as_comfy_image(pil: Image.Image) -> torch.Tensor:
    """ComfyUI IMAGE (1, H, W, 3) in [0, 1], as LoadImage gives it."""
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255)[None]


def as_diffusers_input(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


def schedule(steps: int, strength: float, shift: float = 3.0) -> list[float]:
    """The sampler's sigmas (DiffSynth-Studio's FLUX schedule, its formula written out here): `steps` points from
    sigma_min + (1 - sigma_min) * strength down to sigma_min, each shifted s -> shift * s / (1 + (shift - 1) s)."""
    sigma_min = 0.003 / 1.002
    plain = np.linspace(sigma_min + (1 - sigma_min) * strength, sigma_min, steps)
    return [float(s) for s in shift * plain / (1 + (shift - 1) * plain)]


def mode_latents(monkeypatch):
    """diffusers' img2img / inpaint pipelines encode the input image with a *sample* of the VAE posterior drawn
    from the generator; ComfyUI's VAEEncode, DiffSynth-Studio and FluxCore take its mode (the mean). The
    references take the mode too, so the comparison is of the sampling, and the generator's first draw is the
    noise, as FluxCore's seed gives it."""
    def mode(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()
    monkeypatch.setattr(pipeline_flux_img2img, "retrieve_latents", mode)
    monkeypatch.setattr(pipeline_flux_inpaint, "retrieve_latents", mode)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return FluxPipeline._unpack_latents(packed, H, W, 8)  # diffusers' own unpacking


# ---------------------------------------------------------------- LATENT: diffusers' raw space
def test_vae_nodes_encode_and_decode_diffusers_raw_latents(tiny):
    vae = tiny["ref"].vae
    pil = random_image(1)
    raw, = FluxCoreVAEEncode().encode(as_comfy_image(pil), tiny["vae"])
    with torch.no_grad():
        expected = vae.encode(as_diffusers_input(pil)).latent_dist.mean
    # Measured 2.4e-6 (encode) and 4.5e-6 (decode); the scaled latent instead of the raw one is off by > 0.1.
    assert raw["samples"].shape == (1, 16, H // 8, W // 8)
    assert (raw["samples"] - expected).abs().max() <= 1e-5
    image, = FluxCoreVAEDecode().decode(raw, tiny["vae"])
    with torch.no_grad():
        decoded = (vae.decode(expected).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert (image - decoded).abs().max() <= 1e-5


def test_sampler_latent_is_raw_with_flux_published_shift_and_scale(tiny):
    ref = tiny["ref"]
    assert (ref.vae.config.shift_factor, ref.vae.config.scaling_factor) == (SHIFT, SCALE)
    sigmas = schedule(3, 1.0)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    # What native FluxGuidance does to the conditioning: the entry's guidance replaced.
    positive = [[t, {**d, "guidance": 2.5}] for t, d in encode(tiny)]
    out, = FluxCoreSampler().sample(tiny["dit"], positive, encode(tiny, ""), latent, seed=7, steps=3)
    with torch.no_grad():
        packed = ref(prompt=PROMPT, height=H, width=W, sigmas=sigmas, num_inference_steps=3, guidance_scale=2.5,
                     max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(7),
                     output_type="latent").images
    scaled = unpack(packed)
    # Measured 0 (the same float32 operations in the same order); a shift off by d moves every raw value by d, so
    # the bound catches d > 1e-4 (the published 0.1159 written as 0.12 fails by 4e-3), a wrong scale far more.
    assert (out["samples"] - (scaled / SCALE + SHIFT)).abs().max() <= 1e-4
    assert (out["samples"] - scaled).abs().max() > 0.1  # raw and scaled spaces are told apart (measured 10.3)


# ---------------------------------------------------------------- CONDITIONING: the native FLUX form
def test_text_encode_gives_the_native_flux_conditioning(tiny):
    ref = tiny["ref"]
    conditioning = encode(tiny, guidance=3.5)
    assert isinstance(conditioning, list) and len(conditioning) == 1
    entry = conditioning[0]
    assert isinstance(entry, list) and len(entry) == 2
    tokens, extra = entry
    # CLIPTextEncodeFlux's keys; widths are the encoders' (T5 d_model, CLIP hidden: 4096 and 768 for FLUX.1).
    assert set(extra) == {"pooled_output", "guidance"} and isinstance(extra["guidance"], float)
    assert extra["guidance"] == 3.5
    assert tokens.shape == (1, T5_LENGTH, ref.text_encoder_2.config.d_model)
    assert extra["pooled_output"].shape == (1, ref.text_encoder.config.hidden_size)
    with torch.no_grad():
        prompt_embeds, pooled, _ = ref.encode_prompt(PROMPT, None, max_sequence_length=T5_LENGTH)
    # Measured 0 (same transformers modules and tokenizers, run by diffusers).
    assert (tokens - prompt_embeds).abs().max() <= 1e-5
    assert (extra["pooled_output"] - pooled).abs().max() <= 1e-5


def test_kontext_reference_adds_native_reference_latents(tiny):
    pil = random_image(2)
    base = encode(tiny, guidance=2.5)
    earlier = torch.randn(1, 16, 4, 4)
    chained = [[base[0][0], {**base[0][1], "reference_latents": [earlier]}]]  # a ReferenceLatent before ours
    out, = FluxCoreKontextReference().append(chained, tiny["vae"], as_comfy_image(pil))
    tokens, extra = out[0]
    assert tokens is base[0][0] and extra["pooled_output"] is base[0][1]["pooled_output"] and extra["guidance"] == 2.5
    assert set(extra) == {"pooled_output", "guidance", "reference_latents"}
    first, added = extra["reference_latents"]
    assert first is earlier and chained[0][1]["reference_latents"] == [earlier]  # appended, input untouched
    with torch.no_grad():  # native ReferenceLatent holds VAEEncode's raw latent of the image
        expected = tiny["ref"].vae.encode(as_diffusers_input(pil)).latent_dist.mean
    # Measured 6e-7; the scaled latent instead of the raw one is off by > 0.1, a shift written 0.12 by 4e-3.
    assert added.shape == (1, 16, H // 8, W // 8) and (added - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------- image-to-image and inpainting
def test_image_to_image_matches_diffusers_img2img(tiny, monkeypatch):
    mode_latents(monkeypatch)
    ref, pil = tiny["ref"], random_image(3)
    encoded, = FluxCoreVAEEncode().encode(as_comfy_image(pil), tiny["vae"])
    out, = FluxCoreSampler().sample(tiny["dit"], encode(tiny), encode(tiny, ""), encoded, seed=11, steps=3,
                                    denoise=0.8)
    pipe = FluxImg2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():  # strength 1: diffusers runs every sigma given (the node's), starting from the image
        packed = pipe(prompt=PROMPT, image=pil, strength=1.0, height=H, width=W, sigmas=schedule(3, 0.8),
                      num_inference_steps=3, guidance_scale=3.5, max_sequence_length=T5_LENGTH,
                      generator=torch.Generator().manual_seed(11), output_type="latent").images
    expected = unpack(packed) / SCALE + SHIFT
    # Measured 5e-6; a latent shift off by 4e-3 fails it, as does a start at another sigma.
    assert (out["samples"] - expected).abs().max() <= 1e-4
    assert (out["samples"] - encoded["samples"]).abs().max() > 0.1  # it did change the image (measured 14.7)


def test_inpainting_matches_diffusers_inpaint(tiny, monkeypatch):
    mode_latents(monkeypatch)
    ref, pil = tiny["ref"], random_image(4)
    mask = torch.zeros(1, H, W)
    mask[:, :, W // 2:] = 1.0  # repaint the right half (LoadImage/SetLatentNoiseMask: 1 = change)
    encoded, = FluxCoreVAEEncode().encode(as_comfy_image(pil), tiny["vae"])
    masked = dict(encoded, noise_mask=mask.reshape(1, 1, H, W))  # what SetLatentNoiseMask makes
    out, = FluxCoreSampler().sample(tiny["dit"], encode(tiny), encode(tiny, ""), masked, seed=5, steps=3,
                                    denoise=0.8)
    pipe = FluxInpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    mask_image = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8))  # diffusers: white = repaint
    with torch.no_grad():
        packed = pipe(prompt=PROMPT, image=pil, mask_image=mask_image, strength=1.0, height=H, width=W,
                      sigmas=schedule(3, 0.8), num_inference_steps=3, guidance_scale=3.5,
                      max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(5),
                      output_type="latent").images
    expected = unpack(packed) / SCALE + SHIFT
    # Measured 3.8e-6 (kept half 1.2e-7); the mask's polarity swapped fails it (and the kept-half check).
    assert (out["samples"] - expected).abs().max() <= 1e-4
    keep = slice(0, W // 16)
    assert (out["samples"][..., keep] - encoded["samples"][..., keep]).abs().max() <= 1e-4  # the kept half
