"""--fp8_models: keep a frozen model's Linear weights in float8_e4m3fn (half the memory of bf16) and compute
in the dtype of the input, casting each weight when its layer runs. Trained parameters are never touched.
(A stop-gap for training until flux_core's VRAM manager offers the same storage for every model.)

Only Linear layers are stored in FP8: they hold nearly all of the DiT's and the text encoders' weights, while
the VAE is mostly convolutions (so `vae` saves little). Callers that read a model's dtype from its first
parameter (an embedding, conv_in) keep seeing the compute dtype. T5's feed-forward output layers (`wo`) keep
their dtype: transformers casts the hidden states to `wo`'s weight dtype before using it.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
KEEP = ("wo",)


def _linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, self.weight.to(x.dtype), bias)


def store_in_fp8(module: nn.Module) -> int:
    """Convert the frozen Linear weights of `module` to float8 storage; returns the bytes saved."""
    saved = 0
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] in KEEP or type(m) is not nn.Linear:
            continue
        weight = m.weight
        if weight.requires_grad or not weight.is_floating_point() or weight.dtype == FP8:
            continue
        saved += weight.numel() * (weight.element_size() - 1)
        m.weight = nn.Parameter(weight.detach().to(FP8), requires_grad=False)
        m.forward = types.MethodType(_linear, m)
    return saved
