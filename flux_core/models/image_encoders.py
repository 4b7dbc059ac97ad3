"""The IP-Adapters' image encoders as `transformers` vision towers, and how each turns images into features.

- SigLIP (InstantX IP-Adapter; google/siglip-so400m-patch14-384, ComfyUI's `sigclip_vision_patch14_384`):
  `SiglipVisionModel`; images resized to 384x384 (bicubic) and scaled to [-1, 1], as DiffSynth-Studio does;
  the feature is the attention-pooled `pooler_output` (1152).
- CLIP ViT (XLabs IP-Adapter; openai/clip-vit-large-patch14, ComfyUI's `clip_vision_l`):
  `CLIPVisionModelWithProjection`; images prepared by transformers' `CLIPImageProcessor` (shortest side to 224,
  centre crop, CLIP mean/std), as diffusers' FluxPipeline does; the feature is `image_embeds` (768).
The config is read off the weights' shapes (`VisionParams`); a `config.json` beside them, or overrides, win.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..vram import compute_place
from .shapes import count_blocks

SIGLIP, CLIP = "siglip", "clip"
TITLES = {SIGLIP: "SigLIP vision encoder", CLIP: "CLIP vision encoder"}
# Heads cannot be read from shapes; the published towers of these widths all use these counts.
KNOWN_HEADS = {768: 12, 1024: 16, 1152: 16, 1280: 16, 1664: 16}
# Published towers whose image size is not a whole number of patches (the patch convolution drops the rest), by
# (patch size, patches per side): google/siglip-so400m-patch14-384 takes 384x384 images as 27 x 27 patches of 14.
# Its ComfyUI single file has no config.json, and 27 x 14 = 378 would resize every image to another size than
# DiffSynth-Studio's (and transformers' processor's) 384.
UNEVEN_IMAGE_SIZES = {(14, 27): 384}


@dataclass(frozen=True)
class VisionParams:
    family: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    projection_dim: int | None = None   # CLIP's visual projection (its image_embeds width)
    layer_norm_eps: float | None = None
    hidden_act: str | None = None

    @classmethod
    def from_state_dict_shapes(cls, family: str, shapes: Mapping[str, tuple[int, ...]],
                               overrides: Mapping | None = None) -> "VisionParams":
        """Shapes under flat names (`embeddings.patch_embedding.weight`, ...; CLIP's `visual_projection.weight`)."""
        overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
        hidden, _, patch, _ = shapes["embeddings.patch_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0] - (1 if family == CLIP else 0)  # CLIP: + class
        side = math.isqrt(positions)
        heads = overrides.get("num_attention_heads", KNOWN_HEADS.get(hidden))
        if heads is None:
            raise ValueError(f"the number of attention heads of a {hidden}-wide vision tower is not known; put its "
                             f"config.json (num_attention_heads) beside the weights, or pass "
                             f"load_model(..., config={{'num_attention_heads': ...}})")
        inferred = dict(family=family, hidden_size=hidden, patch_size=patch, num_attention_heads=heads,
                        image_size=UNEVEN_IMAGE_SIZES.get((patch, side), side * patch),
                        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                        num_hidden_layers=count_blocks(shapes, "encoder.layers."),
                        projection_dim=shapes["visual_projection.weight"][0] if family == CLIP else None)
        known = set(cls.__dataclass_fields__) - {"family"}
        inferred.update({k: v for k, v in overrides.items() if k in known})
        return cls(**inferred)

    def to_transformers(self):
        from transformers import CLIPVisionConfig, SiglipVisionConfig
        config = {k: v for k, v in asdict(self).items() if k != "family" and v is not None}
        return SiglipVisionConfig(**config) if self.family == SIGLIP else CLIPVisionConfig(**config)


def build_vision_encoder(params: VisionParams) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection, SiglipVisionModel
    cls = SiglipVisionModel if params.family == SIGLIP else CLIPVisionModelWithProjection
    return cls(params.to_transformers()).eval()


@functools.lru_cache(maxsize=None)
def vision_module_prefix(family: str) -> str:
    """How this transformers version names the tower's weights in the module's state dict: "vision_model." or ""
    (transformers 5 flattens SigLIP's). Probed once on a meta-device model."""
    with torch.device("meta"):
        probe = build_vision_encoder(VisionParams(family, 8, 8, 1, 1, 2, 4, 8 if family == CLIP else None))
    return "vision_model." if any(k.startswith("vision_model.") for k in probe.state_dict()) else ""


def vision_family(encoder: nn.Module) -> str:
    from transformers import SiglipVisionModel
    return SIGLIP if isinstance(encoder, SiglipVisionModel) else CLIP


def feature_dim(encoder: nn.Module) -> int:
    """The width of the features `encode_images` gives."""
    config = encoder.config
    return config.hidden_size if vision_family(encoder) == SIGLIP else config.projection_dim


def pixel_values(encoder: nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """The encoder's input (N, 3, S, S) float32 for RGB PIL images."""
    size = encoder.config.image_size
    if vision_family(encoder) == SIGLIP:
        arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
                  for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return clip_processor(size)(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values


@functools.lru_cache(maxsize=None)
def clip_processor(size: int):
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x: the PIL processor is the default one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def encode_images(encoder: nn.Module, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, feature_dim) float32 features of N images, computed where the encoder computes (flux_core.vram)."""
    device, dtype = compute_place(encoder)
    x = pixel_values(encoder, images).to(device, dtype)
    out = encoder(pixel_values=x)
    return (out.pooler_output if vision_family(encoder) == SIGLIP else out.image_embeds).float()
