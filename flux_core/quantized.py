"""Weights that rest quantized (GGML block formats, as in GGUF files) and are dequantized for each call.

A GGML tensor is a row-major run of blocks; each block codes `block_size` consecutive values of the last
dimension in `type_size` bytes (scales as float16, packed integer codes). `dequantize(raw, qtype, shape)` turns
the raw bytes into values with torch on the tensor's own device, written from the published block layouts of
the ggml project (ggml-quants.c `dequantize_row_*`, ggml-common.h `block_*`): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and BF16. The tests compare every type with `gguf.quants.dequantize`.

`QuantizedLinear` is an nn.Linear whose `weight` parameter holds the raw blocks (uint8, shape `(out, bytes per
row)`): storage in the quantized format, compute in the input's dtype. `flux_core.vram` moves those bytes like
any integer tensor (it never casts them), so a VRAM budget counts quantized bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class BlockFormat:
    block_size: int                                            # values per block
    type_size: int                                             # bytes per block
    decode: Callable[[torch.Tensor], torch.Tensor]             # (n, type_size) uint8 -> (n, block_size) float32


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte `at` of every block, as an (n, 1) float32 column."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k) 4-bit codes: all low nibbles first, then all high ones (ggml's order)."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bit i of a little-endian run of bytes, for i < count: (n, bytes) -> (n, count) in {0, 1}."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[:, :, None] >> shifts) & 1).reshape(packed.shape[0], -1)[:, :count]


def _q8_0(b: torch.Tensor) -> torch.Tensor:     # d: f16, 32 x int8
    return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:     # d: f16, 16 bytes of 4-bit codes, value = d * (code - 8)
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:     # d, m: f16, 16 bytes of codes, value = d * code + m
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:     # d: f16, 32 fifth bits, 16 bytes of low nibbles; d * (code - 16)
    code = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return _f16(b, 0) * (code.float() - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:     # d, m: f16, 32 fifth bits, 16 bytes of nibbles; d * code + m
    code = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * code.float() + _f16(b, 2)


# K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with its own small integer scale.
QK_K = 256


def _two_bit_planes(packed: torch.Tensor) -> torch.Tensor:
    """(n, 32*h) bytes -> (n, 128*h) 2-bit codes: per 32-byte group, bit pairs 0-1, 2-3, 4-5, 6-7 in turn."""
    n = packed.shape[0]
    shifts = torch.arange(0, 8, 2, device=packed.device, dtype=torch.uint8)
    return ((packed.reshape(n, -1, 1, 32) >> shifts[:, None]) & 3).reshape(n, -1)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # 16 bytes of (scale | min << 4) per 16 values, 64 bytes of 2-bit codes, d, dmin: f16
    n = b.shape[0]
    scales = b[:, 0:16]
    step = (_f16(b, 80) * (scales & 0x0F).float())[:, :, None]
    low = (_f16(b, 82) * (scales >> 4).float())[:, :, None]
    code = _two_bit_planes(b[:, 16:80]).reshape(n, 16, 16).float()
    return (step * code - low).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # 32 bytes of high bits, 64 bytes of 2-bit codes, 12 bytes of 16 six-bit signed scales, d: f16
    n = b.shape[0]
    packed = b[:, 96:108]
    low4 = torch.cat([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], dim=1)                    # scales 0-7, 8-15
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    high2 = ((packed[:, None, 8:12] >> shifts[:, None]) & 3).reshape(n, 16)                   # 2 bits each
    scale = ((low4 | (high2 << 4)).to(torch.int16) - 32).float()
    step = (_f16(b, 108) * scale)[:, :, None]
    code = _two_bit_planes(b[:, 32:96]).to(torch.int16)
    # high bit j of value k (k = 32 j + l) is bit j of byte l of the mask; a clear bit means "subtract 4"
    bit_j = (b[:, None, 0:32] >> torch.arange(8, device=b.device, dtype=torch.uint8)[:, None]) & 1  # (n, 8, 32)
    code = code - 4 * (1 - bit_j.reshape(n, QK_K).to(torch.int16))
    return (step * code.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes hold 8 six-bit scales and 8 six-bit mins (the top 2 bits of the last 4 of each are
    kept in the top bits of the first 8 bytes)."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([first & 63, (third & 0x0F) | ((first >> 6) << 4)], dim=1)
    minimum = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
    return scale.float(), minimum.float()


def _k_with_mins(b: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """value = d * scale_s * code - dmin * min_s for the 8 sub-blocks s of 32 values."""
    n = b.shape[0]
    scale, minimum = _scales_and_mins(b[:, 4:16])
    step = (_f16(b, 0) * scale)[:, :, None]
    low = (_f16(b, 2) * minimum)[:, :, None]
    return (step * code.reshape(n, 8, 32).float() - low).reshape(n, QK_K)


def _low_high_per_32(packed: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 256) 4-bit codes: per 32 bytes, the 32 low nibbles then the 32 high ones."""
    n = packed.shape[0]
    return _nibbles(packed.reshape(n, 4, 32)).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:    # d, dmin: f16, 12 bytes scales/mins, 128 bytes of 4-bit codes
    return _k_with_mins(b, _low_high_per_32(b[:, 16:144]))


def _q5_k(b: torch.Tensor) -> torch.Tensor:    # as Q4_K plus 32 bytes of fifth bits (bit s of byte l: value 32 s + l)
    n = b.shape[0]
    fifth = (b[:, None, 16:48] >> torch.arange(8, device=b.device, dtype=torch.uint8)[:, None]) & 1
    return _k_with_mins(b, _low_high_per_32(b[:, 48:176]) | (fifth.reshape(n, QK_K) << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (per 16 values), d: f16
    n = b.shape[0]
    low = _nibbles(b[:, 0:128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)  # per half: 4 runs of 32
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts[:, None]) & 3
    code = (low | (high << 4)).to(torch.int16) - 32
    step = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float())[:, :, None]
    return (step * code.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


# GGML type name -> block format (the type names are gguf.GGMLQuantizationType's).
BLOCK_FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat(32, 34, _q8_0), "Q4_0": BlockFormat(32, 18, _q4_0), "Q4_1": BlockFormat(32, 20, _q4_1),
    "Q5_0": BlockFormat(32, 22, _q5_0), "Q5_1": BlockFormat(32, 24, _q5_1),
    "Q2_K": BlockFormat(QK_K, 84, _q2_k), "Q3_K": BlockFormat(QK_K, 110, _q3_k), "Q4_K": BlockFormat(QK_K, 144, _q4_k),
    "Q5_K": BlockFormat(QK_K, 176, _q5_k), "Q6_K": BlockFormat(QK_K, 210, _q6_k), "BF16": BlockFormat(1, 2, _bf16),
}


def raw_shape(shape: tuple[int, ...], qtype: str) -> tuple[int, ...]:
    """Shape of the raw uint8 tensor holding a `shape` tensor in `qtype` (the last dim becomes bytes)."""
    fmt = BLOCK_FORMATS[qtype]
    if shape[-1] % fmt.block_size:
        raise ValueError(f"a last dimension of {shape[-1]} is not a multiple of {qtype}'s block of {fmt.block_size}")
    return (*shape[:-1], shape[-1] // fmt.block_size * fmt.type_size)


def bytes_per_value(qtype: str) -> float:
    fmt = BLOCK_FORMATS[qtype]
    return fmt.type_size / fmt.block_size


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of a `qtype` tensor of logical `shape` from its raw bytes, on `raw`'s device, in `dtype`.
    Computed in float32 (as the reference does), then cast once."""
    fmt = BLOCK_FORMATS[qtype]
    blocks = raw.reshape(-1, fmt.type_size)
    return fmt.decode(blocks).reshape(shape).to(dtype)


class QuantizedLinear(nn.Linear):
    """nn.Linear whose weight rests as GGML blocks and is dequantized, on its device, for each call.

    `weight` is a uint8 Parameter of shape `raw_shape((out, in), qtype)`; `in_features`/`out_features` keep the
    logical sizes (LoRA shape checks read them). A forward hook added to it (LoRA hook mode) sees the usual output."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.weight = nn.Parameter(torch.empty(raw_shape((out_features, in_features), qtype), dtype=torch.uint8,
                                               device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def replacing(cls, linear: nn.Linear, qtype: str) -> "QuantizedLinear":
        """A QuantizedLinear of `linear`'s sizes, on its device (the meta device while a model is built)."""
        return cls(linear.in_features, linear.out_features, qtype, bias=linear.bias is not None,
                   device=linear.weight.device, dtype=linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"
