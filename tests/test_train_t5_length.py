"""`python -m flux_core.train` without --t5_sequence_length trains (and renders its validation images) at the T5
tokenizer's own length, resolved once from the loaded pipeline's tokenizer_2 (the demo-shaped models: 32 tokens;
FLUX.1-dev's tokenizer says 512), and `validate_lora` renders at it; a given --t5_sequence_length wins."""
from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from flux_core import demo
from flux_core.train.__main__ import main
from tests.tiny_demo import T5_LENGTH, recorded_t5_lengths, write_demo_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_t5")
    models = write_demo_folder(tmp / "models")
    data = tmp / "data"
    data.mkdir()
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        for name, colour in (("red.png", "red"), ("blue.png", "blue")):
            Image.new("RGB", (32, 32), colour).save(data / name)
            writer.writerow([name, f"a {colour} circle"])
    return models, data


def argv(world, output, *extra):
    models, data = world
    return ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model_paths", json.dumps([str(models / demo.FILES[s]) for s in ("dit", "vae", "clip", "t5")]),
            "--output_path", str(output), "--torch_dtype", "float32", "--lora_base_model", "dit", "--lora_rank", "2",
            "--max_steps", "1", "--height", "32", "--width", "32", "--validation_prompts", "a red circle",
            "--validation_num_inference_steps", "1", "--progress_bar", "off", *extra]


@pytest.mark.parametrize("flags, length", [((), T5_LENGTH), (("--t5_sequence_length", "16"), 16)])
def test_training_uses_the_tokenizers_t5_length_unless_given(world, tmp_path, monkeypatch, flags, length):
    lengths = recorded_t5_lengths(monkeypatch)
    output = tmp_path / "run"
    assert main(argv(world, output, *flags)) == 0
    assert len(lengths) >= 2 and set(lengths) == {length}   # the caption of the step and the validation image
    events = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["t5_sequence_length"] == length
    assert any(e["event"] == "validation" for e in events)

    # validate_lora renders the trained LoRA at the same length: its --t5_sequence_length defaults likewise
    models, _ = world
    lengths.clear()
    validate = ["validate_lora", "--model_paths", json.dumps([str(models / demo.FILES[s]) for s in demo.FILES]),
                "--lora_path", str(output / "step-1.safetensors"), "--prompt", "a red circle", "--height", "32",
                "--width", "32", "--num_inference_steps", "1", "--torch_dtype", "float32", "--device", "cpu",
                "--output", str(tmp_path / "validated.png"), *flags]
    assert main(validate) == 0
    assert lengths == [length] and (tmp_path / "validated.png").is_file()
