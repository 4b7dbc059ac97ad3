"""A tiny training setup: the tiny FLUX folder (tests/tiny_pipeline.py) and a dataset of 8 solid-colour 32x32
images with captions, in folders whose names have spaces and non-ASCII characters.

    setup = make_train_setup(tmp)
    args = train_argv(setup, tmp / "out", "--num_epochs", "2")   # argv for python -m flux_core.train
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 30, 160), "orange": (240, 140, 20)}
# Words the tiny tokenizers know (tests/tiny_text.py corpus), so every caption has its own tokens.
SUBJECTS = ["a cat", "a dog", "a horse", "a castle", "the moon", "a woman", "a chair", "the beach"]
SIZE = 32


@dataclass
class TrainSetup:
    model: Path          # diffusers FLUX folder
    data: Path           # images + metadata.csv (and the same images with .txt captions in data/folder)
    captions: dict[str, str]   # image file name -> caption

    @property
    def model_paths(self) -> str:
        return json.dumps([str(self.model)])


def make_train_setup(tmp: Path) -> TrainSetup:
    tmp = Path(tmp)
    make_diffusers_pipeline(tmp)
    data = tmp / "dätä set ü"
    (data / "folder").mkdir(parents=True)
    captions = {}
    with open(data / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt"])
        for (name, rgb), subject in zip(COLOURS.items(), SUBJECTS):
            file = f"{name} é.png"
            Image.new("RGB", (SIZE, SIZE), rgb).save(data / file)
            Image.new("RGB", (SIZE, SIZE), rgb).save(data / "folder" / file)
            caption = f"{subject} {name}"
            (data / "folder" / file).with_suffix(".txt").write_text(caption, encoding="utf-8")
            writer.writerow([file, caption])
            captions[file] = caption
    return TrainSetup(tmp / FOLDER_NAME, data, captions)


def train_argv(setup: TrainSetup, output: Path, *extra: str) -> list[str]:
    return ["--dataset_base_path", str(setup.data), "--dataset_metadata_path", str(setup.data / "metadata.csv"),
            "--model_paths", setup.model_paths, "--output_path", str(output), "--torch_dtype", "float32",
            "--t5_sequence_length", "16", "--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2",
            *extra]


def subprocess_env() -> dict:
    """Environment for a training subprocess: the repository importable, one thread (deterministic and fair
    on a small CI machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def python() -> str:
    return sys.executable


def read_log(output: Path) -> list[dict]:
    path = Path(output) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
