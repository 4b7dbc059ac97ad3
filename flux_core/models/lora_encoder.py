"""LoRA-Encoder (DiffSynth-Studio's `FluxLoRAEncoder`): a FLUX LoRA in, conditioning tokens out.

Parameter names are DiffSynth's, so `DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev`'s model.safetensors loads as it is:

    embedder.model_dict.<site>.x                (1, L, in)   L learned probe rows per LoRA site (models/lora_sites.py)
    embedder.model_dict.<site>.layer_norm.*     (out,)
    embedder.proj_dict.<site type>.*            Linear(out, E), one per site type ("attn___a_to_qkv", "proj_out", ...)
    encoders.<n>.{attn.to_q,to_k,to_v,to_out, layer_norm1, layer_norm2, fc1, fc2}.*   CLIP-style layers
    special_embeds                              (1, S, E)
    final_layer_norm.*, final_linear.*          E -> E

One LoRA becomes S tokens (S = 1 published): at each site its probe goes through the LoRA's low-rank path,
LayerNorm(x @ down^T @ (scale * up)^T), then the site type's projection to E; the tokens of all sites follow the
special tokens through the encoder layers (no mask, no positions, quick-GELU); the special tokens' outputs, after
the final LayerNorm and Linear, are the LoRA's tokens. Published sizes: 304 sites, L = 16, E = 4096, one layer of
32 heads x 128, FFN 8192.

The sizes come from the shapes except the attention heads: the head width is DiffSynth's 128 unless
`config={"num_heads": n}` (or "head_dim") says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .lora_sites import LoraSite, count_site_blocks, lora_sites

DIFFSYNTH_HEAD_DIM = 128   # DiffSynth's FluxLoRAEncoder: CLIPEncoderLayer(num_heads=32, head_dim=128)
_SITES = "embedder.model_dict."


@dataclass(frozen=True)
class LoraEncoderParams:
    depth: int = 19                 # double blocks of the DiT it encodes LoRAs of
    depth_single: int = 38
    hidden: int = 3072              # the DiT's width
    mlp_hidden: int = 12288
    embeds_per_lora: int = 16       # L: probe rows per site
    embed_dim: int = 4096           # E: the DiT's text width (the tokens join the T5 tokens)
    intermediate: int = 8192        # the encoder layers' FFN width
    num_layers: int = 1
    num_heads: int = 32
    head_dim: int = 128
    special_embeds: int = 1         # S: tokens per LoRA

    @property
    def sites(self) -> tuple[LoraSite, ...]:
        return lora_sites(self.depth, self.depth_single, self.hidden, self.mlp_hidden)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None
                               ) -> "LoraEncoderParams":
        overrides = dict(overrides or {})
        site_keys = {k[len(_SITES):].split(".", 1)[0] for k in shapes if k.startswith(_SITES)}
        depth, depth_single = count_site_blocks(site_keys)
        if depth:
            hidden = shapes[f"{_SITES}blocks___0___attn___a_to_out.x"][-1]
            mlp_hidden = shapes[f"{_SITES}blocks___0___ff_a___2.x"][-1]
        elif depth_single:
            hidden = shapes[f"{_SITES}single_blocks___0___to_qkv_mlp.x"][-1]
            mlp_hidden = shapes[f"{_SITES}single_blocks___0___proj_out.x"][-1] - hidden
        else:
            raise ValueError("no LoRA site probes (embedder.model_dict.blocks___0___... / single_blocks___0___...).")
        inner, embed_dim = shapes["encoders.0.attn.to_q.weight"]
        inferred = dict(depth=depth, depth_single=depth_single, hidden=hidden, mlp_hidden=mlp_hidden,
                        embeds_per_lora=shapes[f"{_SITES}{next(iter(sorted(site_keys)))}.x"][1],
                        embed_dim=embed_dim, intermediate=shapes["encoders.0.fc1.weight"][0],
                        num_layers=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("encoders.")),
                        special_embeds=shapes["special_embeds"][1])
        heads, head_dim = overrides.pop("num_heads", None), overrides.pop("head_dim", None)
        if heads is None:
            head_dim = head_dim or DIFFSYNTH_HEAD_DIM
            if inner % head_dim:
                raise ValueError(f"the attention is {inner} wide, not a multiple of DiffSynth's {head_dim}-wide heads: "
                                 f"pass config={{'num_heads': n}}.")
            heads = inner // head_dim
        elif inner % heads:
            raise ValueError(f"the attention is {inner} wide, which num_heads={heads} does not divide.")
        inferred.update(num_heads=heads, head_dim=inner // heads)
        inferred.update(overrides)
        return cls(**inferred)


class SiteProbe(nn.Module):
    """One site's learned probe rows through a LoRA's low-rank path (DiffSynth's LoRALayerBlock)."""

    def __init__(self, rows: int, in_features: int, out_features: int):
        super().__init__()
        self.x = nn.Parameter(torch.empty(1, rows, in_features))
        self.layer_norm = nn.LayerNorm(out_features)

    def forward(self, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.x @ down.T @ up.T)


class LoraEmbedder(nn.Module):
    def __init__(self, p: LoraEncoderParams):
        super().__init__()
        self.sites = p.sites
        self.model_dict = nn.ModuleDict({s.key: SiteProbe(p.embeds_per_lora, s.in_features, s.out_features)
                                         for s in self.sites})
        types = {s.type_key: s.out_features for s in self.sites}
        self.proj_dict = nn.ModuleDict({t: nn.Linear(out, p.embed_dim) for t, out in types.items()})

    def forward(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """factors: {FluxCore layer: (down, scale * up)} for every site -> (1, sites * L, E)."""
        return torch.cat([self.proj_dict[s.type_key](self.model_dict[s.key](*factors[s.layer])) for s in self.sites],
                         dim=1)


class EncoderAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        self.to_out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """A CLIP text-encoder layer without its causal mask: pre-LN attention and quick-GELU MLP, each residual."""

    def __init__(self, dim: int, intermediate: int, heads: int, head_dim: int):
        super().__init__()
        self.attn = EncoderAttention(dim, heads, head_dim)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.layer_norm1(x))
        h = self.fc1(self.layer_norm2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


class FluxLoraEncoder(nn.Module):
    def __init__(self, params: LoraEncoderParams = LoraEncoderParams()):
        super().__init__()
        self.params = params
        self.embedder = LoraEmbedder(params)
        self.encoders = nn.ModuleList([EncoderLayer(params.embed_dim, params.intermediate, params.num_heads,
                                                    params.head_dim) for _ in range(params.num_layers)])
        self.special_embeds = nn.Parameter(torch.empty(1, params.special_embeds, params.embed_dim))
        self.final_layer_norm = nn.LayerNorm(params.embed_dim)
        self.final_linear = nn.Linear(params.embed_dim, params.embed_dim)

    @property
    def sites(self) -> tuple[LoraSite, ...]:
        return self.embedder.sites

    def forward(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One LoRA's tokens (1, S, E). factors: {FluxCore layer: (down (r, in), scale * up (out, r))} for every
        site, on the encoder's compute device in its compute dtype."""
        embeds = self.embedder(factors)
        x = torch.cat([self.special_embeds.to(embeds), embeds], dim=1)
        for layer in self.encoders:
            x = layer(x)
        return self.final_linear(self.final_layer_norm(x[:, :self.params.special_embeds]))
