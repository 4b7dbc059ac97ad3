"""ComfyUI's scaled-fp8 checkpoints, read as plain weights: the one mechanism for every kind (DiT, CLIP-L, T5).

Two spellings exist (learned from ComfyUI's comfy/utils.py `convert_old_quants` and comfy/quant_ops.py):
- older "scaled_fp8" files: a top-level `scaled_fp8` marker tensor, and beside each scaled Linear weight a scalar
  `<layer>.scale_weight` (and `<layer>.scale_input`);
- newer quantized files: `<layer>.weight_scale` (and `<layer>.input_scale`), the layer's format in a
  `<layer>.comfy_quant` tensor (UTF-8 JSON bytes such as {"format": "float8_e4m3fn"}) or in the file's
  `_quantization_metadata` entry ({"layers": {"<layer>": {...}}}; `files.open_safetensors` turns it into the
  same `comfy_quant` tensors, as ComfyUI does).

The real weight is fp8 * scale. Input scales only matter to fp8 matmuls, which FluxCore does not run: dropped.
Per-tensor float8 formats are read; the block formats (nvfp4, mxfp8, int8) are refused by name.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch

from ..dtypes import FLOAT8_DTYPES
from .files import CheckpointError
from .lazy import LazyTensor

WEIGHT_SCALES = ("scale_weight", "weight_scale")
NOT_WEIGHTS = ("scale_input", "input_scale", "comfy_quant")
MARKER = "scaled_fp8"
# The formats whose weight is one float8 tensor times one scale.
PER_TENSOR_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def dequantize_scaled_fp8(sd: Mapping[str, LazyTensor]) -> tuple[dict[str, LazyTensor], bool]:
    """(state dict with fp8 * scale weights and no scale/marker keys, whether any weight was scaled)."""
    out: dict[str, LazyTensor] = {}
    scaled = False
    refused: list[str] = []
    for key, value in sd.items():
        name = key.rsplit(".", 1)[-1]
        if key == MARKER or name in WEIGHT_SCALES or name in NOT_WEIGHTS:
            continue
        if name == "weight":
            layer = key[: -len("weight")]
            scale = next((sd[layer + s] for s in WEIGHT_SCALES if layer + s in sd), None)
            fmt = _layer_format(sd.get(layer + "comfy_quant"))
            if fmt is not None and fmt not in PER_TENSOR_FORMATS:
                refused.append((value.source.split(":")[0], f"{layer[:-1]} ({fmt})"))
                continue
            if scale is not None:
                value, scaled = _scale(value, scale), True
        out[key] = value
    if refused:
        layers = [layer for _, layer in refused]
        raise CheckpointError(
            f"{refused[0][0]}: {len(layers)} layer(s) are stored in a ComfyUI quantized format FluxCore does not "
            f"read: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}. Supported: per-tensor scaled "
            f"{' / '.join(PER_TENSOR_FORMATS)}; use the bf16, fp8 or GGUF release of this model.")
    return out, scaled


def _layer_format(conf: LazyTensor | None) -> str | None:
    if conf is None:
        return None
    try:
        return str(json.loads(bytes(conf.load().to(torch.uint8).tolist()).decode("utf-8")).get("format"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{conf.source}: unreadable ComfyUI quantization config ({e}).") from None


def _scale(weight: LazyTensor, scale: LazyTensor) -> LazyTensor:
    if scale.numel() != 1:
        raise CheckpointError(f"{scale.source}: a per-block or per-channel weight scale of shape {scale.shape}; "
                              f"only per-tensor scaled fp8 is supported. Use the bf16 or plain fp8 file.")
    if weight.dtype not in FLOAT8_DTYPES:
        raise CheckpointError(f"{weight.source}: has a weight scale but is stored in {weight.dtype}, not float8; "
                              f"the file is not a ComfyUI scaled-fp8 file.")
    # Multiply in float32, then the loader rounds once to the requested dtype.
    return LazyTensor(weight.shape, torch.float32,
                      lambda: weight.load().float() * scale.load().float().reshape(()), weight.source)
