"""Tiny FLUX ControlNets for tests: diffusers `FluxControlNetModel`s with random weights (the sizes of
tests/tiny_dit.py's TINY_DIT), writers for the published layouts, and tiny files of the ControlNets FluxCore refuses.

    ref = make_diffusers_controlnet(num_mode=10)            # union; num_mode=None: plain
    folder = write_diffusers_controlnet(ref, tmp / "cn")    # config.json + diffusion_pytorch_model.safetensors
    double, single = diffusers_residuals(ref, x, control, mode=2)
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxControlNetModel
from safetensors.torch import save_file

from tests.tiny_dit import TINY_DIT


def make_diffusers_controlnet(seed: int = 0, num_mode: int | None = None, extra_condition_channels: int = 0,
                              **overrides) -> FluxControlNetModel:
    """A diffusers FluxControlNetModel at TINY_DIT's sizes (2 double, 2 single blocks unless overridden).

    `extra_condition_channels` (alimama Inpainting-Beta: 4) widens `controlnet_x_embedder` to in_channels + extra,
    as alimama's own class (and diffusers 0.30's) builds it; diffusers 0.42 no longer has the option, but its forward
    adds `controlnet_x_embedder(controlnet_cond)` without checking widths, so the widened layer runs through
    diffusers' own forward. The value is recorded in config.json as alimama's published config has it."""
    torch.manual_seed(seed)
    model = FluxControlNetModel(**{**TINY_DIT, **overrides}, num_mode=num_mode).eval()
    if extra_condition_channels:
        model.controlnet_x_embedder = torch.nn.Linear(model.config.in_channels + extra_condition_channels,
                                                      model.inner_dim)
        model.register_to_config(extra_condition_channels=extra_condition_channels)
    with torch.no_grad():
        for p in model.parameters():  # default init zeroes the heads: randomise so every path matters
            p.normal_(0.0, 0.15)
    return model


def control_channels(model: FluxControlNetModel) -> int:
    return model.controlnet_x_embedder.in_features


def diffusers_residuals(model: FluxControlNetModel, x: dict, control: torch.Tensor, mode: int | None = None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """diffusers' residual lists on FluxCore-style inputs (tests/tiny_dit.py `dit_inputs`; ids with a batch
    dimension, diffusers takes them without). Empty lists where diffusers returns None."""
    batch = x["img"].shape[0]
    mode_ids = None if mode is None else torch.full((batch, 1), mode, dtype=torch.long)
    with torch.no_grad():
        out = model(hidden_states=x["img"], controlnet_cond=control, controlnet_mode=mode_ids,
                    encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
                    img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"])
    return list(out.controlnet_block_samples or []), list(out.controlnet_single_block_samples or [])


def write_diffusers_controlnet(model: FluxControlNetModel, folder: Path, max_shard_size: str | None = None) -> Path:
    """As published: `config.json` + `diffusion_pytorch_model.safetensors` (or shards and their index)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def write_lone_file(model: FluxControlNetModel, path: Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    """The diffusers-named weights as one safetensors file with nothing beside it (no config.json)."""
    save_file({prefix + k: (v.to(dtype) if dtype else v).detach().contiguous()
               for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def diffsynth_state_dict(model: FluxControlNetModel) -> dict[str, torch.Tensor]:
    """The weights in DiffSynth-Studio's internal names, converted by DiffSynth 2.1.12's own ControlNet converter
    (it has no literal 3072 and no final layer to swap, so it works at tiny sizes)."""
    from tests.diffsynth_ref import diffsynth_controlnet
    _, convert = diffsynth_controlnet()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.contiguous() for k, v in convert(sd).items()}


def write_diffsynth_controlnet(model: FluxControlNetModel, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v for k, v in diffsynth_state_dict(model).items()}, str(path))
    return Path(path)


def xlabs_controlnet_state_dict(hidden: int = 32) -> dict[str, torch.Tensor]:
    """The key layout of an XLabs-AI FLUX ControlNet (flux-canny-controlnet-v3 and friends): BFL-named trunk,
    `controlnet_blocks.N`, a pixel-space `input_hint_block` conv stack and `pos_embed_input`; no final layer."""
    sd = {"img_in.weight": torch.zeros(hidden, 64), "img_in.bias": torch.zeros(hidden),
          "time_in.in_layer.weight": torch.zeros(hidden, 256), "txt_in.weight": torch.zeros(hidden, 32),
          "double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * hidden, hidden),
          "controlnet_blocks.0.weight": torch.zeros(hidden, hidden), "controlnet_blocks.0.bias": torch.zeros(hidden),
          "pos_embed_input.weight": torch.zeros(hidden, 64),
          "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3), "input_hint_block.0.bias": torch.zeros(16)}
    return sd


def sd_controlnet_state_dict(layout: str) -> dict[str, torch.Tensor]:
    """The key layout of a Stable Diffusion 1.5/SDXL ControlNet: "ldm" (control_v11p_sd15_canny.pth converted to
    safetensors: `control_model.*`), "ldm-bare" (the same without the prefix) or "diffusers" (ControlNetModel)."""
    if layout == "diffusers":
        return {"conv_in.weight": torch.zeros(8, 4, 3, 3),
                "controlnet_cond_embedding.conv_in.weight": torch.zeros(8, 3, 3, 3),
                "controlnet_down_blocks.0.weight": torch.zeros(8, 8, 1, 1),
                "down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3),
                "mid_block.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)}
    ldm = {"input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
           "zero_convs.0.0.weight": torch.zeros(8, 8, 1, 1), "middle_block_out.0.weight": torch.zeros(8, 8, 1, 1)}
    prefix = "control_model." if layout == "ldm" else ""
    return {prefix + k: v for k, v in ldm.items()}


def controlnet_inputs(context_dim: int = 32, batch: int = 1, extra_channels: int = 0, seed: int = 0) -> dict:
    """One forward's inputs on a 4x6 latent (a 2x3 grid of packed tokens), unpacked too for DiffSynth, which packs
    them itself: latent (B, 16, 4, 6), control latent (B, 16 + extra/4, 4, 6); img / control packed in (c, ph, pw)
    order; ids [0, row, col]; 5 text tokens; sigma 0.7, embedded guidance 3.5 (per batch row slightly different)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 16, 4, 6, generator=g)
    control_latent = torch.randn(batch, 16 + extra_channels // 4, 4, 6, generator=g)
    ids = torch.zeros(1, 6, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(6) // 3, torch.arange(6) % 3

    def pack(z):  # written out here, independently of flux_core.math.pack_latents
        b, c, h, w = z.shape
        return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)

    return dict(latent=latent, control_latent=control_latent, img=pack(latent), control=pack(control_latent),
                img_ids=ids.repeat(batch, 1, 1), txt=torch.randn(batch, 5, context_dim, generator=g),
                txt_ids=torch.zeros(batch, 5, 3), timesteps=torch.linspace(0.7, 0.5, batch),
                y=torch.randn(batch, context_dim, generator=g), guidance=torch.linspace(3.5, 2.5, batch))
