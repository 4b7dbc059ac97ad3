"""Exact fusion of split LoRAs into fused layers, and the exact split back.

diffusers-style files hold separate LoRAs for q, k, v (and the MLP input of single blocks); BFL-style models
and files have one fused layer. Both directions move numbers around without arithmetic, so no precision is
lost:

- fuse: parts that share the same down matrix and scale (a fused LoRA that was split) -> that down, with
  the parts' up rows stacked (zeros for parts the file does not cover); otherwise -> down matrices
  stacked and up block-diagonal, so `up @ down` is exactly the parts' deltas stacked. Only parts whose
  scales differ need their scale multiplied into their up block (one rounding).
- split: each part keeps the down rows its up block actually uses (its non-zero columns). A block-diagonal
  fused LoRA splits back into its original parts; a LoRA trained on the fused layer splits into parts that
  share the full down matrix. Parts whose up rows are all zero are left out: they change nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import LoraLayer, LoraShapeError
from .names import Target


@dataclass
class Piece(LoraLayer):
    """One LoRA module of a file (a LoraLayer), placed on (part of) a canonical layer by `target`."""
    target: Target | None = None
    scheme: str = ""            # the naming scheme its keys were read in

    def parts(self, n_parts: int) -> range:
        t = self.target
        return range(0, n_parts) if t.whole else range(t.first, t.first + t.count)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def check_piece(piece: Piece, name: str, shape: tuple[int, int], sizes: list[int]) -> None:
    """Raise if a piece does not fit the layer's shape (a LoRA for another model size)."""
    parts = piece.parts(len(sizes))
    rows = sum(sizes[p] for p in parts)
    got = (int(piece.up.shape[0]), int(piece.down.shape[1]))
    if got != (rows, shape[1]):
        what = name if piece.target.whole else f"rows {sum(sizes[:parts.start])}:{sum(sizes[:parts.stop])} of {name}"
        raise LoraShapeError(
            f"{', '.join(piece.source_keys)}: LoRA delta has shape {got} (out, in) but the model's {what} needs "
            f"{(rows, shape[1])} (layer weight {tuple(shape)}). This LoRA was made for a different model "
            f"(another FLUX size or another architecture); use a LoRA trained for this model.")


def assemble(name: str, pieces: list[Piece], sizes: list[int]) -> LoraLayer:
    """One LoraLayer for a canonical layer from the pieces that cover it (pieces must not overlap)."""
    keys = tuple(k for p in pieces for k in p.source_keys)
    if len(pieces) == 1 and pieces[0].target.whole:
        p = pieces[0]
        up = swap_halves(p.up) if p.target.swap_halves else p.up
        return LoraLayer(p.down, up, p.alpha, keys)

    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    out_features = offsets[-1]
    dtype = pieces[0].up.dtype
    for p in pieces[1:]:
        dtype = torch.promote_types(dtype, p.up.dtype)

    def rows(p: Piece) -> slice:
        r = p.parts(len(sizes))
        return slice(offsets[r.start], offsets[r.stop])

    first = pieces[0]
    shared = all(p.scale == first.scale and p.down.shape == first.down.shape and torch.equal(p.down, first.down)
                 for p in pieces[1:])
    if shared:
        up = torch.zeros(out_features, first.rank, dtype=dtype)
        for p in pieces:
            up[rows(p)] = p.up.to(dtype)
        return LoraLayer(first.down, up, first.alpha, keys)

    rank = sum(p.rank for p in pieces)
    same_scale = all(p.scale == first.scale for p in pieces)
    down_dtype = first.down.dtype
    for p in pieces[1:]:
        down_dtype = torch.promote_types(down_dtype, p.down.dtype)
    down = torch.cat([p.down.to(down_dtype) for p in pieces], dim=0)
    up = torch.zeros(out_features, rank, dtype=dtype)
    col = 0
    for p in pieces:
        block = p.up if same_scale else (p.up.float() * p.scale).to(dtype)
        up[rows(p), col:col + p.rank] = block.to(dtype)
        col += p.rank
    alpha = first.scale * rank if same_scale else float(rank)
    return LoraLayer(down, up, alpha, keys)


def split(layer: LoraLayer, sizes: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(part index, down, up) for each part of a fused layer that the LoRA changes; the scale stays the
    layer's (`layer.scale`) for every part."""
    if len(sizes) == 1:
        return [(0, layer.down, layer.up)]
    out = []
    start = 0
    for index, size in enumerate(sizes):
        up_rows = layer.up[start:start + size]
        start += size
        used = (up_rows != 0).any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            continue
        if used.numel() == layer.rank:
            out.append((index, layer.down, up_rows))
        else:
            out.append((index, layer.down[used], up_rows[:, used]))
    return out
