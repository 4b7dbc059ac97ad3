"""FLUX IP-Adapters: image features -> image tokens -> per-block keys and values that the DiT's queries attend to.

Two published families, one module (reference notes §3.3; diffusers' `FluxIPAdapterAttnProcessor`):

| family   | image features                  | projector                         | blocks              | keys    | added where                        |
| -------- | ------------------------------- | --------------------------------- | ------------------- | ------- | ---------------------------------- |
| instantx | SigLIP so400m pooled (1152)     | MLP 1152->2304->128x4096, LN      | 19 double+38 single | RMSNorm | attention output, before the proj. |
| xlabs    | CLIP ViT-L/14 image_embeds (768)| Linear 768->4x4096, LN            | 19 double           | raw     | the image stream, after the block  |

InstantX's to_k_ip/to_v_ip have no bias, XLabs' have one. Parameter names are DiffSynth-Studio's (`image_proj.*`,
`ipadapter_modules.<i>.to_k_ip`), so a DiffSynth-trained IP-Adapter is one of our files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from einops import rearrange
from torch import nn

from .shapes import count_blocks

INSTANTX, XLABS = "instantx", "xlabs"
FAMILIES = {INSTANTX: "InstantX FLUX.1-dev IP-Adapter (SigLIP image encoder)",
            XLABS: "XLabs FLUX IP-Adapter (CLIP ViT-L image encoder)"}


@dataclass(frozen=True)
class IPAdapterParams:
    family: str             # INSTANTX or XLABS
    image_embed_dim: int    # width of one image's feature vector (1152 SigLIP pooled, 768 CLIP image_embeds)
    token_dim: int          # width of the image tokens the projector makes (4096)
    num_tokens: int         # image tokens per reference image (128 InstantX, 4 XLabs)
    hidden_size: int        # the DiT's width: keys and values are made at it (3072)
    num_blocks: int         # DiT blocks with keys and values (57 = 19 double + 38 single; XLabs 19 double)

    @classmethod
    def from_state_dict_shapes(cls, family: str, shapes: Mapping[str, tuple[int, ...]]) -> "IPAdapterParams":
        first = shapes["image_proj.proj.0.weight" if family == INSTANTX else "image_proj.proj.weight"]
        last = shapes["image_proj.proj.2.weight" if family == INSTANTX else "image_proj.proj.weight"]
        token_dim = shapes["image_proj.norm.weight"][0]
        if last[0] % token_dim:
            raise ValueError(f"the projector makes {last[0]} values, not a whole number of {token_dim}-wide tokens")
        return cls(family=family, image_embed_dim=first[1], token_dim=token_dim, num_tokens=last[0] // token_dim,
                   hidden_size=shapes["ipadapter_modules.0.to_k_ip.weight"][0],
                   num_blocks=count_blocks(shapes, "ipadapter_modules."))


class ImageProjection(nn.Module):
    """One image's feature vector -> `num_tokens` tokens of `token_dim`, layer-normed (InstantX: a two-layer MLP;
    XLabs: one linear layer)."""

    def __init__(self, params: IPAdapterParams):
        super().__init__()
        self.num_tokens, self.token_dim = params.num_tokens, params.token_dim
        out = params.token_dim * params.num_tokens
        e = params.image_embed_dim
        self.proj = (nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, out)) if params.family == INSTANTX
                     else nn.Linear(e, out))
        self.norm = nn.LayerNorm(params.token_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features).reshape(-1, self.num_tokens, self.token_dim))


class IPAdapterBlock(nn.Module):
    """The keys and values one DiT block's image queries attend to."""

    def __init__(self, params: IPAdapterParams):
        super().__init__()
        bias = params.family == XLABS
        self.to_k_ip = nn.Linear(params.token_dim, params.hidden_size, bias=bias)
        self.to_v_ip = nn.Linear(params.token_dim, params.hidden_size, bias=bias)
        self.normalize_keys = params.family == INSTANTX  # InstantX RMS-normalizes each head's key (eps 1e-5, no weight)

    def forward(self, tokens: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, token_dim) -> keys, values (B, heads, T, head_dim)."""
        k = rearrange(self.to_k_ip(tokens), "B T (H D) -> B H T D", H=num_heads)
        v = rearrange(self.to_v_ip(tokens), "B T (H D) -> B H T D", H=num_heads)
        if self.normalize_keys:
            k = nn.functional.rms_norm(k, (k.shape[-1],), eps=1e-5)
        return k, v


class FluxIPAdapter(nn.Module):
    def __init__(self, params: IPAdapterParams):
        super().__init__()
        self.params = params
        self.image_proj = ImageProjection(params)
        self.ipadapter_modules = nn.ModuleList(IPAdapterBlock(params) for _ in range(params.num_blocks))

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, image_embed_dim) of N reference images -> (1, N x num_tokens, token_dim): all images' tokens
        as one sequence, as DiffSynth-Studio joins several ipadapter_images."""
        tokens = self.image_proj(features)
        return tokens.reshape(1, -1, tokens.shape[-1])

    def keys_values(self, tokens: torch.Tensor, num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every block's (keys, values) for these image tokens, in block order."""
        return [block(tokens, num_heads) for block in self.ipadapter_modules]


def ip_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Queries (B, heads, L, head_dim) attending to image keys/values (1 or B, heads, T, head_dim), unmasked ->
    (B, L, heads x head_dim)."""
    b = q.shape[0]
    out = nn.functional.scaled_dot_product_attention(q, k.to(q).expand(b, -1, -1, -1), v.to(q).expand(b, -1, -1, -1))
    return rearrange(out, "B H L D -> B L (H D)")
