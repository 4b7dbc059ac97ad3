"""Control-map nodes: a photo (IMAGE) in, the control image of one InstantX Union mode out (IMAGE).

One node per mode rather than one node with a mode combo: each shows only the widgets its mode uses (a combo node
would show thresholds, sigma, factor and quality at once, most of them ignored), and the node's title says which
union mode to pick in Apply ControlNet, as ComfyUI's own preprocessor nodes do. depth and pose need estimator
weights and have no node here: ComfyUI's controlnet_aux nodes make those maps.
"""
from __future__ import annotations

import torch

from flux_core import control_maps

from . import comfy_bridge as bridge
from .loaders import NodeInputError, node_error

CATEGORY = "FluxCore/controlnet"
IMAGE_INPUT = ("IMAGE", {"tooltip": "The photo to make the control map from; each image of a batch is mapped on "
                                    "its own."})


def run_per_image(node: str, make, image: torch.Tensor, **params) -> tuple[torch.Tensor]:
    """Map a (B, H, W, C) IMAGE image by image (so Cancel stops between images); engine errors name the input."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] == 0:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeInputError(f"{node}, input 'image': expected an IMAGE batch (B, H, W, C), got {shape}.")
    maps = []
    for i in range(image.shape[0]):
        bridge.check_interrupt()
        try:
            maps.append(make(image[i:i + 1], **params))
        except control_maps.ControlMapInputError as error:
            raise node_error(node, error.parameter, error) from None
    return (torch.cat(maps),)


class FluxCoreCannyMap:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = ("Canny edges (white on black) for the union ControlNet's canny mode (0); the same edges as "
                   "cv2.Canny / controlnet_aux's Canny preprocessor.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_INPUT,
            "low_threshold": ("INT", {"default": 100, "min": 0, "max": 2040, "tooltip":
                                      "Edges continue through pixels whose gradient (L1 of 3x3 Sobel, 0..2040) "
                                      "exceeds this when connected to a strong edge. Lower: longer edges."}),
            "high_threshold": ("INT", {"default": 200, "min": 0, "max": 2040, "tooltip":
                                       "Edges start at pixels whose gradient exceeds this. Higher: fewer edges. "
                                       "Must be >= low_threshold."}),
            "sigma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip":
                                "Gaussian blur (standard deviation, px) before detection, to drop fine texture. "
                                "0 = none, as cv2.Canny."}),
        }}

    def make(self, image, low_threshold=100, high_threshold=200, sigma=0.0):
        return run_per_image("FluxCoreCannyMap", control_maps.canny, image, low_threshold=low_threshold,
                             high_threshold=high_threshold, sigma=sigma)


class FluxCoreTileMap:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = ("The photo downscaled and upscaled back (detail removed, layout and colours kept) for the union "
                   "ControlNet's tile mode (1).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_INPUT,
            "factor": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 32.0, "step": 0.5, "tooltip":
                                 "Each side is divided by this, then scaled back. 1 = the image as it is (for an "
                                 "image already upscaled from a small one)."}),
        }}

    def make(self, image, factor=4.0):
        return run_per_image("FluxCoreTileMap", control_maps.tile, image, factor=factor)


class FluxCoreBlurMap:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = "The photo under a Gaussian blur, for the union ControlNet's blur mode (3)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_INPUT,
            "sigma": ("FLOAT", {"default": 6.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip":
                                "Blur strength: the Gaussian's standard deviation in pixels. Higher: the result "
                                "follows the photo more loosely."}),
        }}

    def make(self, image, sigma=6.0):
        return run_per_image("FluxCoreBlurMap", control_maps.blur, image, sigma=sigma)


class FluxCoreGrayMap:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = "The photo's luma (BT.601) on three channels, for the union ControlNet's gray mode (5)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": IMAGE_INPUT}}

    def make(self, image):
        return run_per_image("FluxCoreGrayMap", control_maps.gray, image)


class FluxCoreLowQualityMap:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = ("The photo downscaled, JPEG-compressed and upscaled back, for the union ControlNet's low "
                   "quality mode (lq, 6).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": IMAGE_INPUT,
            "factor": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 16.0, "step": 0.5, "tooltip":
                                 "Each side is divided by this before compression, then scaled back. 1 = "
                                 "compression only."}),
            "jpeg_quality": ("INT", {"default": 30, "min": 1, "max": 95, "tooltip":
                                     "JPEG quality of the compression step (lower: stronger blocks and ringing)."}),
        }}

    def make(self, image, factor=2.0, jpeg_quality=30):
        return run_per_image("FluxCoreLowQualityMap", control_maps.low_quality, image, factor=factor,
                             jpeg_quality=jpeg_quality)


NODE_CLASS_MAPPINGS = {
    "FluxCoreCannyMap": FluxCoreCannyMap,
    "FluxCoreTileMap": FluxCoreTileMap,
    "FluxCoreBlurMap": FluxCoreBlurMap,
    "FluxCoreGrayMap": FluxCoreGrayMap,
    "FluxCoreLowQualityMap": FluxCoreLowQualityMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxCoreCannyMap": "Canny Map for Union ControlNet (FluxCore)",
    "FluxCoreTileMap": "Tile Map for Union ControlNet (FluxCore)",
    "FluxCoreBlurMap": "Blur Map for Union ControlNet (FluxCore)",
    "FluxCoreGrayMap": "Gray Map for Union ControlNet (FluxCore)",
    "FluxCoreLowQualityMap": "Low Quality Map for Union ControlNet (FluxCore)",
}
