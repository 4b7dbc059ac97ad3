"""InfiniteYou's image projector as a loadable kind (flux_core.models.infiniteyou).

Layouts: "bytedance": `image_proj_model.bin` (a torch file with an `image_proj` dict, read with weights_only=True)
or its keys under `image_proj.` in safetensors; "diffsynth": DiffSynth-Studio's training output
(`--remove_prefix_in_ckpt pipe.`: `image_proj_model.*` beside `controlnet.models.0.*`), also `pipe.image_proj_model.`.
InfuseNet, InfiniteYou's other half, is a FLUX ControlNet and loads as one (loading/controlnet_kind.py).
"""
from __future__ import annotations

from typing import Mapping

from ..models.infiniteyou import InfiniteYouProjector, ProjectorParams
from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

LAYOUTS = {"image_proj.": "bytedance", "image_proj_model.": "diffsynth", "pipe.image_proj_model.": "diffsynth",
           "": "bytedance"}
_PROBES = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_kv.weight")


def select_projector(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix, layout in LAYOUTS.items():
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        if all(p in sub for p in _PROBES):
            return layout, sub
    return None


def build_projector(sd: StateDict, config: dict) -> InfiniteYouProjector:
    return InfiniteYouProjector(ProjectorParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()}, config))


INFINITEYOU_KIND = ModelKind(name="infiniteyou", title="InfiniteYou image projector", select=select_projector,
                             build=build_projector)
