"""What a loadable kind of model is: the record each `*_kind.py` module fills in and `loader.load_model` uses.

Kept apart from the loader so that the kind modules import this and the loader imports them: imports run one way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from torch import nn

from .lazy import LazyTensor

StateDict = dict[str, LazyTensor]


@dataclass(frozen=True)
class ModelKind:
    name: str            # "dit", "vae", "clip", "t5"
    title: str           # what a person calls it, for messages
    # Finds this kind's keys in a state dict; returns (layout, canonical state dict) or None.
    select: Callable[[Mapping[str, LazyTensor]], tuple[str, StateDict] | None]
    # Builds the module (called under the meta device) from the canonical state dict and config overrides.
    build: Callable[[StateDict, dict], nn.Module]
    # Runs after the weights are assigned: re-create non-persistent buffers, tie weights.
    finalize: Callable[[nn.Module], None] | None = None
    # Whether a config.json beside the weights describes this kind of model (None: always). A folder may hold another
    # model's: Nexus-Gen's holds its Qwen2.5-VL's config.json beside the decoders that carry a DiT.
    reads_config: Callable[[dict], bool] | None = None
