"""A ComfyUI-style models folder holding the tiny FLUX components, for node and workflow tests.

    models = make_models_dir(tmp)   # sets nothing; pass it as FLUXCORE_MODELS_DIR (monkeypatch.setenv)

Tiny models carry their config.json (non-FLUX head sizes), so each is a folder in the model folder:
diffusion_models/tiny-dit, text_encoders/tiny-clip, text_encoders/tiny-t5 (+ tokenizer/, tokenizer_2/),
vae/tiny-vae, and diffusers/flux-tiny (the whole diffusers folder).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

NAMES = {"dit": "tiny-dit", "clip": "tiny-clip", "t5": "tiny-t5", "vae": "tiny-vae", "diffusers": FOLDER_NAME,
         "wrong_dit": "not-a-dit"}


def make_models_dir(tmp: Path):
    """Returns (models dir, the diffusers reference pipeline)."""
    ref = make_diffusers_pipeline(tmp)
    src, models = Path(tmp) / FOLDER_NAME, Path(tmp) / "models"
    for sub, dst in (("transformer", "diffusion_models/tiny-dit"), ("text_encoder", "text_encoders/tiny-clip"),
                     ("text_encoder_2", "text_encoders/tiny-t5"), ("tokenizer", "text_encoders/tokenizer"),
                     ("tokenizer_2", "text_encoders/tokenizer_2"), ("vae", "vae/tiny-vae"),
                     ("vae", "diffusion_models/" + NAMES["wrong_dit"])):  # a VAE picked in the DiT loader
        shutil.copytree(src / sub, models / dst)
    shutil.copytree(src, models / "diffusers" / FOLDER_NAME)
    return models, ref


def load_node_models(models_dir: Path) -> dict:
    """The tiny DiT, text encoders and VAE through the loader nodes, from `models_dir` (which must be
    FLUXCORE_MODELS_DIR while they load)."""
    from nodes.loaders import FluxCoreDiTLoader, FluxCoreTextEncoderLoader, FluxCoreVAELoader
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]
    te, = FluxCoreTextEncoderLoader().load(NAMES["clip"], NAMES["t5"])
    vae, = FluxCoreVAELoader().load(NAMES["vae"])
    return dict(dit=dit, te=te, vae=vae)
