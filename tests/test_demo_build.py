"""`python -m flux_core.demo.build` as shipped, at a few steps per stage: every stage runs (dataset, tokenizers and
text encoders, VAE, DiT and LoRA through `python -m flux_core.train`), the files land where flux_core.demo expects
them and load through the normal pipeline, and build_log.json keeps each stage's time with the arguments it ran with,
also across a partial rebuild (`--stages lora`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flux_core import demo
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline

QUICK = ["--images_per_scene", "1", "--vae_steps", "2", "--dit_steps", "2", "--lora_steps", "2", "--threads", "1"]


def build(out, *flags) -> dict:
    done = subprocess.run([sys.executable, "-m", "flux_core.demo.build", "--out", str(out), *QUICK, *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "build_log.json").read_text())


@pytest.mark.slow
def test_the_build_script_makes_a_loadable_demo_and_logs_each_stage(tmp_path):
    out = tmp_path / "demo"
    log = build(out)
    assert set(log["seconds"]) == {"dataset", "text", "vae", "dit", "lora", "total"}
    assert log["stages"]["dit"]["arguments"] == {"seed": 0, "dit_steps": 2, "t5_length": 32, "resume": False}
    assert log["stages"]["lora"]["arguments"] == {"seed": 0, "lora_steps": 2, "t5_length": 32}
    assert log["stages"]["lora"]["threads"] == 1 and log["dataset"]["images"] == 576   # 600 scenes, 24 held out
    models = out / "models"
    assert (models / demo.LORA_FILE).is_file()
    assert len(list((out / "datasets" / demo.STRIPES_DATASET).glob("*.png"))) == 48

    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=str(models / name), kind=slot) for slot, name in demo.FILES.items()])
    assert pipe.tokenizer_2.model_max_length == 32 and pipe.dit.params.head_dim == 64
    report = pipe.load_lora(pipe.dit, str(models / demo.LORA_FILE))
    assert report.layers and not report.unmatched_keys, report
    image = pipe(prompt="a red circle on the left on a blue background", height=demo.HEIGHT, width=demo.WIDTH,
                 num_inference_steps=1, seed=0)
    assert image.size == (demo.WIDTH, demo.HEIGHT)

    # A partial rebuild replaces its stage's entry and keeps the others' (time and arguments).
    again = build(out, "--stages", "lora", "--lora_steps", "3")
    assert again["stages"]["lora"]["arguments"]["lora_steps"] == 3
    for name in ("dataset", "text", "vae", "dit"):
        assert again["stages"][name] == log["stages"][name] and again["seconds"][name] == log["seconds"][name]
    assert again["seconds"]["total"] == pytest.approx(sum(v for k, v in again["seconds"].items() if k != "total"))
