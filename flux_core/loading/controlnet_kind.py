"""The FLUX ControlNet as a loadable kind: find it in any layout, build it from its shapes.

Layouts (the heads `controlnet_blocks.N`, `controlnet_single_blocks.N`, `controlnet_x_embedder`,
`controlnet_mode_embedder` have the same names in all of them; only the trunk differs, and it is converted by the
DiT's own converters):
- "diffusers": the published checkpoints (InstantX Union-alpha, alimama Inpainting-Beta, jasperai Upscaler,
  InfiniteYou InfuseNet): `diffusion_pytorch_model.safetensors` (or shards) with `config.json`; trunk named
  `x_embedder`, `time_text_embed.*`, `transformer_blocks.N`, `single_transformer_blocks.N`;
- "diffsynth": DiffSynth-Studio's internal names (`blocks.N.attn.a_to_qkv`, ...), as its converter and its
  ControlNet training write them;
- "bfl": FluxCore's own names (`img_in`, `double_blocks.N`, ...), as `FluxControlNet.state_dict()` writes them.
Any of them may sit under `controlnet.` or DiffSynth's training prefixes `pipe.controlnet.models.0.` and `controlnet.models.0.`.

XLabs FLUX ControlNets and Stable Diffusion ControlNets are recognised by their keys and refused by name
(`describe_unsupported_controlnet`).
"""
from __future__ import annotations

import re
from typing import Mapping

from ..models.controlnet import ControlNetParams, FluxControlNet
from .dit_kind import dit_overrides
from .dit_layouts import detect_dit_layout, dit_to_bfl
from .files import strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

# DiffSynth's training writes `pipe.controlnet.models.0.`, or `controlnet.models.0.` after --remove_prefix_in_ckpt
# "pipe." (InfiniteYou's full training: InfuseNet beside `image_proj_model.*`).
CONTROLNET_PREFIXES = ("controlnet.models.0.", "controlnet.", "pipe.controlnet.models.0.")

SUPPORTED = ("the diffusers-format FLUX ControlNets (InstantX Union-alpha, alimama Inpainting-Beta, jasperai "
             "Upscaler, InfiniteYou InfuseNet: diffusion_pytorch_model.safetensors with its config.json)")


def detect_controlnet_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    if "controlnet_x_embedder.weight" not in sd or _has_part(sd, "input_hint_block"):
        return None
    if "img_in.weight" in sd and "time_in.in_layer.weight" in sd:  # our own names: the DiT's, without a final layer
        return "bfl"
    return detect_dit_layout(sd)  # a diffusers or DiffSynth trunk, told apart as for the DiT


def select_controlnet(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + CONTROLNET_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        layout = detect_controlnet_layout(sub)
        if layout:
            return layout, dit_to_bfl(sub, layout)  # the heads pass through the trunk's renaming untouched
    return None


def build_controlnet(sd: StateDict, config: dict) -> FluxControlNet:
    shapes = {k: v.shape for k, v in sd.items()}
    # RoPE axes come the DiT's way: explicit `axes_dim` or diffusers' `axes_dims_rope` in config.json.
    return FluxControlNet(ControlNetParams.from_state_dict_shapes(shapes, dit_overrides(config)))


def describe_unsupported_controlnet(sd: Mapping[str, LazyTensor]) -> str | None:
    """What a ControlNet file FluxCore does not run is (a sentence naming it and what to use instead), or None."""
    if _has_part(sd, "input_hint_block") and (_has_part(sd, "double_blocks") or _has_part(sd, "transformer_blocks")
                                              or _has_part(sd, "pos_embed_input")):
        return (f"an XLabs-style FLUX ControlNet (input_hint_block.* beside the transformer blocks: the control "
                f"image goes through a pixel-space hint encoder), which FluxCore does not run. FluxCore runs "
                f"{SUPPORTED}.")
    # zero_convs / controlnet_down_blocks: the per-level outputs only an SD ControlNet has (not an SD UNet)
    if _has_part(sd, "control_model") or _has_part(sd, "zero_convs"):
        return (f"a Stable Diffusion 1.5/SDXL ControlNet (LDM layout: control_model.*, input_blocks.*, "
                f"zero_convs.*), not a FLUX ControlNet. FluxCore runs {SUPPORTED}.")
    if _has_part(sd, "controlnet_cond_embedding") or _has_part(sd, "controlnet_down_blocks"):
        return (f"a Stable Diffusion 1.5/SDXL ControlNet (diffusers ControlNetModel layout: "
                f"controlnet_cond_embedding.*, controlnet_down_blocks.*), not a FLUX ControlNet. "
                f"FluxCore runs {SUPPORTED}.")
    return None


def _has_part(sd: Mapping[str, LazyTensor], name: str) -> bool:
    """Whether a key has `name` as a whole dotted part (at the start or after a wrapper prefix)."""
    part = re.compile(r"(^|\.)" + re.escape(name) + r"\.")
    return any(part.search(k) for k in sd)


CONTROLNET_KIND = ModelKind(name="controlnet", title="FLUX ControlNet", select=select_controlnet,
                            build=build_controlnet)
