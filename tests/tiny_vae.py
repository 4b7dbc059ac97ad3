"""A tiny FLUX-shaped VAE for tests: a diffusers `AutoencoderKL` and writers for the published file layouts.

    vae = make_diffusers_vae(seed=0)                 # float32, eval mode, randomised weights
    write_diffusers_folder(vae, tmp / "vae")         # diffusers vae/ folder (config.json + safetensors)
    write_bfl_file(vae, tmp / "ae.safetensors")      # BFL ae.safetensors names
    write_bfl_file(vae, tmp / "ckpt.safetensors", prefix="first_stage_model.")

Same architecture as FLUX.1's VAE (4 levels, so 8x downscale; 16 latent channels; no quant convs; mid-block
attention) with widths (16, 16, 32, 32), 2 res blocks per level and 8 GroupNorm groups. Load it with
`load_model(path, kind="vae", torch_dtype=torch.float32, config={"norm_groups": TINY_NORM_GROUPS})` when the
file has no diffusers config.json beside it (norm groups cannot be read from shapes).

`reference_encode` / `reference_decode` give diffusers' answer in the scaled (DiT) latent space
(`reference_encode_image` for a PIL image).
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_BLOCK_OUT = (16, 16, 32, 32)
TINY_LAYERS_PER_BLOCK = 2
TINY_NORM_GROUPS = 8
SCALE_FACTOR = 0.3611
SHIFT_FACTOR = 0.1159


def make_diffusers_vae(seed: int = 0):
    """A tiny diffusers AutoencoderKL with every parameter (norm affines included) drawn from `seed`."""
    from diffusers import AutoencoderKL

    n = len(TINY_BLOCK_OUT)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=TINY_BLOCK_OUT,
        layers_per_block=TINY_LAYERS_PER_BLOCK, latent_channels=16, norm_num_groups=TINY_NORM_GROUPS,
        sample_size=64, scaling_factor=SCALE_FACTOR, shift_factor=SHIFT_FACTOR,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)           # GroupNorm scale around 1
            elif p.ndim == 1:
                p.copy_(0.1 * noise)               # biases
            else:                                  # conv / linear: variance-preserving
                p.copy_(noise / p[0].numel() ** 0.5)
    return vae.eval().requires_grad_(False)


def write_diffusers_folder(vae, folder: str | Path) -> Path:
    folder = Path(folder)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def bfl_state_dict(vae) -> dict[str, torch.Tensor]:
    """The diffusers weights under BFL `ae.safetensors` names (attention as 1x1 convs)."""
    sd = vae.state_dict()
    n = len(vae.config.block_out_channels)
    out: dict[str, torch.Tensor] = {}

    def resnet(src: str, dst: str):
        for part in ("norm1", "conv1", "norm2", "conv2"):
            for s in ("weight", "bias"):
                out[f"{dst}.{part}.{s}"] = sd[f"{src}.{part}.{s}"]
        if f"{src}.conv_shortcut.weight" in sd:
            for s in ("weight", "bias"):
                out[f"{dst}.nin_shortcut.{s}"] = sd[f"{src}.conv_shortcut.{s}"]

    def mid(side: str):
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        attn = f"{side}.mid_block.attentions.0"
        for s in ("weight", "bias"):
            out[f"{side}.mid.attn_1.norm.{s}"] = sd[f"{attn}.group_norm.{s}"]
        for src, dst in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            out[f"{side}.mid.attn_1.{dst}.weight"] = sd[f"{attn}.{src}.weight"][:, :, None, None]
            out[f"{side}.mid.attn_1.{dst}.bias"] = sd[f"{attn}.{src}.bias"]

    def plain(src: str, dst: str):
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    for side in ("encoder", "decoder"):
        plain(f"{side}.conv_in", f"{side}.conv_in")
        mid(side)
        plain(f"{side}.conv_norm_out", f"{side}.norm_out")
        plain(f"{side}.conv_out", f"{side}.conv_out")
    for i in range(n):
        for j in range(vae.config.layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            plain(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        level = n - 1 - i  # diffusers up_blocks.0 runs first = BFL up.{n-1}
        for j in range(vae.config.layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if i < n - 1:
            plain(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    if len(out) != len(sd):
        raise AssertionError(f"bfl_state_dict mapped {len(out)} of {len(sd)} diffusers weights")
    return out


def write_bfl_file(vae, path: str | Path, prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the BFL-named weights (under `prefix`, plus `extra` tensors as they are) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: v.contiguous() for k, v in bfl_state_dict(vae).items()}
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return path


@torch.no_grad()
def reference_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """diffusers' scaled latent: `(latent_dist.mean - shift) * scale`."""
    mean = vae.encode(image).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def reference_encode_image(vae, image) -> torch.Tensor:
    """`reference_encode` of an RGB PIL image scaled to [-1, 1] as DiffSynth's `preprocess_image` scales it."""
    import numpy as np
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    return reference_encode(vae, pixels)


@torch.no_grad()
def reference_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' image from a scaled latent: `decode(z / scale + shift)`."""
    return vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample
