"""DiffSynth-Studio's LoRA-Fusion-Preview patcher as a loadable kind (flux_core.models.lora_patcher).

Layout "diffsynth": `DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev`'s model.safetensors (`model_dict.<site>.*`),
also under the prefixes of DiffSynth's training output (`pipe.lora_patcher.`, `lora_patcher.`).
"""
from __future__ import annotations

from typing import Mapping

from ..models.lora_patcher import FluxLoraPatcher, LoraPatcherParams
from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

PREFIXES = ("pipe.lora_patcher.", "lora_patcher.", "")
_SUFFIXES = (".weight_base", ".weight_lora", ".weight_cross", ".weight_out", ".norm_lora.weight")


def select_lora_patcher(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        merged = [k for k in sub if k.startswith("model_dict.")]
        if merged and all(any(k.endswith(s) for k in merged) for s in _SUFFIXES):
            return "diffsynth", sub
    return None


def build_lora_patcher(sd: StateDict, config: dict) -> FluxLoraPatcher:
    return FluxLoraPatcher(LoraPatcherParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()}, config))


LORA_PATCHER_KIND = ModelKind(name="lora_patcher", title="LoRA-Fusion patcher", select=select_lora_patcher,
                              build=build_lora_patcher)
