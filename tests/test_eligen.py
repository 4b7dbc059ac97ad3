"""EliGen (flux_core.eligen) against DiffSynth-Studio 2.1.12's own code: its mask preprocessing
(`FluxImageUnit_EntityControl.preprocess_masks`), its attention mask (`FluxDiT.process_entity_masks` /
`construct_mask`), its DiT forward with entities (`model_fn_flux_image`) and a whole run with and without the
entities on the negative branch; inpaint mode; Kontext references and appended prompt tokens in the mask; every
input error."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flux_core.adapters import DiTCall
from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs
from flux_core.eligen import (EliGenInputError, eligen_adapter, eligen_attention_mask, eligen_mask_bytes, entity_grid,
                              inpaint_region, patch_regions)
from flux_core.image import pil_to_tensor
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.sampling import predict_velocity
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

F32 = torch.float32
H, W = 48, 64                      # latent 6x8, 12 image tokens
SIGMAS = [1.0, 0.75, 0.5, 0.25]
LT = 16                            # t5_sequence_length
RUN = dict(prompt="a cat and a dog", height=H, width=W, sigmas=SIGMAS, embedded_guidance=3.5, t5_sequence_length=LT,
           output_type="latent", progress_bar_cmd=None)
ENTITY_PROMPTS = ["a red cat", "a blue dog"]
# Measured below: 1.5e-6 to 3.0e-6 on outputs up to ~7, where the entities move them by 0.8 to 1.2. Planted mistakes
# seen to fail these tests: the global prompt allowed to see the entity prompts; masks resized bilinear instead of
# nearest-neighbour (the speckled mask lands on other latent pixels).
TOL = 1e-4


def painted(box, size=(W, H), mode="RGB"):
    """A mask image: black, with `box` (left, top, right, bottom) in white."""
    image = Image.new(mode, size)
    ImageDraw.Draw(image).rectangle(box, fill="white" if mode == "RGB" else 255)
    return image


def entity_masks():
    """A speckled region (which pixel nearest-neighbour sampling picks matters) and an odd rectangle (its edges fall
    inside 2x2 token patches and between latent pixels)."""
    speckle = (np.random.default_rng(0).random((H, W)) > 0.6).astype(np.uint8) * 255
    speckle[:, W // 2:] = 0
    return [Image.fromarray(speckle).convert("RGB"), painted((30, 0, 63, 21))]


def noise(seed=0):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.diffsynth_ref import tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    tmp = tmp_path_factory.mktemp("eligen")
    ref = make_diffusers_pipeline(tmp)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=F32, device="cpu",
                                             model_configs=[ModelConfig(path=str(tmp / FOLDER_NAME))])
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(ref.transformer), strict=True)
    return types.SimpleNamespace(ref=ref, pipe=pipe, their_dit=their_dit)


def their_masks(masks):
    """DiffSynth's own EntityControl unit's mask preprocessing, (1, N, 1, h, w) in the pipe dtype."""
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.pipelines.flux_image import FluxImageUnit_EntityControl
    fake = types.SimpleNamespace(device="cpu", torch_dtype=F32)
    fake.preprocess_image = types.MethodType(BasePipeline.preprocess_image, fake)
    out = FluxImageUnit_EntityControl().preprocess_masks(fake, masks, H // 8, W // 8, 1)
    return torch.cat(out, dim=0).unsqueeze(0)


def their_prompt(tiny, prompts):
    emb, pooled, _ = tiny.ref.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=LT)
    return emb, pooled


def our_contribution(adapter, emb, pooled, branch="positive", extras=None):
    inputs = prepare_dit_inputs(noise(), 0.5, PromptEmbeds(emb, pooled), 3.5, F32, extras)
    return inputs, adapter.contribute(inputs, DiTCall(sigma=0.5, branch=branch))


def test_entity_grid_equals_diffsynths_preprocessing():
    masks = entity_masks()
    theirs = their_masks(masks)[0, :, 0] > 0
    ours = torch.stack([entity_grid(m, H // 8, W // 8) for m in masks])
    assert torch.equal(ours, theirs)
    # The same picture as a greyscale image, or as a ComfyUI MASK tensor (float, (1, H, W)), lands on the same grid
    # (DiffSynth's own preprocessing takes RGB images only).
    greys = [m.convert("L") for m in masks]
    assert torch.equal(torch.stack([entity_grid(m, H // 8, W // 8) for m in greys]), theirs)
    tensors = [torch.from_numpy(np.asarray(m, dtype=np.float32) / 255)[None] for m in greys]
    assert torch.equal(torch.stack([entity_grid(t, H // 8, W // 8) for t in tensors]), theirs)


def test_attention_mask_equals_diffsynths_process_entity_masks(tiny):
    masks = entity_masks()
    emb, pooled = their_prompt(tiny, "a cat and a dog")
    entity_emb, _ = their_prompt(tiny, ENTITY_PROMPTS)
    with torch.no_grad():
        _, _, expected = tiny.their_dit.process_entity_masks(
            torch.zeros(1, 12, 32), emb, entity_emb[None], their_masks(masks), torch.zeros(1, LT, 3),
            torch.zeros(1, 12, 3), repeat_dim=16)
    _, contribution = our_contribution(eligen_adapter(entity_emb, masks, H, W), emb, pooled)
    assert contribution.attention_mask.shape == expected.shape == (1, 1, 3 * LT + 12, 3 * LT + 12)
    assert torch.equal(contribution.attention_mask, expected)
    assert torch.equal(contribution.txt, torch.cat([entity_emb[0:1], entity_emb[1:2], emb], dim=1))


def their_velocity(tiny, latents, sigma, emb, pooled, entities=None):
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    eligen = {}
    if entities is not None:
        eligen = dict(entity_prompt_emb=entities[0], entity_masks=entities[1])
    with torch.no_grad():
        return model_fn(dit=tiny.their_dit, latents=latents, timestep=torch.tensor([sigma * 1000]), prompt_emb=emb,
                        pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]), text_ids=torch.zeros(1, LT, 3),
                        **eligen)


def test_dit_call_with_entities_equals_diffsynth(tiny):
    masks, x = entity_masks(), noise(3)
    emb, pooled = their_prompt(tiny, "a cat and a dog")
    entity_emb, _ = their_prompt(tiny, ENTITY_PROMPTS)
    expected = their_velocity(tiny, x, 0.6, emb, pooled, (entity_emb[None], their_masks(masks)))
    without = their_velocity(tiny, x, 0.6, emb, pooled)
    with torch.no_grad():
        got = predict_velocity(tiny.pipe.dit, x, DiTCall(sigma=0.6), PromptEmbeds(emb, pooled), 3.5,
                               adapters=[eligen_adapter(entity_emb, masks, H, W)])
    # Measured 1.5e-6 on outputs up to 7.1; the entities move the output by 0.83.
    assert (got - expected).abs().max().item() < TOL
    assert (expected - without).abs().max().item() > 1e-2


@pytest.mark.parametrize("on_negative", [False, True])
def test_run_with_true_cfg_equals_diffsynths_loop(tiny, on_negative):
    """Euler steps over SIGMAS with DiffSynth's model_fn_flux_image per branch; the negative branch gets the negative
    prompt in every entity only with eligen_enable_on_negative (DiffSynth's EntityControl unit)."""
    masks, x, cfg = entity_masks(), noise(5), 2.5
    got = tiny.pipe(latents=x, cfg_scale=cfg, negative_prompt="blurry", eligen_entity_prompts=ENTITY_PROMPTS,
                    eligen_entity_masks=masks, eligen_enable_on_negative=on_negative, **RUN)
    posi, nega = their_prompt(tiny, RUN["prompt"]), their_prompt(tiny, "blurry")
    entity_emb, _ = their_prompt(tiny, ENTITY_PROMPTS)
    posi_entities = (entity_emb[None], their_masks(masks))
    nega_entities = (nega[0][:, None].repeat(1, 2, 1, 1), their_masks(masks)) if on_negative else None
    latents, sigmas = x.clone(), SIGMAS + [0.0]
    for step, sigma in enumerate(SIGMAS):
        p = their_velocity(tiny, latents, sigma, *posi, posi_entities)
        n = their_velocity(tiny, latents, sigma, *nega, nega_entities)
        latents = latents + (n + cfg * (p - n)) * (sigmas[step + 1] - sigma)
    # Measured 2.2e-6 / 3.0e-6 (off / on the negative branch) on latents up to 5.8; the entities move them by ~1.
    assert (got - latents).abs().max().item() < TOL
    plain = tiny.pipe(latents=x, cfg_scale=cfg, negative_prompt="blurry", **RUN)
    assert (got - plain).abs().max().item() > 1e-2


def test_inpaint_keeps_the_input_image_outside_the_entities(tiny):
    """eligen_enable_inpaint: outside the union of the masks each step's velocity heads for the input image's latent,
    so the final latent there is that latent (Euler on (x_t - x0) / sigma lands on x0 at sigma 0); inside, the entities
    change it."""
    masks = entity_masks()
    source = Image.effect_noise((W, H), 60).convert("RGB")
    x0 = tiny.pipe.encode_image(pil_to_tensor(source))
    got = tiny.pipe(latents=noise(6), input_image=source, eligen_entity_prompts=ENTITY_PROMPTS,
                    eligen_entity_masks=masks, eligen_enable_inpaint=True, cfg_scale=2.0, **RUN)
    region = inpaint_region(masks, H // 8, W // 8).expand_as(got)
    assert 0 < region.sum() < region.numel()
    # Measured 4.8e-7 (rounding of four Euler steps).
    assert (got - x0)[~region].abs().max().item() < 1e-5
    assert (got - x0)[region].abs().max().item() > 1e-1


def test_tiled_run_crops_the_entity_regions(tiny):
    """The tiled DiT gives each tile its crop of the regions: one tile covering the latent is the untiled run, and
    smaller tiles run (each with a mask of its own size)."""
    common = dict(latents=noise(7), eligen_entity_prompts=ENTITY_PROMPTS, eligen_entity_masks=entity_masks(), **RUN)
    untiled = tiny.pipe(**common)
    assert torch.equal(tiny.pipe(tiled=True, tile_size=8, tile_stride=4, **common), untiled)
    tiled = tiny.pipe(tiled=True, tile_size=4, tile_stride=2, **common)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()


def test_mask_with_references_and_appended_prompt_tokens():
    """Kontext reference tokens answer to the global prompt and the image, never to an entity; a global prompt longer
    than the entity prompts (LoRA-Encoder tokens appended) keeps its own segment length."""
    regions = torch.tensor([[True, False, False, True]])
    mask = eligen_attention_mask(regions, [3], global_length=5, reference_tokens=2)[0, 0]
    allowed = mask == 0
    entity, glob, image, refs = slice(0, 3), slice(3, 8), slice(8, 12), slice(12, 14)
    assert allowed[entity, entity].all() and allowed[glob, glob].all()
    assert not allowed[entity, glob].any() and not allowed[glob, entity].any()
    assert torch.equal(allowed[entity, image], regions.expand(3, 4))
    assert torch.equal(allowed[image, entity], regions.T.expand(4, 3))
    assert allowed[glob, image].all() and allowed[glob, refs].all() and allowed[refs, glob].all()
    assert not allowed[entity, refs].any() and not allowed[refs, entity].any()
    assert allowed[image, refs].all() and allowed[refs, image].all() and allowed[image, image].all()
    assert torch.isinf(mask[~allowed]).all()


def test_patch_regions_follow_the_token_order():
    """Tokens are 2x2 patches in rows (flux_core.math.pack_latents); a token is in the region if any pixel is."""
    grid = torch.zeros(1, 4, 6, dtype=torch.bool)
    grid[0, 3, 5] = True       # bottom-right pixel -> the last token
    grid[0, 0, 2] = True       # top row, third column -> token 1
    assert patch_regions(grid)[0].nonzero().flatten().tolist() == [1, 5]


def test_mask_memory_is_reported():
    # 1024x1024 with two entities of 512 tokens and a 512-token prompt: 4096 + 1536 tokens, bf16.
    assert eligen_mask_bytes(4096 + 3 * 512, torch.bfloat16) == 5632 * 5632 * 2
    assert eligen_mask_bytes(100, torch.float32) == 40000


def test_every_input_error_at_once(tiny):
    wide = painted((0, 0, 10, 10), size=(64, 64))
    empty = painted((0, 0, 2, 2))    # a 3x3 white corner vanishes on the 6x8 latent grid
    with pytest.raises(EliGenInputError) as err:
        tiny.pipe(eligen_entity_prompts=["a", "b", 3], eligen_entity_masks=[wide, empty], **RUN)
    message = str(err.value)
    for part in ("3 eligen_entity_prompts but 2 eligen_entity_masks", "eligen_entity_prompts[2] is a int",
                 "eligen_entity_masks[0] is 64x64 but the image is 64x48", "eligen_entity_masks[1] has no white pixel"):
        assert part in message
    with pytest.raises(EliGenInputError, match="eligen_entity_masks is given but eligen_entity_prompts is not"):
        tiny.pipe(eligen_entity_masks=entity_masks(), **RUN)
    with pytest.raises(EliGenInputError, match=r"eligen_entity_masks\[0\] is a str"):
        tiny.pipe(eligen_entity_prompts=["a"], eligen_entity_masks=["mask.png"], **RUN)
    with pytest.raises(ValueError, match="eligen_enable_inpaint=True needs input_image"):
        tiny.pipe(eligen_entity_prompts=ENTITY_PROMPTS, eligen_entity_masks=entity_masks(),
                  eligen_enable_inpaint=True, **RUN)
    with pytest.raises(TypeError, match="eligen_enable_on_negative='yes'"):
        tiny.pipe(eligen_entity_prompts=ENTITY_PROMPTS, eligen_entity_masks=entity_masks(),
                  eligen_enable_on_negative="yes", **RUN)


def test_a_mask_at_another_resolution_of_the_same_shape_is_resized(tiny):
    small = [m.resize((W // 2, H // 2), Image.NEAREST) for m in entity_masks()]
    big = [m.resize((W * 2, H * 2), Image.NEAREST) for m in entity_masks()]
    x = noise(8)
    runs = [tiny.pipe(latents=x, eligen_entity_prompts=ENTITY_PROMPTS, eligen_entity_masks=m, **RUN)
            for m in (entity_masks(), big)]
    assert torch.equal(runs[0], runs[1])
    tiny.pipe(latents=x, eligen_entity_prompts=ENTITY_PROMPTS, eligen_entity_masks=small, **RUN)


def test_the_eligen_lora_in_diffsynths_names_loads_like_any_lora(tiny):
    """The EliGen model is a DiT LoRA in DiffSynth's own names with PEFT's adapter name (`blocks.0.attn.a_to_qkv.
    lora_A.default.weight`, bf16, no alpha). Loaded with pipe.load_lora and run with entities, it equals DiffSynth's
    GeneralLoRALoader fused into DiffSynth's DiT and its model_fn_flux_image with the same entities."""
    import copy
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.utils.lora.general import GeneralLoRALoader
    g = torch.Generator().manual_seed(21)
    sites = ["blocks.0.attn.a_to_qkv", "blocks.1.ff_b.0", "blocks.0.norm1_a.linear", "single_blocks.1.to_qkv_mlp",
             "single_blocks.0.proj_out"]
    lora = {}
    for site in sites:
        out_features, in_features = tiny.their_dit.get_submodule(site).weight.shape
        lora[f"{site}.lora_A.default.weight"] = (torch.randn(4, in_features, generator=g) * 0.3).to(torch.bfloat16)
        lora[f"{site}.lora_B.default.weight"] = (torch.randn(out_features, 4, generator=g) * 0.3).to(torch.bfloat16)
    their_dit = copy.deepcopy(tiny.their_dit)
    GeneralLoRALoader(torch_dtype=F32).fuse_lora_to_base_model(their_dit, lora, alpha=1.0)

    masks, x = entity_masks(), noise(11)
    emb, pooled = their_prompt(tiny, "a cat and a dog")
    entity_emb, _ = their_prompt(tiny, ENTITY_PROMPTS)
    expected = their_velocity(types.SimpleNamespace(their_dit=their_dit), x, 0.7, emb, pooled,
                              (entity_emb[None], their_masks(masks)))
    report = tiny.pipe.load_lora(tiny.pipe.dit, None, state_dict=lora)
    try:
        assert report.loras[0].format == "diffsynth" and len(report.layers) == len(sites)
        with torch.no_grad():
            got = predict_velocity(tiny.pipe.dit, x, DiTCall(sigma=0.7), PromptEmbeds(emb, pooled), 3.5,
                                   adapters=[eligen_adapter(entity_emb, masks, H, W)])
    finally:
        tiny.pipe.clear_lora()
    without_lora = their_velocity(tiny, x, 0.7, emb, pooled, (entity_emb[None], their_masks(masks)))
    # Measured 2.5e-6; the LoRA moves the output by 3.6.
    assert (got - expected).abs().max().item() < TOL
    assert (expected - without_lora).abs().max().item() > 1e-2


def test_inpaint_region_of_a_mask_tensor_equals_its_picture():
    """A ComfyUI MASK (float tensor) and the same picture as a PIL image give the same inpaint region (the tensor is
    resized as its 8-bit picture; torch's bicubic interpolation without antialias moved 6 of the 48 latent pixels)."""
    masks = entity_masks()
    tensors = [torch.from_numpy(np.asarray(m.convert("L"), dtype=np.float32) / 255)[None] for m in masks]
    assert torch.equal(inpaint_region(tensors, H // 8, W // 8), inpaint_region(masks, H // 8, W // 8))
