"""The one record FluxCore keeps on a loaded model, instead of loose attributes set by several modules.

    state_of(dit).layout          # "bfl", "diffusers", ... (set by the loader)
    state_of(linear).offloaded    # set by the VRAM manager; flux_core.lora then uses hook mode

`state_of` creates the record on first use; `peek_state` only reads it (None when nothing was recorded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_ATTR = "_fluxcore_state"


@dataclass
class ModelState:
    layout: str | None = None                                # checkpoint layout the weights were read from
    offloaded: bool = False                                  # weights rest off the compute device (streamed), or
                                                             # are GGUF blocks (set by the loader): LoRA hooks them
    compute: tuple[torch.device, torch.dtype] | None = None  # where a managed model computes (flux_core.vram)
    lora: Any = None                                         # flux_core.lora's fused/hooked LoRA bookkeeping
    applied_loras: tuple = ()                                # the LoRA stack a node graph last applied
    vram_placement: Any = None                               # (options, VRAMManager) of the VRAM options node
    fp8_on_load: bool = False                                # stored in FP8 by its loader (not converted later)


def state_of(module: nn.Module) -> ModelState:
    state = module.__dict__.get(_ATTR)
    if state is None:
        state = ModelState()
        module.__dict__[_ATTR] = state
    return state


def peek_state(module: nn.Module) -> ModelState | None:
    return module.__dict__.get(_ATTR)
