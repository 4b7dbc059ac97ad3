"""A ComfyUI-style models folder holding the tiny FLUX components, for node and workflow tests.

    models = make_models_dir(tmp)   # sets nothing; pass it as FLUXCORE_MODELS_DIR (monkeypatch.setenv)

Tiny models carry their config.json (non-FLUX head sizes), so each is a folder in the model folder:
diffusion_models/tiny-dit, text_encoders/tiny-clip, text_encoders/tiny-t5 (+ tokenizer/, tokenizer_2/),
vae/tiny-vae, and diffusers/flux-tiny (the whole diffusers folder).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

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
    dit, = FluxCoreDiTLoader().load(NAMES["dit"])
    te, = FluxCoreTextEncoderLoader().load(NAMES["clip"], NAMES["t5"])
    vae, = FluxCoreVAELoader().load(NAMES["vae"])
    return dict(dit=dit, te=te, vae=vae)


def write_controlnet_files(models_dir: Path) -> dict[str, Path]:
    """Tiny ControlNets as lone files under the published names the example workflows use
    (example_workflows.build_workflows.CONTROLNET_FILES), shaped like tests/tiny_flux_files.py's DiT (head dim 128,
    FLUX's RoPE axes, so no config.json is needed): alimama's inpainting (68-wide input), InstantX's union (10 modes)
    and jasperai's upscaler (no single blocks). Returns the path of each by kind."""
    from example_workflows.build_workflows import CONTROLNET_FILES
    from tests.tiny_controlnet import make_diffusers_controlnet, write_lone_file
    from tests.tiny_flux_files import CLIP_HIDDEN, T5_DIM
    flux_shaped = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
                       axes_dims_rope=(16, 56, 56), joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_HIDDEN)
    # No single blocks, as alimama's and jasperai's published nets (the union one keeps one): the workflows run at
    # 1024x1024, where every block's attention over 4096 image tokens is most of a workflow test's time.
    variants = {"inpainting": dict(seed=31, extra_condition_channels=4, num_single_layers=0),
                "union": dict(seed=32, num_mode=10), "upscaler": dict(seed=33, num_single_layers=0)}
    paths = {}
    for kind, name in CONTROLNET_FILES.items():
        path = Path(models_dir) / "controlnet" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        model = make_diffusers_controlnet(**{**flux_shaped, **variants[kind]})
        with torch.no_grad():  # make_diffusers_controlnet's N(0, 0.15) is for width 32: the trunk is scaled to
            for name, p in model.named_parameters():  # keep activations O(1) at width 128; the heads keep it, so the
                if p.ndim > 1 and not name.startswith("controlnet_"):  # residuals are of the hidden states' order
                    p.mul_(min(1.0, 2.0 / p.shape[-1] ** 0.5))
        paths[kind] = write_lone_file(model, path)
    return paths


def write_adapter_files(models_dir: Path) -> dict[str, Path]:
    """The IP-Adapter and InfiniteYou files of the example workflows, where README tells a user to put them
    (example_workflows.build_workflows.IPADAPTER_FILES, INFINITEYOU_FILES), shaped for tests/tiny_flux_files.py's
    DiT (width 128, one double and one single block, text width 32; InfuseNet without single blocks: at the
    workflows' 1024x1024 every block over 4096 tokens is most of the test's time): InstantX's ip-adapter.bin in
    models/ipadapter/, a SigLIP folder (config.json: the head count of a 24-wide tower is not in its shapes) in
    models/clip_vision/, and ByteDance's image_proj_model.bin and sharded InfuseNetModel/ in models/infinite_you/.
    Returns the path of each by key ("ipadapter", "image_encoder", "projector", "infusenet")."""
    from example_workflows.build_workflows import INFINITEYOU_FILES, IPADAPTER_FILES
    from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
    from tests.tiny_flux_files import CLIP_HIDDEN, T5_DIM
    from tests.tiny_ipadapter import (instantx_state_dict, make_siglip, projector_state_dict, write_instantx,
                                      write_projector, write_siglip)
    models_dir = Path(models_dir)
    paths = {"ipadapter": models_dir / "ipadapter" / IPADAPTER_FILES["ipadapter"],
             "image_encoder": models_dir / "clip_vision" / IPADAPTER_FILES["image_encoder"],
             "projector": models_dir / "infinite_you" / INFINITEYOU_FILES["projector"],
             "infusenet": models_dir / "infinite_you" / INFINITEYOU_FILES["infusenet"]}
    for key in ("ipadapter", "projector"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    write_instantx(instantx_state_dict(seed=41, hidden=128, blocks=2), paths["ipadapter"])
    write_siglip(make_siglip(seed=42), paths["image_encoder"])
    write_projector(projector_state_dict(seed=43, output_dim=T5_DIM), paths["projector"])
    infusenet = make_diffusers_controlnet(seed=44, num_layers=1, num_single_layers=0, attention_head_dim=128,
                                          num_attention_heads=1, axes_dims_rope=(16, 56, 56),
                                          joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_HIDDEN)
    with torch.no_grad():  # as write_controlnet_files: the trunk scaled for width 128, the heads kept
        for name, p in infusenet.named_parameters():
            if p.ndim > 1 and not name.startswith("controlnet_"):
                p.mul_(min(1.0, 2.0 / p.shape[-1] ** 0.5))
    write_diffusers_controlnet(infusenet, paths["infusenet"], max_shard_size="400KB")  # sharded, as published
    return paths
