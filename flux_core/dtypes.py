"""The dtype names FluxCore speaks, defined once: compute dtypes by name, float8 storage dtypes, and the storage
choices offered by the command line and the nodes (ComfyUI's own spelling, as its UNETLoader uses)."""
from __future__ import annotations

import torch

# Compute dtypes by the names the command lines and nodes accept.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

FLOAT8_DTYPES: tuple[torch.dtype, ...] = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))

# The format FP8 compute (flux_core.fp8) keeps weights and quantizes activations in: e4m3 (3 mantissa bits), the
# format of FP8 inference; e5m2's extra range is for gradients.
FP8_COMPUTE_DTYPE: torch.dtype = torch.float8_e4m3fn

# How weight matrices are stored: "default" keeps the compute dtype, fp8_* halves their bytes (computed in bf16).
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn,
                                                "fp8_e5m2": torch.float8_e5m2}
