"""EliGen Entity (FluxCore) and the sampler's handling of `fluxcore_eligen_entities`, on tiny models: the same latents
as FluxImagePipeline's eligen_entity_prompts / eligen_entity_masks (our library, which tests/test_eligen.py checks
against DiffSynth-Studio's own code; here the node layer is checked against it), with masks as ComfyUI MASK tensors,
the negative branch, inpaint mode, native nodes in the chain, the memory check, the example workflow's wiring, and
every error naming the Entity node and the input."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flux_core.eligen import EliGenAdapter, eligen_mask_bytes
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from nodes import NODE_CLASS_MAPPINGS
from nodes.conditioning import FluxCoreTextEncode
from nodes.eligen_nodes import ENTITIES_KEY, EntityPayload, FluxCoreEliGenEntity
from nodes.loaders import NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from nodes.vae_nodes import FluxCoreVAEEncode
from tests.native_standins import standins
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir

H, W = 48, 64          # latent 6x8
LT = 16                # t5_sequence_length of the prompts (the entities take the prompt's)
PROMPT, NEGATIVE = "a cat and a dog", "blurry"
TEXTS = ["a red cat", "a blue dog"]


def painted(box, size=(W, H)) -> Image.Image:
    """A mask picture: black with `box` (left, top, right, bottom) white."""
    image = Image.new("L", size)
    ImageDraw.Draw(image).rectangle(box, fill=255)
    return image


def as_mask(image: Image.Image) -> torch.Tensor:
    """A mask picture as the ComfyUI MASK LoadImageMask gives: (1, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)[None]


def masks_pil(size=(W, H)):
    """A speckled left half (which pixel nearest-neighbour sampling picks matters) and a rectangle whose edges fall
    inside 2x2 token patches and between latent pixels; at another resolution of the same shape too."""
    speckle = (np.random.default_rng(0).random((H, W)) > 0.6).astype(np.uint8) * 255
    speckle[:, W // 2:] = 0
    out = [Image.fromarray(speckle).convert("L"), painted((30, 0, 63, 21))]
    return [m.resize(size, Image.NEAREST) for m in out] if size != (W, H) else out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_eligen")
    models_dir, _ = make_models_dir(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"]))])
    yield dict(dir=models_dir, pipe=pipe, **loaded)
    mp.undo()


def encode(models, text, length=LT):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=length)[0]


def entity(models, conditioning, text, mask, unique_id=None):
    return FluxCoreEliGenEntity().add(conditioning, models["te"], text, mask, unique_id=unique_id)[0]


def chain(models, conditioning, texts, masks, ids=None):
    for i, (text, mask) in enumerate(zip(texts, masks)):
        conditioning = entity(models, conditioning, text, mask, None if ids is None else ids[i])
    return conditioning


def sample(models, positive, negative, steps=3, cfg=1.0, latent=None, denoise=1.0, **kwargs):
    latent = latent if latent is not None else FluxCoreEmptyLatent().generate(W, H, 1)[0]
    return FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=3, steps=steps, cfg=cfg,
                                    denoise=denoise, **kwargs)[0]["samples"]


def pipeline_latent(models, steps=3, cfg=1.0, **kwargs):
    """The pipeline's final latent as raw VAE latent (what the sampler's LATENT holds)."""
    with torch.no_grad():
        scaled = models["pipe"](prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=cfg, height=H, width=W, seed=3,
                                num_inference_steps=steps, t5_sequence_length=LT, output_type="latent",
                                progress_bar_cmd=None, **kwargs)
    return models["vae"].model.module.to_comfy_latent(scaled)


# ---------------------------------------------------------------- contract
def test_the_node_is_registered_with_its_inputs_and_tooltips():
    cls = NODE_CLASS_MAPPINGS["FluxCoreEliGenEntity"]
    assert cls.RETURN_TYPES == ("CONDITIONING",) and cls.CATEGORY.startswith("FluxCore/")
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["conditioning", "text_encoders", "text", "mask"]
    assert spec["required"]["mask"][0] == "MASK" and spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    for name, (_, options) in spec["required"].items():
        assert options.get("tooltip"), name
    assert FluxCoreSampler.INPUT_TYPES()["optional"]["eligen_inpaint"][1]["default"] is False


def test_the_entity_is_encoded_by_the_node_to_the_prompts_length(models):
    conditioning = encode(models, PROMPT, length=24)
    out = entity(models, conditioning, "a red cat", as_mask(masks_pil()[1]), unique_id="7")
    payload, = out[0][1][ENTITIES_KEY]
    assert payload.embeds.shape == (1, 24, conditioning[0][0].shape[-1]) and payload.node_id == "7"
    expected = models["pipe"].encode_prompt(["a red cat"], 24).prompt_emb
    assert torch.equal(payload.embeds, expected)
    assert ENTITIES_KEY not in conditioning[0][1]      # the upstream conditioning is left as it was
    assert torch.equal(out[0][0], conditioning[0][0])


# ---------------------------------------------------------------- the same latents as the pipeline
@pytest.mark.parametrize("size", [(W, H), (2 * W, 2 * H)], ids=["latent-size x8", "twice that"])
def test_entity_chain_equals_the_pipelines_eligen_entities(models, size):
    """MASK tensors in the nodes, PIL masks in the pipeline (the same pictures): the same regions, the same run."""
    pils = masks_pil(size)
    got = sample(models, chain(models, encode(models, PROMPT), TEXTS, [as_mask(m) for m in pils]), encode(models, ""))
    expected = pipeline_latent(models, eligen_entity_prompts=TEXTS, eligen_entity_masks=pils)
    plain = pipeline_latent(models)
    # Measured 0 (the same float32 computations, latents up to 13); the entities move the latent by 1.2 here, so an
    # entity left out, or a mask resized onto other latent pixels, is far outside the bound.
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2


def test_masks_from_tensors_in_the_pipeline_too(models):
    """The MASK tensors themselves given to the pipeline: the same run."""
    masks = [as_mask(m) for m in masks_pil()]
    got = sample(models, chain(models, encode(models, PROMPT), TEXTS, masks), encode(models, ""))
    expected = pipeline_latent(models, eligen_entity_prompts=TEXTS, eligen_entity_masks=masks)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0


def test_entities_on_the_negative_prompt_are_diffsynths_enable_on_negative(models):
    """cfg > 1: entities chained onto 'negative' act on the negative branch. With the negative prompt as their text
    and the positive entities' masks they are DiffSynth's eligen_enable_on_negative; on 'positive' only, the
    negative branch runs without EliGen (on_negative off)."""
    masks = [as_mask(m) for m in masks_pil()]
    positive = chain(models, encode(models, PROMPT), TEXTS, masks)
    negative = chain(models, encode(models, NEGATIVE), [NEGATIVE] * 2, masks)
    on = sample(models, positive, negative, cfg=2.5)
    off = sample(models, positive, encode(models, NEGATIVE), cfg=2.5)
    kw = dict(cfg=2.5, eligen_entity_prompts=TEXTS, eligen_entity_masks=masks_pil())
    expected_on = pipeline_latent(models, eligen_enable_on_negative=True, **kw)
    expected_off = pipeline_latent(models, eligen_enable_on_negative=False, **kw)
    # Measured 0 and 0; on and off differ by 0.97 here.
    assert (on - expected_on).abs().max().item() <= 1e-5
    assert (off - expected_off).abs().max().item() <= 1e-5
    assert (on - off).abs().max().item() > 1e-2


def test_the_tiled_dit_crops_the_entity_regions_as_the_pipeline(models):
    """tiled_dit: each tile gets its crop of the regions, as the pipeline's tiled=True."""
    masks = [as_mask(m) for m in masks_pil()]
    got = sample(models, chain(models, encode(models, PROMPT), TEXTS, masks), encode(models, ""), tiled_dit=True,
                 tile_size=4, tile_stride=2)
    expected = pipeline_latent(models, eligen_entity_prompts=TEXTS, eligen_entity_masks=masks, tiled=True,
                               tile_size=4, tile_stride=2)
    untiled = pipeline_latent(models, eligen_entity_prompts=TEXTS, eligen_entity_masks=masks)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0
    assert (got - untiled).abs().max().item() > 1e-3     # the tiles do matter here: measured 1.2


def test_each_branch_gets_its_own_entities(models, monkeypatch):
    """A regional negative prompt: one entity on 'negative' only contributes to the negative branch, with its own
    embedding and mask; the positive branch has two of its own. Under cfg 1 the negative side is not used."""
    from flux_core import eligen
    seen = []
    original = EliGenAdapter.contribute

    def spy(self, inputs, call):
        out = original(self, inputs, call)
        if out is not None:
            seen.append((call.branch, self.prompts[call.branch].shape[1], self.grids.sum().item()))
        return out
    monkeypatch.setattr(eligen.EliGenAdapter, "contribute", spy)
    masks = [as_mask(m) for m in masks_pil()]
    positive = chain(models, encode(models, PROMPT), TEXTS, masks)
    negative = entity(models, encode(models, NEGATIVE), "a green cat", masks[1])
    sample(models, positive, negative, steps=2, cfg=2.0)
    regions = [int((torch.nn.functional.interpolate(m[None], size=(H // 8, W // 8), mode="nearest-exact") > 0.5)
                   .sum()) for m in masks]
    assert seen == [("positive", 2, sum(regions)), ("negative", 1, regions[1])] * 2
    seen.clear()
    sample(models, positive, negative, steps=2, cfg=1.0)
    assert [s[0] for s in seen] == ["positive"] * 2


def test_inpaint_mode_equals_the_pipelines_eligen_enable_inpaint(models):
    """eligen_inpaint on a VAE-encoded image (denoise 0.8) is the pipeline's eligen_enable_inpaint with that image as
    input_image and the same MASK tensors: outside the entities' regions the image is kept. (The same masks as PIL
    pictures give the pipeline another region: flux_core.eligen.inpaint_region resizes a tensor bicubic without
    antialiasing, PIL with it; 6 of 48 latent pixels differ here. Reported; the node layer passes the MASK on.)"""
    source = Image.effect_noise((W, H), 60).convert("RGB")
    pixels = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255)[None]
    latent, = FluxCoreVAEEncode().encode(pixels, models["vae"])
    masks = masks_pil()
    positive = chain(models, encode(models, PROMPT), TEXTS, [as_mask(m) for m in masks])
    got = sample(models, positive, encode(models, NEGATIVE), cfg=2.0, latent=latent, denoise=0.8,
                 eligen_inpaint=True)
    expected = pipeline_latent(models, cfg=2.0, input_image=source, denoising_strength=0.8, eligen_entity_prompts=TEXTS,
                               eligen_entity_masks=[as_mask(m) for m in masks], eligen_enable_inpaint=True)
    without = sample(models, positive, encode(models, NEGATIVE), cfg=2.0, latent=latent, denoise=0.8)
    # Measured 0; inpaint mode moves the latent by 18.7 (outside the regions, where it keeps the image).
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - without).abs().max().item() > 1e-2
    from flux_core.eligen import inpaint_region
    outside = ~inpaint_region([as_mask(m) for m in masks], H // 8, W // 8).expand_as(got)
    assert 0 < outside.sum() < outside.numel()
    # Measured 1.2e-7 (the raw latent of the input image, back from the scaled space) where it moved by 18.7 without.
    assert (got - latent["samples"])[outside].abs().max().item() < 1e-5


def test_native_nodes_carry_the_entities_and_nothing_is_encoded_when_sampling(models, monkeypatch, caplog):
    """FluxGuidance after the entities and ConditioningZeroOut on the negative keep the list (the sampler warns about
    no unknown entry); the sampler encodes no text: the Entity nodes did."""
    from nodes import conditioning as conditioning_module, eligen_nodes
    native = standins(models["dir"], models["dir"])
    masks = [as_mask(m) for m in masks_pil()]
    positive, = native["FluxGuidance"]().append(chain(models, encode(models, PROMPT), TEXTS, masks), 3.5)
    negative, = native["ConditioningZeroOut"]().zero_out(encode(models, NEGATIVE))

    def refuse(*args, **kwargs):
        raise AssertionError("the sampler encoded text")
    monkeypatch.setattr(eligen_nodes, "encode_prompt", refuse)
    monkeypatch.setattr(conditioning_module, "encode_prompt", refuse)
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        got = sample(models, positive, negative)
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    expected = pipeline_latent(models, eligen_entity_prompts=TEXTS, eligen_entity_masks=masks_pil())
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0


def test_the_sampler_counts_the_entities_and_their_masks_in_its_memory_check(models, monkeypatch):
    """As the pipeline: the entity prompts lengthen the text, and each branch with entities keeps an attention mask
    over its whole sequence for the run."""
    from nodes import sampler as sampler_module
    calls = []
    monkeypatch.setattr(sampler_module, "check_run_cost",
                        lambda *args, held_bytes=0, **kwargs: calls.append((args[4], args[7], held_bytes)))
    masks = [as_mask(m) for m in masks_pil()]
    positive = chain(models, encode(models, PROMPT), TEXTS, masks)
    negative = entity(models, encode(models, NEGATIVE), "a green cat", masks[0])
    sample(models, positive, negative, steps=1, cfg=2.0)
    sample(models, encode(models, PROMPT), encode(models, NEGATIVE), steps=1, cfg=2.0)
    (text, what, held), (plain_text, _, none) = calls
    image = (H // 16) * (W // 16)
    dtype = next(models["dit"].model.module.parameters()).dtype
    assert plain_text == LT and none == 0
    assert text == 3 * LT   # the positive branch's prompt and its two entities
    assert held == eligen_mask_bytes(3 * LT + image, dtype) + eligen_mask_bytes(2 * LT + image, dtype)
    assert "EliGen entities (2 on 'positive' and 1 on 'negative'" in what


# ---------------------------------------------------------------- errors name the node and the input
def test_the_entity_node_refuses_what_it_cannot_use_all_at_once(models):
    with pytest.raises(NodeInputError) as e:
        entity(models, encode(models, PROMPT), "  ", torch.ones(2, H, W), unique_id="12")
    message = str(e.value)
    assert message.startswith("FluxCoreEliGenEntity #12, ")
    assert "input 'text': empty" in message and "input 'mask': expected one MASK" in message
    assert "(2, 48, 64)" in message
    with pytest.raises(NodeInputError, match="input 'conditioning': empty conditioning"):
        entity(models, [], "a cat", torch.ones(H, W))


def test_mask_errors_name_each_entity_node_at_sampling(models):
    """A mask of another aspect ratio and an empty mask (LoadImage's mask of a picture without alpha: 64x64 zeros)
    on two Entity nodes: one message, each problem naming its node by id and text."""
    positive = chain(models, encode(models, PROMPT), ["a red cat", "a blue dog", "a bird"],
                     [torch.ones(1, 64, 64), torch.zeros(1, H, W), as_mask(masks_pil()[1])], ids=["4", "5", "6"])
    with pytest.raises(NodeInputError) as e:
        sample(models, positive, encode(models, ""))
    message = str(e.value)
    assert message.startswith("FluxCoreSampler, input 'positive': ")
    assert "the mask of EliGen Entity (FluxCore) #4 ('a red cat') is 64x64 but the image is 64x48" in message
    assert "the mask of EliGen Entity (FluxCore) #5 ('a blue dog') has no white pixel" in message
    assert "#6" not in message


def test_entities_of_one_branch_must_share_a_length(models):
    mask = as_mask(masks_pil()[1])
    first = entity(models, encode(models, PROMPT, length=LT), "a red cat", mask, unique_id="3")
    # a native node replaced the tokens by longer ones: the next entity takes the new length
    longer = [[torch.cat([first[0][0], first[0][0]], dim=1), first[0][1]]]
    both = entity(models, longer, "a blue dog", mask, unique_id="9")
    with pytest.raises(NodeInputError, match=r"input 'positive': its entities were encoded to different numbers of "
                                             r"T5 tokens \(EliGen Entity \(FluxCore\) #3 \('a red cat'\): 16, "
                                             r"EliGen Entity \(FluxCore\) #9 \('a blue dog'\): 32\)"):
        sample(models, both, encode(models, ""))


def test_inpaint_mode_needs_positive_entities_and_an_encoded_image(models):
    mask = as_mask(masks_pil()[1])
    negative_only = entity(models, encode(models, NEGATIVE), "a green cat", mask)
    with pytest.raises(NodeInputError) as e:
        sample(models, encode(models, PROMPT), negative_only, cfg=2.0, eligen_inpaint=True)
    assert "input 'eligen_inpaint': no EliGen Entity (FluxCore) on 'positive'" in str(e.value)
    assert "input 'latent_image': all zeros (an empty latent)" in str(e.value)   # both at once


def test_a_foreign_entry_under_the_key_is_refused(models):
    positive = encode(models, PROMPT)
    positive[0][1][ENTITIES_KEY] = ["a cat"]
    with pytest.raises(NodeInputError, match=r"input 'positive': fluxcore_eligen_entities\[0\] is a str; only "
                                             r"EliGen Entity \(FluxCore\) makes these entries"):
        sample(models, positive, encode(models, ""))


def test_entities_encoded_for_another_model_are_refused(models):
    positive = encode(models, PROMPT)
    payload = EntityPayload("a cat", torch.zeros(1, LT, 7), as_mask(masks_pil()[1])[0], node_id="2")
    positive[0][1][ENTITIES_KEY] = [payload]
    with pytest.raises(NodeInputError, match=r"EliGen Entity \(FluxCore\) #2 \('a cat'\) was encoded to tokens "
                                             r"of width 7"):
        sample(models, positive, encode(models, ""))


# ---------------------------------------------------------------- the example workflow
def test_the_example_workflows_input_images_are_what_their_script_draws():
    from example_workflows.make_eligen_masks import HERE, REGIONS, draw
    for name, (left, top, right, bottom) in REGIONS.items():
        with Image.open(HERE / name) as im:
            assert im.mode == "RGBA" and np.array_equal(np.asarray(im), np.asarray(draw(REGIONS[name]))), \
                "run python example_workflows/make_eligen_masks.py"
            alpha = np.asarray(im.getchannel("A"))
        assert (alpha[top:bottom, left:right] == 0).all() and (alpha == 0).sum() == (right - left) * (bottom - top)
        assert (HERE / name).stat().st_size < 16 * 1024


def test_the_example_workflow_runs_and_equals_the_pipeline(tmp_path):
    """fluxcore_eligen.json through the UI -> API conversion and the core-node stand-ins on tiny FLUX-shaped files,
    made small (256x256, 2 steps, 32 T5 tokens; the file's own settings run in tests/test_workflows.py and
    tests/test_comfyui_server.py): the same latent as the pipeline given the Entity nodes' prompts and LoadImage's
    masks of the shipped images (1 where transparent)."""
    from example_workflows.build_workflows import HERE
    from tests.tiny_flux_files import set_up_like_a_user
    from tests.workflow_harness import load_workflow, run_prompt, specs_from_classes, ui_to_api
    files = set_up_like_a_user(tmp_path)
    classes = {**NODE_CLASS_MAPPINGS, **standins(files["input"], files["output"])}
    small = {"FluxCoreSampler": {"steps": 2}, "FluxCoreEmptyLatent": {"width": 256, "height": 256},
             "FluxCoreTextEncode": {"t5_sequence_length": 32}}
    prompt = ui_to_api(load_workflow(HERE / "fluxcore_eligen.json"), specs_from_classes(classes), small)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXCORE_MODELS_DIR", str(tmp_path / "models"))
        result = run_prompt(prompt, classes)
    sampler, = [nid for nid, n in prompt.items() if n["class_type"] == "FluxCoreSampler"]
    got = result.outputs[sampler][0]["samples"]
    # The chain, from the sampler's positive back to the prompt: [first entity, second entity].
    chain, nid = [], prompt[sampler]["inputs"]["positive"][0]
    while prompt[nid]["class_type"] == "FluxCoreEliGenEntity":
        chain.insert(0, prompt[nid]["inputs"])
        nid = prompt[nid]["inputs"]["conditioning"][0]
    encode = prompt[nid]["inputs"]
    assert len(chain) == 2 and encode["text"].startswith("A wooden kitchen table")
    masks = []
    for inputs in chain:
        load = prompt[inputs["mask"][0]]
        assert load["class_type"] == "LoadImage" and inputs["mask"][1] == 1
        with Image.open(files["input"] / load["inputs"]["image"]) as im:
            masks.append(1 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255))
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(files[k])) for k in ("dit", "clip", "t5", "vae")])
    kw = dict(prompt=encode["text"], embedded_guidance=encode["guidance"], t5_sequence_length=32, height=256,
              width=256, seed=prompt[sampler]["inputs"]["seed"], num_inference_steps=2, output_type="latent",
              progress_bar_cmd=None, sigma_shift=prompt[sampler]["inputs"]["sigma_shift"])
    with torch.no_grad():
        expected = pipe(eligen_entity_prompts=[c["text"] for c in chain], eligen_entity_masks=masks, **kw)
        plain = pipe(**kw)
    raw = pipe.vae.to_comfy_latent
    # Measured 0 (the same float32 computations, latents up to 68); without the entities it differs by 3.4.
    assert (got - raw(expected)).abs().max().item() <= 1e-4
    assert (got - raw(plain)).abs().max().item() > 1e-2
