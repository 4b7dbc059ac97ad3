"""A stand-in for ComfyUI's core ImageScaleBy (the upscale example workflow uses it), in the manner of
tests/native_standins.py and built on its ImageScale: ImageScaleBy scales both sides by `scale_by`, rounded, with
ComfyUI's common_upscale and no crop. (Kept apart only because that file belongs to another part of the work; it
can move there.)"""
from __future__ import annotations

from pathlib import Path

from tests.native_standins import standins

UPSCALE_STANDIN_NAMES = ("ImageScaleBy",)


def upscale_standins(input_dir: str | Path, output_dir: str | Path) -> dict[str, type]:
    image_scale = standins(input_dir, output_dir)["ImageScale"]

    class ImageScaleBy:
        """Resizes by a factor: width = round(W * scale_by), height = round(H * scale_by)."""
        CATEGORY = "image/upscaling"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "upscale"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",), "upscale_method": (image_scale.methods,),
                                 "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

        def upscale(self, image, upscale_method, scale_by):
            _, h, w, _ = image.shape
            return image_scale().upscale(image, upscale_method, round(w * scale_by), round(h * scale_by), "disabled")

    return {"ImageScaleBy": ImageScaleBy}
