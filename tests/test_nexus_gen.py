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

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model, load_models
from flux_core.model_config import ModelConfig
from flux_core.models.nexus_gen import (NexusGenAdapter, NexusGenAdapterParams, NexusGenAutoregressiveModel,
                                        NexusGenImageEmbeddingMerger, NexusGenMergerParams, merger_position_ids)
from flux_core.nexus_gen import (REFERENCE_MAX_PIXELS, bound_image, editing_messages, editing_text_ids,
                                 generation_messages, model_inputs, nexus_gen_encoder, smart_resize)
from flux_core.pipeline import FluxImagePipeline
from flux_core.vl_processor import load_vl_processor
from tests.diffsynth_nexus_gen_ref import (diffsynth_editing_text_ids, diffsynth_messages, diffsynth_nexus_gen,
                                           diffsynth_target_embeddings, merger_key_shapes, tiny_diffsynth_merger)
from tests.tiny_dit import write_nexus_gen_dit
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
from tests.tiny_qwen_vl import (PREPROCESSOR_CONFIG, TINY_TEXT, make_processor, published_state_dict, sample_image,
                                tiny_qwen_vl_config, write_qwen_vl_folder)

# The tiny AR model (tests/tiny_qwen_vl.py): hidden 16, heads of 8 with multimodal-RoPE sections 1 + 1 + 2. The tiny
# DiT (tests/tiny_dit.py) reads text tokens of width 32.
AR_HIDDEN, TEXT_DIM, MROPE = TINY_TEXT["hidden_size"], 32, (1, 1, 2)
MERGER_SIZES = dict(hidden=AR_HIDDEN, heads=2, kv_heads=1, intermediate=32, mrope=MROPE, out_channel=TEXT_DIM)
# Parity bound (relative to the output's largest magnitude): measured 0 (AR model) to 3.3e-7 (merger); every
# mistake tried moves the outputs by more than 1e-2 (see each test).
PARITY = 1e-4
H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def make_ar(seed: int = 0) -> NexusGenAutoregressiveModel:
    return randomised(NexusGenAutoregressiveModel(tiny_qwen_vl_config()), seed)


@pytest.fixture(scope="module")
def processor():
    """The tiny processor with the bounds of its preprocessor_config.json (DiffSynth loads Nexus-GenV2's processor/
    folder with its own settings)."""
    return make_processor(min_pixels=PREPROCESSOR_CONFIG["min_pixels"], max_pixels=PREPROCESSOR_CONFIG["max_pixels"])


@pytest.fixture(scope="module")
def ar():
    return make_ar()


def white(side=252):
    return Image.new("RGB", (side, side), (255, 255, 255))


# ------------------------------------------------------------------------------------------------------ adapters
def test_generation_adapter_matches_diffsynth_and_loads_its_names_strictly():
    p, _, _ = diffsynth_nexus_gen()
    reference = randomised(p.NexusGenAdapter(AR_HIDDEN, TEXT_DIM), 1)
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
    reference = randomised(tiny_diffsynth_merger(**MERGER_SIZES), 3)
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
