"""The FLUX.1 16-channel VAE (autoencoder) with the Black Forest Labs parameter names of `ae.safetensors`.

Latent spaces (both hold (B, 16, H/8, W/8) tensors):
- raw: the encoder's mean, what the decoder takes. ComfyUI's LATENT dicts (`{"samples": ...}`) hold this space:
  its `latent_formats.Flux.process_in` applies `(x - shift) * scale` only when a latent enters the model, and
  `process_out` undoes it when the sampler hands the result back.
- scaled: `(raw - shift_factor) * scale_factor`, the space the DiT works in (BFL, diffusers and DiffSynth all
  scale before the DiT). `FluxVAE.encode` returns it and `FluxVAE.decode` takes it.
`encode_raw` / `decode_raw` work in the raw space; `to_comfy_latent` / `from_comfy_latent` convert between them.

Images are (B, 3, H, W) in [-1, 1] with H and W multiples of 8. The encoder's second half (the log-variance) is
dropped: encoding takes the mean, never a sample, so it is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..vram import compute_place

DOWNSCALE = 8  # pixels per latent pixel: 3 stride-2 downsamples for the 4 levels of FLUX's VAE


@dataclass(frozen=True)
class AutoEncoderParams:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32  # GroupNorm groups; not readable from shapes (tiny test models use fewer)

    def __post_init__(self):
        for c in (self.ch * m for m in self.ch_mult):
            if c % self.norm_groups:
                raise ValueError(f"AutoEncoderParams: {c} channels are not divisible by norm_groups {self.norm_groups}.")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def raw_to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent (ComfyUI LATENT `samples`) -> the scaled latent the DiT works in."""
        return (raw - self.shift_factor) * self.scale_factor

    def scaled_to_raw(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


def _norm(params: AutoEncoderParams, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(params.norm_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, params: AutoEncoderParams, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(params, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(params, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the width changes, so the residual can be added.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1x1 convs as in `ae.safetensors`."""

    def __init__(self, params: AutoEncoderParams, channels: int):
        super().__init__()
        self.norm = _norm(params, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad right and bottom only: the trained weights expect this asymmetric padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): res blocks, then a resampler if any."""

    def __init__(self, blocks: list[nn.Module], resample_name: str | None, resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample_name is not None:
            setattr(self, resample_name, resample)


class _Mid(nn.Module):
    def __init__(self, params: AutoEncoderParams, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(params, channels, channels)
        self.attn_1 = AttnBlock(params, channels)
        self.block_2 = ResnetBlock(params, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        p = params
        n = len(p.ch_mult)
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        widths = [p.ch * m for m in (1,) + tuple(p.ch_mult)]  # width entering level i is widths[i]
        self.down = nn.ModuleList()
        for i in range(n):
            blocks = [ResnetBlock(p, widths[i] if j == 0 else widths[i + 1], widths[i + 1])
                      for j in range(p.num_res_blocks)]
            last = i == n - 1
            self.down.append(_Level(blocks, None if last else "downsample", None if last else Downsample(widths[i + 1])))
        self.mid = _Mid(p, widths[-1])
        self.norm_out = _norm(p, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        p = params
        n = len(p.ch_mult)
        top = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, top, 3, padding=1)
        self.mid = _Mid(p, top)
        # BFL numbers the decoder levels like the encoder's (up.0 = full resolution) and runs them from the
        # last: up.{n-1} takes the latent-sized features first. Build in index order so the names line up.
        levels: list[nn.Module] = []
        for i in range(n):
            width = p.ch * p.ch_mult[i]
            width_in = p.ch * p.ch_mult[i + 1] if i + 1 < n else top
            blocks = [ResnetBlock(p, width_in if j == 0 else width, width) for j in range(p.num_res_blocks + 1)]
            levels.append(_Level(blocks, "upsample" if i else None, Upsample(width) if i else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(p, p.ch * p.ch_mult[0])
        self.conv_out = nn.Conv2d(p.ch * p.ch_mult[0], p.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxVAE(nn.Module):
    """FLUX.1's autoencoder. `encode`/`decode` speak the scaled latent space the DiT uses; see the module docstring.

    Tiling (`tiled=True`): `tile_size` and `tile_stride` are in LATENT pixels for both directions, so the same
    numbers cover the same area: encoding cuts the image into `tile_size*8`-pixel tiles every `tile_stride*8`
    pixels, decoding cuts the latent into `tile_size` tiles every `tile_stride`. Overlaps are blended with
    linear ramps (see `tiled_apply`). Tiles bound the memory of the mid-block attention (quadratic in the tile
    area) at the cost of small differences from the untiled result, since attention and GroupNorm then see one
    tile at a time. An input no larger than one tile is processed in one piece, exactly as untiled.
    """

    def __init__(self, params: AutoEncoderParams = AutoEncoderParams()):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (not the storage dtype when a VRAMManager places it)."""
        return compute_place(self)[1]

    @property
    def device(self) -> torch.device:
        return compute_place(self)[0]

    # -- raw latent space (ComfyUI LATENT) -------------------------------------------------------------------
    def encode_raw(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 128,
                   tile_stride: int = 64) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, z, H/8, W/8) encoder mean, unscaled. Computed in the VAE's dtype."""
        image = self._check_image(image)
        f = self.params.downscale

        def run(x: torch.Tensor) -> torch.Tensor:
            return self.encoder(x)[:, : self.params.z_channels]

        if not tiled:
            return run(image)
        return tiled_apply(run, image, tile_size, tile_stride, in_per_unit=f, out_per_unit=1)

    def decode_raw(self, latent: torch.Tensor, tiled: bool = False, tile_size: int = 128,
                   tile_stride: int = 64) -> torch.Tensor:
        """(B, z, h, w) unscaled latent -> (B, 3, 8h, 8w) image, about [-1, 1] (not clamped)."""
        latent = self._check_latent(latent)
        if not tiled:
            return self.decoder(latent)
        return tiled_apply(self.decoder, latent, tile_size, tile_stride, in_per_unit=1, out_per_unit=self.params.downscale)

    # -- scaled latent space (the DiT's) ---------------------------------------------------------------------
    def encode(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 128,
               tile_stride: int = 64) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> scaled latent `(mean - shift_factor) * scale_factor`."""
        return self.from_comfy_latent(self.encode_raw(image, tiled, tile_size, tile_stride))

    def decode(self, latent: torch.Tensor, tiled: bool = False, tile_size: int = 128,
               tile_stride: int = 64) -> torch.Tensor:
        """Scaled latent -> (B, 3, 8h, 8w) image, about [-1, 1] (not clamped). Unscales first: `z / scale + shift`."""
        return self.decode_raw(self.to_comfy_latent(latent), tiled, tile_size, tile_stride)

    def to_comfy_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled (DiT) latent -> raw VAE latent, the space ComfyUI's LATENT `samples` hold."""
        return self.params.scaled_to_raw(latent)

    def from_comfy_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent (ComfyUI LATENT `samples`) -> scaled latent for the DiT."""
        return self.params.raw_to_scaled(samples)

    # -- input checks ----------------------------------------------------------------------------------------
    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        p = self.params
        if image.ndim != 4 or image.shape[1] != p.in_channels:
            hint = ""
            if image.ndim == 4 and image.shape[-1] == p.in_channels:
                hint = (" It looks channels-last (ComfyUI IMAGE is (B, H, W, C) in 0..1): pass "
                        "image.permute(0, 3, 1, 2) * 2 - 1.")
            raise ValueError(f"FluxVAE.encode: expected an image of shape (B, {p.in_channels}, H, W) in [-1, 1], "
                             f"got {tuple(image.shape)}.{hint}")
        f = p.downscale
        h, w = image.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"FluxVAE.encode: height and width must be multiples of {f}, got {h}x{w} (HxW); crop or "
                             f"resize to {_nearest_multiple(h, f)}x{_nearest_multiple(w, f)}.")
        return image.to(device=self.device, dtype=self.dtype)

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.params.z_channels
        if latent.ndim != 4 or latent.shape[1] != z:
            hint = ""
            if latent.ndim == 3:
                hint = " Packed DiT tokens (B, L, 64) must be unpacked to (B, 16, H/8, W/8) first."
            elif latent.ndim == 4 and latent.shape[1] == 4:
                hint = " A 4-channel latent comes from a Stable Diffusion VAE, not FLUX's."
            raise ValueError(f"FluxVAE.decode: expected a latent of shape (B, {z}, h, w), got {tuple(latent.shape)}.{hint}")
        return latent.to(device=self.device, dtype=self.dtype)


def _nearest_multiple(n: int, f: int) -> int:
    return max(f, int(round(n / f)) * f)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of `tile`-long windows every `stride` that cover [0, length). Every window is whole: the last
    one is moved back to end at `length` rather than cut short, so all tiles have the same size."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """Blend weight along one tile axis: rises linearly over `ramp_in` samples, falls over `ramp_out`, 1 between.
    Weights stay strictly positive, so every covered sample has a non-zero total weight."""
    x = torch.arange(size, dtype=torch.float32)
    w = torch.ones(size)
    if ramp_in > 0:
        w = torch.minimum(w, (x + 1) / (ramp_in + 1))
    if ramp_out > 0:
        w = torch.minimum(w, (size - x) / (ramp_out + 1))
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_size: int, tile_stride: int,
                in_per_unit: int, out_per_unit: int) -> torch.Tensor:
    """Apply a convolutional `fn` to overlapping tiles of `x` (B, C, H, W) and blend the results.

    Tiles are laid out on a grid of "units" (latent pixels): `x` has `in_per_unit` samples per unit, `fn`'s output
    `out_per_unit`. A tile is `tile_size` units, tiles start every `tile_stride` units. Where tiles overlap, each
    output sample is the weighted mean of the tiles covering it, the weight ramping linearly from a tile's inner
    edge across the overlap, so no seam shows; image borders get no ramp. One tile -> `fn(x)` exactly.
    """
    if tile_size < 1 or tile_stride < 1 or tile_stride > tile_size:
        raise ValueError(f"tiling needs 1 <= tile_stride <= tile_size, got tile_size={tile_size}, "
                         f"tile_stride={tile_stride} (both in latent pixels).")
    b, _, h_in, w_in = x.shape
    h, w = h_in // in_per_unit, w_in // in_per_unit
    rows, cols = tile_starts(h, tile_size, tile_stride), tile_starts(w, tile_size, tile_stride)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)

    th, tw = min(tile_size, h), min(tile_size, w)  # every tile is whole (see tile_starts)
    k = out_per_unit
    out = weight = None
    out_dtype = x.dtype
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            tile = x[:, :, r * in_per_unit:(r + th) * in_per_unit, c * in_per_unit:(c + tw) * in_per_unit]
            y = fn(tile)
            out_dtype = y.dtype
            if out is None:
                out = torch.zeros(b, y.shape[1], h * k, w * k, dtype=torch.float32, device=y.device)
                weight = torch.zeros(1, 1, h * k, w * k, dtype=torch.float32, device=y.device)
            # Ramp only over the overlap with a neighbouring tile (the last tile may overlap more than the rest).
            up = (rows[i - 1] + th - r) if i > 0 else 0
            down = (r + th - rows[i + 1]) if i + 1 < len(rows) else 0
            left = (cols[j - 1] + tw - c) if j > 0 else 0
            right = (c + tw - cols[j + 1]) if j + 1 < len(cols) else 0
            wy = _ramp(th * k, up * k, down * k).to(y.device)
            wx = _ramp(tw * k, left * k, right * k).to(y.device)
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, r * k:(r + th) * k, c * k:(c + tw) * k] += y.float() * wt
            weight[:, :, r * k:(r + th) * k, c * k:(c + tw) * k] += wt
    return (out / weight).to(out_dtype)
