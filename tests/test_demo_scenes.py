"""The demo's world (flux_core.demo.scenes) and its measurement, on pictures drawn by the code that drew the training
set: the measurement must accept every drawn scene, refuse a scene's picture for another scene, and tell striped
from plain; the shipped tokenizers must read every prompt word as one token."""
import random

from flux_core.demo import MODELS_DIR
from flux_core.demo.build import corpus
from flux_core.demo.scenes import (COLOURS, Scene, agrees, all_scenes, draw, held_out_scenes, stripe_strength,
                                   training_scenes)
from flux_core.models.text_encoders import load_clip_tokenizer, load_t5_tokenizer


def test_every_drawn_scene_agrees_with_itself_and_not_with_its_colours_swapped():
    rng = random.Random(0)
    for scene in all_scenes():
        image = draw(scene, rng)
        assert agrees(image, scene), scene
        swapped = Scene(scene.shape, scene.background, scene.position, scene.colour)
        assert not agrees(image, swapped), scene


def test_a_picture_does_not_agree_with_another_position():
    rng = random.Random(1)
    scene = Scene("circle", "red", "left", "blue")
    image = draw(scene, rng)
    assert not any(agrees(image, Scene("circle", "red", p, "blue")) for p in ("right", "top", "bottom"))


def test_stripes_are_measured_on_drawn_circles():
    rng = random.Random(2)
    circles = [s for s in all_scenes() if s.shape == "circle"]
    assert max(stripe_strength(draw(s, rng), s) for s in circles) == 0.0
    assert min(stripe_strength(draw(s, rng, stripes=True), s) for s in circles) > 20


def test_the_split_and_the_prompts():
    assert len(all_scenes()) == 4 * 6 * 5 * 5 and len(held_out_scenes()) == 24
    assert len(training_scenes()) == len(all_scenes()) - 24
    assert Scene("star", "red", "left", "blue").prompt() == "a red star on the left on a blue background"
    assert Scene("circle", "red", "center", "blue").prompt(say_center=False) == "a red circle on a blue background"


def test_the_shipped_tokenizers_read_each_prompt_word_as_one_token():
    words = sorted(set(corpus().split()) | set(COLOURS))
    clip = load_clip_tokenizer(MODELS_DIR / "text_encoders" / "tokenizer")
    t5 = load_t5_tokenizer(MODELS_DIR / "text_encoders" / "tokenizer_2")
    for word in words:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    assert t5.model_max_length == 32
