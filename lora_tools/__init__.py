"""FLUX.1 LoRA files in every published format: read into one canonical form, convert, write.

    lora = read_lora("style.safetensors")            # kohya, diffusers/PEFT, OneTrainer, XLabs, DiffSynth, ...
    lora.format, lora.layers["double_blocks.0.img_attn.qkv"].delta()
    save_lora(lora, "style_diffusers.safetensors", fmt="diffusers")

The canonical form is keyed by Black Forest Labs layer names with one (down, up, alpha) per layer; see
model.py. Only torch, safetensors and the standard library are used: no flux_core, no ComfyUI.
Command line: `python -m lora_tools inspect FILE`, `python -m lora_tools convert IN OUT --to kohya`.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .detect import FORMAT_TITLES, describe_foreign
from .io import read_state_dict, write_state_dict
from .model import LoraError, LoraFile, LoraFormatError, LoraKeyWarning, LoraLayer, LoraShapeError
from .read import parse_lora
from .summary import describe_lora
from .write import FORMATS, save_lora, to_state_dict

__all__ = ["LoraLayer", "LoraFile", "LoraError", "LoraFormatError", "LoraShapeError", "LoraKeyWarning",
           "parse_lora", "read_lora", "save_lora", "convert_lora", "to_state_dict", "describe_lora",
           "describe_foreign", "read_state_dict", "write_state_dict", "FORMATS", "FORMAT_TITLES"]


def read_lora(path: str | os.PathLike, target_shapes: Mapping[str, tuple[int, int]] | None = None) -> LoraFile:
    """Read a LoRA file (safetensors, or .pt/.bin with weights_only) into the canonical form."""
    tensors, metadata = read_state_dict(path)
    return parse_lora(tensors, metadata, target_shapes, source=str(path))


def convert_lora(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "kohya",
                 dtype: torch.dtype | None = None) -> LoraFile:
    """Read any supported LoRA file and write it in `fmt` ("kohya", "diffusers", "diffsynth")."""
    lora = read_lora(src)
    save_lora(lora, dst, fmt, dtype)
    return lora
