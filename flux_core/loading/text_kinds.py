"""CLIP-L and T5-XXL as loadable kinds: find them in any published layout, build them from their shapes.

CLIP-L layouts:
- "hf": diffusers/HF `text_encoder/model.safetensors` and ComfyUI's `clip_l.safetensors` (`text_model.*`;
  `text_projection.weight`, `logit_scale` and a vision tower, when present, are ignored);
- "flat": the same names without `text_model.` (transformers 5 `save_pretrained`, stripped single files).
T5 layouts:
- "hf": `text_encoder_2/` (sharded, with `model.safetensors.index.json`), `t5xxl_fp16.safetensors`,
  `t5xxl_fp8_e4m3fn.safetensors`; `shared.weight` and `encoder.embed_tokens.weight` are the same (tied) tensor
  and either one is enough; a full encoder-decoder T5 keeps only its encoder.
Both may sit under an all-in-one wrapper prefix (ComfyUI FLUX checkpoints `text_encoders.clip_l.transformer.` /
`text_encoders.t5xxl.transformer.`, SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`)
and may be ComfyUI "scaled fp8" files (`*_fp8_e4m3fn_scaled.safetensors`), dequantized while loading (loading/scaled_fp8.py,
the mechanism the DiT uses too).
"""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from ..models.text_encoders import (ClipParams, T5Params, build_clip, build_t5, clip_module_naming)
from .files import strip_prefix
from .lazy import LazyTensor
from .kinds import ModelKind, StateDict
from .scaled_fp8 import dequantize_scaled_fp8

logger = logging.getLogger(__name__)

CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "clip_l.transformer.", "cond_stage_model.transformer.",
                 "conditioner.embedders.0.transformer.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.")

_CLIP_GROUPS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_T5_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"


# --------------------------------------------------------------------------------------------------- CLIP

def detect_clip_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    for layout, prefix in (("hf", "text_model."), ("flat", "")):
        if (prefix + "embeddings.token_embedding.weight" in sd and prefix + "final_layer_norm.weight" in sd
                and prefix + "encoder.layers.0.self_attn.q_proj.weight" in sd
                and prefix + "head.weight" not in sd):  # SigLIP's text tower (beside its vision tower) has a head
            return layout
    return None


def select_clip(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + CLIP_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else sd
        layout = detect_clip_layout(sub)
        if layout:
            return layout, clip_to_module_names(sub, layout)
    return None


def clip_to_module_names(sd: Mapping[str, LazyTensor], layout: str) -> StateDict:
    """The text tower's weights under the names this transformers version's `CLIPTextModel` uses."""
    sd, _ = dequantize_scaled_fp8(sd)
    src = "text_model." if layout == "hf" else ""
    flat = {k[len(src):]: v for k, v in sd.items() if k.startswith(src) and k[len(src):].startswith(_CLIP_GROUPS)}
    # position_ids is a buffer (0..76), not a weight: old files carry it, some with broken (float, rounded) values.
    flat.pop("embeddings.position_ids", None)
    prefix, persistent_ids = clip_module_naming()
    if persistent_ids and "embeddings.position_embedding.weight" in flat:
        n = flat["embeddings.position_embedding.weight"].shape[0]
        flat["embeddings.position_ids"] = LazyTensor((1, n), torch.int64, lambda: torch.arange(n)[None], "arange")
    return {prefix + k: v for k, v in flat.items()}


def build_clip_kind(sd: StateDict, config: dict) -> nn.Module:
    prefix, _ = clip_module_naming()
    shapes = {k[len(prefix):]: v.shape for k, v in sd.items()}
    return build_clip(ClipParams.from_state_dict_shapes(shapes, clip_overrides(config)))


def clip_overrides(config: Mapping) -> dict:
    """ClipParams overrides from a config.json (a CLIPTextConfig, or a full CLIPConfig's `text_config`)."""
    config = dict(config)
    if isinstance(config.get("text_config"), Mapping):
        config = {**config.pop("text_config"), **{k: v for k, v in config.items() if k != "model_type"}}
    return _same_family(config, ("clip_text_model", "clip"), "CLIP text")


def restore_position_ids(module: nn.Module) -> None:
    """Re-create `position_ids` (a non-persistent buffer the meta-device build leaves unset) of transformers' CLIP
    and SigLIP towers."""
    for name, buf in list(module.named_buffers()):
        if name.endswith("position_ids") and buf.is_meta:
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            device = next(module.parameters()).device
            ids = torch.arange(buf.shape[-1], device=device).expand(tuple(buf.shape))
            owner.register_buffer("position_ids", ids, persistent="position_ids" not in owner._non_persistent_buffers_set)


# ----------------------------------------------------------------------------------------------------- T5

def detect_t5_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    return "hf" if _T5_PROBE in sd else None


def select_t5(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + T5_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else sd
        layout = detect_t5_layout(sub)
        if layout:
            module_sd, notes = t5_to_module_names(sub)
            return "+".join([layout, *notes]), module_sd
    return None


def t5_to_module_names(sd: Mapping[str, LazyTensor]) -> tuple[StateDict, list[str]]:
    """(`T5EncoderModel` state dict, layout notes). A decoder and an LM head are dropped; the token embedding is
    given under both of its tied names (one tensor, loaded once)."""
    sd, scaled = dequantize_scaled_fp8(sd)
    out = {k: v for k, v in sd.items() if k.startswith("encoder.") and k != "encoder.embed_tokens.weight"}
    # transformers ties encoder.embed_tokens to shared: `shared.weight` wins when a file holds both.
    embed = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if embed is not None:
        out["shared.weight"] = out["encoder.embed_tokens.weight"] = embed
    notes = (["decoder-dropped"] if any(k.startswith("decoder.") for k in sd) else []) + (["scaled-fp8"] if scaled else [])
    return out, notes


def build_t5_kind(sd: StateDict, config: dict) -> nn.Module:
    shapes = {k: v.shape for k, v in sd.items()}
    return build_t5(T5Params.from_state_dict_shapes(shapes, _same_family(config, ("t5",), "T5")))


def finalize_t5(module: nn.Module) -> None:
    """Tie `encoder.embed_tokens` back to `shared` (assign=True loading gives each name its own Parameter)."""
    module.encoder.embed_tokens.weight = module.shared.weight


# ----------------------------------------------------------------------------------------------- helpers

def _same_family(config: Mapping, model_types: tuple[str, ...], title: str) -> dict:
    """A config.json of another model family (say, a T5 config beside a CLIP file) says nothing about this one."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in model_types:
        logger.warning("Ignoring a config of model_type %r while loading a %s encoder: the config is taken from "
                       "the weights' shapes instead.", model_type, title)
        return {}
    return dict(config)


CLIP_KIND = ModelKind(name="clip", title="CLIP-L text encoder", select=select_clip, build=build_clip_kind,
                      finalize=restore_position_ids)
T5_KIND = ModelKind(name="t5", title="T5-XXL text encoder", select=select_t5, build=build_t5_kind,
                    finalize=finalize_t5)
