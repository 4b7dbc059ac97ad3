"""VAE encode/decode nodes: IMAGE <-> raw LATENT, so native VAEDecode/VAEEncode and ours are interchangeable."""
from __future__ import annotations

import torch

from . import comfy_bridge as bridge
from .conditioning import image_to_model, model_to_image
from .handles import VAE_TYPE
from .loaders import NodeInputError

TILE_INPUTS = {
    "tiled": ("BOOLEAN", {"default": False, "tooltip": "Tile the VAE to bound memory on large images."}),
    "tile_size": ("INT", {"default": 128, "min": 32, "max": 512, "step": 8,
                          "tooltip": "Tile size in latent pixels (x8 in image pixels)."}),
    "tile_stride": ("INT", {"default": 64, "min": 16, "max": 512, "step": 8,
                            "tooltip": "Distance between tiles in latent pixels; overlaps are blended."}),
}


class FluxCoreVAEDecode:
    CATEGORY = "FluxCore/latent"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = "Decodes a FLUX latent to an image."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT", {"tooltip": "FLUX latent (raw VAE space, as native nodes use)."}),
                             "vae": (VAE_TYPE, {"tooltip": "From Load FLUX VAE (FluxCore)."})},
                "optional": dict(TILE_INPUTS)}

    def decode(self, samples, vae, tiled=False, tile_size=128, tile_stride=64):
        latent = samples["samples"]
        if latent.ndim != 4 or latent.shape[1] != 16:
            raise NodeInputError(f"FluxCoreVAEDecode, input 'samples': expected a 16-channel FLUX latent, got shape "
                                 f"{tuple(latent.shape)}.")
        bridge.ready(vae.model)
        module = vae.model.module
        with torch.no_grad():
            image = module.decode_raw(latent.to(module.device, module.dtype), tiled=tiled, tile_size=tile_size,
                                      tile_stride=tile_stride)
        return (model_to_image(image),)


class FluxCoreVAEEncode:
    CATEGORY = "FluxCore/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes an image to a FLUX latent (sides must be multiples of 16)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pixels": ("IMAGE", {"tooltip": "Image whose sides are multiples of 16."}),
                             "vae": (VAE_TYPE, {"tooltip": "From Load FLUX VAE (FluxCore)."})},
                "optional": dict(TILE_INPUTS)}

    def encode(self, pixels, vae, tiled=False, tile_size=128, tile_stride=64):
        _, h, w, _ = pixels.shape
        if h % 16 or w % 16:
            raise NodeInputError(f"FluxCoreVAEEncode, input 'pixels': {w}x{h} is not a multiple of 16; scale or crop "
                                 f"it to {w // 16 * 16}x{h // 16 * 16} first (e.g. with ImageScale).")
        bridge.ready(vae.model)
        module = vae.model.module
        with torch.no_grad():
            latent = module.encode_raw(image_to_model(pixels).to(module.device, module.dtype), tiled=tiled,
                                       tile_size=tile_size, tile_stride=tile_stride)
        return ({"samples": latent.float().cpu()},)


NODE_CLASS_MAPPINGS = {"FluxCoreVAEDecode": FluxCoreVAEDecode, "FluxCoreVAEEncode": FluxCoreVAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreVAEDecode": "FLUX VAE Decode (FluxCore)",
                              "FluxCoreVAEEncode": "FLUX VAE Encode (FluxCore)"}
