"""Nexus-Gen (flux_core.models.nexus_gen, flux_core.nexus_gen, flux_core.loading.nexus_gen_kind) against
DiffSynth-Studio 2.1.12's own code on tiny random weights, float32.

What runs as DiffSynth wrote it on transformers 5.x, and what stands in, is listed in tests/diffsynth_nexus_gen_ref.py:
the adapter runs as it is; the merger's forward, layer, attention and rotary code run in a tiny subclass whose
__init__ hands them a plain config (DiffSynth's __init__ reads transformers 4.49's config layout); the AR model's
file does not import on transformers 5.x, so its `get_rope_index` and `forward` are compiled from DiffSynth's source
and run over transformers 5.x's Qwen2.5-VL modules, with DiffSynth's `get_target_embeddings` (which imports) on top.
The processor is the tiny one of tests/tiny_qwen_vl.py (Qwen's processor files are not available offline): a
byte-level tokenizer built in the test with Qwen's special-token ids, transformers' own Qwen2-VL image processor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model, load_models
from flux_core.loading.nexus_gen_kind import HEAD_KEYS
from flux_core.math import pack_latents
from flux_core.model_config import ModelConfig
from flux_core.model_state import state_of
from flux_core.models.nexus_gen import (NexusGenAdapter, NexusGenAdapterParams, NexusGenAutoregressiveModel,
                                        NexusGenImageEmbeddingMerger, NexusGenMergerParams, merger_position_ids)
from flux_core.nexus_gen import (REFERENCE_MAX_PIXELS, bound_image, editing_messages, editing_text_ids,
                                 generation_messages, model_inputs, nexus_gen_encoder, smart_resize)
from flux_core.pipeline import FluxImagePipeline
from tests.diffsynth_nexus_gen_ref import (diffsynth_ar_config, diffsynth_editing_text_ids, diffsynth_messages,
                                           diffsynth_nexus_gen, diffsynth_target_embeddings, merger_key_shapes,
                                           tiny_diffsynth_merger)
from tests.tiny_nexus_gen import AR_HIDDEN, MERGER_SIZES, MROPE, TEXT_DIM, make_ar, white, write_nexus_gen_files
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
from tests.tiny_qwen_vl import PREPROCESSOR_CONFIG, make_processor, published_state_dict, randomised, sample_image

# Parity bound (relative to the output's largest magnitude): measured 0 (AR model) to 3.3e-7 (merger); every
# mistake tried moves the outputs by more than 1e-2 (see each test).
PARITY = 1e-4
H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
# Image bound (pixels in [0, 1]) against diffusers, as tests/test_pipeline.py's: there measured 8e-7 to 7e-6.
IMAGE_TOLERANCE = 5e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def processor():
    """The tiny processor with the bounds of its preprocessor_config.json (DiffSynth loads Nexus-GenV2's processor/
    folder with its own settings)."""
    return make_processor(min_pixels=PREPROCESSOR_CONFIG["min_pixels"], max_pixels=PREPROCESSOR_CONFIG["max_pixels"])


@pytest.fixture(scope="module")
def ar():
    return make_ar()


# ------------------------------------------------------------------------------------------------------ adapters
def test_generation_adapter_matches_diffsynth_and_loads_its_names_strictly():
    p, _, _ = diffsynth_nexus_gen()
    reference = randomised(p.NexusGenAdapter(AR_HIDDEN, TEXT_DIM), 1, scale=0.3)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = NexusGenAdapter(NexusGenAdapterParams.from_state_dict_shapes(shapes)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 81, AR_HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert relative(ours(x), reference(x)) <= PARITY  # measured 0
    # Nexus-GenV2's sizes: DiffSynth's default adapter and ours have the same names and shapes.
    with torch.device("meta"):
        full = {k: tuple(v.shape) for k, v in p.NexusGenAdapter().state_dict().items()}
        assert {k: tuple(v.shape) for k, v in NexusGenAdapter().state_dict().items()} == full
    assert NexusGenAdapterParams.from_state_dict_shapes(full) == NexusGenAdapterParams()


@pytest.mark.parametrize("with_reference", [True, False])
def test_editing_merger_matches_diffsynth(with_reference):
    """DiffSynth's merger code (see the module doc for the stand-in config) vs ours on the same weights, loaded
    strictly from DiffSynth's names. Mistakes it catches (measured): positions on the image's
    own grid instead of the 72x72 base grid 0.16, a causal layer 0.51, the reference's positions equal to the
    target's 0.035."""
    reference = randomised(tiny_diffsynth_merger(**MERGER_SIZES), 3, scale=0.3)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    params = NexusGenMergerParams.from_state_dict_shapes(shapes, {"num_heads": 2, "mrope_section": MROPE})
    ours = NexusGenImageEmbeddingMerger(params).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    target, target_grid = torch.randn(1, 81, AR_HIDDEN, generator=g), torch.tensor([[1, 18, 18]])
    ref_embeds, ref_grid = torch.randn(1, 77, AR_HIDDEN, generator=g), torch.tensor([[1, 14, 22]])
    args = (target, target_grid, ref_embeds, ref_grid) if with_reference else (target, target_grid)
    with torch.no_grad():
        expected, got = reference(*args), ours(*args)
    assert got.shape == expected.shape == (1, 81 + 77 * with_reference, TEXT_DIM)
    assert relative(got, expected) <= PARITY  # measured 3.3e-7


def test_merger_has_nexus_gen_v2s_names_and_shapes_and_sizes_come_from_them():
    full = merger_key_shapes()
    assert NexusGenMergerParams.from_state_dict_shapes(full) == NexusGenMergerParams()
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in NexusGenImageEmbeddingMerger().state_dict().items()}
    assert ours == full
    # The sizes README quotes: the merger 359 M parameters (0.67 GiB in bf16), the generation adapter 31.5 M (60 MiB).
    merger = sum(math.prod(shape) for shape in full.values())
    with torch.device("meta"):
        adapter = sum(p.numel() for p in NexusGenAdapter().parameters())
    assert round(merger / 1e6) == 359 and round(2 * merger / 2**30, 2) == 0.67
    assert round(adapter / 1e6, 1) == 31.5 and round(2 * adapter / 2**20) == 60
    tiny = {k: tuple(v.shape) for k, v in tiny_diffsynth_merger(**MERGER_SIZES).state_dict().items()}
    with pytest.raises(ValueError, match="mrope_section"):  # a head size other than 128 needs its sections
        NexusGenMergerParams.from_state_dict_shapes(tiny, {"num_heads": 2})


def test_merger_positions_spread_each_image_over_the_72_grid():
    """Literal positions: an 18x18 grid (252 px) gives 9x9 tokens at rows/cols 0, 4, ..., 32 (72/18 = 4)."""
    ids = merger_position_ids(torch.tensor([[1, 18, 18]]), NexusGenMergerParams())
    assert ids.shape == (3, 1, 81)
    assert torch.equal(ids[0, 0], torch.zeros(81))
    assert torch.equal(ids[1, 0].view(9, 9)[:, 0], torch.arange(9.0) * 4)
    assert torch.equal(ids[2, 0].view(9, 9)[0], torch.arange(9.0) * 4)


# ------------------------------------------------------------------------------------------ autoregressive model
@pytest.mark.parametrize("editing", [False, True])
def test_target_embeddings_match_diffsynth(ar, processor, editing):
    """The 81 target embeddings (and the reference image's embeddings) as DiffSynth's get_target_embeddings computes
    them: one forward with the placeholder's tokens replaced by the prefill embeddings, the head's output one
    position before each. Mistakes it catches (measured relative): no shift by one 1.56, the placeholder's own vision
    embeddings instead of the prefill ones 1.30, plain 1-D positions instead of get_rope_index's 0.58."""
    prompt = "a red fox in the snow"
    image = sample_image(200, 120)  # bounded to 196 x 112: a 14 x 8 patch grid, 28 merged tokens
    images = [bound_image(image), white()] if editing else [white()]
    expected, expected_ref, expected_grid = diffsynth_target_embeddings(ar, ar.vision_head, ar.image_prefill_embeds,
                                                                        processor, images,
                                                                        diffsynth_messages(prompt, editing))
    inputs = model_inputs(processor, prompt, image if editing else None)
    assert torch.equal(inputs["image_grid_thw"], expected_grid)
    target, reference = ar.target_embeddings(**inputs)
    assert target.shape == expected.shape == (81, AR_HIDDEN)
    assert relative(target, expected) <= PARITY  # measured 0
    assert reference.shape == expected_ref.shape == (28 if editing else 0, AR_HIDDEN)
    if editing:
        assert relative(reference, expected_ref) <= PARITY  # measured 0


# -------------------------------------------------------------------------------------------- request preparation
def test_reference_image_bound_with_qwens_smart_resize_rounding():
    """Literal sizes worked out from qwen_vl_utils' documented rounding (nearest multiple of 28; floor after scaling
    down to 262640 pixels; ceiling after scaling up to 3136), and agreement with transformers' own smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_resize
    assert smart_resize(512, 512) == (504, 504)       # 18.3 -> 18 multiples; 254016 <= 262640
    assert smart_resize(768, 1024) == (420, 588)      # 783216 > max: beta 1.7304, 443.8 -> 420, 591.8 -> 588
    assert smart_resize(1024, 1024) == (504, 504)     # beta 1.9746: 518.6 -> 504
    assert smart_resize(20, 30) == (56, 84)           # 28 x 28 < 3136: beta 2.29, 45.8 -> 56, 68.6 -> 84
    for h, w in [(512, 512), (768, 1024), (1080, 1920), (333, 777), (64, 900), (20, 30), (3000, 200)]:
        assert smart_resize(h, w) == transformers_resize(h, w, factor=28, min_pixels=3136, max_pixels=262640)
        rh, rw = smart_resize(h, w)
        assert rh % 28 == rw % 28 == 0 and rh * rw <= REFERENCE_MAX_PIXELS
    assert bound_image(sample_image(1024, 768)).size == (588, 420)
    with pytest.raises(ValueError, match="nexus_gen_reference_image: its aspect ratio 250"):
        smart_resize(10, 2500)


def test_messages_are_diffsynths():
    for prompt in ("a cat", "put <image> on a beach"):
        assert editing_messages(prompt) == diffsynth_messages(prompt, True)
        assert generation_messages(prompt) == diffsynth_messages(prompt, False)


@pytest.mark.parametrize("latent, target, ref", [((6, 8), (1, 18, 18), (1, 14, 22)), ((64, 64), (1, 18, 18),
                                                                                    (1, 36, 36))])
def test_editing_text_ids_are_diffsynths(latent, target, ref):
    """Against FluxImageUnit_NexusGen.get_editing_text_ids itself (float32 latents, batch 2)."""
    latents = torch.zeros(2, 16, *latent)
    expected = diffsynth_editing_text_ids(latents, target, ref)
    got = editing_text_ids(latent[0], latent[1], target, ref, batch=2)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got[0, -1, 0] == 1 and got[0, 0, 0] == 0   # reference tokens at index 1, target tokens at 0


def test_editing_ids_are_rounded_to_the_pipelines_dtype_as_diffsynths_are(ar, processor):
    """DiffSynth makes the ids in the latents' dtype (the pipeline's torch_dtype): with a bfloat16 merger the encoder's
    ids equal get_editing_text_ids on bfloat16 latents (row 3 of an 18-row grid over 6 latent rows: 1.0 exactly, row
    1: 0.333984 instead of 0.333333)."""
    from flux_core.nexus_gen import NexusGenEncoder
    merger = NexusGenImageEmbeddingMerger(NexusGenMergerParams.from_state_dict_shapes(
        {k: tuple(v.shape) for k, v in tiny_diffsynth_merger(**MERGER_SIZES).state_dict().items()},
        {"num_heads": 2, "mrope_section": MROPE})).to(torch.bfloat16)
    encoder = NexusGenEncoder(ar, processor, merger, None, sample_image(200, 120), H // 8, W // 8)
    tokens, ids = encoder.encode_one("make it snow")
    expected = diffsynth_editing_text_ids(torch.zeros(1, 16, H // 8, W // 8, dtype=torch.bfloat16), (1, 18, 18),
                                          (1, 8, 14))
    assert tokens.dtype == torch.bfloat16 and ids.dtype == torch.float32
    assert torch.equal(ids, expected.float())
    assert not torch.equal(ids, editing_text_ids(H // 8, W // 8, (1, 18, 18), (1, 8, 14)))


# ------------------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def files(tmp_path_factory, ar):
    """A tiny Nexus-Gen as published: the AR model's folder (shards, config.json, processor files), the generation
    and editing decoders (.bin, with DiffSynth's adapter / merger keys), FLUX.1-dev's VAE and text encoders."""
    tmp = tmp_path_factory.mktemp("nexus")
    ref = make_diffusers_pipeline(tmp)
    out = dict(tmp=tmp, ref=ref, **write_nexus_gen_files(tmp / "decoders", ref.transformer, tmp / "Nexus-Gen", ar))
    out["flux"] = [ModelConfig(path=str(tmp / FOLDER_NAME / sub)) for sub in ("vae", "text_encoder", "text_encoder_2")]
    return out


@pytest.mark.parametrize("suffix", ["", "_st"])
def test_decoders_as_published_load_the_dit_and_their_adapter(files, suffix):
    """Each decoder holds the DiT (`pipe.dit.*`) and its adapter; DiffSynth's converters pick the same adapter
    weights from the same file (its NexusGen*StateDictConverter functions)."""
    from diffsynth.utils.state_dict_converters.nexus_gen_projector import (NexusGenAdapterStateDictConverter,
                                                                           NexusGenMergerStateDictConverter)
    generation = load_models(files["generation" + suffix], torch_dtype=torch.float32)
    editing = load_models(files["editing" + suffix], torch_dtype=torch.float32)
    assert set(generation) == {"dit", "nexus_gen_adapter"} and set(editing) == {"dit", "nexus_gen_merger"}
    raw = (torch.load(files["generation"], weights_only=True), torch.load(files["editing"], weights_only=True))
    adapter_sd, merger_sd = NexusGenAdapterStateDictConverter(raw[0]), NexusGenMergerStateDictConverter(raw[1])
    for ours, theirs in ((generation["nexus_gen_adapter"], adapter_sd), (editing["nexus_gen_merger"], merger_sd)):
        got = ours.state_dict()
        assert set(got) == set(theirs) and all(torch.equal(got[k], theirs[k]) for k in got)
    merger_params = editing["nexus_gen_merger"].params
    assert merger_params.num_heads == 2 and merger_params.mrope_section == MROPE


def test_ar_model_as_published_loads_as_nexus_gen_not_as_plain_qwen_vl(files, ar):
    from flux_core.loading.loader import detect
    from flux_core.loading.files import open_state_dict
    assert [d.kind.name for d in detect(open_state_dict(files["ar_folder"]))] == ["nexus_gen"]
    loaded = load_model(files["ar_folder"], torch_dtype=torch.float32)
    assert type(loaded) is NexusGenAutoregressiveModel and loaded.num_image_tokens == 81
    assert loaded.lm_head is None   # the file's lm_head.weight is not read (1.0 GiB in the 7B, never used)
    expected = ar.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    for name, buffer in ar.named_buffers():  # rotary frequencies re-created after the meta build
        assert torch.equal(dict(loaded.named_buffers())[name], buffer)
    stored = set().union(*(load_file(str(f)) for f in files["ar_folder"].glob("model-*.safetensors")))
    assert {"visual.patch_embed.proj.weight", "model.embed_tokens.weight", "lm_head.weight", *HEAD_KEYS} <= stored


def test_nexus_gen_v2s_published_ar_model_builds_without_its_config_json():
    """DiffSynth's hard-coded Nexus-GenV2 config (read from its source), built on transformers 5 on the meta device,
    its weights named as published (transformers 4.49's names): our kind, without a config.json (a ModelScope
    download of `model*.safetensors` has none), builds the same names and shapes, heads, rotary sections and windows."""
    from types import SimpleNamespace
    from transformers import Qwen2_5_VLConfig
    from flux_core.loading.nexus_gen_kind import build_nexus_gen, select_nexus_gen
    config = Qwen2_5_VLConfig(**diffsynth_ar_config())
    with torch.device("meta"):
        theirs = NexusGenAutoregressiveModel(config)
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    published = {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.")
                  else k.removeprefix("model.")): SimpleNamespace(shape=v) for k, v in shapes.items()}
    published["lm_head.weight"] = SimpleNamespace(shape=(config.text_config.vocab_size, config.text_config.hidden_size))
    layout, sd = select_nexus_gen(published)
    with torch.device("meta"):
        ours = build_nexus_gen(sd, {})
    assert layout == "published" and {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    for part in ("text_config", "vision_config"):
        a, b = getattr(ours.config, part).to_dict(), getattr(config, part).to_dict()
        for key in ("num_attention_heads", "num_key_value_heads", "rms_norm_eps", "num_heads", "window_size",
                    "fullatt_block_indexes", "patch_size", "spatial_merge_size", "tokens_per_second"):
            assert a.get(key) == b.get(key), (part, key)
    rope = [{k: c.text_config.rope_parameters[k] for k in ("rope_type", "rope_theta", "mrope_section")}
            for c in (ours.config, config)]
    assert rope[0] == rope[1]
    # Its size, as README quotes it (the LM head is not loaded): 7.76 G parameters, 14.5 GiB in bf16, 7.2 GiB with FP8
    # weight matrices.
    params = list(ours.parameters())
    total, matrices = sum(v.numel() for v in params), sum(v.numel() for v in params if v.dim() >= 2)
    assert round(total / 1e9, 2) == 7.76
    assert round(2 * total / 2**30, 1) == 14.5 and round((matrices + 2 * (total - matrices)) / 2**30, 1) == 7.2


def test_ar_model_in_transformers_5_names_loads_too(files, ar, tmp_path):
    """A state dict saved from transformers 5 (`model.visual.*`, `model.language_model.*`) with the head, beside the
    AR folder's config.json."""
    import shutil
    shutil.copy(files["ar_folder"] / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in ar.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path / "model.safetensors", torch_dtype=torch.float32)
    assert state_of(loaded).layout == "transformers"
    got, expected = loaded.state_dict(), ar.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_ar_weights_of_other_sizes_without_their_config_are_refused_saying_what_to_add(tmp_path, ar):
    path = tmp_path / "model.safetensors"
    save_file(published_state_dict(ar), str(path))
    with pytest.raises(CheckpointError, match=r"cannot build a Nexus-Gen autoregressive model .* not Qwen2.5-VL-7B's "
                                              r"3584 / 1280.* config.json beside the weights"):
        load_model(path)


# ----------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipes(files):
    """FluxImagePipelines as a user loads Nexus-Gen: one decoder (its DiT and adapter), the AR model's folder (its
    processor in processor/ beside it), FLUX.1-dev's VAE and text encoders."""
    def load(decoder):
        return FluxImagePipeline.from_pretrained(
            torch_dtype=torch.float32, device="cpu",
            model_configs=[ModelConfig(path=str(decoder)), ModelConfig(path=str(files["ar_folder"])), *files["flux"]])
    return {"generation": load(files["generation"]), "editing": load(files["editing"])}


EDIT_ARGS = dict(prompt="make it snow", negative_prompt="blurry", cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS[:2],
                 t5_sequence_length=16, output_type="latent", progress_bar_cmd=None)


def noise(seed=0):
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def dit_inputs_of(pipe, monkeypatch) -> list[dict]:
    """Records the keyword arguments of every DiT call of the pipeline."""
    calls = []
    forward = pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda **kw: calls.append(kw) or forward(**kw))
    return calls


def test_text_to_image_matches_diffusers_given_diffsynths_conditioning(files, pipes, ar):
    """The whole run against diffusers' FluxPipeline (true CFG) fed what DiffSynth computes: prompt tokens =
    DiffSynth's adapter on DiffSynth's target embeddings (text ids 0), pooled = CLIP-L of the prompt, negative =
    CLIP-L + T5 of the negative prompt. Mistakes it catches (measured in pixels): the negative branch through
    Nexus-Gen too 0.32, the positive side's pooled vector of another prompt (the empty one) 0.27."""
    pipe, ref = pipes["generation"], files["ref"]
    prompt, negative = "a red fox in the snow", "blurry"
    target, _, _ = diffsynth_target_embeddings(ar, ar.vision_head, ar.image_prefill_embeds, pipe.nexus_gen_processor,
                                               [white()], diffsynth_messages(prompt, False))
    with torch.no_grad():
        prompt_emb = files["adapter"](target[None])
        _, pooled, _ = ref.encode_prompt(prompt, prompt_2=None, max_sequence_length=16)
    x = noise()
    expected = ref(prompt_embeds=prompt_emb, pooled_prompt_embeds=pooled, negative_prompt=negative,
                   true_cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS, num_inference_steps=len(SIGMAS),
                   latents=pack_latents(x), guidance_scale=3.5, max_sequence_length=16, output_type="np").images
    got = pipe(prompt=prompt, negative_prompt=negative, cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS, latents=x,
               t5_sequence_length=16, output_type="np", progress_bar_cmd=None)
    assert np.abs(got - expected).max() <= IMAGE_TOLERANCE  # measured 1e-6
    other = pipe(prompt="a blue car", negative_prompt=negative, cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS,
                 latents=x, t5_sequence_length=16, output_type="np", progress_bar_cmd=None)
    assert np.abs(got - other).max() > 1e-2  # the prompt matters through the AR model


def test_editing_gives_the_dit_diffsynths_merger_tokens_and_text_ids(files, pipes, ar, monkeypatch):
    """Editing: the positive DiT calls get DiffSynth's merger output on DiffSynth's target and reference embeddings,
    with DiffSynth's get_editing_text_ids; the negative calls T5 of the negative prompt at text ids 0; both the
    pooled CLIP-L vector of their own prompt (as DiffSynth's prompt unit computes before Nexus-Gen replaces the
    positive tokens). Text ids left at 0 (no get_editing_text_ids) fail the ids check."""
    pipe, ref = pipes["editing"], files["ref"]
    prompt, negative, image = "make it snow", "blurry", sample_image(200, 120)
    calls = dit_inputs_of(pipe, monkeypatch)
    pipe(prompt=prompt, negative_prompt=negative, cfg_scale=2.0, nexus_gen_reference_image=image, height=H, width=W,
         sigmas=SIGMAS[:2], latents=noise(), t5_sequence_length=16, output_type="latent", progress_bar_cmd=None)
    assert len(calls) == 4  # 2 steps x (positive, negative)
    target, reference, grids = diffsynth_target_embeddings(ar, ar.vision_head, ar.image_prefill_embeds,
                                                           pipe.nexus_gen_processor, [bound_image(image), white()],
                                                           diffsynth_messages(prompt, True))
    with torch.no_grad():
        tokens = files["merger"](target[None], grids[1:2], reference[None], grids[0:1])
        _, pooled, _ = ref.encode_prompt(prompt, prompt_2=None, max_sequence_length=16)
        negative_emb, negative_pooled, _ = ref.encode_prompt(negative, prompt_2=None, max_sequence_length=16)
    ids = diffsynth_editing_text_ids(torch.zeros(1, 16, H // 8, W // 8), grids[1].tolist(), grids[0].tolist())
    positive, nega = calls[0], calls[1]
    assert positive["txt"].shape == (1, 81 + 28, TEXT_DIM)
    assert relative(positive["txt"], tokens) <= PARITY  # measured 0
    assert torch.equal(positive["txt_ids"], ids)
    assert relative(positive["y"], pooled) <= PARITY
    assert relative(nega["txt"], negative_emb) <= PARITY and not nega["txt_ids"].any()
    assert relative(nega["y"], negative_pooled) <= PARITY
    # The run's memory estimate counts what the DiT got: 81 + 28 tokens (the longer branch: T5's are 16 here).
    assert pipe.conditioning_encoder(16, None, image, H, W).max_tokens == 81 + 28
    assert pipes["generation"].conditioning_encoder(16, None, None, H, W).max_tokens == 81


def test_a_batch_of_prompts_is_encoded_prompt_by_prompt(pipes):
    """Two prompts: each through the AR model on its own (DiffSynth encodes one); the first image equals its single
    run, the editing text ids repeat per image."""
    pipe = pipes["editing"]
    args = {**EDIT_ARGS, "nexus_gen_reference_image": sample_image(200, 120), "cfg_scale": 1.0}
    del args["prompt"]
    both = pipe(prompt=["make it snow", "make it rain"], latents=torch.cat([noise(5), noise(6)]), **args)
    first = pipe(prompt="make it snow", latents=noise(5), **args)
    assert (both[:1] - first).abs().max() <= 1e-5     # measured 0
    assert (both[0] - both[1]).abs().max() > 1e-2
    encoder = pipe.conditioning_encoder(16, None, sample_image(200, 120), H, W)
    embeds = encoder.encode(["make it snow", "make it rain"], "positive")
    assert embeds.prompt_emb.shape == (2, 81 + 28, TEXT_DIM) and torch.equal(embeds.text_ids[0], embeds.text_ids[1])


# ------------------------------------------------------------------------------------------------- missing models
def test_a_nexus_gen_request_without_its_models_names_every_missing_slot(files, pipes):
    kwargs = dict(height=H, width=W, sigmas=SIGMAS[:1], t5_sequence_length=16, output_type="latent",
                  progress_bar_cmd=None)
    # Editing with the generation decoder's pipeline: no merger.
    with pytest.raises(RuntimeError, match=r"the pipeline has no nexus_gen_editing_adapter\. "):
        pipes["generation"](prompt="x", nexus_gen_reference_image=sample_image(), **kwargs)
    # Text-to-image with the editing decoder's pipeline: no generation adapter.
    with pytest.raises(RuntimeError, match=r"the pipeline has no nexus_gen_generation_adapter\. "):
        pipes["editing"](prompt="x", **kwargs)
    # A reference image without Nexus-Gen loaded at all: every Nexus-Gen slot is named at once.
    plain = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                              model_configs=[ModelConfig(path=str(files["generation"])),
                                                             *files["flux"]])
    with pytest.raises(RuntimeError, match=r"has no nexus_gen, nexus_gen_processor, nexus_gen_editing_adapter\. "):
        plain(prompt="x", nexus_gen_reference_image=sample_image(), **kwargs)


def test_nexus_gen_encoder_names_what_it_lacks(ar):
    with pytest.raises(ValueError, match=r"editing \(a reference image is given\) needs nexus_gen_processor, "
                                         r"editing_adapter, clip_t5"):
        nexus_gen_encoder(ar, None, torch.nn.Identity(), None, None, sample_image(), 6, 8)
    with pytest.raises(ValueError, match=r"text-to-image needs generation_adapter"):
        nexus_gen_encoder(ar, object(), None, torch.nn.Identity(), object(), None, 6, 8)


# ------------------------------------------------------------------------------------------------------ low VRAM
def load_editing_pipeline(files, **ar_options) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(files["editing"])), ModelConfig(path=str(files["ar_folder"]), **ar_options),
        *files["flux"]])




@pytest.mark.parametrize("vram_limit", [None, 0])
def test_vram_managed_editing_gives_the_same_result_and_frees_the_ar_model_after_encoding(files, vram_limit):
    """The AR model, the merger and the rest under the VRAM manager (on a simulated device): resident (no limit) or
    every layer streamed (vram_limit=0). The same latent as unmanaged; while the DiT runs none of the AR model's
    weights are on the device; nothing is left there after the run."""
    from flux_core.vram import SimulatedDevice
    pipe = load_editing_pipeline(files)
    args = dict(EDIT_ARGS, nexus_gen_reference_image=sample_image(200, 120), latents=noise(5))
    unmanaged = pipe(**args)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=vram_limit, vram_buffer=0.0, device=device)
    assert {"nexus_gen", "nexus_gen_editing_adapter"} <= set(vram.models)
    during_dit = []
    pipe.dit.register_forward_pre_hook(lambda *_: during_dit.append(len(vram.models["nexus_gen"].resident)))
    managed = pipe(**args)
    assert (managed - unmanaged).abs().max() <= 1e-5   # measured 0 (the same float32 weights, only moved)
    assert during_dit and not any(during_dit)
    assert device.live_bytes == 0


def test_fp8_stored_ar_model_encodes(files):
    """The AR model's weight matrices stored in float8_e4m3fn (ModelConfig offload_dtype), computed in the pipeline's
    dtype through its VRAM manager: the editing run works and stays near the float32 one (measured 2.0e-2 of the
    latent's magnitude: FP8's 3-bit mantissa on every weight of the tiny model)."""
    args = dict(EDIT_ARGS, nexus_gen_reference_image=sample_image(200, 120), latents=noise(5))
    full = load_editing_pipeline(files)(**args)
    pipe = load_editing_pipeline(files, offload_dtype=torch.float8_e4m3fn)
    stored = {p.dtype for n, p in pipe.nexus_gen.named_parameters() if n.endswith("proj.weight") and p.dim() == 2}
    assert stored == {torch.float8_e4m3fn}
    fp8 = pipe(**args)
    assert torch.isfinite(fp8).all() and relative(fp8, full) <= 0.1
