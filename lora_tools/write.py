"""The canonical `LoraFile` -> a state dict in one of the open formats, and files on disk.

| format      | keys                                                    | alpha                                    |
| kohya       | `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` | `.alpha` per layer, as read (exact)     |
| diffusers   | `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` | scale multiplied into lora_B (alpha = rank) |
| diffsynth   | `blocks.0.attn.a_to_qkv.lora_A.weight`                   | scale multiplied into lora_B (alpha = rank) |

kohya is the default: it is keyed to the BFL layers, carries each layer's alpha, and ComfyUI, diffusers,
kohya, Forge and DiffSynth all load it. diffusers/PEFT and DiffSynth have no per-layer alpha that every
loader honours (DiffSynth applies one alpha to all layers, PEFT readers ignore stray `.alpha` keys), so
those writers fold alpha/rank into lora_B: every loader then sees scale 1 and the same delta. The scale is
a power of two for the usual alphas (rank, rank/2, 1 with rank 2^k), so the fold is usually exact; it is one
float32 rounding otherwise. The diffusers file also carries diffusers' own `lora_adapter_metadata` stating
rank and alpha per module.

diffusers splits the fused layers (img/txt qkv, single-block linear1) into q, k, v (and proj_mlp). The split
is exact with no arithmetic (see parts.py): each part keeps the down rows its up block uses, so a LoRA that
was block-diagonal splits back into its original parts, and one trained on the fused layer splits into
parts sharing the full down matrix.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from .io import write_state_dict
from .model import LoraError, LoraFile
from .names import TABLES, Target, part_sizes
from .parts import split, swap_halves

FORMATS = ("kohya", "diffusers", "diffsynth")
# Metadata keys the writers own: dropped from the source metadata, then rewritten to describe the new file.
_OWN_METADATA = ("ss_network_dim", "ss_network_alpha", "ss_network_module", "lora_adapter_metadata", "format",
                 "fluxcore_lora_format")


def to_state_dict(lora: LoraFile, fmt: str = "kohya", dtype: torch.dtype | None = None,
                  adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of `lora` in `fmt`. dtype casts the matrices (alpha stays float32).
    adapter_name (diffsynth only): write `lora_A.<name>.weight`, the names of DiffSynth training checkpoints."""
    if fmt not in FORMATS:
        raise LoraError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    metadata = {k: v for k, v in lora.metadata.items() if k not in _OWN_METADATA}
    metadata["fluxcore_lora_format"] = fmt
    if fmt == "kohya":
        tensors = _kohya(lora, dtype)
        ranks = {layer.rank for layer in lora.layers.values()}
        alphas = {layer.alpha for layer in lora.layers.values()}
        metadata.update(ss_network_module="networks.lora_flux",
                        ss_network_dim=str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                        ss_network_alpha=str(alphas.pop()) if len(alphas) == 1 else "Dynamic")
        return tensors, metadata
    if fmt == "diffusers":
        tensors, ranks = _diffusers(lora, dtype)
        metadata["format"] = "pt"
        metadata["lora_adapter_metadata"] = json.dumps(_peft_metadata(ranks))  # order matters: no sort_keys
        return tensors, metadata
    return _diffsynth(lora, dtype, adapter_name), metadata


def save_lora(lora: LoraFile, path: str | os.PathLike, fmt: str = "kohya", dtype: torch.dtype | None = None,
              adapter_name: str | None = None) -> Path:
    """Write `lora` to a safetensors file in `fmt`, atomically."""
    tensors, metadata = to_state_dict(lora, fmt, dtype, adapter_name)
    return write_state_dict(tensors, path, metadata)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None else t


def _fold_scale(up: torch.Tensor, scale: float) -> torch.Tensor:
    return up if scale == 1.0 else (up.float() * scale).to(up.dtype)


def _kohya(lora: LoraFile, dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora.layers.items():
        key = "lora_unet_" + TABLES["kohya"].name_for(Target(name))
        out[f"{key}.lora_down.weight"] = _cast(layer.down, dtype)
        out[f"{key}.lora_up.weight"] = _cast(layer.up, dtype)
        out[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out


def _diffusers(lora: LoraFile, dtype) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    table = TABLES["diffusers"]
    out, ranks = {}, {}
    for name, layer in lora.layers.items():
        sizes = part_sizes(name, layer.shape)
        for index, down, up in split(layer, sizes):
            target = Target(name) if len(sizes) == 1 else Target(name, index, 1)
            module = table.name_for(target) or table.name_for(Target(name, swap_halves=True))
            if module is None:
                raise LoraError(f"no diffusers name for FLUX layer {name}")
            if module == "norm_out.linear":  # diffusers stores the final AdaLN as (scale, shift)
                up = swap_halves(up)
            out[f"transformer.{module}.lora_A.weight"] = _cast(down, dtype)
            out[f"transformer.{module}.lora_B.weight"] = _cast(_fold_scale(up, layer.scale), dtype)
            ranks[module] = int(down.shape[0])
    return out, ranks


def _peft_metadata(ranks: dict[str, int]) -> dict:
    """diffusers' adapter metadata: the most common rank as r, the others in rank_pattern, alpha = rank for
    every module (the scale is already in lora_B).

    PEFT applies the first pattern key that equals a module's name or a dotted suffix of it, so the key
    `proj_out` (the final projection) would also capture `single_transformer_blocks.N.proj_out`. Every module
    a key would capture therefore gets its own entry, and longer keys come first (the JSON keeps this order)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    for key in list(pattern):
        pattern.update({m: k for m, k in ranks.items() if m.endswith("." + key)})
    pattern = dict(sorted(pattern.items(), key=lambda item: (-len(item[0]), item[0])))
    config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "use_dora": False, "lora_bias": False, "use_rslora": False}
    return {f"transformer.{k}": v for k, v in config.items()}


def _diffsynth(lora: LoraFile, dtype, adapter_name: str | None) -> dict[str, torch.Tensor]:
    table = TABLES["diffsynth"]
    token = f".{adapter_name}" if adapter_name else ""
    out = {}
    for name, layer in lora.layers.items():
        module = table.name_for(Target(name))
        out[f"{module}.lora_A{token}.weight"] = _cast(layer.down, dtype)
        out[f"{module}.lora_B{token}.weight"] = _cast(_fold_scale(layer.up, layer.scale), dtype)
    return out
