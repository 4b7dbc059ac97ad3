"""The IP-Adapter side of training (DiffSynth-Studio's semantics, reference notes §3.3): each row's reference
image(s) condition the DiT through the IP-Adapter of the model flags.

    --trainable_models ipadapter      the IP-Adapter trains; the DiT and the image encoder are frozen
    --extra_inputs ipadapter_images   a column of image paths (or JSON lists of them: several images act together)

The frozen image encoder (SigLIP for InstantX, CLIP ViT-L for XLabs) computes each sample's features without
gradients; the IP-Adapter then makes its keys and values inside the training step, so its gradients flow back
from the DiT's attention. Training runs one branch at scale 1 (DiffSynth trains with cfg_scale 1).
"""
from __future__ import annotations

import argparse

import torch

from ..ipadapter import IPAdapterAdapter, bind_ipadapter, check_ipadapter_models
from ..models.image_encoders import encode_images
from .args import TrainError

COLUMN = "ipadapter_images"


def check_ipadapter_slots(slots: list[str]) -> None:
    """ipadapter_images need an IP-Adapter and its image encoder among the model flags (read from the files' keys,
    before any weights load); both missing pieces named at once."""
    missing = [what for slot, what in (("ipadapter", "IP-Adapter (InstantX/FLUX.1-dev-IP-Adapter:ip-adapter.bin, "
                                                     "or XLabs' flux-ip-adapter.safetensors)"),
                                       ("ipadapter_image_encoder", "image encoder for it (InstantX: "
                                                                   "google/siglip-so400m-patch14-384; XLabs: "
                                                                   "openai/clip-vit-large-patch14)"))
               if slot not in slots]
    if missing:
        raise TrainError(f"--extra_inputs {COLUMN}: the model flags load no {' and no '.join(missing)}; add "
                         f"{'them' if len(missing) > 1 else 'it'} to --model_paths or --model_id_with_origin_paths.")


def check_ipadapter_fit(pipe) -> None:
    """The loaded IP-Adapter fits the DiT and its image encoder (the pipeline's own check), in the trainer's words."""
    dit = pipe.dit
    try:
        check_ipadapter_models(pipe.ipadapter, pipe.ipadapter_image_encoder,
                               (dit.params.depth, dit.params.depth_single_blocks), dit.hidden_size,
                               "the IP-Adapter of --model_paths / --model_id_with_origin_paths")
    except ValueError as e:
        raise TrainError(str(e)) from None


def reference_features(pipe, images) -> torch.Tensor:
    """The frozen image encoder's features (N, E) of a sample's reference images, without gradients."""
    with torch.no_grad():
        return encode_images(pipe.ipadapter_image_encoder, images)


def bind(model, features: torch.Tensor, dit) -> IPAdapterAdapter:
    """The IP-Adapter bound to the features: its keys and values are computed here, under autograd when the
    IP-Adapter trains. Positive branch only, scale 1 (DiffSynth's training: cfg_scale 1, ipadapter_scale 1)."""
    return bind_ipadapter(model, features, dit.num_heads, (dit.params.depth, dit.params.depth_single_blocks),
                          scale=1.0, branches=("positive",))


def validation_references(args: argparse.Namespace, dataset) -> list:
    """The validation images' reference images: --validation_ipadapter_images, else the first data row's."""
    if not args.validation_ipadapter_images:
        return dataset[0][COLUMN]
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in args.validation_ipadapter_images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise TrainError(f"--validation_ipadapter_images {path}: cannot be read as an image ({e}).") from None
    return images
