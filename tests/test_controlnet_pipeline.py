"""ControlNets in FluxImagePipeline: a whole single-ControlNet run against diffusers' FluxControlNetPipeline, several
ControlNets with start/end and true CFG against DiffSynth-Studio's own loop (MultiControlNet + model_fn_flux_image),
the inpainting control input against DiffSynth's own ControlNet unit, and the input checks."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import ControlNetInput
from flux_core.math import pack_latents
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_dit import make_diffusers_dit, write_diffusers_dit
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
from tests.tiny_vae import reference_encode, reference_encode_image

H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
PROMPT = "a cat sitting on a red chair"


def random_image(seed, size=(W, H)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def noise(seed=0):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnpipe")
    ref = make_diffusers_pipeline(tmp)
    union = make_diffusers_controlnet(seed=11, num_mode=10)
    plain = make_diffusers_controlnet(seed=12, num_layers=1, num_single_layers=0)
    write_diffusers_controlnet(union, tmp / "union")
    write_diffusers_controlnet(plain, tmp / "plain")
    ours = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(tmp / FOLDER_NAME)), ModelConfig(path=str(tmp / "union")),
        ModelConfig(path=str(tmp / "plain"))])
    return types.SimpleNamespace(ref=ref, ours=ours, union=union, plain=plain, tmp=tmp)


def test_controlnets_fill_pipe_controlnet_in_model_configs_order(tiny):
    assert [e.slot for e in tiny.ours.loaded_from.values() if e.kind == "controlnet"] == \
        ["controlnet.models.0", "controlnet.models.1"]
    assert tiny.ours.controlnet.models[0].params.num_modes == 10
    assert tiny.ours.controlnet.models[1].params.depth == 1


def diffusers_control_pipeline(tiny, controlnet, monkeypatch):
    """diffusers' FluxControlNetPipeline on the same components; its control latent taken from the posterior mean
    (diffusers samples it; DiffSynth and FluxCore use the mean)."""
    from diffusers import FluxControlNetPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    pipe = FluxControlNetPipeline(**{k: v for k, v in tiny.ref.components.items()}, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("which", ["union", "plain"])
def test_single_controlnet_run_matches_diffusers(tiny, which, monkeypatch):
    model = tiny.union if which == "union" else tiny.plain
    control = random_image(1)
    x = noise(2)
    mode = {"union": 2, "plain": None}[which]
    expected = diffusers_control_pipeline(tiny, model, monkeypatch)(
        prompt=PROMPT, control_image=control, control_mode=mode, controlnet_conditioning_scale=0.8, height=H,
        width=W, sigmas=SIGMAS, num_inference_steps=len(SIGMAS), latents=pack_latents(x), guidance_scale=3.5,
        max_sequence_length=16, output_type="np").images
    item = ControlNetInput(controlnet_id=0 if which == "union" else 1, image=control, scale=0.8,
                           processor_id="depth" if which == "union" else None)
    got = tiny.ours(prompt=PROMPT, controlnet_inputs=[item], height=H, width=W, sigmas=SIGMAS, latents=x,
                    embedded_guidance=3.5, t5_sequence_length=16, output_type="np", progress_bar_cmd=None)
    plain = tiny.ours(prompt=PROMPT, height=H, width=W, sigmas=SIGMAS, latents=x, embedded_guidance=3.5,
                      t5_sequence_length=16, output_type="np", progress_bar_cmd=None)
    # Measured 1.1e-6 (union) and 1.2e-6 (plain) on pixels in [0, 1], under the bound of 1e-3; the control
    # changes the image by 0.89 to 1.0.
    assert np.abs(got - expected).max() <= 1e-3
    assert np.abs(got - plain).max() > 1e-2


def diffsynth_loop(tiny, dit, controlnets, items, cfg_scale, x, negative):
    """DiffSynth-Studio's own denoising: MultiControlNet + model_fn_flux_image per step and branch, Euler steps over
    SIGMAS, with diffusers' text encoding and diffusers' VAE (posterior mean) for the control latents."""
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet
    ref = tiny.ref
    vae = ref.vae

    def encode(image):
        return reference_encode_image(vae, image)

    def text(prompt):
        emb, pooled, _ = ref.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
        return emb, pooled

    their_inputs = [TheirInput(controlnet_id=i.controlnet_id, scale=i.scale, start=i.start, end=i.end,
                               image=i.image, processor_id=i.processor_id) for i in items]
    conditionings = [encode(i.image) for i in items]
    multi = MultiControlNet(controlnets)
    sides = {"posi": text(PROMPT), "nega": text(negative)}
    latents = x.clone()
    sigmas = SIGMAS + [0.0]
    with torch.no_grad():
        for step, sigma in enumerate(SIGMAS):
            preds = {}
            for side, (emb, pooled) in sides.items():
                preds[side] = model_fn(dit=dit, controlnet=multi, latents=latents, timestep=torch.tensor([sigma * 1000]),
                                       prompt_emb=emb, pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]),
                                       text_ids=torch.zeros(1, emb.shape[1], 3), controlnet_inputs=their_inputs,
                                       controlnet_conditionings=conditionings, progress_id=step,
                                       num_inference_steps=len(SIGMAS))
            v = preds["nega"] + cfg_scale * (preds["posi"] - preds["nega"])
            latents = latents + v * (sigmas[step + 1] - sigma)
    return latents


@pytest.mark.slow
def test_several_controlnets_with_start_end_and_cfg_match_diffsynths_loop(tiny, tmp_path):
    """Two inputs on one union ControlNet (two modes, different ranges and scales) and one on a plain ControlNet of
    another depth, under true CFG: equal to DiffSynth's loop, which spreads each net's residuals before summing and
    reruns the ControlNets in the negative branch with the negative prompt. A DiT of FLUX's 19/38 blocks: DiffSynth
    spreads residuals over a literal 19 and 38."""
    from tests.diffsynth_ref import tiny_diffsynth_controlnet, tiny_diffsynth_dit
    from tests.tiny_controlnet import diffsynth_state_dict as controlnet_diffsynth_sd
    from tests.tiny_dit import diffsynth_state_dict as dit_diffsynth_sd
    deep = make_diffusers_dit(seed=21, num_layers=19, num_single_layers=38)
    dit_file = write_diffusers_dit(deep, tmp_path / "transformer")  # its config.json gives the tiny RoPE axes
    folder = tiny.tmp / FOLDER_NAME
    ours = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(dit_file)), ModelConfig(path=str(folder / "vae")),
        ModelConfig(path=str(folder / "text_encoder")), ModelConfig(path=str(folder / "text_encoder_2")),
        ModelConfig(path=str(tiny.tmp / "union")), ModelConfig(path=str(tiny.tmp / "plain"))],
        tokenizer_1_config=ModelConfig(path=str(folder / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(folder / "tokenizer_2")))
    items = [ControlNetInput(controlnet_id=0, image=random_image(3), scale=0.8, start=1.0, end=0.4, processor_id="depth"),
             ControlNetInput(controlnet_id=0, image=random_image(4), scale=0.5, start=0.7, end=0.0, processor_id="canny"),
             ControlNetInput(controlnet_id=1, image=random_image(5), scale=1.2)]
    x = noise(6)
    got = ours(prompt=PROMPT, negative_prompt="blurry", cfg_scale=2.0, controlnet_inputs=items, height=H, width=W,
               sigmas=SIGMAS, latents=x, embedded_guidance=3.5, t5_sequence_length=16, output_type="latent",
               progress_bar_cmd=None)

    their_dit = tiny_diffsynth_dit(double=19, single=38)
    their_dit.load_state_dict(dit_diffsynth_sd(deep), strict=True)
    union = tiny_diffsynth_controlnet(num_mode=10)
    union.load_state_dict(controlnet_diffsynth_sd(tiny.union), strict=True)
    plain = tiny_diffsynth_controlnet(double=1, single=0)
    plain.load_state_dict(controlnet_diffsynth_sd(tiny.plain), strict=True)
    expected = diffsynth_loop(tiny, their_dit, [union.eval(), plain.eval()], items, 2.0, x, "blurry")
    without = ours(prompt=PROMPT, negative_prompt="blurry", cfg_scale=2.0, controlnet_inputs=items[:2], height=H,
                   width=W, sigmas=SIGMAS, latents=x, embedded_guidance=3.5, t5_sequence_length=16,
                   output_type="latent", progress_bar_cmd=None)
    # Measured 2.4e-6 on latents up to 5.7 (the bound: 1e-3); the third ControlNet alone moves them by 2.4.
    assert (got - expected).abs().max().item() <= 1e-3
    assert (got - without).abs().max().item() > 1e-2


def test_inpainting_control_latent_is_diffsynths(tiny):
    """The inpainting ControlNet's control input (masked pixels blacked out, VAE mean, `1 - mask` channel) equals
    what DiffSynth's own ControlNet unit builds, for a PIL mask of another size than the image."""
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, FluxImageUnit_ControlNet

    from flux_core.controlnet import control_latent
    image = random_image(7)
    mask = Image.new("RGB", (32, 24))
    mask.paste((255, 255, 255), (8, 4, 24, 20))
    vae = tiny.ref.vae

    def vae_mean(pixels, **kwargs):
        return reference_encode(vae, pixels)

    fake = types.SimpleNamespace(device="cpu", torch_dtype=torch.float32, vae_encoder=vae_mean,
                                 load_models_to_device=lambda names: None)
    fake.preprocess_image = types.MethodType(BasePipeline.preprocess_image, fake)
    expected = FluxImageUnit_ControlNet().process(fake, [TheirInput(image=image, inpaint_mask=mask)], False, 128, 64)
    expected = expected["controlnet_conditionings"][0]
    with torch.no_grad():
        got = control_latent(ControlNetInput(image=image, inpaint_mask=mask), W, H,
                             lambda x: vae_mean(x), "controlnet_inputs[0]")
    assert got.shape == expected.shape == (1, 17, H // 8, W // 8)
    assert (got - expected).abs().max().item() < 1e-5  # measured 1.0e-6
    tensor_mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)
    with torch.no_grad():
        from_tensor = control_latent(ControlNetInput(image=image, inpaint_mask=tensor_mask), W, H, vae_mean, "x")
    assert (from_tensor[:, 16] - expected[:, 16]).abs().max().item() == 0  # the same mask channel



def test_a_mask_tensor_blacks_out_what_its_picture_does_when_shrunk(tiny):
    """A mask painted at twice the control image's size: as a ComfyUI MASK tensor it is shrunk as its 8-bit picture
    (flux_core.image.mask_at_size), so the inpainting ControlNet's blacked-out image is the one of the PIL picture.
    (Shrunk by torch's bicubic interpolation, with or without antialias, the speckled tensor blacked out other
    pixels.)"""
    from flux_core.controlnet import control_latent
    image = random_image(8)
    speckle = (np.random.default_rng(1).random((2 * H, 2 * W)) > 0.5).astype(np.uint8) * 255
    picture = Image.fromarray(speckle).convert("RGB")
    tensor_mask = torch.from_numpy(speckle.astype(np.float32) / 255)
    vae = tiny.ref.vae
    with torch.no_grad():
        latents = [control_latent(ControlNetInput(image=image, inpaint_mask=m), W, H,
                                  lambda x: reference_encode(vae, x), "x") for m in (picture, tensor_mask)]
    assert torch.equal(latents[0][:, :16], latents[1][:, :16])

@pytest.mark.parametrize("items,match", [
    ([ControlNetInput(controlnet_id=2, image=random_image(0))], r"controlnet_inputs\[0\]: controlnet_id=2, but 2 ControlNet"),
    ([ControlNetInput(controlnet_id=0, image=random_image(0))], r"union ControlNet: set processor_id"),
    ([ControlNetInput(controlnet_id=1, image=random_image(0), processor_id="canny")], r"only union ControlNets take"),
    ([ControlNetInput(controlnet_id=0, image=random_image(0), processor_id="sketch")], r"'sketch' is not a union"),
    ([ControlNetInput(controlnet_id=1, image=None)], r"image must be a PIL image"),
    ([ControlNetInput(controlnet_id=1, image=random_image(0), start=0.2, end=0.5)], r"need 0 <= end <= start <= 1"),
    ([ControlNetInput(controlnet_id=1, image=random_image(0), inpaint_mask=Image.new("L", (4, 4)))],
     r"not an inpainting ControlNet"),
    ([{"image": 1}], r"controlnet_inputs\[0\] is a dict"),
])
def test_bad_controlnet_inputs_are_named(tiny, items, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny.ours(prompt=PROMPT, controlnet_inputs=items, height=H, width=W, num_inference_steps=1,
                  t5_sequence_length=16, progress_bar_cmd=None)


def test_tiled_dit_refuses_teacache(tiny):
    with pytest.raises(ValueError, match="tiled=True runs the DiT once per tile"):
        tiny.ours(prompt=PROMPT, height=H, width=W, tiled=True, tea_cache_l1_thresh=0.3, num_inference_steps=1)


def test_controlnet_and_tile_forwards_count_in_the_run_cost(tiny, monkeypatch):
    """The CPU run-time warning counts the ControlNets' forwards (in DiT passes) and the tiled DiT's calls: a
    threshold just above the plain run's compute warns only with them."""
    import warnings

    from flux_core import run_cost
    from flux_core.run_cost import dit_forward_flops, image_tokens
    plain_flops = 2 * dit_forward_flops(tiny.ours.dit, image_tokens(H, W), 16)  # 2 steps, 1 pass, batch 1
    monkeypatch.setattr(run_cost, "CPU_WARN_FLOPS", plain_flops * 1.01)
    kwargs = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, t5_sequence_length=16,
                  output_type="latent", progress_bar_cmd=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", run_cost.SlowRunWarning)
        tiny.ours(**kwargs)
    with pytest.warns(run_cost.SlowRunWarning, match=r"2 steps x 1 tile\(s\) x \(1 pass\(es\) \+ 0.\d+ DiT pass\(es\) "
                                                     r"of controlnet_inputs\)"):
        tiny.ours(controlnet_inputs=[ControlNetInput(controlnet_id=1, image=random_image(0))], **kwargs)
    with pytest.warns(run_cost.SlowRunWarning, match=r"2 steps x 6 tile\(s\) x \(1 pass\(es\)\)"):
        tiny.ours(tiled=True, tile_size=4, tile_stride=2, **kwargs)
