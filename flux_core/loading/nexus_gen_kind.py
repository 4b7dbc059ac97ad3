"""Nexus-Gen's models as loadable kinds (flux_core.models.nexus_gen).

- "nexus_gen": the autoregressive model, `DiffSynth-Studio/Nexus-GenV2`'s `model*.safetensors`: Qwen2.5-VL in its
  published layout (transformers 4.49 names: `visual.*`, `model.{embed_tokens,layers,norm}.*`, `lm_head.weight`;
  layout "published") or transformers 5.x's (`model.visual.*`, `model.language_model.*`; layout "transformers"),
  plus Nexus-Gen's head (`vision_head.weight`, `image_prefill_embeds.weight`). The head is what tells it from a plain
  Qwen2.5-VL, which the "qwen_vl" kind loads.
- "nexus_gen_adapter": `generation_decoder.bin`'s `adapter.*` keys (the generation adapter).
- "nexus_gen_merger": `edit_decoder.bin`'s `embedding_merger.*` keys (the editing adapter).
The decoders also hold the DiT under `pipe.dit.`, which the DiT kind loads (layout "nexus-gen"): one decoder file
given to FluxImagePipeline.from_pretrained fills pipe.dit and its adapter slot.

Sizes come from the shapes; a `config.json` beside the weights (or explicit config) overrides them. What shapes
cannot tell takes Qwen2.5-VL-7B's value: attention heads of 128 (text) and 80 (vision) wide, the vision tower's
112-pixel windows with full attention in blocks 7, 15, 23, 31.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

from torch import nn

from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

# Models are imported when built: transformers' Qwen2.5-VL code takes seconds to import, and detection needs none.
HEAD_KEYS = ("vision_head.weight", "image_prefill_embeds.weight")
ADAPTER_PREFIX = "adapter."
MERGER_PREFIX = "embedding_merger."
# Qwen2.5-VL-7B's vision tower: what its shapes do not say.
VISION_HEAD_DIM = 80
VISION_WINDOW_SIZE = 112
VISION_FULL_ATTENTION_EVERY = 8   # blocks 7, 15, 23, 31 of 32

# Published (transformers 4.49) name -> transformers 5.x Qwen2_5_VLForConditionalGeneration name.
_PUBLISHED_TO_TRANSFORMERS = ((re.compile(r"^visual\."), "model.visual."),
                              (re.compile(r"^model\.(?!visual\.|language_model\.)"), "model.language_model."))


def select_nexus_gen(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    if not all(k in sd for k in HEAD_KEYS):
        return None
    if "model.language_model.embed_tokens.weight" in sd and any(k.startswith("model.visual.") for k in sd):
        return "transformers", dict(sd)
    if "model.embed_tokens.weight" in sd and any(k.startswith("visual.") for k in sd):
        out = {}
        for key, value in sd.items():
            for pattern, replacement in _PUBLISHED_TO_TRANSFORMERS:
                key, n = pattern.subn(replacement, key)
                if n:
                    break
            out[key] = value
        return "published", out
    return None


def _count(shapes: Mapping[str, tuple], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def qwen_vl_config(shapes: Mapping[str, tuple], overrides: Mapping | None = None):
    """transformers' Qwen2_5_VLConfig of a Qwen2.5-VL state dict in transformers 5.x names, from its shapes, with
    `overrides` (a config.json in the published flat layout: text fields at the top, `vision_config` below) on top."""
    from transformers import Qwen2_5_VLConfig

    from ..models.nexus_gen import QWEN_HEAD_DIM, QWEN_MROPE_SECTION
    overrides = dict(overrides or {})
    vocab, hidden = shapes["model.language_model.embed_tokens.weight"]
    if not overrides.get("num_attention_heads") and hidden % QWEN_HEAD_DIM:
        raise ValueError(f"hidden size {hidden} is not a multiple of Qwen2.5-VL's head size {QWEN_HEAD_DIM}: give "
                         f"num_attention_heads in config (a config.json beside the weights)")
    heads = overrides.get("num_attention_heads") or hidden // QWEN_HEAD_DIM
    head_dim = hidden // heads
    if head_dim != QWEN_HEAD_DIM and "rope_scaling" not in overrides and "rope_parameters" not in overrides:
        raise ValueError(f"text head size {head_dim} is not Qwen2.5-VL's {QWEN_HEAD_DIM}: give the mrope_section "
                         f"(rope_scaling) in config")
    text = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=shapes["model.language_model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
                intermediate_size=shapes["model.language_model.layers.0.mlp.gate_proj.weight"][0],
                num_hidden_layers=_count(shapes, "model.language_model.layers."), rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": list(QWEN_MROPE_SECTION)},
                tie_word_embeddings="lm_head.weight" not in shapes)
    v_hidden, in_chans, temporal, patch, _ = shapes["model.visual.patch_embed.proj.weight"]
    depth = _count(shapes, "model.visual.blocks.")
    vision = dict(hidden_size=v_hidden, in_chans=in_chans, temporal_patch_size=temporal, patch_size=patch, depth=depth,
                  num_heads=v_hidden // VISION_HEAD_DIM, window_size=VISION_WINDOW_SIZE,
                  intermediate_size=shapes["model.visual.blocks.0.mlp.gate_proj.weight"][0],
                  out_hidden_size=shapes["model.visual.merger.mlp.2.weight"][0],
                  spatial_merge_size=math.isqrt(shapes["model.visual.merger.mlp.0.weight"][1] // v_hidden),
                  fullatt_block_indexes=list(range(VISION_FULL_ATTENTION_EVERY - 1, depth, VISION_FULL_ATTENTION_EVERY)),
                  hidden_act="silu", tokens_per_second=2)
    vision.update(overrides.pop("vision_config", None) or {})
    known = {k: v for k, v in overrides.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    return Qwen2_5_VLConfig(**{**text, **known, "vision_config": vision})


def build_nexus_gen(sd: StateDict, config: dict) -> nn.Module:
    from ..models.nexus_gen import NexusGenAutoregressiveModel
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return NexusGenAutoregressiveModel(qwen_vl_config(shapes, config),
                                       num_image_tokens=shapes["image_prefill_embeds.weight"][0])


def rebuild_rotary_buffers(module: nn.Module) -> None:
    """Re-create the rotary embeddings' frequency buffers (not stored in checkpoints, so still on the meta device
    after a meta build): each rotary module is rebuilt from its config and its buffers moved beside the weights."""
    device = next(module.parameters()).device
    for owner in module.modules():
        meta = [name for name, b in owner.named_buffers(recurse=False) if b.is_meta]
        if meta:
            fresh = type(owner)(owner.config)
            for name in meta:
                setattr(owner, name, getattr(fresh, name).to(device))


# The generation adapter's keys as DiffSynth's NexusGenAdapter names them (its Sequential is itself `adapter`).
ADAPTER_KEYS = frozenset(f"adapter.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias"))


def select_adapter(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    sub = {k: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)}
    if set(sub) == ADAPTER_KEYS:
        return "diffsynth", sub
    return None


def build_adapter(sd: StateDict, config: dict) -> nn.Module:
    from ..models.nexus_gen import NexusGenAdapter, NexusGenAdapterParams
    return NexusGenAdapter(NexusGenAdapterParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()}))


def select_merger(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    if not any(k.startswith(MERGER_PREFIX) for k in sd):
        return None
    sub = strip_prefix(sd, [MERGER_PREFIX])
    if "layers.0.self_attn.q_proj.weight" in sub and "projector.5.weight" in sub:
        return "diffsynth", sub
    return None


def build_merger(sd: StateDict, config: dict) -> nn.Module:
    from ..models.nexus_gen import NexusGenImageEmbeddingMerger, NexusGenMergerParams
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return NexusGenImageEmbeddingMerger(NexusGenMergerParams.from_state_dict_shapes(shapes, config))


NEXUS_GEN_KIND = ModelKind(name="nexus_gen", title="Nexus-Gen autoregressive model", select=select_nexus_gen,
                           build=build_nexus_gen, finalize=rebuild_rotary_buffers)
NEXUS_GEN_ADAPTER_KIND = ModelKind(name="nexus_gen_adapter", title="Nexus-Gen generation adapter",
                                   select=select_adapter, build=build_adapter)
NEXUS_GEN_MERGER_KIND = ModelKind(name="nexus_gen_merger", title="Nexus-Gen editing adapter (embedding merger)",
                                  select=select_merger, build=build_merger, finalize=rebuild_rotary_buffers)
