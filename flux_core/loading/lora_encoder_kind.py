"""DiffSynth-Studio's LoRA-Encoder as a loadable kind (flux_core.models.lora_encoder).

Layout "diffsynth": `DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev`'s model.safetensors (DiffSynth's own parameter names),
also with the prefixes of DiffSynth's training output (`pipe.lora_encoder.`, `lora_encoder.`).
"""
from __future__ import annotations

from typing import Mapping

from ..models.lora_encoder import FluxLoraEncoder, LoraEncoderParams
from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

PREFIXES = ("pipe.lora_encoder.", "lora_encoder.", "")
_PROBES = ("special_embeds", "final_linear.weight", "final_layer_norm.weight", "encoders.0.attn.to_q.weight")


def select_lora_encoder(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        if (all(p in sub for p in _PROBES) and any(k.startswith("embedder.model_dict.") for k in sub)
                and any(k.startswith("embedder.proj_dict.") for k in sub)):
            return "diffsynth", sub
    return None


def build_lora_encoder(sd: StateDict, config: dict) -> FluxLoraEncoder:
    return FluxLoraEncoder(LoraEncoderParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()}, config))


LORA_ENCODER_KIND = ModelKind(name="lora_encoder", title="LoRA-Encoder", select=select_lora_encoder,
                              build=build_lora_encoder)
