"""The tiled DiT: one DiT call split into overlapping latent tiles whose velocities are blended.

DiffSynth-Studio's `tiled=True` tiles the DiT as well as the VAE (its FLUX upscaler example runs 2048x2048 so): tiles
of `tile_size` latent pixels every `tile_stride`, the last tile of a row or column moved back to end at the edge;
each tile is a full DiT call whose positions restart at 0 (adapters crop their spatial inputs to the tile through
`DiTInputs.top/left`); the velocities are averaged with weights that ramp up from a tile's inner edges over a border
of (tile height + tile width) / 4 and stay flat along the latent's own edges. A latent no larger than one tile is one
call, equal to the untiled one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class DiTTiling:
    tile_size: int = 128     # latent pixels (1024 image pixels)
    tile_stride: int = 64

    def __post_init__(self):
        if self.tile_size < 2 or self.tile_size % 2 or not 1 <= self.tile_stride <= self.tile_size:
            raise ValueError(f"tile_size={self.tile_size}, tile_stride={self.tile_stride}: the DiT's tiles need an even "
                             f"tile_size >= 2 (latent pixels, FLUX packs 2x2) and 1 <= tile_stride <= tile_size.")


def tile_boxes(height: int, width: int, tiling: DiTTiling) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of every tile of a (height, width) latent, in DiffSynth-Studio's order."""
    size_h, size_w = min(tiling.tile_size, height), min(tiling.tile_size, width)
    stride = tiling.tile_stride
    boxes = []
    for top in range(0, height, stride):
        for left in range(0, width, stride):
            # a tile that starts after one that already reached the edge adds nothing
            if (top >= stride and top - stride + size_h >= height) or (left >= stride and left - stride + size_w >= width):
                continue
            top_, left_ = min(top, height - size_h), min(left, width - size_w)
            boxes.append((top_, top_ + size_h, left_, left_ + size_w))
    return boxes


def tile_weight(height: int, width: int, at_edge: tuple[bool, bool, bool, bool], device=None) -> torch.Tensor:
    """Blending weight (1, 1, height, width) of one tile: the distance to its nearest inner edge (top, bottom, left,
    right; edges on the latent's border do not count), clipped to 1..border and divided by border."""
    border = (height + width) // 4
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    flat = torch.full((height, width), border, device=device)
    distances = torch.stack([flat if at_edge[0] else rows + 1, flat if at_edge[1] else height - rows,
                             flat if at_edge[2] else cols + 1, flat if at_edge[3] else width - cols])
    weight = distances.min(dim=0).values.clip(1, border).float() / border
    return weight[None, None]


def tiled_forward(velocity_of_tile: Callable[[torch.Tensor, int, int], torch.Tensor], latents: torch.Tensor,
                  tiling: DiTTiling) -> torch.Tensor:
    """The blended velocity of `latents` (B, C, H, W); `velocity_of_tile(tile, top, left)` computes one tile."""
    _, _, height, width = latents.shape
    total = torch.zeros_like(latents, dtype=torch.float32)
    weights = torch.zeros((1, 1, height, width), dtype=torch.float32, device=latents.device)
    for top, bottom, left, right in tile_boxes(height, width, tiling):
        v = velocity_of_tile(latents[:, :, top:bottom, left:right], top, left).float()
        w = tile_weight(bottom - top, right - left, (top == 0, bottom >= height, left == 0, right >= width),
                        device=latents.device)
        total[:, :, top:bottom, left:right] += v * w
        weights[:, :, top:bottom, left:right] += w
    return total / weights
