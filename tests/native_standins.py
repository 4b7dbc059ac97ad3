"""Small stand-ins for the few ComfyUI core nodes our example workflows use, so that the workflows run without
ComfyUI. Written from the nodes' documented behaviour (node id, inputs in widget order, output types, data
formats), not copied: IMAGE is (B, H, W, 3) float in [0, 1], MASK is (B, H, W), LATENT is {"samples": ...},
CONDITIONING is a list of [tokens, {options}].

    classes = standins(input_dir, output_dir)   # {"LoadImage": ..., "SaveImage": ..., ...}

Each class keeps the native node's id, input names, widget order and RETURN_TYPES, because the workflow
harness maps saved widget values by that order.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

MAX_RESOLUTION = 16384


def _set_values(conditioning, values: dict, append: bool = False):
    """A copy of every conditioning entry with `values` set (lists appended to when `append`)."""
    out = []
    for tokens, extra in conditioning:
        extra = dict(extra)
        for key, value in values.items():
            old = extra.get(key)
            extra[key] = old + value if append and old is not None else value
        out.append([tokens, extra])
    return out


def standins(input_dir: str | Path, output_dir: str | Path, temp_dir: str | Path | None = None) -> dict[str, type]:
    """The stand-in classes, with LoadImage reading from `input_dir` and SaveImage writing into `output_dir`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    temp_dir = Path(temp_dir) if temp_dir is not None else output_dir / "temp"

    class LoadImage:
        """An image from the input folder; the mask is 1 where the image is transparent (painted in MaskEditor)."""
        CATEGORY = "image"
        RETURN_TYPES = ("IMAGE", "MASK")
        FUNCTION = "load_image"

        @classmethod
        def INPUT_TYPES(cls):
            files = sorted(p.name for p in input_dir.iterdir() if p.is_file()) if input_dir.is_dir() else []
            return {"required": {"image": (files, {"image_upload": True})}}

        def load_image(self, image):
            pil = ImageOps.exif_transpose(Image.open(input_dir / image))
            rgb = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255)[None]
            if "A" in pil.getbands():
                alpha = torch.from_numpy(np.asarray(pil.getchannel("A"), dtype=np.float32) / 255)
                mask = (1.0 - alpha)[None]
            else:
                mask = torch.zeros(1, 64, 64)  # what ComfyUI gives for an image without alpha
            return rgb, mask

    class SaveImage:
        """Writes each image as <prefix>_<counter>_.png into the output folder."""
        CATEGORY = "image"
        RETURN_TYPES = ()
        FUNCTION = "save_images"
        OUTPUT_NODE = True
        folder, kind = output_dir, "output"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                    "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            target = self.folder / Path(filename_prefix).parent
            target.mkdir(parents=True, exist_ok=True)
            stem = Path(filename_prefix).name
            counter = len(list(target.glob(f"{stem}_*_.png"))) + 1
            results = []
            for image in images:
                array = (image.cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
                name = f"{stem}_{counter:05}_.png"
                Image.fromarray(array).save(target / name)
                results.append({"filename": name, "subfolder": str(Path(filename_prefix).parent).strip("."),
                                "type": self.kind})
                counter += 1
            return {"ui": {"images": results}}

    class PreviewImage(SaveImage):
        """Like SaveImage, into the temp folder with a random prefix."""
        folder, kind = temp_dir, "temp"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

        def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
            suffix = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
            return super().save_images(images, f"{filename_prefix}_temp_{suffix}")

    class ImageScale:
        """Resizes to width x height (0 keeps the aspect ratio); "center" crops to the new aspect first."""
        CATEGORY = "image/upscaling"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "upscale"
        methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",), "upscale_method": (cls.methods,),
                                 "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                                 "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                                 "crop": (["disabled", "center"],)}}

        def upscale(self, image, upscale_method, width, height, crop):
            _, h, w, _ = image.shape
            if width == 0 and height == 0:
                return (image,)
            width = width or max(1, round(w * height / h))
            height = height or max(1, round(h * width / w))
            x = image.movedim(-1, 1)
            if crop == "center":
                if w / h > width / height:  # too wide: cut the sides
                    keep = round(h * width / height)
                    x = x[..., (w - keep) // 2:(w - keep) // 2 + keep]
                elif w / h < width / height:  # too tall: cut top and bottom
                    keep = round(w * height / width)
                    x = x[..., (h - keep) // 2:(h - keep) // 2 + keep, :]
            if upscale_method == "lanczos":
                pils = [Image.fromarray((i.movedim(0, -1).numpy() * 255).clip(0, 255).astype(np.uint8)) for i in x]
                out = torch.stack([torch.from_numpy(np.asarray(p.resize((width, height), Image.LANCZOS),
                                                               dtype=np.float32) / 255) for p in pils])
                return (out,)
            out = F.interpolate(x, size=(height, width), mode=upscale_method)
            return (out.movedim(1, -1).clamp(0, 1),)

    class SetLatentNoiseMask:
        """Marks the area a sampler may change: the mask goes into the latent as "noise_mask" (B, 1, H, W)."""
        CATEGORY = "latent/inpaint"
        RETURN_TYPES = ("LATENT",)
        FUNCTION = "set_mask"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

        def set_mask(self, samples, mask):
            out = dict(samples)
            out["noise_mask"] = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
            return (out,)

    class FluxGuidance:
        """Sets FLUX's embedded guidance on every conditioning entry."""
        CATEGORY = "advanced/conditioning/flux"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "append"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"conditioning": ("CONDITIONING",),
                                 "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}}

        def append(self, conditioning, guidance):
            return (_set_values(conditioning, {"guidance": guidance}),)

    class ConditioningZeroOut:
        """Zeros the tokens and the pooled output (an 'empty' negative for FLUX)."""
        CATEGORY = "advanced/conditioning"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "zero_out"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"conditioning": ("CONDITIONING",)}}

        def zero_out(self, conditioning):
            out = []
            for tokens, extra in conditioning:
                extra = dict(extra)
                if extra.get("pooled_output") is not None:
                    extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
                out.append([torch.zeros_like(tokens), extra])
            return (out,)

    class ReferenceLatent:
        """Appends a latent to the conditioning's "reference_latents" (Kontext-style edit models)."""
        CATEGORY = "advanced/conditioning/edit_models"
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "execute"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}}

        def execute(self, conditioning, latent=None):
            if latent is None:
                return (conditioning,)
            return (_set_values(conditioning, {"reference_latents": [latent["samples"]]}, append=True),)

    class ImageScaleBy:
        """Resizes by a factor: width = round(W * scale_by), height = round(H * scale_by), no crop."""
        CATEGORY = "image/upscaling"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "upscale"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",), "upscale_method": (ImageScale.methods,),
                                 "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

        def upscale(self, image, upscale_method, scale_by):
            _, h, w, _ = image.shape
            return ImageScale().upscale(image, upscale_method, round(w * scale_by), round(h * scale_by), "disabled")

    classes = [LoadImage, SaveImage, PreviewImage, ImageScale, ImageScaleBy, SetLatentNoiseMask, FluxGuidance,
               ConditioningZeroOut, ReferenceLatent]
    return {c.__name__: c for c in classes}


STANDIN_NAMES = ("LoadImage", "SaveImage", "PreviewImage", "ImageScale", "ImageScaleBy", "SetLatentNoiseMask", "FluxGuidance",
                 "ConditioningZeroOut", "ReferenceLatent")
