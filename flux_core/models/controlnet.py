"""The FLUX ControlNet: a short copy of the DiT's trunk whose blocks emit per-block residuals for the image tokens.

One model serves the published diffusers-format FLUX ControlNets (InstantX Union-alpha, alimama Inpainting-Beta,
jasperai Upscaler, InfiniteYou InfuseNet): they differ only in depth, in a mode embedder (union) and in the width of
the control input (alimama adds a mask channel: 4 more packed features). The trunk has the DiT's Black Forest Labs
names and blocks; the heads keep their published names (`controlnet_blocks.N`, `controlnet_single_blocks.N`,
`controlnet_x_embedder`, `controlnet_mode_embedder`). The forward follows DiffSynth-Studio's `FluxControlNet` and
diffusers' `FluxControlNetModel`; `spread_residuals` maps its residuals onto the DiT's blocks as DiffSynth does.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..math import embed_positions, timestep_embedding
from .dit import FluxDiT
from .layers import DoubleStreamBlock, MLPEmbedder, SingleStreamBlock
from .shapes import FLUX_AXES_DIM, trunk_config

# InstantX Union-alpha's control modes (its model card; DiffSynth's `mode_dict`). The embedder has 10 rows, of which
# these 7 were trained.
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
UNION_MODE_ALIASES = {"low quality": 6, "low_quality": 6}

# The ControlNet's own heads: a state dict with any of these is a ControlNet, never a DiT.
CONTROLNET_HEADS = ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder",
                    "controlnet_mode_embedder")
_HEAD_KEY = re.compile(r"(^|\.)(" + "|".join(CONTROLNET_HEADS) + r")\.")


def has_controlnet_heads(keys) -> bool:
    """Whether any key belongs to a ControlNet head (also under a wrapper prefix such as `controlnet.`)."""
    return any(_HEAD_KEY.search(k) for k in keys)


@dataclass(frozen=True)
class ControlNetParams:
    in_channels: int = 64               # the DiT's image tokens: 16 latent channels x 2x2 patch
    extra_condition_channels: int = 0   # packed control features beyond in_channels (alimama Inpainting-Beta: 4)
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 5                      # double-stream blocks of the ControlNet itself
    depth_single_blocks: int = 10
    axes_dim: tuple[int, ...] = FLUX_AXES_DIM
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    num_modes: int = 0                  # rows of the union mode embedder; 0 = no mode embedder

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ControlNetParams: hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}.")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"ControlNetParams: axes_dim {tuple(self.axes_dim)} must sum to the head dim "
                             f"{self.head_dim}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def control_channels(self) -> int:
        """Width of the packed control tokens: in_channels + extra_condition_channels."""
        return self.in_channels + self.extra_condition_channels

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]],
                               overrides: Mapping | None = None) -> "ControlNetParams":
        """Read the config off a state dict in our names (BFL trunk, published heads). Only the RoPE axes and theta
        cannot be read from shapes: the axes take the FLUX value for head dim 128 and must be given
        (`overrides["axes_dim"]`, diffusers `axes_dims_rope`) for any other head dim, exactly as for the DiT."""
        overrides = dict(overrides or {})
        inferred = trunk_config(shapes, overrides, "ControlNet")
        mode_shape = shapes.get("controlnet_mode_embedder.weight")
        in_channels = inferred["in_channels"]
        inferred.update(extra_condition_channels=shapes["controlnet_x_embedder.weight"][1] - in_channels,
                        num_modes=mode_shape[0] if mode_shape else 0)
        if inferred["extra_condition_channels"] < 0:
            raise ValueError(f"controlnet_x_embedder takes {shapes['controlnet_x_embedder.weight'][1]} features, "
                             f"fewer than img_in's {in_channels}.")
        inferred.update({k: v for k, v in overrides.items() if k in ("axes_dim", "theta")})
        inferred["axes_dim"] = tuple(inferred["axes_dim"])
        return cls(**inferred)


def union_mode_id(processor_id: str | int) -> int:
    """The union ControlNet mode id of a mode name ("canny", "depth", "low quality", ...) or id (0..6)."""
    valid = ", ".join(f"{name!r} ({i})" for name, i in UNION_MODES.items())
    if isinstance(processor_id, bool):  # bool is an int: never a mode
        raise ValueError(f"processor_id {processor_id!r} is not a union ControlNet mode; use one of {valid}.")
    if isinstance(processor_id, int):
        if processor_id in UNION_MODES.values():
            return processor_id
        raise ValueError(f"processor_id {processor_id} is not a union ControlNet mode id; use one of {valid}.")
    name = str(processor_id).strip().lower()
    mode = UNION_MODES.get(name, UNION_MODE_ALIASES.get(name))
    if mode is None:
        raise ValueError(f"processor_id {processor_id!r} is not a union ControlNet mode; use one of {valid} "
                         f"('low quality' and 'low_quality' also name 'lq').")
    return mode


def spread_residuals(residuals: Sequence[torch.Tensor], num_blocks: int) -> list[torch.Tensor | None]:
    """Map a ControlNet's residuals onto `num_blocks` DiT blocks as DiffSynth does: with
    `interval = ceil(num_blocks / n)`, block j gets `residuals[j // interval]`. No residuals: None for every block
    (the DiT then adds nothing), not zero tensors."""
    if not residuals:
        return [None] * num_blocks
    interval = math.ceil(num_blocks / len(residuals))
    return [residuals[j // interval] for j in range(num_blocks)]


class FluxControlNet(nn.Module):
    # Training (flux_core.train, `--trainable_models controlnet`): the DiT's gradient checkpointing, same switches.
    gradient_checkpointing = False
    gradient_checkpointing_offload = False
    run_block = FluxDiT.run_block

    def __init__(self, params: ControlNetParams = ControlNetParams()):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.img_in = nn.Linear(params.in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(params.depth))
        self.controlnet_single_blocks = nn.ModuleList(
            nn.Linear(hidden, hidden) for _ in range(params.depth_single_blocks))
        self.controlnet_x_embedder = nn.Linear(params.control_channels, hidden)
        self.controlnet_mode_embedder = nn.Embedding(params.num_modes, hidden) if params.num_modes else None

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None, control: torch.Tensor,
                mode: int | str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """img (B, L, in_channels): the DiT's packed latent tokens (no extra channels, no Kontext references);
        control (B or 1, L, in_channels + extra_condition_channels): the packed control latent; txt (B, Lt, context);
        ids as the DiT takes them; timesteps sigma in [0, 1] (B,); guidance (B,) or None; y pooled (B, vec).
        `mode`: the union mode (an id, or a name for `union_mode_id`), required by a ControlNet with a mode
        embedder and refused by one without. Returns (double-block residuals, single-block residuals), one
        (B, L, hidden) tensor per block of this ControlNet, not yet spread over the DiT's blocks."""
        self._check_inputs(img, control, mode)
        dtype = img.dtype
        # a control of batch 1 broadcasts over the batch: one control image may serve every sample
        img = self.img_in(img) + self.controlnet_x_embedder(control.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed and guidance is not None:  # None leaves the embedder out, as in the DiT
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        if self.controlnet_mode_embedder is not None:
            # The mode is one more text token, in front, with position id zero.
            mode_id = torch.full((txt.shape[0], 1), self._mode_id(mode), dtype=torch.long, device=txt.device)
            txt = torch.cat((self.controlnet_mode_embedder(mode_id).to(dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids.new_zeros(txt_ids.shape[0], 1, txt_ids.shape[2]), txt_ids), dim=1)
        pe = embed_positions(torch.cat((txt_ids, img_ids), dim=1), list(self.params.axes_dim), self.params.theta)

        double_res = []
        for block, head in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = self.run_block(block, img=img, txt=txt, vec=vec, pe=pe)
            double_res.append(head(img))
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        single_res = []
        for block, head in zip(self.single_blocks, self.controlnet_single_blocks):
            x = self.run_block(block, x, vec=vec, pe=pe)
            single_res.append(head(x[:, n_txt:]))
        return double_res, single_res

    def _mode_id(self, mode: int | str) -> int:
        return union_mode_id(mode) if isinstance(mode, str) else int(mode)

    def _check_inputs(self, img: torch.Tensor, control: torch.Tensor, mode) -> None:
        p = self.params
        problems = []
        if img.shape[-1] != p.in_channels:
            problems.append(f"img has {img.shape[-1]} features per token, the ControlNet's img_in takes "
                            f"{p.in_channels} (give the DiT's packed latent without extra channels)")
        if control.shape[-1] != p.control_channels:
            extra = (f" ({p.in_channels} latent + {p.extra_condition_channels} mask features)"
                     if p.extra_condition_channels else "")
            problems.append(f"control has {control.shape[-1]} features per token, this ControlNet takes "
                            f"{p.control_channels}{extra}")
        if control.shape[1] != img.shape[1]:
            problems.append(f"control has {control.shape[1]} tokens but img has {img.shape[1]}: the control image "
                            f"must have the output's size")
        if control.shape[0] not in (1, img.shape[0]):
            problems.append(f"control has batch {control.shape[0]}, img {img.shape[0]}: give one control per image "
                            f"or one for all")
        if p.num_modes and mode is None:
            problems.append(f"this is a union ControlNet ({p.num_modes} modes): give processor_id, one of "
                            f"{', '.join(UNION_MODES)}")
        elif not p.num_modes and mode is not None:
            problems.append(f"processor_id {mode!r} was given, but this ControlNet has no modes (not a union "
                            f"ControlNet): leave processor_id out")
        elif mode is not None and not isinstance(mode, str):
            if isinstance(mode, bool) or not isinstance(mode, numbers.Integral) or not 0 <= mode < p.num_modes:
                problems.append(f"processor_id {mode!r} is not a mode id of this union ControlNet "
                                f"(0..{p.num_modes - 1})")
        if problems:
            raise ValueError("FluxControlNet: " + "; ".join(problems) + ".")
        if isinstance(mode, str):
            union_mode_id(mode)  # raises naming the valid modes
