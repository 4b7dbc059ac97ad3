"""InfiniteYou's image projector: one 512-d ArcFace face embedding -> 8 identity tokens of the T5 width.

A perceiver resampler (the IP-Adapter "Resampler" shape; reference notes §3.7): learned query latents attend, in
each of `depth` layers, to [projected face embedding, latents] and pass a feed-forward, both with residuals; then a
projection to the text width and a LayerNorm. Parameter names are those of ByteDance's `image_proj_model.bin`
(under its `image_proj` dict), which DiffSynth-Studio loads unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from einops import rearrange
from torch import nn

from .shapes import count_blocks


@dataclass(frozen=True)
class ProjectorParams:
    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None
                               ) -> "ProjectorParams":
        """The head width cannot be read from shapes: it is 64 (InfiniteYou's) unless `overrides["dim_head"]`."""
        overrides = dict(overrides or {})
        _, num_queries, dim = shapes["latents"]
        dim_head = int(overrides.get("dim_head", cls.dim_head))
        inner = shapes["layers.0.0.to_q.weight"][0]
        if inner % dim_head:
            raise ValueError(f"the attention width {inner} is not a multiple of dim_head {dim_head}; pass "
                             f"config={{'dim_head': ...}}")
        return cls(dim=dim, depth=count_blocks(shapes, "layers."), dim_head=dim_head, heads=inner // dim_head,
                   num_queries=num_queries, embedding_dim=shapes["proj_in.weight"][1],
                   output_dim=shapes["proj_out.weight"][0], ff_mult=shapes["layers.0.1.1.weight"][0] // dim)


class PerceiverAttention(nn.Module):
    """The latents' queries attend to [features, latents] (keys and values from both; no biases)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = rearrange(self.to_q(latents), "B L (H D) -> B H L D", H=self.heads)
        k, v = (rearrange(t, "B L (H D) -> B H L D", H=self.heads)
                for t in self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1))
        # q and k each scaled by dim_head^-1/4 before the product (the published model's order; steadier in fp16)
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        weights = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        return self.to_out(rearrange(weights @ v, "B H L D -> B L (H D)"))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class InfiniteYouProjector(nn.Module):
    def __init__(self, params: ProjectorParams = ProjectorParams()):
        super().__init__()
        self.params = params
        self.latents = nn.Parameter(torch.randn(1, params.num_queries, params.dim) / params.dim ** 0.5)
        self.proj_in = nn.Linear(params.embedding_dim, params.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(params.dim, params.dim_head, params.heads),
                           _feed_forward(params.dim, params.ff_mult)]) for _ in range(params.depth))
        self.proj_out = nn.Linear(params.dim, params.output_dim)
        self.norm_out = nn.LayerNorm(params.output_dim)

    def forward(self, face_embedding: torch.Tensor) -> torch.Tensor:
        """face_embedding (B, N, 512) -> identity tokens (B, num_queries, output_dim)."""
        x = self.proj_in(face_embedding)
        latents = self.latents.to(x).expand(x.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))
