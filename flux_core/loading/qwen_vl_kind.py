"""Qwen2.5-VL (Step1X-Edit's conditioning encoder) as a loadable kind: transformers' `Qwen2_5_VLModel` (the vision
tower and the language model; the LM head is not loaded: Step1X-Edit reads hidden states, and the 7B's head is
1.1 GB in bf16).

Layouts:
- "hf": Qwen/Qwen2.5-VL-7B-Instruct as published (`model-0000i-of-00005.safetensors`: `model.*` language model,
  `visual.*` vision tower, `lm_head.weight`);
- "transformers5": `model.language_model.*`, `model.visual.*`, `lm_head.weight` (transformers 5's
  Qwen2_5_VLForConditionalGeneration.save_pretrained, DiffSynth-Studio's QwenImageTextEncoder names);
- "base": `language_model.*`, `visual.*` (a saved Qwen2_5_VLModel).
Any of them may be one file (ComfyUI's `text_encoders/qwen_2.5_vl_7b.safetensors`, the "hf" names without the LM
head) and ComfyUI "scaled fp8" (`*_fp8_scaled.safetensors`: dequantized while loading, as for the DiT).
Nexus-Gen's autoregressive model is a Qwen2.5-VL with an image head (`vision_head`, `image_prefill_embeds`): it is
the Nexus-Gen kind's, never this one's.

The config comes from the folder's config.json (the published flat one, or transformers 5's nested one); without
one, from the shapes when they are the published 7B's (heads, rotary sections and the vision tower's windows are not
in the shapes); otherwise the load is refused with what to add.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..dtypes import FLOAT8_DTYPES
from ..vram import stored_compute_dtype
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor
from .scaled_fp8 import dequantize_scaled_fp8

NEXUS_GEN_KEYS = ("image_prefill_embeds", "vision_head")
_LAYOUTS = (  # (layout, language model prefix, vision tower prefix)
    ("hf", "model.", "visual."),
    ("transformers5", "model.language_model.", "model.visual."),
    ("base", "language_model.", "visual."),
)
_TEXT_PROBE, _VISION_PROBE = "embed_tokens.weight", "patch_embed.proj.weight"

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, the fields the shapes cannot tell (text hidden 3584, vision hidden 1280).
QWEN25_VL_7B = {
    "text": dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000,
                 rms_norm_eps=1e-6, sliding_window=32768, use_sliding_window=False, hidden_act="silu"),
    "vision": dict(hidden_size=1280, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_chans=3,
                   hidden_act="silu"),
}


def is_nexus_gen(sd: Mapping[str, LazyTensor]) -> bool:
    return any(part in k for k in sd for part in NEXUS_GEN_KEYS)


def select_qwen_vl(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    if is_nexus_gen(sd):
        return None
    for layout, text, vision in _LAYOUTS:
        if text + _TEXT_PROBE in sd and vision + _VISION_PROBE in sd:
            sd, scaled = dequantize_scaled_fp8(sd)   # ComfyUI's qwen_2.5_vl_7b_fp8_scaled.safetensors
            layout += "+scaled-fp8" if scaled else ""
            out = {}
            for k, v in sd.items():
                if k.startswith(vision):
                    out["visual." + k[len(vision):]] = v
                elif k.startswith(text):
                    out["language_model." + k[len(text):]] = v
            return layout, out
    return None


def require_transformers_5() -> None:
    """FluxCore builds Qwen2.5-VL (Step1X-Edit's encoder, Nexus-Gen's model) on transformers 5's classes, whose module
    layout (`language_model`, `visual` inside the base model) and rotary embeddings 4.x lacks."""
    import transformers
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ValueError(f"Qwen2.5-VL models need transformers 5 or newer, and {transformers.__version__} is "
                         f"installed: pip install -U \"transformers>=5\" (FLUX.1's own models work with either).")


def qwen_vl_config(sd: Mapping[str, LazyTensor] | Mapping[str, tuple], config: Mapping):
    """transformers' Qwen2_5_VLConfig: from `config` (a config.json, flat or with text_config) when it is a
    Qwen2.5-VL one, else from the shapes of the published 7B. Raises ValueError naming what to add."""
    require_transformers_5()
    from transformers import Qwen2_5_VLConfig
    config = dict(config)
    if config.get("model_type") == "qwen2_5_vl":
        return Qwen2_5_VLConfig(**config)
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in sd.items()}
    vocab, hidden = shape["language_model.embed_tokens.weight"]
    vision_hidden = shape["visual.patch_embed.proj.weight"][0]
    known = QWEN25_VL_7B
    if (hidden, vision_hidden) != (known["text"]["hidden_size"], known["vision"]["hidden_size"]):
        raise ValueError(f"its text model is {hidden} wide with a {vision_hidden}-wide vision tower, not "
                         f"Qwen2.5-VL-7B's {known['text']['hidden_size']} / {known['vision']['hidden_size']}: its "
                         f"head counts and rotary sections are not in the weights. Put the model's config.json "
                         f"beside the weights (or pass config= with its fields).")
    layers = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("language_model.layers."))
    blocks = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("visual.blocks."))
    text = dict(known["text"], vocab_size=vocab, num_hidden_layers=layers,
                intermediate_size=shape["language_model.layers.0.mlp.gate_proj.weight"][0])
    vision = dict(known["vision"], depth=blocks, intermediate_size=shape["visual.blocks.0.mlp.gate_proj.weight"][0],
                  out_hidden_size=shape["visual.merger.mlp.2.weight"][0])
    return Qwen2_5_VLConfig(**text, vision_config=vision, **{k: v for k, v in config.items() if k != "model_type"})


def build_qwen_vl(sd: StateDict, config: dict) -> nn.Module:
    from transformers import Qwen2_5_VLModel
    return Qwen2_5_VLModel(qwen_vl_config(sd, config))


def finalize_qwen_vl(module: nn.Module) -> None:
    """Re-create the rotary embeddings' inverse frequencies (non-persistent buffers the meta-device build leaves
    unset), on the weights' device, in float32 as transformers keeps them. Under FP8 storage, the patch embedding's
    weight goes back to the compute dtype (its FP8 values, 1.5 M of them in the 7B): transformers casts the pixels to
    that weight's dtype (`visual.dtype` is it, and the embedding casts to it again), and FP8 pixels would lose all
    but 3 bits and then fail in the convolution."""
    device = next(module.parameters()).device
    with torch.device(device):
        module.language_model.rotary_emb = type(module.language_model.rotary_emb)(module.language_model.config)
        module.visual.rotary_pos_emb = type(module.visual.rotary_pos_emb)(module.visual.config)
    proj = module.visual.patch_embed.proj
    if proj.weight.dtype in FLOAT8_DTYPES:
        proj.weight = nn.Parameter(proj.weight.to(stored_compute_dtype(module)), requires_grad=False)


QWEN_VL_KIND = ModelKind(name="qwen_vl", title="Qwen2.5-VL", select=select_qwen_vl, build=build_qwen_vl,
                         finalize=finalize_qwen_vl)
