"""The demo model as shipped (flux_core/demo/models): `FluxImagePipeline.from_demo()` and the README's first command
run on it offline, at its trained size and T5 length. How good its pictures are is tests/test_demo_quality.py's."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux_core import demo
from flux_core.__main__ import DEMO_COMMAND
from flux_core.pipeline import FluxImagePipeline

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_demo_files_are_all_there():
    assert demo.missing_files() == []


def test_from_demo_on_the_shipped_files():
    pipe = FluxImagePipeline.from_demo(device="cpu")
    assert pipe.default_size == (demo.HEIGHT, demo.WIDTH)
    assert pipe.t5_sequence_length() == 32            # the demo's T5 tokenizer: model_max_length 32
    assert pipe.dit.params.guidance_embed is False    # schnell-like: embedded_guidance is ignored
    image = pipe(prompt="a red circle on a blue background", seed=0, num_inference_steps=2, progress_bar_cmd=None)
    assert image.size == (demo.WIDTH, demo.HEIGHT) and image.mode == "RGB"
    assert pipe.dit.img_in.weight.dtype == torch.float32


@pytest.mark.slow
def test_the_readme_demo_command_runs_offline_from_any_folder(tmp_path):
    """The command exactly as README and the offline error give it, in a fresh process and another folder, with
    downloads turned off for ModelScope and the Hugging Face libraries."""
    command = DEMO_COMMAND.split(" ", 2)   # python -m <rest>
    assert command[:2] == ["python", "-m"]
    argv = [sys.executable, "-m", *shlex.split(command[2])]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DIFFSYNTH_SKIP_DOWNLOAD": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "demo.png") as image:
        assert image.size == (demo.WIDTH, demo.HEIGHT)
    assert "saved demo.png" in done.stdout


def test_package_data_covers_every_shipped_demo_file():
    """pyproject's package-data globs (what `pip install .` ships, checked once by hand with a fresh venv) match every
    file under flux_core/demo/models and datasets: a new kind of demo file must be added to them."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["flux_core.demo"]
    here = demo.MODELS_DIR.parent
    shipped = set(demo.shipped_files())
    covered = {p for pattern in patterns for p in here.glob(pattern) if p.is_file()}
    assert shipped and shipped <= covered, sorted(str(p) for p in shipped - covered)
