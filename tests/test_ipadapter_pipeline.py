"""IP-Adapter and InfiniteYou in FluxImagePipeline: the slots from_pretrained fills, what each parameter does to a
run, and every input error named at the parameter. (Numerical parity with DiffSynth-Studio and diffusers is in
tests/test_ipadapter_parity.py and tests/test_infiniteyou_parity.py.)"""
from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import ControlNetInput
from flux_core.infiniteyou import IdentityOnOtherControlNetWarning, InfiniteYouWithoutControlNetWarning
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_ipadapter import (face_embedding, instantx_state_dict, make_clip_vision, make_siglip,
                                  projector_state_dict, reference_image, write_instantx, write_projector, write_siglip,
                                  write_xlabs, xlabs_state_dict)
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
RUN = dict(prompt="a cat", height=H, width=W, sigmas=SIGMAS, embedded_guidance=3.5, t5_sequence_length=16,
           output_type="latent", progress_bar_cmd=None)


def noise(seed=0):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def black(size=(W, H)):
    return Image.new("RGB", size)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ippipe")
    ref = make_diffusers_pipeline(tmp)
    siglip = make_siglip(seed=5, image_size=384, patch_size=96)  # DiffSynth's unit resizes to a literal 384
    write_siglip(siglip, tmp / "siglip")
    make_clip_vision(seed=6).save_pretrained(tmp / "clip-vision")
    write_instantx(instantx_state_dict(seed=7), tmp / "ip-adapter.bin")
    write_xlabs(xlabs_state_dict(seed=8), tmp / "flux-ip-adapter.safetensors")
    write_projector(projector_state_dict(seed=9), tmp / "image_proj_model.bin")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=10, num_layers=1, num_single_layers=1), tmp / "infusenet")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=11, num_mode=10), tmp / "union")

    def pipeline(*names):
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(tmp / FOLDER_NAME)), *[ModelConfig(path=str(tmp / n)) for n in names]])

    return types.SimpleNamespace(
        tmp=tmp, pipeline=pipeline, ref=ref, siglip=siglip,
        instantx=pipeline("ip-adapter.bin", "siglip"),
        xlabs=pipeline("flux-ip-adapter.safetensors", "clip-vision"),
        infiniteyou=pipeline("image_proj_model.bin", "infusenet", "union"))


def test_from_pretrained_fills_diffsynths_slots(tiny):
    slots = {e.slot: e.kind for e in tiny.instantx.loaded_from.values()}
    assert slots["ipadapter"] == "ipadapter" and slots["ipadapter_image_encoder"] == "image_encoder"
    assert tiny.instantx.ipadapter.params.family == "instantx"
    assert tiny.xlabs.ipadapter.params.family == "xlabs"
    slots = {e.slot: e.kind for e in tiny.infiniteyou.loaded_from.values()}
    assert slots["image_proj_model"] == "infiniteyou" and slots["controlnet.models.0"] == "controlnet"


@pytest.mark.parametrize("which", ["instantx", "xlabs"])
def test_reference_image_steers_the_run_and_scale_zero_is_no_adapter(tiny, which):
    pipe = getattr(tiny, which)
    x = noise(1)
    plain = pipe(latents=x, **RUN)
    off = pipe(latents=x, ipadapter_images=reference_image(1), ipadapter_scale=0.0, **RUN)
    one = pipe(latents=x, ipadapter_images=reference_image(1), ipadapter_scale=0.8, **RUN)
    other = pipe(latents=x, ipadapter_images=reference_image(2), ipadapter_scale=0.8, **RUN)
    assert torch.equal(off, plain)
    # The tiny adapter moves latents of size ~2 by O(0.1); another reference image moves them again.
    assert (one - plain).abs().max().item() > 1e-2
    assert (one - other).abs().max().item() > 1e-3


def test_several_reference_images_act_together(tiny):
    """All images' tokens form one sequence (DiffSynth): attention over the same tokens twice equals attention over
    them once, and a second, different image changes the result."""
    x = noise(2)
    one = tiny.instantx(latents=x, ipadapter_images=[reference_image(3)], **RUN)
    same_twice = tiny.instantx(latents=x, ipadapter_images=[reference_image(3), reference_image(3)], **RUN)
    two = tiny.instantx(latents=x, ipadapter_images=[reference_image(3), reference_image(4)], **RUN)
    # Duplicated keys leave each softmax unchanged up to rounding (measured 5e-7).
    assert (same_twice - one).abs().max().item() < 1e-5
    assert (two - one).abs().max().item() > 1e-3


@pytest.mark.slow
def test_instantx_run_with_true_cfg_matches_diffsynths_own_unit_and_loop(tiny):
    """Two reference images under true CFG: DiffSynth's own IP-Adapter unit (`FluxImageUnit_IPAdapter`: 384 bicubic
    resize, its preprocess_image, SigLIP pooled features from transformers, its FluxIpAdapter per branch, zeros on
    the negative one) and its `model_fn_flux_image` per step and branch, Euler steps over SIGMAS, against our
    pipeline on the same tiny files. At ipadapter_scale 1.0 (DiffSynth's negative branch always runs at 1.0)."""
    from tests.diffsynth_ref import diffsynth_flux, diffsynth_ipadapter, tiny_diffsynth_dit, tiny_diffsynth_ipadapter
    from tests.tiny_dit import diffsynth_state_dict
    model_fn, _, _ = diffsynth_flux()  # imports diffsynth first (with its placeholders; skips without it)
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.pipelines.flux_image import FluxImageUnit_IPAdapter
    _, converter = diffsynth_ipadapter()
    images, x, cfg = [reference_image(8, (50, 30)), reference_image(9, (24, 40))], noise(9), 2.0
    got = tiny.instantx(latents=x, ipadapter_images=images, ipadapter_scale=1.0, cfg_scale=cfg,
                        negative_prompt="blurry", **RUN)

    their_ip = tiny_diffsynth_ipadapter(num_tokens=3, num_blocks=4, image_dim=24)
    their_ip.load_state_dict(converter(torch.load(tiny.tmp / "ip-adapter.bin", weights_only=True)))
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(tiny.ref.transformer), strict=True)

    class SigLIP:  # transformers' own vision tower of the same SigLIP file
        def __call__(self, pixel_values):
            return tiny.siglip.vision_model(pixel_values=pixel_values)

    fake = types.SimpleNamespace(ipadapter=their_ip, ipadapter_image_encoder=SigLIP(), device="cpu",
                                 torch_dtype=torch.float32, load_models_to_device=lambda names: None)
    fake.preprocess_image = types.MethodType(BasePipeline.preprocess_image, fake)
    with torch.no_grad():
        _, posi, nega = FluxImageUnit_IPAdapter().process(
            fake, {"ipadapter_images": images, "ipadapter_scale": 1.0, "cfg_scale": cfg}, {}, {})
        sides = {}
        for side, prompt, ip in (("posi", RUN["prompt"], posi), ("nega", "blurry", nega)):
            emb, pooled, _ = tiny.ref.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
            sides[side] = (emb, pooled, ip["ipadapter_kwargs_list"])
        latents, sigmas = x.clone(), SIGMAS + [0.0]
        for step, sigma in enumerate(SIGMAS):
            preds = {side: model_fn(dit=their_dit, latents=latents, timestep=torch.tensor([sigma * 1000]),
                                    prompt_emb=emb, pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]),
                                    text_ids=torch.zeros(1, emb.shape[1], 3), ipadapter_kwargs_list=ip)
                     for side, (emb, pooled, ip) in sides.items()}
            v = preds["nega"] + cfg * (preds["posi"] - preds["nega"])
            latents = latents + v * (sigmas[step + 1] - sigma)
    without = tiny.instantx(latents=x, cfg_scale=cfg, negative_prompt="blurry", **RUN)
    # Measured 2.1e-6 on latents up to 6.1; the adapter moves them by 0.56, and feeding the negative branch the
    # positive encoding instead of zeros moves them by 0.12.
    assert (got - latents).abs().max().item() < 1e-4
    assert (got - without).abs().max().item() > 1e-2


def test_true_cfg_gives_the_negative_branch_a_zero_encoding(tiny, monkeypatch):
    """Under cfg_scale != 1 the adapter is bound for both branches, the negative one from all-zero features."""
    import flux_core.pipeline as pipeline_module
    seen = []
    real = pipeline_module.bind_ipadapter

    def spy(model, features, *args, branches=("positive",), **kwargs):
        seen.append((features.clone(), tuple(branches)))
        return real(model, features, *args, branches=branches, **kwargs)

    monkeypatch.setattr(pipeline_module, "bind_ipadapter", spy)
    x = noise(3)
    tiny.instantx(latents=x, ipadapter_images=reference_image(5), cfg_scale=2.0, **RUN)
    tiny.instantx(latents=x, ipadapter_images=reference_image(5), **RUN)
    assert [b for _, b in seen] == [("positive", "negative"), ("positive",)]
    adapter = real(tiny.instantx.ipadapter, seen[0][0], tiny.instantx.dit.num_heads, (2, 2),
                   branches=("positive", "negative"))
    zero = real(tiny.instantx.ipadapter, torch.zeros_like(seen[0][0]), tiny.instantx.dit.num_heads, (2, 2))
    for (k, v), (k0, v0) in zip(adapter.keys_values["negative"], zero.keys_values["positive"]):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_ipadapter_errors_name_the_parameter_and_the_missing_models(tiny):
    with pytest.raises(RuntimeError, match=r"ipadapter_images need an IP-Adapter and its image encoder, but the "
                                           r"pipeline has no ipadapter and no ipadapter_image_encoder"):
        tiny.infiniteyou(latents=noise(), ipadapter_images=reference_image(), **RUN)
    with pytest.raises(TypeError, match=r"ipadapter_images\[1\] is a str"):
        tiny.instantx(latents=noise(), ipadapter_images=[reference_image(), "face.png"], **RUN)
    with pytest.raises(ValueError, match=r"ipadapter_images=\[\]"):
        tiny.instantx(latents=noise(), ipadapter_images=[], **RUN)
    with pytest.raises(TypeError, match=r"ipadapter_scale='0.5' is a str"):
        tiny.instantx(latents=noise(), ipadapter_images=reference_image(), ipadapter_scale="0.5", **RUN)


def test_an_ipadapter_with_the_wrong_encoder_or_for_another_dit_is_refused(tiny):
    mixed = tiny.pipeline("ip-adapter.bin", "clip-vision")
    with pytest.raises(ValueError, match=r"ipadapter_images: the InstantX FLUX.1-dev IP-Adapter \(SigLIP image "
                                         r"encoder\) takes 24-wide features from a SigLIP vision encoder, but the "
                                         r"image encoder is a CLIP vision encoder giving 16-wide ones"):
        mixed(latents=noise(), ipadapter_images=reference_image(), **RUN)
    write_instantx(instantx_state_dict(seed=1, blocks=3), tiny.tmp / "other-dit.bin")
    other = tiny.pipeline("other-dit.bin", "siglip")
    with pytest.raises(ValueError, match=r"the IP-Adapter has 3 blocks of width 32, but the DiT needs 4 of width 32 "
                                         r"\(2 double \+ 2 single blocks\): it was made for another model"):
        other(latents=noise(), ipadapter_images=reference_image(), **RUN)


def infusenet_input(**kwargs):
    return ControlNetInput(controlnet_id=0, image=black(), processor_id="None", **kwargs)


def test_identity_acts_through_infusenet_with_its_guidance(tiny):
    pipe, x = tiny.infiniteyou, noise(4)
    without = pipe(latents=x, controlnet_inputs=[infusenet_input()], **RUN)
    face = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_embedding=face_embedding(1), **RUN)
    other = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_embedding=face_embedding(2), **RUN)
    guided = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_embedding=face_embedding(1),
                  infinityou_guidance=3.0, **RUN)
    assert (face - without).abs().max().item() > 1e-3
    assert (face - other).abs().max().item() > 1e-4
    assert (face - guided).abs().max().item() > 1e-4


def test_a_face_photo_goes_through_the_face_embedder(tiny):
    """`infinityou_id_image` is embedded by `pipe.infinityou_processor` (a stand-in here: insightface is optional)
    and then acts exactly as that embedding passed directly."""
    pipe, x = tiny.infiniteyou, noise(5)
    photo = reference_image(6)

    class StandIn:
        def embed(self, image):
            assert image is photo
            return face_embedding(3)

    pipe.infinityou_processor = StandIn()
    try:
        from_photo = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_image=photo, **RUN)
    finally:
        pipe.infinityou_processor = None
    direct = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_embedding=face_embedding(3), **RUN)
    assert torch.equal(from_photo, direct)


def test_an_identity_without_a_controlnet_input_warns_that_it_has_no_effect(tiny):
    x = noise(6)
    with pytest.warns(InfiniteYouWithoutControlNetWarning, match=r"reaches the DiT only through InfuseNet"):
        out = tiny.infiniteyou(latents=x, infinityou_id_embedding=face_embedding(), **RUN)
    assert torch.equal(out, tiny.infiniteyou(latents=x, **RUN))


def test_an_identity_on_a_union_controlnet_warns(tiny):
    item = ControlNetInput(controlnet_id=1, image=black(), processor_id="depth")
    with pytest.warns(IdentityOnOtherControlNetWarning, match=r"controlnet_inputs\[1\]: ControlNet 1 is a union"):
        tiny.infiniteyou(latents=noise(), controlnet_inputs=[infusenet_input(), item],
                         infinityou_id_embedding=face_embedding(), **RUN)


def test_processor_id_none_string_is_accepted_for_plain_controlnets(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = tiny.infiniteyou(latents=noise(7), controlnet_inputs=[infusenet_input()], **RUN)
    b = tiny.infiniteyou(latents=noise(7), controlnet_inputs=[ControlNetInput(controlnet_id=0, image=black())], **RUN)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(infinityou_id_embedding=torch.zeros(128)), ValueError,
     r"infinityou_id_embedding must be the 512-d ArcFace embedding of one face"),
    (dict(infinityou_id_embedding=face_embedding(), infinityou_id_image=black()), ValueError,
     r"infinityou_id_image and infinityou_id_embedding are both given"),
    (dict(infinityou_id_image="face.png"), TypeError, r"infinityou_id_image must be a PIL.Image"),
    (dict(infinityou_id_embedding=face_embedding(), infinityou_guidance="high"), TypeError,
     r"infinityou_guidance='high' is a str"),
])
def test_identity_errors_name_the_parameter(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny.infiniteyou(latents=noise(), controlnet_inputs=[infusenet_input()], **kwargs, **RUN)


def test_an_identity_without_the_projector_names_the_file_to_add(tiny):
    with pytest.raises(RuntimeError, match=r"InfiniteYou needs its image projector, but the pipeline has none: add "
                                           r"ByteDance/InfiniteYou's image_proj_model.bin"):
        tiny.instantx(latents=noise(), infinityou_id_embedding=face_embedding(), **RUN)


def test_embeddings_as_arrays_and_batched_shapes_are_accepted(tiny):
    pipe, x = tiny.infiniteyou, noise(8)
    a = pipe(latents=x, controlnet_inputs=[infusenet_input()], infinityou_id_embedding=face_embedding(4), **RUN)
    b = pipe(latents=x, controlnet_inputs=[infusenet_input()],
             infinityou_id_embedding=np.asarray(face_embedding(4))[None], **RUN)
    assert torch.equal(a, b)


def test_the_ipadapters_keys_and_values_count_in_the_memory_check(tiny, monkeypatch):
    """The keys/values bound for the whole run are counted with the DiT's activations (flux_core.run_cost
    .ipadapter_kv_bytes): per block a key and a value of 3 tokens per image at width 32, per CFG branch."""
    from flux_core import pipeline as pipeline_module
    seen = []
    monkeypatch.setattr(pipeline_module, "check_run_cost",
                        lambda *args, held_bytes=0, **kwargs: seen.append((args[7], held_bytes)))
    tiny.instantx(latents=noise(), ipadapter_images=[reference_image(1), reference_image(2)], cfg_scale=2.0, **RUN)
    tiny.instantx(latents=noise(), **RUN)
    (what, held), (_, none) = seen
    assert held == 2 * 4 * 3 * 2 * 32 * 2 * 4   # k and v x 4 blocks x 3 tokens x 2 images x width x 2 branches x fp32
    assert none == 0 and "2 ipadapter_images" in what
