"""A demo-shaped model folder for tests of FluxImagePipeline.from_demo and `generate --demo` that must not depend on
the trained, shipped files: the demo's layout and widths (flux_core.demo.build's own writers: tokenizers learned
from the demo's prompts with a 32-token T5, CLIP-L / T5 single files, a BFL DiT with its config.json), untrained.

    root = write_demo_folder(tmp_path / "models")
    monkeypatch.setattr(flux_core.demo, "MODELS_DIR", root)   # flux_core.demo's paths now point there

or, in a test module, `from tests.tiny_demo import demo_folder, demo_here` and ask for the `demo_here` fixture.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux_core import demo
from flux_core.demo.build import CLIP, T5, VAE, init_dit, write_text_encoders, write_vae
from flux_core.pipeline import FluxImagePipeline

T5_LENGTH = 32   # the demo tokenizer's model_max_length


def write_demo_folder(root: Path, seed: int = 0) -> Path:
    """Every file flux_core.demo.FILES names (and the LoRA, configs and tokenizers missing_files() looks for) under
    `root`, laid out as flux_core/demo/models is."""
    from flux_core.models.vae import AutoEncoderParams, FluxVAE

    root = Path(root)
    paths = {slot: root / name for slot, name in demo.FILES.items()}
    write_text_encoders(paths["clip"].parent, T5_LENGTH, seed)
    paths["dit"].parent.mkdir(parents=True, exist_ok=True)
    init_dit(paths["dit"].parent, CLIP["hidden_size"], T5["d_model"], seed)
    torch.manual_seed(seed)
    vae = FluxVAE(AutoEncoderParams(**VAE, scale_factor=1.0, shift_factor=0.0))
    write_vae(paths["vae"].parent, vae.state_dict(), scale=1.0, shift=0.0)
    lora = root / demo.LORA_FILE
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"")   # present for missing_files(); from_demo does not load it
    return root


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return write_demo_folder(tmp_path_factory.mktemp("demo") / "models")


@pytest.fixture
def demo_here(demo_folder, monkeypatch):
    """flux_core.demo's paths point at the demo-shaped folder."""
    monkeypatch.setattr(demo, "MODELS_DIR", demo_folder)
    return demo_folder


def recorded_t5_lengths(monkeypatch) -> list[int]:
    """The T5 token count of every conditioning a FluxImagePipeline encodes from now on (each prompt branch)."""
    lengths = []
    encode_with = FluxImagePipeline.encode_with

    def record(pipe, encoder, prompts, branch):
        out = encode_with(pipe, encoder, prompts, branch)
        lengths.append(out.prompt_emb.shape[1])
        return out
    monkeypatch.setattr(FluxImagePipeline, "encode_with", record)
    return lengths
