"""Control maps for the InstantX Union ControlNet made from a photo without model weights.

The union ControlNet takes an image that already *is* the control map (`ControlNetInput(processor_id=...)` picks the
mode; no annotator runs inside the pipeline, as in DiffSynth-Studio). Five of its seven modes need no model to make
that map, and this module makes them:

| union mode (id) | function      | what the map is                                              |
| --------------- | ------------- | ------------------------------------------------------------ |
| canny (0)       | `canny`       | white-on-black Canny edges, as cv2.Canny(image, 100, 200)    |
| tile (1)        | `tile`        | the photo downscaled then upscaled (detail removed)          |
| blur (3)        | `blur`        | the photo under a Gaussian blur                              |
| gray (5)        | `gray`        | the photo's luma, as a 3-channel image                       |
| lq (6)          | `low_quality` | the photo downscaled, JPEG-compressed and upscaled back       |

depth (2) and pose (4) need a depth or pose estimator (model weights): give a depth map or a pose image made
elsewhere (ComfyUI's controlnet_aux nodes, DiffSynth's `Annotator`). `control_map(mode, image)` says so by name.

InstantX publishes the mode ids but not how the tile, blur and lq training inputs were made; the defaults below are
the usual degradations of those names, documented per function. Canny follows OpenCV's cv2.Canny exactly (that is
what controlnet_aux's CannyDetector, and so DiffSynth's `Annotator("canny")`, run) without depending on OpenCV.

Every function takes a PIL image (returns a PIL RGB image of the same size) or a ComfyUI-style IMAGE tensor
(B, H, W, C) float in [0, 1] (returns (B, H, W, 3) float32 in [0, 1] on the CPU; each image of the batch is mapped
on its own).
"""
from __future__ import annotations

import io
import math
import numbers
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

from .models.controlnet import UNION_MODES, union_mode_id

# Modes whose map needs an estimator with weights; the message tells the user what to give instead.
NEEDS_PREPROCESSOR = {
    "depth": "a depth map (near is white), e.g. from ComfyUI's controlnet_aux Depth Anything / MiDaS nodes",
    "pose": "an OpenPose skeleton image, e.g. from ComfyUI's controlnet_aux DWPose / OpenPose nodes",
}


class ControlMapInputError(ValueError):
    """A bad argument; `parameter` names it (the nodes turn it into their input's name)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


# ----------------------------------------------------------------------------- PIL <-> batch plumbing
def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _batch_to_pils(images: torch.Tensor, name: str) -> list[Image.Image]:
    """(B, H, W, C) or (H, W, C) float in [0, 1] -> PIL RGB images. Values are rounded, not truncated: an 8-bit
    image loaded as k/255 comes back as k (truncation would turn some k into k-1 through float error)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ControlMapInputError(name, f"{name}: expected an IMAGE tensor (B, H, W, C) with C = 1, 3 or 4, "
                                         f"got shape {tuple(images.shape)}.")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ControlMapInputError(name, f"{name}: empty image batch, shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ControlMapInputError(name, f"{name}: expected float values in [0, 1] (a ComfyUI IMAGE), got dtype "
                                         f"{images.dtype}; divide 8-bit values by 255 first.")
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    array = (images[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


def _pils_to_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_to_rgb_uint8(i) for i in images])).float() / 255.0


def _map_images(image, name: str, make: Callable[[Image.Image], Image.Image]):
    """Apply `make` (PIL RGB -> PIL RGB) to a PIL image, or to each image of an IMAGE tensor."""
    if isinstance(image, Image.Image):
        return make(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        squeeze = image.ndim == 3
        out = _pils_to_batch([make(i) for i in _batch_to_pils(image, name)])
        return out[0] if squeeze else out
    raise ControlMapInputError(name, f"{name} must be a PIL.Image.Image or an IMAGE tensor (B, H, W, 3) in [0, 1], "
                                     f"got {type(image).__name__}.")


def _check_number(name: str, value, minimum: float, *, inclusive: bool, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real     # numpy scalars too
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise ControlMapInputError(name, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}.")
    if value < minimum or (value == minimum and not inclusive):
        raise ControlMapInputError(name, f"{name} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}.")


# ----------------------------------------------------------------------------- canny (union mode 0)
# tan(22.5 deg) in OpenCV's 15-bit fixed point: the sector boundaries of non-maximum suppression are compared in
# integers, as cv2.Canny does, so borderline directions fall on the same side as there.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488 * (1 << _CANNY_SHIFT) + 0.5)


def _sobel(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (x right, y down) of (H, W, C) int32 with replicated borders (cv2.Canny's border)."""
    p = np.pad(channels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    horizontal = p[:, 2:] - p[:, :-2]                     # [-1, 0, 1] along x
    dx = horizontal[:-2] + 2 * horizontal[1:-1] + horizontal[2:]
    vertical = p[2:] - p[:-2]                             # [-1, 0, 1] along y
    dy = vertical[:, :-2] + 2 * vertical[:, 1:-1] + vertical[:, 2:]
    return dx, dy


def _suppress_non_maxima(mag: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where `mag` is a maximum across the edge, with the gradient direction quantised to 4 sectors. Like OpenCV,
    the axis sectors compare `> one neighbour and >= the other` (a 2-px plateau keeps one pixel) and the diagonal
    sector is strict on both sides; outside the image the magnitude is 0."""
    h, w = mag.shape
    m = np.pad(mag, 1)

    def neighbour(dr, dc):
        return m[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _CANNY_SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0                             # gradient along the main diagonal (down-right)
    keep = horizontal & (mag > neighbour(0, -1)) & (mag >= neighbour(0, 1))
    keep |= vertical & (mag > neighbour(-1, 0)) & (mag >= neighbour(1, 0))
    keep |= diagonal & same_sign & (mag > neighbour(-1, -1)) & (mag > neighbour(1, 1))
    keep |= diagonal & ~same_sign & (mag > neighbour(-1, 1)) & (mag > neighbour(1, -1))
    return keep


def _connected_to(candidates: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of `candidates` 8-connected (through candidates) to a pixel of `seeds` (hysteresis). Union-find over
    the candidate pixels, vectorised: hook each root to the smaller root across every neighbouring pair, then
    compress paths, until every pair shares its root."""
    h, w = candidates.shape
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        return np.zeros_like(candidates)
    compact = np.full(h * w, -1, dtype=np.int64)
    compact[flat] = np.arange(flat.size)
    grid = compact.reshape(h, w)
    pairs_a, pairs_b = [], []
    for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):      # each undirected 8-neighbour pair once
        a = grid[:h - dr, max(0, -dc):w - max(0, dc)]
        b = grid[dr:, max(0, dc):w - max(0, -dc)]
        both = (a >= 0) & (b >= 0)
        pairs_a.append(a[both])
        pairs_b.append(b[both])
    a, b = np.concatenate(pairs_a), np.concatenate(pairs_b)
    parent = np.arange(flat.size)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    keep_root = np.zeros(flat.size, dtype=bool)
    keep_root[parent[compact[np.flatnonzero(seeds & candidates)]]] = True
    out = np.zeros(h * w, dtype=bool)
    out[flat] = keep_root[parent]
    return out.reshape(h, w)


def canny_edges(rgb: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """Canny edges of an (H, W) or (H, W, C) uint8 array as an (H, W) bool array, following cv2.Canny
    (apertureSize 3, L2gradient False): Sobel derivatives per channel, the channel with the largest L1 magnitude
    |dx| + |dy| chosen per pixel, non-maximum suppression, then hysteresis: pixels above `floor(low_threshold)`
    that survive suppression are edges when 8-connected to one above `floor(high_threshold)`."""
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    channels = rgb.astype(np.int32)
    dx, dy = _sobel(channels)
    mag = np.abs(dx) + np.abs(dy)
    best = np.argmax(mag, axis=2)[..., None]              # first channel on ties, as OpenCV
    mag = np.take_along_axis(mag, best, 2)[..., 0]
    dx = np.take_along_axis(dx, best, 2)[..., 0]
    dy = np.take_along_axis(dy, best, 2)[..., 0]
    candidates = (mag > math.floor(low_threshold)) & _suppress_non_maxima(mag, dx, dy)
    return _connected_to(candidates, candidates & (mag > math.floor(high_threshold)))


def canny(image, low_threshold: float = 100, high_threshold: float = 200, sigma: float = 0.0):
    """Control map for union mode **canny** (0): white edges on black, 1 px wide.

    `low_threshold` / `high_threshold` have cv2.Canny's meaning (the defaults are controlnet_aux's
    CannyDetector's, which DiffSynth's `Annotator("canny")` runs; edges are found at the image's own resolution):
    the gradient is the L1 norm of 3x3 Sobel derivatives (up to 4 * 255 * 2 per channel), an edge pixel needs
    more than `low_threshold` and a path of such pixels to one above `high_threshold`. Colour images are not
    converted to gray first: like cv2.Canny, each pixel uses the channel with the strongest gradient (an edge
    between two colours of equal luma is still found). `sigma` > 0 blurs the image first (PIL's Gaussian, that
    standard deviation in pixels) to drop fine texture; the default 0 matches cv2.Canny, whose only smoothing is
    the Sobel kernel's own."""
    _check_number("low_threshold", low_threshold, 0, inclusive=True)
    _check_number("high_threshold", high_threshold, 0, inclusive=True)
    _check_number("sigma", sigma, 0, inclusive=True)
    if low_threshold > high_threshold:
        raise ControlMapInputError("low_threshold", f"low_threshold ({low_threshold}) must not exceed high_threshold "
                                                    f"({high_threshold}); swap them.")

    def make(photo: Image.Image) -> Image.Image:
        if sigma > 0:
            photo = photo.filter(ImageFilter.GaussianBlur(sigma))
        edges = canny_edges(_to_rgb_uint8(photo), low_threshold, high_threshold)
        return Image.fromarray(np.repeat(edges[..., None] * np.uint8(255), 3, axis=2), "RGB")

    return _map_images(image, "image", make)


# ----------------------------------------------------------------------------- the other weight-free modes
def blur(image, sigma: float = 6.0):
    """Control map for union mode **blur** (3): the photo under a Gaussian blur of standard deviation `sigma`
    pixels (PIL's GaussianBlur, whose `radius` is that standard deviation; edges extend the border pixels).
    The default 6 px on a ~1024 px image keeps shapes and colours and removes all texture, the kind of input the
    blur mode restores detail into; raise it for a looser hold."""
    _check_number("sigma", sigma, 0, inclusive=False)
    return _map_images(image, "image", lambda photo: photo.filter(ImageFilter.GaussianBlur(sigma)))


def gray(image):
    """Control map for union mode **gray** (5): the photo's luma L = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601,
    what PIL's convert("L") and cv2.cvtColor's RGB2GRAY compute), repeated on three channels; the mode
    colourises it."""
    return _map_images(image, "image", lambda photo: photo.convert("L").convert("RGB"))


def _downscale(photo: Image.Image, factor: float) -> Image.Image:
    """Each side divided by `factor` (at least 1 px); PIL's bicubic resize is antialiased when shrinking."""
    w, h = photo.size
    return photo.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BICUBIC)


def tile(image, factor: float = 4.0):
    """Control map for union mode **tile** (1): the photo downscaled by `factor` (each side divided, antialiased
    bicubic) and upscaled back to its size (bicubic), the "tile_resample" input of tile ControlNets: the layout
    and colours of the photo without its fine detail, which the model regenerates. factor 1 returns the photo
    unchanged (DiffSynth's `Annotator("tile")` passes the image as it is; use 1 to feed an already small image
    that was upscaled elsewhere)."""
    _check_number("factor", factor, 1, inclusive=True)
    if factor == 1:
        return _map_images(image, "image", lambda photo: photo.copy())
    return _map_images(image, "image",
                       lambda photo: _downscale(photo, factor).resize(photo.size, Image.BICUBIC))


def low_quality(image, factor: float = 2.0, jpeg_quality: int = 30):
    """Control map for union mode **lq** (low quality, 6): the photo downscaled by `factor` (antialiased
    bicubic), JPEG-encoded at `jpeg_quality` (1..95, PIL's encoder with 4:2:0 chroma subsampling), decoded and
    upscaled back (bicubic). Both steps, because a low-quality photo in the wild has both: lost resolution
    (softness, what the tile map alone has) and compression artefacts (8x8 blocks, ringing, smeared chroma);
    InstantX does not publish its lq degradation, so this is the common one. factor 1 gives compression alone."""
    _check_number("factor", factor, 1, inclusive=True)
    _check_number("jpeg_quality", jpeg_quality, 1, inclusive=True, integer=True)
    if jpeg_quality > 95:
        raise ControlMapInputError("jpeg_quality", f"jpeg_quality must be <= 95 (PIL's highest useful JPEG quality), "
                                                   f"got {jpeg_quality}.")

    def make(photo: Image.Image) -> Image.Image:
        small = photo if factor == 1 else _downscale(photo, factor)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=jpeg_quality)
        buffer.seek(0)
        degraded = Image.open(buffer).convert("RGB")
        return degraded if degraded.size == photo.size else degraded.resize(photo.size, Image.BICUBIC)

    return _map_images(image, "image", make)


# Union mode name -> the function that makes its map from a photo (modes needing weights are absent).
CONTROL_MAPS: dict[str, Callable] = {"canny": canny, "tile": tile, "blur": blur, "gray": gray, "lq": low_quality}


def control_map(mode: str | int, image, **params):
    """The control map of union `mode` (a name or id of UNION_MODES, as `processor_id` takes it) for `image`, with
    that mode's function's `params`."""
    try:
        mode_id = union_mode_id(mode)
    except ValueError as error:
        raise ControlMapInputError("mode", str(error)) from None
    name = next(name for name, i in UNION_MODES.items() if i == mode_id)
    if name in NEEDS_PREPROCESSOR:
        raise ControlMapInputError("mode", f"mode {name!r}: no built-in preprocessor (it needs model weights); give "
                                           f"{NEEDS_PREPROCESSOR[name]} as the control image, with "
                                           f"processor_id={name!r}.")
    return CONTROL_MAPS[name](image, **params)
