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

The AR model's config is made as the qwen_vl kind makes it (qwen_vl_kind.qwen_vl_config: the config.json beside the
weights, else Qwen2.5-VL-7B's from the shapes). The adapters' sizes come from their shapes; the merger's head size is
Qwen's 128 unless a config says otherwise (flux_core.models.nexus_gen.NexusGenMergerParams).
"""
from __future__ import annotations

import re
from typing import Mapping

from torch import nn

from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor
from .qwen_vl_kind import finalize_qwen_vl, qwen_vl_config

# Models are imported when built: transformers' Qwen2.5-VL code takes seconds to import, and detection needs none.
HEAD_KEYS = ("vision_head.weight", "image_prefill_embeds.weight")
ADAPTER_PREFIX = "adapter."
MERGER_PREFIX = "embedding_merger."

# Published (transformers 4.49) name -> transformers 5.x Qwen2_5_VLForConditionalGeneration name.
_PUBLISHED_TO_TRANSFORMERS = ((re.compile(r"^visual\."), "model.visual."),
                              (re.compile(r"^model\.(?!visual\.|language_model\.)"), "model.language_model."))


def select_nexus_gen(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    """The AR model's keys in transformers 5.x names; the language-model head (`lm_head.weight`) is left out: the
    model does not keep it (flux_core.models.nexus_gen.NexusGenAutoregressiveModel)."""
    if not all(k in sd for k in HEAD_KEYS):
        return None
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
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


def build_nexus_gen(sd: StateDict, config: dict) -> nn.Module:
    """The config as the qwen_vl kind makes it (config.json, else Qwen2.5-VL-7B's sizes), from the Qwen2.5-VL keys."""
    from ..models.nexus_gen import NexusGenAutoregressiveModel
    qwen = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return NexusGenAutoregressiveModel(qwen_vl_config(qwen, config),
                                       num_image_tokens=sd["image_prefill_embeds.weight"].shape[0])


def finalize_nexus_gen(module: nn.Module) -> None:
    finalize_qwen_vl(module.model)


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


def finalize_merger(module: nn.Module) -> None:
    module.reset_rotary()


def is_qwen_vl_config(config: dict) -> bool:
    return config.get("model_type") == "qwen2_5_vl"


def is_not_transformers_config(config: dict) -> bool:
    """The merger's few settings (num_heads, mrope_section) beside a decoder; a Qwen2.5-VL config.json there is the
    AR model's."""
    return "model_type" not in config


NEXUS_GEN_KIND = ModelKind(name="nexus_gen", title="Nexus-Gen autoregressive model", select=select_nexus_gen,
                           build=build_nexus_gen, finalize=finalize_nexus_gen, reads_config=is_qwen_vl_config)
NEXUS_GEN_ADAPTER_KIND = ModelKind(name="nexus_gen_adapter", title="Nexus-Gen generation adapter",
                                   select=select_adapter, build=build_adapter)
NEXUS_GEN_MERGER_KIND = ModelKind(name="nexus_gen_merger", title="Nexus-Gen editing adapter (embedding merger)",
                                  select=select_merger, build=build_merger, finalize=finalize_merger,
                                  reads_config=is_not_transformers_config)
