"""The math of FLUX as pure functions: attention, rotary position embedding, timestep embedding,
2x2 latent packing and position ids. Conventions follow the Black Forest Labs reference exactly."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, H, L, D); pe: rotary matrices from `rope` (None: q and k are rotated already). Returns
    (B, L, H*D)."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices for one position axis: pos (B, L) -> (B, L, dim/2, 2, 2), computed in float64."""
    assert dim % 2 == 0, f"rope axis dimension must be even, got {dim}"
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def embed_positions(ids: torch.Tensor, axes_dim: list[int], theta: int = 10000) -> torch.Tensor:
    """ids (B, L, n_axes) -> rotary matrices (B, 1, L, sum(axes_dim)/2, 2, 2) shared by all heads."""
    emb = torch.cat([rope(ids[..., i], axes_dim[i], theta) for i in range(len(axes_dim))], dim=-3)
    return emb.unsqueeze(1)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate adjacent channel pairs of q and k; computed in float32 and cast back."""
    return _rotate(xq, freqs_cis), _rotate(xk, freqs_cis)


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0]
    out += freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first. `t` is sigma (or guidance) in model units; it is scaled by 1000 here."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches in (c, ph, pw) order."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`; height and width are the latent's (H, W)."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def pad_to_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with odd sides padded to whole 2x2 patches, wrapping around (ComfyUI's FLUX code does the same:
    a latent side a multiple of 8 pixels but not 16 comes out of VAEEncode odd)."""
    return F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="circular")


def image_ids(batch: int, height: int, width: int, index: int = 0, device=None, dtype=torch.float32,
              row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """Position ids [index, row, col] for a latent of (height, width), one row per 2x2 patch: (B, H/2*W/2, 3). Rows
    and columns start at the offsets (in patches; ComfyUI places several Kontext references side by side so)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None] + row_offset
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :] + col_offset
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1)


def text_ids(batch: int, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
