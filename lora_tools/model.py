"""The canonical LoRA: one low-rank pair per FLUX DiT layer, keyed by the layer's BFL name.

Every reader produces a `LoraFile`; every writer and the engine consume one. A layer's weight delta is

    delta = up @ down * alpha / rank        (up = B = lora_up, down = A = lora_down)

with its own alpha: files whose layers carry different alphas keep them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class LoraError(ValueError):
    """A LoRA file that cannot be read or applied. The message names the file or key and the fix."""


class LoraFormatError(LoraError):
    """No key of the file matches a FLUX DiT layer; the message says what the file looks like instead."""


class LoraShapeError(LoraError):
    """A LoRA made for a model of another size (or a damaged file): names the key and both shapes."""


class LoraKeyWarning(UserWarning):
    """Some keys of a LoRA file matched no layer and were left out; the message lists them."""


@dataclass
class LoraLayer:
    down: torch.Tensor          # (rank, in_features): lora_down / lora_A
    up: torch.Tensor            # (out_features, rank): lora_up / lora_B
    alpha: float                # delta scale is alpha / rank
    source_keys: tuple[str, ...] = ()   # the file keys this layer was built from

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer this LoRA adapts."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down * self.scale).to(dtype)


@dataclass
class LoraFile:
    layers: dict[str, LoraLayer]        # BFL layer name -> LoRA
    format: str                         # "kohya", "diffusers", "onetrainer", "xlabs", "diffsynth", "bfl"
    unmatched: dict[str, str] = field(default_factory=dict)   # file key -> why it was left out
    skipped_keys: list[str] = field(default_factory=list)     # keys for other models (text encoders)
    metadata: dict[str, str] = field(default_factory=dict)    # the file's safetensors metadata
    notes: list[str] = field(default_factory=list)            # assumptions made while reading
    source: str = ""

    @property
    def unmatched_keys(self) -> list[str]:
        return list(self.unmatched)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.layers:
            raise KeyError(f"{self.source or 'LoRA'}: no LoRA for layer '{name}'; it has {len(self.layers)} "
                           f"layers, e.g. {sorted(self.layers)[:3]}.")
        return self.layers[name].delta(dtype)

    def matched(self) -> dict[str, tuple[str, ...]]:
        """Which file keys went into which layer."""
        return {name: layer.source_keys for name, layer in sorted(self.layers.items())}
