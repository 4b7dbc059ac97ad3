"""The FLUX DiT's building blocks, one small module each, with the Black Forest Labs parameter names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from einops import rearrange
from torch import nn

from ..math import apply_rope, attention

# A block's attention hook: queries (B, heads, L, head_dim) -> (output added to the attention output before the
# projection, output added to the block's output), each (B, L, hidden) or None (flux_core.models.dit.block_hook).
AttentionHookFn = Callable[[torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor | None]"]


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fused kernel: normalises in float32 internally without float32 copies of x
        # the scale follows x: a ComfyUI partial load may leave this small module on the offload device
        return nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.scale.to(x.device, x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the weights of one stream's attention (qkv, QK-norm, proj); the joint attention runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def modulate(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden, hidden, bias=True))


def _layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over [text, image]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                mask: torch.Tensor | None = None, hook: AttentionHookFn | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hook(image queries)` gives outputs (B, L_img, hidden) added to the image stream's attention output before
        its projection and to the image stream after the block (flux_core.models.dit.AttentionHook)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        before, after = hook(img_q) if hook is not None else (None, None)
        # Only the joint q, k, v outlive this statement: the per-stream ones (and the qkv outputs their views
        # keep alive) are freed before attention runs.
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(
            self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt))), (img_q, img_k, img_v)))
        del img_q, img_k, img_v
        attn = attention(q, k, v, pe=pe, mask=mask)
        del q, k, v
        n_txt = txt.shape[1]
        img_attn = attn[:, n_txt:] if before is None else attn[:, n_txt:] + before.to(attn.dtype)
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(attn[:, :n_txt])
        del attn
        img = img + img_mod2.gate * self.img_mlp(img_mod2.modulate(self.img_norm2(img)))
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt)))
        if after is not None:
            img = img + after.to(img.dtype)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text, image]: attention and MLP computed in parallel from one fused projection."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                mask: torch.Tensor | None = None, hook: AttentionHookFn | None = None) -> torch.Tensor:
        """`hook(queries of the whole sequence, after RoPE)` gives outputs (B, L, hidden) added to the attention
        output and to the block's output (flux_core.models.dit.AttentionHook)."""
        mod, _ = self.modulation(vec)
        lin = self.linear1(mod.modulate(self.pre_norm(x)))
        q, k, v = rearrange(lin[..., :3 * self.hidden_size], "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        if not torch.is_grad_enabled():
            # v is a view of the fused projection (the largest activation): a copy lets it be freed before
            # attention. Under autograd the GELU keeps it alive for backward anyway, so the copy would only add.
            v = v.contiguous()
        mlp = self.mlp_act(lin[..., 3 * self.hidden_size:])
        del lin
        before = after = None
        if hook is not None:  # the hook reads the rotated queries (where DiffSynth's IP-Adapter reads them)
            q, k = apply_rope(q, k, pe)
            (before, after), pe = hook(q), None
        attn = attention(q, k, v, pe=pe, mask=mask)
        del q, k, v
        if before is not None:
            attn = attn + before.to(attn.dtype)
        x = x + mod.gate * self.linear2(torch.cat((attn, mlp), 2))
        return x if after is None else x + after.to(x.dtype)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])
