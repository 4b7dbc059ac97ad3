"""The IP-Adapters' image encoders as a loadable kind (flux_core.models.image_encoders).

SigLIP and CLIP vision towers are told apart by their keys (SigLIP: an attention-pooling `head.*`; CLIP: a class
embedding, `pre_layrnorm` and `visual_projection`). Layouts: "hf" (`vision_model.*`: a transformers folder such as
google/siglip-so400m-patch14-384 or openai/clip-vit-large-patch14, whose text tower is ignored, and ComfyUI's
`clip_vision/*.safetensors`), "flat" (the same names without `vision_model.`, as transformers 5 saves SigLIP).
"""
from __future__ import annotations

from typing import Mapping

from ..models.image_encoders import CLIP, SIGLIP, VisionParams, build_vision_encoder, vision_module_prefix
from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor
from .text_kinds import restore_position_ids

IMAGE_ENCODER_PREFIXES = ("pipe.ipadapter_image_encoder.", "ipadapter_image_encoder.", "image_encoder.")
_PROBE = "embeddings.patch_embedding.weight"


def vision_family_of(sd: Mapping[str, LazyTensor]) -> str | None:
    """SIGLIP or CLIP for a flat-named vision tower, None if the keys are not one."""
    if _PROBE not in sd or "encoder.layers.0.mlp.fc1.weight" not in sd:
        return None
    if "head.probe" in sd:
        return SIGLIP
    if "embeddings.class_embedding" in sd and "visual_projection.weight" in sd:
        return CLIP
    return None


def missing_for_features(sd: Mapping[str, LazyTensor]) -> str | None:
    """For a flat-named vision tower that cannot give an IP-Adapter's image features: what it lacks and what to use
    instead; None for anything else."""
    if _PROBE not in sd or "encoder.layers.0.mlp.fc1.weight" not in sd or vision_family_of(sd) is not None:
        return None
    if "embeddings.class_embedding" in sd:
        return ("a CLIP vision tower without its projection (visual_projection.weight): the XLabs IP-Adapter takes "
                "the projected image_embeds; use the tower saved with it (CLIPVisionModelWithProjection, as "
                "openai/clip-vit-large-patch14 and ComfyUI's clip_vision_l.safetensors hold it)")
    return ("a SigLIP vision tower without its attention-pooling head (head.*): the InstantX IP-Adapter takes the "
            "pooled output; use google/siglip-so400m-patch14-384 as published (its head included)")


def select_image_encoder(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + IMAGE_ENCODER_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        tower = {k[len("vision_model."):]: v for k, v in sub.items() if k.startswith("vision_model.")}
        layout = "hf" if tower else "flat"
        if not tower:
            tower = {k: v for k, v in sub.items() if not k.startswith(("text_model.", "logit_", "text_projection"))}
        if "visual_projection.weight" in sub:
            tower["visual_projection.weight"] = sub["visual_projection.weight"]
        family = vision_family_of(tower)
        if family is None and missing_for_features(tower) is not None:   # refused by name when built
            family = CLIP if "embeddings.class_embedding" in tower else SIGLIP
        if family is not None:
            module_prefix = vision_module_prefix(family)
            tower.pop("embeddings.position_ids", None)  # a buffer (0..n), not a weight
            return f"{layout}-{family}", {(k if k == "visual_projection.weight" else module_prefix + k): v
                                          for k, v in tower.items()}
    return None


def build_image_encoder(sd: StateDict, config: dict):
    shapes = {k.removeprefix("vision_model."): v.shape for k, v in sd.items()}   # select's module names, flat
    missing = missing_for_features(shapes)
    if missing:
        raise ValueError(f"it is {missing}.")
    family = vision_family_of(shapes)
    config = dict(config)
    if isinstance(config.get("vision_config"), Mapping):  # a whole SiglipConfig / CLIPConfig
        # A CLIPConfig keeps the projection width at its top level; its vision_config carries CLIPVisionConfig's
        # default (512), which is not the width of this file's visual_projection.
        config = {**config["vision_config"],
                  **({"projection_dim": config["projection_dim"]} if "projection_dim" in config else {})}
    return build_vision_encoder(VisionParams.from_state_dict_shapes(family, shapes, config))


IMAGE_ENCODER_KIND = ModelKind(name="image_encoder", title="IP-Adapter image encoder (SigLIP / CLIP vision)",
                               select=select_image_encoder, build=build_image_encoder,
                               finalize=restore_position_ids)
