"""Step1X-Edit's connector: Qwen2.5-VL hidden states -> the DiT's text tokens and pooled vector, at each step.

    prompt_emb, pooled = connector(llm_emb, sigma, mask)   # (B, L, 3584), (B,), (B, L) -> (B, L, 4096), (B, 768)

- pooled: the masked mean of the states, times (1 + scale_factor), through `global_proj_out`;
- tokens: a token refiner conditioned on the noise level. `c` = an MLP of the sinusoidal embedding of sigma (no
  x1000: DiffSynth-Studio passes timestep / 1000) + an MLP of the masked mean; the states go through
  `input_embedder` and `depth` refiner blocks (pre-LayerNorm self-attention and MLP, each added through a gate made
  from `c`). Attention sees the pairs of real tokens; every query also sees token 0, so padded queries stay finite.

Parameter names are DiffSynth-Studio's (`S.individual_token_refiner.blocks.N.self_attn_qkv`, ...), which are the
`connector.*` names of `step1x-edit-i1258.safetensors` without the prefix. The head count is not in the shapes (no
QK norm): it comes from the config (`heads_num`, DiffSynth's name), default DiffSynth's 32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..math import attention, timestep_embedding

DIFFSYNTH_HEADS = 32      # Qwen2Connector(heads_num=32): 4096 / 32 = 128-wide heads
TIME_FREQUENCIES = 256    # the timestep embedder's sinusoid width


@dataclass(frozen=True)
class ConnectorParams:
    in_channels: int = 3584     # Qwen2.5-VL-7B's hidden size
    hidden: int = 4096          # the DiT's text width
    heads: int = DIFFSYNTH_HEADS
    depth: int = 2
    mlp_hidden: int = 16384
    pooled: int = 768           # the DiT's pooled width

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None
                               ) -> "ConnectorParams":
        overrides = dict(overrides or {})
        hidden, in_channels = shapes["S.input_embedder.weight"]
        blocks = {int(k.split(".")[3]) for k in shapes if k.startswith("S.individual_token_refiner.blocks.")}
        heads = overrides.pop("heads_num", None) or overrides.pop("heads", None) or DIFFSYNTH_HEADS
        if hidden % heads:
            raise ValueError(f"the connector is {hidden} wide, which {heads} heads do not divide: pass "
                             f"config={{'heads_num': n}}.")
        inferred = dict(in_channels=in_channels, hidden=hidden, heads=heads, depth=1 + max(blocks, default=-1),
                        mlp_hidden=shapes["S.individual_token_refiner.blocks.0.mlp.fc1.weight"][0],
                        pooled=shapes["global_proj_out.weight"][0])
        inferred.update({k: v for k, v in overrides.items() if k in cls.__dataclass_fields__})
        return cls(**inferred)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(sigma.float(), TIME_FREQUENCIES, time_factor=1.0).to(self.mlp[0].weight))


class TextProjection(nn.Module):
    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefinerBlock(nn.Module):
    """Gated self-attention and MLP over the tokens, the gates from the conditioning vector `c`."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = RefinerMLP(hidden, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        b, n, _ = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.self_attn_proj(attention(q, k, v, None, mask)) * gate_attn
        return x + self.mlp(self.norm2(x)) * gate_mlp


class IndividualTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(params.hidden, params.heads, params.mlp_hidden)
                                     for _ in range(params.depth)])

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn_mask = None if mask is None else pair_mask(mask)
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.input_embedder = nn.Linear(params.in_channels, params.hidden)
        self.t_embedder = TimestepEmbedder(params.hidden)
        self.c_embedder = TextProjection(params.in_channels, params.hidden)
        self.individual_token_refiner = IndividualTokenRefiner(params)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(sigma) + self.c_embedder(masked_mean(x, mask))
        return self.individual_token_refiner(self.input_embedder(x), c, mask)


class Step1XConnector(nn.Module):
    """DiffSynth-Studio's Qwen2Connector (its parameter names): see the module docstring."""

    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.params = params
        self.S = SingleTokenRefiner(params)
        self.global_proj_out = nn.Linear(params.in_channels, params.pooled)
        self.scale_factor = nn.Parameter(torch.full((1,), -(1 - 0.09)))

    def forward(self, llm_emb: torch.Tensor, sigma: torch.Tensor | float, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """llm_emb (B, L, in_channels), sigma: the noise level in [0, 1] (a float or (B,)), mask (B, L) of 0/1 ->
        (prompt_emb (B, L, hidden), pooled (B, pooled)), in the weights' dtype."""
        dtype = self.global_proj_out.weight.dtype
        x = llm_emb.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        pooled = self.global_proj_out(masked_mean(x, mask) * (1 + self.scale_factor.to(dtype)))
        return self.S(x, sigma, mask), pooled


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over the tokens where mask is 1 (all tokens without a mask): (B, L, C) -> (B, C)."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) token mask -> (B, 1, L, L) boolean attention mask: both tokens real; key 0 always visible (a query on
    padding would otherwise see nothing and give NaN)."""
    real = mask.bool()
    out = real[:, None, :, None] & real[:, None, None, :]
    out[..., 0] = True
    return out
