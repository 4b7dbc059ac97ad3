"""The FLUX VAE as a loadable kind: find it in any layout, convert it to the BFL names, build it from its shapes.

Layouts:
- "bfl": `ae.safetensors` (`encoder.down.0.block.0.conv1.weight`, ...), also under a wrapper prefix
  (`first_stage_model.` in ComfyUI/LDM checkpoints, `vae.` or `ae.` in all-in-one files);
- "diffusers": an `AutoencoderKL` `vae/` folder (`encoder.down_blocks.0.resnets.0.conv1.weight`, ...).

Shapes tell the widths, depth and latent channels. GroupNorm groups cannot be read from shapes: they come from an
explicit config (`norm_groups`), a diffusers `config.json` (`norm_num_groups`) or FLUX's 32. Likewise the latent
scale and shift (`scale_factor`/`shift_factor`, diffusers `scaling_factor`/`shift_factor`, else FLUX's values).
"""
from __future__ import annotations

import re
from typing import Mapping

from ..models.vae import AutoEncoderParams, FluxVAE
from .files import rename_keys, strip_prefix
from .lazy import LazyTensor
from .kinds import ModelKind, StateDict

VAE_PREFIXES = ("first_stage_model.", "vae.", "ae.")
FLUX_Z_CHANNELS = 16

# What the shapes cannot tell, by our name and by the diffusers config.json name. Shape-derived fields are not
# taken from configs: a config.json lying beside a single file may belong to another model.
_DIFFUSERS_CONFIG = {"norm_num_groups": "norm_groups", "scaling_factor": "scale_factor", "shift_factor": "shift_factor"}
_OVERRIDABLE = {"norm_groups", "scale_factor", "shift_factor"}


def detect_vae_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        return None
    if "encoder.down.0.block.0.conv1.weight" in sd:
        return "bfl"
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        return "diffusers"
    return None


def select_vae(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + VAE_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        layout = detect_vae_layout(sub)
        if layout:
            return layout, vae_to_bfl(sub, layout)
    return None


def vae_to_bfl(sd: Mapping[str, LazyTensor], layout: str) -> dict[str, LazyTensor]:
    if layout == "bfl":
        out = dict(sd)
    elif layout == "diffusers":
        out = _diffusers_to_bfl(sd)
    else:
        raise ValueError(f"unknown VAE layout {layout!r}")
    return _attention_as_conv(out)


# diffusers name -> BFL name. Decoder levels are renumbered separately (diffusers counts them in the order they
# run, BFL by resolution).
DIFFUSERS_RULES: list[tuple[str, str]] = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.", r"\1.mid.attn_1.q."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.", r"\1.mid.attn_1.k."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.", r"\1.mid.attn_1.v."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
]


def _diffusers_to_bfl(sd: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    out: dict[str, LazyTensor] = {}
    for key, value in rename_keys(sd, DIFFUSERS_RULES).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        m = re.match(r"^decoder\.up\.(\d+)\.(.*)$", key)
        if m:  # diffusers up_blocks.0 runs first = BFL's lowest resolution, up.{n-1}
            key = f"decoder.up.{n_up - 1 - int(m.group(1))}.{m.group(2)}"
        out[key] = value
    return out


def _attention_as_conv(sd: dict[str, LazyTensor]) -> dict[str, LazyTensor]:
    """diffusers (and some converted files) keep the mid-block attention as Linear (C, C); BFL as 1x1 conv."""
    out = dict(sd)
    for key, value in sd.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and len(value.shape) == 2:
            out[key] = value.apply(lambda x: x.reshape(*x.shape, 1, 1), shape=(*value.shape, 1, 1))
    return out


def vae_overrides(config: Mapping) -> dict:
    """norm_groups / scale_factor / shift_factor from an explicit config or a diffusers config.json; the rest is ignored."""
    out = {}
    for key, value in config.items():
        key = _DIFFUSERS_CONFIG.get(key, key)
        if key in _OVERRIDABLE and value is not None:
            out[key] = value
    return out


def params_from_shapes(shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None) -> AutoEncoderParams:
    """Read the config off a BFL-named VAE state dict; refuse VAEs that are not FLUX.1's 16-channel kind."""
    levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
    blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    if any(w % ch for w in widths):
        raise ValueError(f"encoder level widths {widths} are not multiples of conv_in's {ch} channels.")
    z_channels = shapes["decoder.conv_in.weight"][1]
    if z_channels != FLUX_Z_CHANNELS:
        what = ("a Stable Diffusion 1.x/2.x/SDXL VAE (4 latent channels)" if z_channels == 4
                else f"a VAE with {z_channels} latent channels")
        raise ValueError(f"this is {what}, not the FLUX.1 VAE (16 latent channels). Use FLUX's ae.safetensors "
                         f"(or the vae/ folder of a FLUX.1 diffusers repository).")
    if "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        raise ValueError("it has quant_conv/post_quant_conv layers, which the FLUX.1 VAE does not have: it is "
                         "another model's VAE (e.g. Stable Diffusion's).")
    inferred = dict(in_channels=in_channels, out_ch=shapes["decoder.conv_out.weight"][0], ch=ch,
                    ch_mult=tuple(w // ch for w in widths), num_res_blocks=len(blocks), z_channels=z_channels)
    inferred.update(vae_overrides(overrides or {}))
    return AutoEncoderParams(**inferred)


def build_vae(sd: StateDict, config: dict) -> FluxVAE:
    return FluxVAE(params_from_shapes({k: v.shape for k, v in sd.items()}, config))


VAE_KIND = ModelKind(name="vae", title="FLUX VAE (autoencoder)", select=select_vae, build=build_vae)
