"""IP-Adapters against references we did not write, on tiny weights in float32:
- InstantX against DiffSynth-Studio 2.1.12's own code: its FluxIpAdapter (a tiny subclass built from its own
  modules) loaded from the same ip-adapter.bin through its own converter, its IP-Adapter unit (image preprocessing,
  SigLIP pooled features, negative branch from zeros) and its DiT forward `model_fn_flux_image`;
- XLabs against diffusers: the adapter loaded by diffusers' own `FluxIPAdapterMixin.load_ip_adapter`, a transformer
  forward with `ip_adapter_image_embeds`, and a whole FluxPipeline run with `ip_adapter_image`;
- the image encoders' features against transformers (SigLIP on DiffSynth's preprocessing and on SiglipImageProcessor;
  CLIP on CLIPImageProcessor, as diffusers' FluxPipeline encodes IP-Adapter images).
"""
from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file

from flux_core.adapters import DiTCall, apply_adapters
from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs, run_dit
from flux_core.ipadapter import bind_ipadapter
from flux_core.loading.loader import load_model
from flux_core.models.dit import DiTExtras
from flux_core.models.image_encoders import encode_images
from flux_core.sampling import guided_velocity
from tests.tiny_ipadapter import (CLIP_PROJECTION_DIM, TEXT_DIM, instantx_state_dict, make_clip_vision,
                                  reference_image, write_comfy_clip_vision, write_instantx, write_xlabs,
                                  xlabs_state_dict)

F32 = torch.float32
AXES = {"axes_dim": (4, 6, 6)}
HEADS, DEPTH = 2, (2, 2)
B, H, W, LT = 1, 6, 8, 5          # latent 6x8: 12 image tokens; 5 text tokens
SIGLIP_SIZE = 384                  # DiffSynth's IP-Adapter unit resizes to a literal 384
# Bound for every DiT-output comparison below (measured values in each test: 0 to 2.4e-6). The smallest real mistakes
# it must catch, each planted and seen to fail: single-block queries taken before RoPE (moves the output by 1.3e-3),
# RoPE applied to the double blocks' image queries (1.8e-3), keys not RMS-normalised (5.5e-3), one image's tokens
# instead of all (2.8e-2), the scale applied to the keys instead of the output (9.8e-2).
TOL = 1e-4


def packed(latents):
    return rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


def ids(h, w, index=0):
    from diffusers import FluxPipeline
    out = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
    out[..., 0] = index
    return out[None]


def make_siglip_384(seed: int = 0):
    """A SigLIP vision tower at the published image size (384, patch 14: 27 x 27 patches), 24 wide, 2 layers."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                                 num_attention_heads=HEADS, patch_size=14, image_size=SIGLIP_SIZE))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.eval()


def write_comfy_siglip(model, path):
    """ComfyUI's clip_vision/sigclip_vision_patch14_384.safetensors: the tower under `vision_model.`, no config."""
    sd = {f"vision_model.{k.removeprefix('vision_model.')}": v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith("position_ids")}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Our DiT, IP-Adapter and SigLIP loaded from files; DiffSynth's DiT and IP-Adapter from the same weights."""
    from tests.diffsynth_ref import diffsynth_ipadapter, ipadapter_key_names, tiny_diffsynth_dit, \
        tiny_diffsynth_ipadapter
    from tests.tiny_dit import diffsynth_state_dict, make_diffusers_dit, write_bfl_dit
    tmp = tmp_path_factory.mktemp("ipparity")
    reference = make_diffusers_dit(seed=4)
    dit = load_model(write_bfl_dit(reference, tmp / "dit.safetensors"), config=AXES, torch_dtype=F32, kind="dit")
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(reference), strict=True)

    bin_path = write_instantx(instantx_state_dict(seed=9), tmp / "ip-adapter.bin")
    ipadapter = load_model(bin_path, torch_dtype=F32, kind="ipadapter")
    _, convert = diffsynth_ipadapter()
    their_ip = tiny_diffsynth_ipadapter(heads=HEADS, head_dim=16, text_dim=TEXT_DIM, num_tokens=3, num_blocks=4,
                                        image_dim=24)
    their_ip.load_state_dict(convert(torch.load(bin_path, weights_only=True)), strict=True)
    # the tiny subclass has the real class's parameter names
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in their_ip.state_dict()} == ipadapter_key_names()

    siglip = make_siglip_384(seed=5)
    # ComfyUI's single file: no config.json; the 24 width needs its head count, the image size is read off the shapes
    encoder = load_model(write_comfy_siglip(siglip, tmp / "sigclip.safetensors"), config={"num_attention_heads": 2},
                         torch_dtype=F32, kind="image_encoder")
    return types.SimpleNamespace(dit=dit, their_dit=their_dit, ipadapter=ipadapter, their_ip=their_ip.eval(),
                                 siglip=siglip, encoder=encoder)


def diffsynth_ipadapter_unit(tiny, images, scale, cfg_scale):
    """DiffSynth's own FluxImageUnit_IPAdapter on a stand-in pipe holding the tiny SigLIP and IP-Adapter: its
    preprocessing (RGB, 384x384 bicubic, [-1, 1]), pooled features, positive kwargs at `scale`, negative from zeros."""
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.pipelines.flux_image import FluxImageUnit_IPAdapter
    pipe = types.SimpleNamespace(device="cpu", torch_dtype=F32, ipadapter_image_encoder=tiny.siglip,
                                 ipadapter=tiny.their_ip, load_models_to_device=lambda names: None)
    pipe.preprocess_image = lambda image, **kw: BasePipeline.preprocess_image(pipe, image, **kw)
    with torch.no_grad():
        _, posi, nega = FluxImageUnit_IPAdapter().process(
            pipe, {"ipadapter_images": images, "ipadapter_scale": scale, "cfg_scale": cfg_scale}, {}, {})
    return posi["ipadapter_kwargs_list"], nega.get("ipadapter_kwargs_list")


def images_of(n):
    return [reference_image(i, size=(40 + 8 * i, 32 + 4 * i)) for i in range(n)]


@pytest.mark.parametrize("n_images", [1, 3])
def test_instantx_keys_and_values_equal_diffsynths_unit(tiny, n_images):
    """From PIL images to every block's keys and values, both CFG branches: DiffSynth's unit (its preprocessing, the
    SigLIP pooled output, its FluxIpAdapter; the negative branch from a zero encoding) against ours (encode_images on
    SigLIP loaded from ComfyUI's single file, bind_ipadapter)."""
    images = images_of(n_images)
    posi, nega = diffsynth_ipadapter_unit(tiny, images, scale=0.6, cfg_scale=2.0)
    with torch.no_grad():
        adapter = bind_ipadapter(tiny.ipadapter, encode_images(tiny.encoder, images), HEADS, DEPTH, scale=0.6)
    assert adapter.scale == posi[0]["scale"] == 0.6
    diffs = []
    for branch, theirs in (("positive", posi), ("negative", nega)):
        kv = adapter.keys_values[branch]
        assert len(kv) == len(theirs) == sum(DEPTH)
        for i, (k, v) in enumerate(kv):
            assert k.shape == theirs[i]["ip_k"].shape == (1, HEADS, 3 * n_images, 16)
            diffs += [(k - theirs[i]["ip_k"]).abs().max().item(), (v - theirs[i]["ip_v"]).abs().max().item()]
    # Measured 8.3e-7. Resizing to 378 instead of 384 (the SigLIP image size read as 27 patches x 14) moves them by
    # 3.3e-3, pixels in [0, 1] instead of [-1, 1] by 0.44, a negative branch not fed zeros by 1.07.
    assert max(diffs) < 1e-5


def dit_call_inputs(seed, kontext: bool):
    g = torch.Generator().manual_seed(seed)
    x = dict(latents=torch.randn(B, 16, H, W, generator=g), txt=torch.randn(B, LT, TEXT_DIM, generator=g),
             pooled=torch.randn(B, 32, generator=g), sigma=0.55, guidance=3.5)
    x["kontext"] = torch.randn(B, 16, 4, 6, generator=g) if kontext else None
    return x


def their_velocity(tiny, x, ipadapter_kwargs_list, prompt=None):
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    txt, pooled = prompt if prompt is not None else (x["txt"], x["pooled"])
    kontext = {}
    if x["kontext"] is not None:
        kontext = dict(kontext_latents=packed(x["kontext"]), kontext_image_ids=ids(4, 6, index=1))
    with torch.no_grad():
        return model_fn(dit=tiny.their_dit, latents=x["latents"], timestep=torch.tensor([x["sigma"] * 1000]),
                        prompt_emb=txt, pooled_prompt_emb=pooled, guidance=torch.tensor([x["guidance"]]),
                        text_ids=torch.zeros(B, txt.shape[1], 3), image_ids=ids(H, W),
                        ipadapter_kwargs_list=ipadapter_kwargs_list, **kontext)


def our_extras(x) -> DiTExtras:
    if x["kontext"] is None:
        return DiTExtras()
    return DiTExtras(ref_tokens=packed(x["kontext"]), ref_ids=ids(4, 6, index=1))


@pytest.mark.parametrize("n_images, kontext", [(1, False), (1, True), (3, True)])
def test_instantx_dit_call_equals_diffsynth(tiny, n_images, kontext):
    """One DiT call: DiffSynth's model_fn_flux_image with its FluxIpAdapter's kwargs (scale 0.6) against our DiT with
    the bound adapter through apply_adapters; with Kontext reference tokens in the sequence (their queries attend to
    the image too, in DiffSynth), one and three reference images."""
    features = torch.randn(n_images, 24, generator=torch.Generator().manual_seed(n_images))
    x = dit_call_inputs(seed=3 + n_images, kontext=kontext)
    with torch.no_grad():
        expected = their_velocity(tiny, x, tiny.their_ip(features, scale=0.6))
        without = their_velocity(tiny, x, {})
        adapter = bind_ipadapter(tiny.ipadapter, features, HEADS, DEPTH, scale=0.6, branches=("positive",))
        inputs = prepare_dit_inputs(x["latents"], x["sigma"], PromptEmbeds(x["txt"], x["pooled"]), x["guidance"], F32,
                                    our_extras(x))
        got = run_dit(tiny.dit, apply_adapters(inputs, [adapter], DiTCall(sigma=x["sigma"])))
    # Measured 1.1e-6 to 1.2e-6 (TOL above); the adapter moves the output by 0.14 to 0.18.
    assert (got - expected).abs().max().item() < TOL
    assert (expected - without).abs().max().item() > 1e-2


def test_instantx_negative_branch_under_cfg_equals_diffsynth(tiny):
    """True CFG (cfg_scale 2): DiffSynth's negative branch runs its adapter on a zero image encoding (at scale 1.0);
    ours at ipadapter_scale 1.0 gives the same guided velocity. The negative prompt differs from the positive one."""
    features = torch.randn(2, 24, generator=torch.Generator().manual_seed(11))
    x = dit_call_inputs(seed=12, kontext=True)
    g = torch.Generator().manual_seed(13)
    negative = (torch.randn(B, LT + 2, TEXT_DIM, generator=g), torch.randn(B, 32, generator=g))
    with torch.no_grad():
        posi = their_velocity(tiny, x, tiny.their_ip(features, scale=1.0))
        nega = their_velocity(tiny, x, tiny.their_ip(torch.zeros_like(features)), prompt=negative)
        nega_without = their_velocity(tiny, x, {}, prompt=negative)
        expected = nega + 2.0 * (posi - nega)
        adapter = bind_ipadapter(tiny.ipadapter, features, HEADS, DEPTH, scale=1.0)
        got = guided_velocity(tiny.dit, x["latents"], DiTCall(sigma=x["sigma"]), PromptEmbeds(x["txt"], x["pooled"]),
                              PromptEmbeds(*negative), 2.0, x["guidance"], extras=our_extras(x), adapters=[adapter])
    # Measured 2.4e-6 (TOL above); feeding the negative branch the image's features instead of zeros moves it by 0.25,
    # and the zero-fed adapter itself changes the negative branch by 0.46.
    assert (got - expected).abs().max().item() < TOL
    assert (nega - nega_without).abs().max().item() > 1e-1


def test_siglip_features_equal_transformers(tiny):
    """Our SigLIP features (encode_images: 384x384 bicubic, [-1, 1], pooler_output) equal transformers'
    SiglipVisionModel on DiffSynth's preprocessing, and on transformers' own SiglipImageProcessor (384, bicubic,
    mean = std = 0.5): the two preprocessings give the same pixels."""
    from transformers import SiglipImageProcessor
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.diffusion.base_pipeline import BasePipeline
    images = images_of(3) + [reference_image(7, size=(500, 300)).convert("L")]
    pipe = types.SimpleNamespace(device="cpu", torch_dtype=F32)
    diffsynth_pixels = torch.cat([BasePipeline.preprocess_image(pipe, im.convert("RGB").resize((384, 384), 3))
                                  for im in images])
    processor_pixels = SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE})(
        images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        ours = encode_images(tiny.encoder, images)
        on_diffsynth = tiny.siglip(pixel_values=diffsynth_pixels).pooler_output
        on_processor = tiny.siglip(pixel_values=processor_pixels).pooler_output
    # Measured 8.9e-8 against DiffSynth's pixels and 0 against the processor's (whose pixels differ from DiffSynth's
    # by 1.2e-7: float rounding of the same bicubic resize); an image size of 378 moves the features by 1.1e-2,
    # pixels in [0, 1] instead of [-1, 1] by 0.33.
    assert (ours - on_diffsynth).abs().max().item() < 1e-5
    assert (ours - on_processor).abs().max().item() < 1e-5
    assert (diffsynth_pixels - processor_pixels).abs().max().item() < 1e-6


def test_clip_features_equal_transformers_as_diffusers_encodes(tmp_path):
    """CLIP image_embeds of CLIPVisionModelWithProjection on CLIPImageProcessor's pixel_values (what diffusers'
    FluxPipeline.encode_image computes for ip_adapter_image), against encode_images on the tower loaded from
    ComfyUI's clip_vision file."""
    from transformers import CLIPImageProcessor
    clip = make_clip_vision(seed=6)
    encoder = load_model(write_comfy_clip_vision(clip, tmp_path / "clip_vision_l.safetensors"),
                         config={"num_attention_heads": 2}, torch_dtype=F32)
    size = clip.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = images_of(3) + [reference_image(8, size=(90, 30))]
    with torch.no_grad():
        expected = clip(pixel_values=processor(images=images, return_tensors="pt").pixel_values).image_embeds
        ours = encode_images(encoder, images)
    # Measured 0 (the same processor code); a missing centre crop cannot even batch images of other shapes.
    assert ours.shape == (4, CLIP_PROJECTION_DIM)
    assert (ours - expected).abs().max().item() < 1e-5


# ---- XLabs against diffusers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xlabs(tmp_path_factory):
    """A tiny diffusers FluxPipeline folder, a CLIP vision folder and XLabs' flux-ip-adapter.safetensors; diffusers'
    pipeline with the adapter loaded by its own load_ip_adapter, and ours from the same files."""
    from transformers import CLIPImageProcessor
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    tmp = tmp_path_factory.mktemp("xlabs")
    ref = make_diffusers_pipeline(tmp)
    clip = make_clip_vision(seed=7)
    clip.save_pretrained(tmp / "image_encoder")
    ip_path = write_xlabs(xlabs_state_dict(seed=8), tmp / "flux-ip-adapter.safetensors")
    size = clip.config.image_size
    from diffusers import FluxPipeline
    theirs = FluxPipeline(**{k: v for k, v in ref.components.items() if k not in ("image_encoder", "feature_extractor")},
                          image_encoder=clip, feature_extractor=CLIPImageProcessor(
                              size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    theirs.set_progress_bar_config(disable=True)
    theirs.load_ip_adapter(str(tmp), weight_name=ip_path.name, image_encoder_pretrained_model_name_or_path=None)
    ours = FluxImagePipeline.from_pretrained(torch_dtype=F32, device="cpu", model_configs=[
        ModelConfig(path=str(tmp / FOLDER_NAME)), ModelConfig(path=str(ip_path)),
        ModelConfig(path=str(tmp / "image_encoder"))])
    return types.SimpleNamespace(theirs=theirs, ours=ours, tmp=tmp)


def test_xlabs_transformer_forward_equals_diffusers(xlabs):
    """diffusers' transformer with the XLabs adapter (its load_ip_adapter; set_ip_adapter_scale 0.7) on
    `ip_adapter_image_embeds` of two images, against our DiT with the bound adapter (added to the image stream after
    each double block; none in single blocks)."""
    theirs, ours = xlabs.theirs, xlabs.ours
    g = torch.Generator().manual_seed(21)
    embeds = torch.randn(2, CLIP_PROJECTION_DIM, generator=g)
    x = dict(img=torch.randn(1, 12, 64, generator=g), txt=torch.randn(1, LT, TEXT_DIM, generator=g),
             y=torch.randn(1, 32, generator=g), sigma=0.45)
    kwargs = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                  timestep=torch.tensor([x["sigma"]]), img_ids=ids(H, W)[0], txt_ids=torch.zeros(LT, 3),
                  guidance=torch.tensor([3.5]))
    theirs.set_ip_adapter_scale(0.7)
    with torch.no_grad():
        expected = theirs.transformer(**kwargs, joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[None]]}
                                      ).sample
        adapter = bind_ipadapter(ours.ipadapter, embeds, ours.dit.num_heads, DEPTH, scale=0.7, branches=("positive",))
        inputs = prepare_dit_inputs(rearrange(x["img"], "B (H W) (C P Q) -> B C (H P) (W Q)", H=3, P=2, Q=2),
                                    x["sigma"], PromptEmbeds(x["txt"], x["y"]), 3.5, F32)
        got = packed(run_dit(ours.dit, apply_adapters(inputs, [adapter], DiTCall(sigma=x["sigma"]))))
        without = packed(run_dit(ours.dit, inputs))   # diffusers' transformer needs IP inputs once they are loaded
    # Measured 0 (TOL above); the XLabs output added before the attention projection instead of after the block
    # moves it by 0.48, the scale applied to the keys by 0.18, RoPE on the image queries by 1.8e-3.
    assert (got - expected).abs().max().item() < TOL
    assert (expected - without).abs().max().item() > 1e-2


@pytest.mark.slow
def test_xlabs_pipeline_run_equals_diffusers(xlabs):
    """A whole run, cfg_scale 1: diffusers' FluxPipeline(ip_adapter_image=...) with the XLabs adapter at scale 0.8
    against our pipeline loaded from the same files (the FLUX folder, the XLabs file, the CLIP vision folder).
    diffusers' true CFG (true_cfg_scale > 1 with negative_ip_adapter_image) encodes a negative *image*; DiffSynth's
    rule, which FluxCore follows, feeds a zero encoding instead: the two differ, so CFG is compared against
    DiffSynth (test_instantx_negative_branch_under_cfg_equals_diffsynth), not here."""
    from tests.tiny_pipeline import FOLDER_NAME  # noqa: F401 (the folder the fixture wrote)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    latents = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(22))
    image = reference_image(23, size=(50, 40))
    xlabs.theirs.set_ip_adapter_scale(0.8)
    expected = xlabs.theirs(prompt="a cat on a chair", ip_adapter_image=image, height=48, width=64, sigmas=sigmas,
                            num_inference_steps=len(sigmas), latents=packed(latents), guidance_scale=3.5,
                            max_sequence_length=16, output_type="np").images
    got = xlabs.ours(prompt="a cat on a chair", ipadapter_images=image, ipadapter_scale=0.8, height=48, width=64,
                     sigmas=sigmas, latents=latents, embedded_guidance=3.5, t5_sequence_length=16, output_type="np",
                     progress_bar_cmd=None)
    plain = xlabs.ours(prompt="a cat on a chair", height=48, width=64, sigmas=sigmas, latents=latents,
                       embedded_guidance=3.5, t5_sequence_length=16, output_type="np", progress_bar_cmd=None)
    # Measured 8.0e-7 on pixels in [0, 1]; the reference image changes the result by 0.098.
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - plain).max() > 1e-2


# ---- a whole InstantX run against DiffSynth's loop -----------------------------------------------------------------

@pytest.mark.slow
def test_instantx_pipeline_run_with_cfg_equals_diffsynths_loop(tiny, tmp_path):
    """FluxImagePipeline(ipadapter_images=two images, cfg_scale=2, negative prompt) loaded from a FLUX folder,
    ip-adapter.bin and a SigLIP folder, against DiffSynth's own loop: its IP-Adapter unit (positive kwargs, negative
    from a zero encoding) and model_fn_flux_image per step and branch, Euler steps over the same sigmas, with
    diffusers' text encoding of the same tiny encoders. ipadapter_scale 1.0: DiffSynth's negative adapter always
    runs at 1.0 (flux_core.ipadapter applies the scale to both branches)."""
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.diffsynth_ref import diffsynth_flux, tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    model_fn, _, _ = diffsynth_flux()
    ref = make_diffusers_pipeline(tmp_path)
    tiny.siglip.save_pretrained(tmp_path / "siglip")
    write_instantx(instantx_state_dict(seed=9), tmp_path / "ip-adapter.bin")   # the file tiny.their_ip was read from
    ours = FluxImagePipeline.from_pretrained(torch_dtype=F32, device="cpu", model_configs=[
        ModelConfig(path=str(tmp_path / FOLDER_NAME)), ModelConfig(path=str(tmp_path / "ip-adapter.bin")),
        ModelConfig(path=str(tmp_path / "siglip"))])
    images, sigmas = images_of(2), [1.0, 0.75, 0.5, 0.25]
    latents = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(30))
    run = dict(prompt="a cat on a chair", negative_prompt="blurry", cfg_scale=2.0, height=48, width=64, sigmas=sigmas,
               latents=latents, embedded_guidance=3.5, t5_sequence_length=16, output_type="latent",
               progress_bar_cmd=None)
    got = ours(**run, ipadapter_images=images, ipadapter_scale=1.0)
    plain = ours(**run)

    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(ref.transformer), strict=True)
    posi_ip, nega_ip = diffsynth_ipadapter_unit(tiny, images, scale=1.0, cfg_scale=2.0)
    sides = {}
    for side, prompt, ip in (("posi", run["prompt"], posi_ip), ("nega", run["negative_prompt"], nega_ip)):
        emb, pooled, _ = ref.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
        sides[side] = (emb, pooled, ip)
    x = latents.clone()
    with torch.no_grad():
        for step, sigma in enumerate(sigmas):
            v = {side: model_fn(dit=their_dit, latents=x, timestep=torch.tensor([sigma * 1000]), prompt_emb=emb,
                                pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]),
                                text_ids=torch.zeros(1, emb.shape[1], 3), ipadapter_kwargs_list=ip)
                 for side, (emb, pooled, ip) in sides.items()}
            x = x + (v["nega"] + 2.0 * (v["posi"] - v["nega"])) * ((sigmas + [0.0])[step + 1] - sigma)
    # Measured 2.1e-6 (the bound: 1e-4); the reference images move the latents by 0.20. Caught: the negative
    # branch fed the image's features instead of zeros (0.12), only the first image's tokens used (5.9e-4).
    assert (got - x).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-2
