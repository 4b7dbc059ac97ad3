"""The FLUX DiT as a loadable kind: find it in any layout, build it from its shapes."""
from __future__ import annotations

from typing import Mapping

from ..models.controlnet import has_controlnet_heads
from ..models.dit import FluxDiT, FluxParams
from .dit_layouts import DIT_PREFIXES, NEXUS_GEN_PREFIX, detect_dit_layout, dit_to_bfl
from .files import strip_prefix
from .lazy import LazyTensor
from .scaled_fp8 import dequantize_scaled_fp8
from .kinds import ModelKind, StateDict

# diffusers config.json names -> FluxParams fields (only what the shapes cannot tell).
_DIFFUSERS_CONFIG = {"axes_dims_rope": "axes_dim"}
_PARAM_FIELDS = set(FluxParams.__dataclass_fields__)


def select_dit(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    if has_controlnet_heads(sd):  # a FLUX ControlNet's trunk has DiT names: the ControlNet kind takes it
        return None
    for prefix in ("",) + DIT_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        layout = detect_dit_layout(sub)
        if layout == "diffsynth" and prefix == NEXUS_GEN_PREFIX:  # reached only when keys carry the prefix
            layout = "nexus-gen"
        if layout:
            sub, scaled = dequantize_scaled_fp8(sub)
            return layout + ("+scaled-fp8" if scaled else ""), dit_to_bfl(sub, layout)
    return None


def dit_overrides(config: Mapping) -> dict:
    """FluxParams overrides from an explicit config or a diffusers config.json (other keys are ignored)."""
    out = {}
    for key, value in config.items():
        key = _DIFFUSERS_CONFIG.get(key, key)
        if key in _PARAM_FIELDS and value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def build_dit(sd: StateDict, config: dict) -> FluxDiT:
    shapes = {k: v.shape for k, v in sd.items()}
    return FluxDiT(FluxParams.from_state_dict_shapes(shapes, dit_overrides(config)))


def is_dit_config(config: dict) -> bool:
    """A diffusers transformer's config.json (`_class_name`), not a transformers model's (`model_type`)."""
    return "model_type" not in config


DIT_KIND = ModelKind(name="dit", title="FLUX DiT (diffusion model)", select=select_dit, build=build_dit,
                     reads_config=is_dit_config)
