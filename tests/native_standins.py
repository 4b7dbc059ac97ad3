"""Small stand-ins for the few ComfyUI core nodes our example workflows use, so that the workflows run without
ComfyUI. Written from the nodes' documented behaviour (node id, inputs in widget order, output types, data
formats), not copied: IMAGE is (B, H, W, 3) float in [0, 1], MASK is (B, H, W), LATENT is {"samples": ...},
CONDITIONING is a list of [tokens, {options}].

    classes = standins(input_dir, output_dir)   # {"LoadImage": ..., "SaveImage": ..., ...}

Each class keeps the native node's id, input names, widget order and RETURN_TYPES, because the workflow
harness maps saved widget values by that order.

VAE is ComfyUI's VAE object as the core nodes use it (`encode`: IMAGE -> raw latent, `decode`: raw latent -> IMAGE),
here over flux_core's FLUX autoencoder read from the same file (VAELoader reads models/vae/ as FluxCore's loaders do,
FLUXCORE_MODELS_DIR standalone).
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


class NativeVAE:
    """ComfyUI's VAE object over FLUX's autoencoder (flux_core's module), float32 as ComfyUI runs a VAE on the CPU.
    encode: IMAGE (B, H, W, 3) in [0, 1], cut to multiples of 8 around the centre, times 2 minus 1 -> the encoder's
    mean, unscaled (a LATENT's samples); decode: raw latent -> (x + 1) / 2 clamped to [0, 1], channels last."""

    def __init__(self, module):
        self.module = module

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, top:top + h, left:left + w]
        # Contiguous: ComfyUI hands its encoder the channels-last view movedim makes, on which this machine's CPU
        # convolutions lose precision (measured 0.012 from a float64 encoding of the inpainting example, contiguous
        # 2e-5); the same math in the layout FluxImagePipeline uses.
        x = (pixels.movedim(-1, 1) * 2.0 - 1.0).contiguous()
        with torch.no_grad():
            return self.module.encode_raw(x.to(self.module.dtype)).float()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.module.decode_raw(samples.to(self.module.dtype)).float()
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)


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

    class VAELoader:
        """A VAE file from models/vae/ ("pixel_space", ComfyUI's identity VAE, is listed but not offered here)."""
        CATEGORY = "loaders"
        RETURN_TYPES = ("VAE",)
        FUNCTION = "load_vae"

        @classmethod
        def INPUT_TYPES(cls):
            from nodes import comfy_bridge
            return {"required": {"vae_name": ([*comfy_bridge.list_models("vae"), "pixel_space"],)}}

        def load_vae(self, vae_name):
            from flux_core.loading.loader import load_model
            from nodes import comfy_bridge
            if vae_name == "pixel_space":
                raise NotImplementedError("the stand-in VAELoader loads FLUX VAE files only")
            return (NativeVAE(load_model(comfy_bridge.model_path("vae", vae_name), kind="vae",
                                         torch_dtype=torch.float32)),)

    class VAEDecode:
        """Decodes a LATENT's samples with the VAE into an IMAGE."""
        CATEGORY = "latent"
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "decode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",), "vae": ("VAE",)}}

        def decode(self, vae, samples):
            return (vae.decode(samples["samples"]),)

    class InpaintModelConditioning:
        """Inputs for inpainting models (FLUX.1-Fill): the mask resized (bilinear) to the picture, both cut to
        multiples of 8 around the centre; the picture with the pixels where the rounded mask is 1 set to grey (0.5)
        is encoded into `concat_latent_image`, the resized mask (not rounded) goes in as `concat_mask`, on both
        conditionings. The LATENT holds the whole picture's encoding and, with noise_mask, the mask as its
        `noise_mask`."""
        CATEGORY = "conditioning/inpaint"
        RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
        RETURN_NAMES = ("positive", "negative", "latent")
        FUNCTION = "encode"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                                 "pixels": ("IMAGE",), "mask": ("MASK",), "noise_mask": ("BOOLEAN", {"default": True})}}

        def encode(self, positive, negative, pixels, vae, mask, noise_mask=True):
            height, width = pixels.shape[1], pixels.shape[2]
            mask = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(height, width),
                                 mode="bilinear")
            h, w = height // 8 * 8, width // 8 * 8
            top, left = (height % 8) // 2, (width % 8) // 2
            cut = pixels[:, top:top + h, left:left + w].clone()
            mask = mask[:, :, top:top + h, left:left + w]
            keep = (1.0 - mask.round()).squeeze(1)[..., None]
            greyed = (cut - 0.5) * keep + 0.5
            concat = vae.encode(greyed)
            latent = {"samples": vae.encode(pixels)}
            if noise_mask:
                latent["noise_mask"] = mask
            values = {"concat_latent_image": concat, "concat_mask": mask}
            return _set_values(positive, values), _set_values(negative, values), latent

    classes = [LoadImage, SaveImage, PreviewImage, ImageScale, ImageScaleBy, SetLatentNoiseMask, FluxGuidance,
               ConditioningZeroOut, ReferenceLatent, VAELoader, VAEDecode, InpaintModelConditioning]
    return {c.__name__: c for c in classes}


STANDIN_NAMES = ("LoadImage", "SaveImage", "PreviewImage", "ImageScale", "ImageScaleBy", "SetLatentNoiseMask", "FluxGuidance",
                 "ConditioningZeroOut", "ReferenceLatent", "VAELoader", "VAEDecode", "InpaintModelConditioning")
