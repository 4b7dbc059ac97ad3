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

import numpy as np
import pytest
import torch
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


# ------------------------------------------------------------------------------------------------ adapters
@dataclass
class AdapterSetup:
    """The tiny training setup plus the tiny IP-Adapter world (InstantX ip-adapter.bin + SigLIP folder) and the
    tiny InfiniteYou world (image_proj_model.bin + an InfuseNet-shaped diffusers ControlNet folder), with metadata:
    ipadapter.csv (image, prompt, ipadapter_images; row 1 holds a JSON list of two references), infiniteyou.csv
    (image, prompt, controlnet_image, infinityou_id_embedding (.safetensors on even rows, .npy on odd ones),
    infinityou_guidance) and faces.csv (image, prompt, controlnet_image, infinityou_id_image)."""
    setup: TrainSetup
    ipadapter: Path
    siglip: Path
    projector: Path
    infusenet: Path

    @property
    def data(self) -> Path:
        return self.setup.data

    def model_paths(self, *names: str) -> str:
        """--model_paths with the FLUX folder and the named adapter files (ipadapter, siglip, projector, infusenet)."""
        return json.dumps([str(self.setup.model)] + [str(getattr(self, name)) for name in names])


def make_adapter_setup(tmp: Path) -> AdapterSetup:
    import numpy as np
    from safetensors.torch import save_file

    from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
    from tests.tiny_ipadapter import (face_embedding, instantx_state_dict, make_siglip, projector_state_dict,
                                      reference_image, write_instantx, write_projector, write_siglip)

    tmp = Path(tmp)
    setup = make_train_setup(tmp)
    out = AdapterSetup(setup, write_instantx(instantx_state_dict(seed=3), tmp / "ip-adapter.bin"),
                       write_siglip(make_siglip(seed=4), tmp / "siglip"),
                       write_projector(projector_state_dict(seed=5), tmp / "image_proj_model.bin"),
                       write_diffusers_controlnet(make_diffusers_controlnet(seed=6), tmp / "InfuseNetModel"))
    data = setup.data
    ip_rows, iy_rows, face_rows = [], [], []
    for i, (file, caption) in enumerate(setup.captions.items()):
        reference_image(10 + i, (48, 40)).save(data / f"reference {i}.png")
        reference_image(30 + i, (SIZE, SIZE)).save(data / f"face {i}.png")
        Image.new("RGB", (SIZE, SIZE)).save(data / f"black {i}.png")
        embedding = face_embedding(i)
        if i % 2:
            np.save(data / f"face {i}.npy", embedding.numpy())
            face = f"face {i}.npy"
        else:
            save_file({"embedding": embedding}, str(data / f"face {i}.safetensors"))
            face = f"face {i}.safetensors"
        references = json.dumps([f"reference {i}.png", "reference 0.png"]) if i == 1 else f"reference {i}.png"
        ip_rows.append((file, caption, references))
        iy_rows.append((file, caption, f"black {i}.png", face, 1.0 + 0.25 * (i % 3)))
        face_rows.append((file, caption, f"black {i}.png", f"face {i}.png"))
    for name, header, rows in (
            ("ipadapter.csv", ["image", "prompt", "ipadapter_images"], ip_rows),
            ("infiniteyou.csv", ["image", "prompt", "controlnet_image", "infinityou_id_embedding",
                                 "infinityou_guidance"], iy_rows),
            ("faces.csv", ["image", "prompt", "controlnet_image", "infinityou_id_image"], face_rows)):
        with open(data / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return out


def adapter_argv(world: AdapterSetup, output: Path, metadata: str, models: tuple[str, ...], *extra: str) -> list[str]:
    """argv for a run on one of make_adapter_setup's metadata files with the named adapter models (float32, tiny
    T5 length); the training mode and extra inputs come in `extra`."""
    return ["--dataset_base_path", str(world.data), "--dataset_metadata_path", str(world.data / metadata),
            "--model_paths", world.model_paths(*models), "--output_path", str(output), "--torch_dtype", "float32",
            "--t5_sequence_length", "16", *extra]


def two_processes_and_one(argv, tmp_path: Path, steps: int = 3) -> tuple[dict, dict]:
    """Run `argv(output, *extra)` as 2 processes (`accelerate launch --multi_gpu`, gloo on a CPU) and as one process
    with --gradient_accumulation_steps 2, side by side; returns (one, two): their step-<steps> weights files."""
    import subprocess

    from safetensors.torch import load_file

    launch = [python(), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux_core.train",
              *argv(tmp_path / "two", "--max_steps", str(steps))]
    two = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           encoding="utf-8")
    one = subprocess.run([python(), "-m", "flux_core.train", *argv(tmp_path / "one", "--max_steps", str(steps),
                                                                    "--gradient_accumulation_steps", "2")],
                         env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert read_log(tmp_path / "two")[0]["num_processes"] == 2
    return (load_file(tmp_path / "one" / f"step-{steps}.safetensors"),
            load_file(tmp_path / "two" / f"step-{steps}.safetensors"))


# ------------------------------------------------------------------------------------------------ EliGen
ELIGEN_SIZE = (64, 48)   # (width, height): a training size of its own (multiples of 16, not square)
# Per row: two entities, each a colour painted in a box (left, top, right, bottom) of the image, and its prompt.
ELIGEN_ROWS = [
    ("a cat and a dog", [("a red cat", "red", (0, 0, 31, 47)), ("a blue dog", "blue", (32, 8, 63, 39))]),
    ("a horse on the beach", [("a green horse", "green", (8, 0, 47, 23)),
                              ("the yellow beach", "yellow", (0, 24, 63, 47))]),
    ("a castle and the moon", [("a purple castle", "purple", (0, 16, 39, 47)),
                               ("the white moon", "white", (44, 0, 63, 15))]),
    ("a woman on a chair", [("a woman", "orange", (16, 0, 47, 31)), ("a black chair", "black", (16, 32, 47, 47))]),
]


def eligen_mask(box, size=ELIGEN_SIZE) -> Image.Image:
    """A mask image: black, with `box` (left, top, right, bottom, in ELIGEN_SIZE pixels) white, at `size` (the same
    shape at another resolution scales the box)."""
    from PIL import ImageDraw
    sx, sy = size[0] / ELIGEN_SIZE[0], size[1] / ELIGEN_SIZE[1]
    image = Image.new("RGB", size)
    left, top, right, bottom = box
    ImageDraw.Draw(image).rectangle((left * sx, top * sy, (right + 1) * sx - 1, (bottom + 1) * sy - 1), fill="white")
    return image


def make_eligen_data(data: Path) -> Path:
    """DiffSynth's EliGen layout in `data`: 64x48 images painted with their entities' colours, masks/ with one mask
    per entity (row 2's at twice the resolution: the same shape), and eligen.json (image, prompt,
    eligen_entity_prompts, eligen_entity_masks lists). Returns the metadata path."""
    from PIL import ImageDraw
    data = Path(data)
    (data / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (caption, entities) in enumerate(ELIGEN_ROWS):
        image = Image.new("RGB", ELIGEN_SIZE, (128, 128, 128))
        draw = ImageDraw.Draw(image)
        masks = []
        for j, (_, colour, box) in enumerate(entities):
            draw.rectangle(box, fill=COLOURS[colour])
            size = (ELIGEN_SIZE[0] * 2, ELIGEN_SIZE[1] * 2) if i == 1 else ELIGEN_SIZE
            eligen_mask(box, size).save(data / "masks" / f"{i} {j}.png")
            masks.append(f"masks/{i} {j}.png")
        image.save(data / f"entities {i}.png")
        rows.append({"image": f"entities {i}.png", "prompt": caption,
                     "eligen_entity_prompts": [prompt for prompt, _, _ in entities], "eligen_entity_masks": masks})
    path = data / "eligen.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ LoRA-Encoder
def make_kontext_data(data: Path) -> Path:
    """A Kontext dataset in the new folder `data` (metadata.jsonl; names with spaces): a target with two reference
    images (a JSON list) and a row with one (a plain string), each image of another size than the others."""
    data.mkdir()
    Image.new("RGB", (32, 48), (200, 10, 10)).save(data / "target.png")
    Image.new("RGB", (48, 32), (10, 10, 200)).save(data / "ref 1.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(data / "ref 2.png")
    (data / "metadata.jsonl").write_text(
        '{"image": "target.png", "prompt": "a cat red", "kontext_images": ["ref 1.png", "ref 2.png"]}\n'
        '{"image": "ref 1.png", "prompt": "a dog blue", "kontext_images": "ref 2.png"}\n', encoding="utf-8")
    return data


def make_lora_encoder_data(setup: TrainSetup, tmp: Path) -> Path:
    """The LoRA-Encoder world beside a make_train_setup one: tmp/lora-encoder.safetensors (DiffSynth's own
    FluxLoRAEncoder at the tiny size, random weights: tests/tiny_lora_models.py), loras/ in the dataset with LoRAs on
    every site of the tiny DiT (style a: kohya, style b: PEFT/diffusers), and loras.csv (image, prompt,
    lora_encoder_inputs; even rows style a, odd rows style b). Returns the encoder's path."""
    from tests.tiny_lora_models import diffsynth_encoder, write_site_lora, write_state_dict

    tmp = Path(tmp)
    encoder = write_state_dict(diffsynth_encoder(seed=31), tmp / "lora-encoder.safetensors")
    data = setup.data
    (data / "loras").mkdir(exist_ok=True)
    write_site_lora(data / "loras" / "style a.safetensors", "kohya", seed=32, alpha=2.0)
    write_site_lora(data / "loras" / "style b.safetensors", "diffusers", seed=33)
    with open(data / "loras.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prompt", "lora_encoder_inputs"])
        for i, (file, caption) in enumerate(setup.captions.items()):
            writer.writerow([file, caption, f"loras/style {'ab'[i % 2]}.safetensors"])
    return encoder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a small shared machine: one intra-op thread is many times faster (no spinning threads
    competing with other processes) and matches the subprocesses (OMP_NUM_THREADS=1). Import it into a test module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def noise_picture(seed: int, size: int = SIZE) -> Image.Image:
    """A size x size RGB picture of uniform noise (an image to edit, an inpaint or control image of a data row)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def nonzero_lora(trainer) -> None:
    """Give the LoRA's up projections (zero at the start) random values, so that its gradient depends on every input
    the loss reads after it (a zero LoRA's B gradient ignores most of them)."""
    with torch.no_grad():
        for name, p in trainer.params:
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def loss_gradient(trainer, sample: dict, seed: int = 7) -> torch.Tensor:
    """The gradient of the trained parameters (flattened, in `trainer.params` order) of one sample's loss with the
    timestep and noise of `seed`, leaving no gradient behind."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss(sample, torch.Generator().manual_seed(seed)).backward()
    grads = torch.cat([p.grad.flatten() for _, p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def resumed_and_whole(argv, tmp_path: Path, cut: int) -> tuple[dict, dict]:
    """A run straight through (in tmp_path/"whole") and the same run stopped after `cut` steps and resumed (in
    tmp_path/"cut"), quietly; `argv(output, *extra)` builds the command line. Checks that both end with the same final
    file and that it and its training state are bit-identical, and returns (the resumed run's last "start" log entry,
    the uninterrupted run's result)."""
    import contextlib
    import io

    from safetensors.torch import load_file

    from flux_core.train.trainer import train
    from flux_core.train.args import parse_args
    with contextlib.redirect_stdout(io.StringIO()):
        whole = train(parse_args(argv(tmp_path / "whole")))
        train(parse_args(argv(tmp_path / "cut", "--max_steps", str(cut))))
        resumed = train(parse_args(argv(tmp_path / "cut", "--resume")))
    final = whole["path"].name
    assert resumed["path"].name == final
    for name in (final, f"checkpoints/{whole['path'].stem}/trainable.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        assert a.keys() == b.keys()
        for k in a:
            # Measured 0 in every mode (the same computation on one thread); resuming into the wrong data order or
            # without the optimizer state moves weights by about one step.
            assert torch.equal(a[k], b[k]), (name, k)
    return [e for e in read_log(tmp_path / "cut") if e["event"] == "start"][-1], whole


# ------------------------------------------------------------------------------------------------ split training
def data_process_argv(setup: TrainSetup, cache: Path, *extra: str) -> list[str]:
    """argv of `--task data_process` writing the tiny dataset's cache into `cache` (the flags of train_argv)."""
    return train_argv(setup, cache, "--task", "data_process", *extra)


def cached_argv(setup: TrainSetup, cache: Path, output: Path, *extra: str) -> list[str]:
    """argv of `--task sft:train` from the cache in `cache`: train_argv with the cache as --dataset_base_path and no
    --dataset_metadata_path (DiffSynth's convention), so the same run as train_argv(setup, output, *extra)."""
    argv = train_argv(setup, output, "--task", "sft:train", *extra)
    at = argv.index("--dataset_metadata_path")
    del argv[at:at + 2]
    argv[argv.index("--dataset_base_path") + 1] = str(cache)
    return argv


def step_losses(output: Path) -> list[float]:
    """The logged loss of every optimizer step of the run in `output`, in order."""
    return [e["loss"] for e in read_log(output) if e["event"] == "step"]
