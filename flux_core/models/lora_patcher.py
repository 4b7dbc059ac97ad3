"""LoRA-Fusion-Preview (DiffSynth-Studio's `FluxLoraPatcher`): a learned per-layer merge of several LoRAs.

Parameter names are DiffSynth's (`DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev` loads as it is): one `LoraMerger`
per LoRA site (models/lora_sites.py), `model_dict.<site>.{weight_base, weight_lora, weight_cross, weight_out, bias,
norm_base.*, norm_lora.*}`, each of the site's output width. For a layer's base output b and the outputs l_k of its
K LoRAs (each strength * scale * x @ down^T @ up^T):

    gate_k = sigmoid(LN_b(b) * w_base + LN_l(l_k) * w_lora + LN_b(b) * LN_l(l_k) * w_cross + bias)
    out    = b + sum_k w_out * gate_k * l_k

instead of the plain b + sum_k l_k. flux_core.lora.enable_lora_merger puts it into the DiT's LoRA hooks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .lora_sites import LoraSite, count_site_blocks, lora_sites

_SITES = "model_dict."


@dataclass(frozen=True)
class LoraPatcherParams:
    depth: int = 19
    depth_single: int = 38
    hidden: int = 3072
    mlp_hidden: int = 12288

    @property
    def sites(self) -> tuple[LoraSite, ...]:
        return lora_sites(self.depth, self.depth_single, self.hidden, self.mlp_hidden)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None
                               ) -> "LoraPatcherParams":
        """The sizes from the mergers' widths (output sizes): `a_to_out` is D wide and `ff_a.0` M; without double
        blocks, single `proj_out` is D and `to_qkv_mlp` 3D + M."""
        keys = {k[len(_SITES):].split(".", 1)[0] for k in shapes if k.startswith(_SITES)}
        depth, depth_single = count_site_blocks(keys)
        if depth:
            hidden = shapes[f"{_SITES}blocks___0___attn___a_to_out.weight_base"][0]
            mlp_hidden = shapes[f"{_SITES}blocks___0___ff_a___0.weight_base"][0]
        elif depth_single:
            hidden = shapes[f"{_SITES}single_blocks___0___proj_out.weight_base"][0]
            mlp_hidden = shapes[f"{_SITES}single_blocks___0___to_qkv_mlp.weight_base"][0] - 3 * hidden
        else:
            raise ValueError("no LoRA site mergers (model_dict.blocks___0___... / single_blocks___0___...).")
        return cls(**{**dict(depth=depth, depth_single=depth_single, hidden=hidden, mlp_hidden=mlp_hidden),
                      **dict(overrides or {})})


class LoraMerger(nn.Module):
    """One layer's merge of its base output with its LoRAs' outputs (the formula in the module docstring)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight_base = nn.Parameter(torch.empty(dim))
        self.weight_lora = nn.Parameter(torch.empty(dim))
        self.weight_cross = nn.Parameter(torch.empty(dim))
        self.weight_out = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.norm_base = nn.LayerNorm(dim, eps=1e-5)
        self.norm_lora = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
        """base (..., dim); loras (K, ..., dim), one per LoRA -> the merged output (..., dim)."""
        b = self.norm_base(base)
        lo = self.norm_lora(loras)
        gate = torch.sigmoid(b * self.weight_base + lo * self.weight_lora + b * lo * self.weight_cross + self.bias)
        return base + (self.weight_out * gate * loras).sum(dim=0)


class FluxLoraPatcher(nn.Module):
    def __init__(self, params: LoraPatcherParams = LoraPatcherParams()):
        super().__init__()
        self.params = params
        self.sites = params.sites
        self.model_dict = nn.ModuleDict({s.key: LoraMerger(s.out_features) for s in self.sites})

    def merger(self, site: LoraSite) -> LoraMerger:
        return self.model_dict[site.key]
