"""FluxCore's DiT as a native MODEL inside a real ComfyUI (marker `comfyui`, skipped without COMFYUI_DIR): against
ComfyUI's own Flux on the same tiny weights (apply_model with Kontext references by every ref_latents_method,
comfy.sample with two sampler/scheduler pairs at cfg > 1, ModelSamplingFlux + EasyCache), native LoRA against
FluxCore's LoRA with no leak either way, and a partial load. Each check runs in ComfyUI's Python
(tests/comfyui_native_checks.py; ComfyUI's top-level `nodes` and `tests` modules would clash with ours here).

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -n 0 -m comfyui tests/test_comfyui_native.py
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.tiny_controlnet import make_diffusers_controlnet
from tests.tiny_dit import make_diffusers_dit, write_bfl_dit
from tests.tiny_lora import bfl_shapes, random_pairs, write_kohya

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SCRIPT = Path(__file__).with_name("comfyui_native_checks.py")

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout (see README, "
                                               "'Testing inside a real ComfyUI')."),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    ref = make_diffusers_dit(seed=11)
    write_bfl_dit(ref, folder / "dit.safetensors")
    pairs = random_pairs({k: v for k, v in bfl_shapes(ref).items() if "blocks" in k}, seed=2)
    write_kohya(folder / "lora.safetensors", pairs)
    controlnet = make_diffusers_controlnet(seed=4)  # diffusers names (InstantX's published layout)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(folder / "controlnet.safetensors"))
    return folder


@pytest.mark.parametrize("check", ["config", "apply_model", "guidance", "sample", "lora_and_leaks", "handover", "model_nodes",
                                   "native_controlnet", "fp8", "partial_load"])
def test_native_model_in_comfyui(check, files):
    run = subprocess.run([PYTHON, str(SCRIPT), COMFYUI_DIR, str(files), check], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(run.stdout.strip().splitlines()[-1])
