"""The bundled demo model (flux_core/demo) draws what it is asked: this checks the VAE, both text encoders, the
sampler and the trainer that made the DiT together, on the files as shipped, through the normal loaders.

Acceptance (issue 14): for the held-out scenes (combinations of shape, colour, position and background the DiT
never saw), at least 90 % of the pictures put the shape's colour on its region and the background colour around
it; with the prompts swapped (each picture made from another scene's prompt) the same measurement fails, so the
score comes from the prompts and not from the measurement. The stripes LoRA draws stripes at strength 1 and leaves
the pictures as they are at strength 0.
"""
import numpy as np
import pytest
import torch

import flux_core.demo as demo
from flux_core.demo.quality import prompt_agreement
from flux_core.demo.scenes import Scene, held_out_scenes, stripe_strength, training_scenes
from flux_core.pipeline import FluxImagePipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe():
    return FluxImagePipeline.from_demo()


def test_the_test_scenes_are_held_out_of_training():
    held = held_out_scenes()
    assert len(held) >= 20
    # every held-out scene is a new combination of words the DiT has read (each value appears in training)
    seen = training_scenes()
    for scene in held:
        for field in ("shape", "colour", "position", "background"):
            assert any(getattr(s, field) == getattr(scene, field) for s in seen)


def test_the_demo_draws_held_out_prompts(pipe):
    result = prompt_agreement(pipe)
    failed = [p for p, ok in zip(result.prompts, result.agreed) if not ok]
    # Measured on the shipped model: see README (demo section) and the build log; the issue asks for 90 %.
    assert result.score >= 0.9, f"{result.score:.0%} agree; failed: {failed}"


def test_with_the_prompts_swapped_the_measurement_fails(pipe):
    swapped = prompt_agreement(pipe, shift=1)
    # A model that ignored its prompt would score the same here as above. Each picture is measured against the
    # scene before its prompt's; they share both colours in their places only by chance.
    assert swapped.score < 0.3, f"{swapped.score:.0%} agree with the wrong prompt"


def circles_with_lora(pipe, scenes: list[Scene], alpha: float | None):
    """The scenes' pictures with the stripes LoRA at strength alpha (None: without it), as arrays."""
    pipe.clear_lora()
    if alpha is not None:
        pipe.load_lora(pipe.dit, str(demo.lora_path()), alpha=alpha)
    images = pipe(prompt=[s.prompt() for s in scenes], seed=0, progress_bar_cmd=None)
    pipe.clear_lora()
    return images


def test_the_stripes_lora_draws_stripes_at_strength_one_and_nothing_at_zero(pipe):
    circles = [s for s in held_out_scenes() if s.shape == "circle"][:4]
    circles += [Scene("circle", "red", "left", "blue"), Scene("circle", "yellow", "center", "black")]
    plain = circles_with_lora(pipe, circles, None)
    at_zero = circles_with_lora(pipe, circles, 0.0)
    at_one = circles_with_lora(pipe, circles, 1.0)
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(plain, at_zero))
    before = [stripe_strength(image, scene) for image, scene in zip(plain, circles)]
    after = [stripe_strength(image, scene) for image, scene in zip(at_one, circles)]
    # Grey-level deviation down each circle's middle, the same circle without and with the LoRA. Measured on the
    # shipped files: +9 to +72 (a drawn striped circle measures 24 to 60, a drawn plain one 0; the demo's plain
    # blobs 1 to 16, where an edge crosses the window). A LoRA trained 150 steps instead of 1000 raised them by 3.0 to
    # 73, three of the six by less than 6.
    assert all(b - a > 5 for a, b in zip(before, after)), list(zip(before, after))


def test_the_demo_files_fit_the_package_budget():
    assert sum(p.stat().st_size for p in demo.shipped_files()) <= 25e6   # the "at most 25 MB in all"
    assert not demo.missing_files()


def test_the_demo_pipeline_is_the_normal_one(pipe):
    kinds = {slot: entry.kind for slot, entry in pipe.loaded_from.items()}
    assert kinds == {"dit": "dit", "vae": "vae", "text_encoder_1": "clip", "text_encoder_2": "t5"}
    assert pipe.dit.params.guidance_embed is False and pipe.dit.params.head_dim == 64
    assert pipe.tokenizer_2.model_max_length == 32
    assert pipe.dit.params.context_in_dim == pipe.text_encoder_2.config.d_model
    assert next(pipe.dit.parameters()).dtype == torch.float32
