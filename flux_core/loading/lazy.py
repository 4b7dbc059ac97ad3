"""Lazy tensors: a shape and dtype now, the data only when asked for.

Checkpoints are read through `LazyTensor`s so that layout converters (renames, q/k/v concatenation, half
swaps) and config inference run on shapes alone, and the loader can materialise one tensor at a time:
the weights never exist twice in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lora_tools import parts

from .errors import CheckpointError


@dataclass(frozen=True)
class QuantizedData:
    """How a block-quantized tensor (a GGUF tensor in a GGML format) is stored: `read` gives the raw bytes."""
    qtype: str                       # GGML type name, a key of flux_core.quantized.BLOCK_FORMATS
    raw_shape: tuple[int, ...]       # the uint8 tensor `read` returns (the logical shape's last dim in bytes)
    read: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]
    source: str = ""  # "file:key", for error messages
    # Set for block-quantized tensors: `read` then dequantizes (for code that wants values), while the loader
    # may keep the raw blocks instead (flux_core.quantized.QuantizedLinear). Transforms (apply, cat) drop it.
    quantized: QuantizedData | None = None

    def load(self) -> torch.Tensor:
        return self.read()

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self) -> int:
        """Bytes as stored (the raw blocks of a quantized tensor)."""
        if self.quantized is not None:
            n = 1
            for d in self.quantized.raw_shape:
                n *= d
            return n
        return self.numel() * _itemsize(self.dtype)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int] | None = None) -> "LazyTensor":
        """A lazy tensor computed by `fn` from this one (same shape unless `shape` says otherwise)."""
        return LazyTensor(tuple(shape) if shape is not None else self.shape, self.dtype, lambda: fn(self.read()), self.source)


def lazy_from_tensor(tensor: torch.Tensor, source: str = "") -> LazyTensor:
    return LazyTensor(tuple(tensor.shape), tensor.dtype, lambda: tensor, source)


def lazy_cat(parts: Sequence[LazyTensor], dim: int = 0) -> LazyTensor:
    """Concatenation of lazy tensors (e.g. diffusers' separate q, k, v into BFL's fused qkv)."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    dtype = parts[0].dtype
    return LazyTensor(tuple(shape), dtype, lambda: torch.cat([p.read().to(dtype) for p in parts], dim=dim),
                      "+".join(p.source for p in parts))


def swap_halves(t: LazyTensor) -> LazyTensor:
    """(a, b) -> (b, a) along dim 0: diffusers stores the final AdaLN as (scale, shift), BFL as (shift, scale)."""
    return t.apply(parts.swap_halves)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def file_range_reader(path: Path, offset: int, length: int, shape: tuple[int, ...], dtype: torch.dtype
                      ) -> Callable[[], torch.Tensor]:
    """A reader of `length` bytes at `offset` in `path` as a `dtype` tensor of `shape`, with plain file reads (no
    memory map: a mapped file's touched pages would count as a second copy). A file that ends early is refused."""
    def read() -> torch.Tensor:
        buf = torch.empty(length, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            view = memoryview(buf.numpy())
            got = 0
            while got < length:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path}: ended early while reading a tensor; the file is truncated.")
                got += n
        return buf.view(dtype).reshape(shape) if length else torch.empty(shape, dtype=dtype)
    return read
