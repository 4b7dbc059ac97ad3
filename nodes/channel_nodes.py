"""The DiT's extra input channels in ComfyUI: FLEX.2 Inputs (FluxCore), and FLUX.1-Fill from native inpaint nodes.

FLEX.2-preview (196 input channels): FLEX.2 Inputs (FluxCore) puts one `FlexPayload` under the conditioning key
`fluxcore_flex` of positive and negative (the same object: it compares by identity). Nothing is encoded there: the
sampler encodes the images with the payload's VAE at the latent's size (tiled when the DiT is), and turns the payload
into flux_core.flex's adapter with the run's sigmas, so `control_stop` counts the run's steps as DiffSynth-Studio's
flex_control_stop does.

FLUX.1-Fill (384 input channels) takes ComfyUI's own keys, as native InpaintModelConditioning sets them and ComfyUI's
Flux model reads them (comfy/model_base.py Flux.concat_cond): `concat_latent_image`, the raw VAE latent of the
picture with the masked pixels set to grey (resized bilinear, center-cropped, to the latent and scaled), and
`concat_mask` (averaged over its channels, resized bilinear to the image's pixels, unshuffled 8x8 into 64 channels;
not binarised, as there). A native Fill workflow (InpaintModelConditioning -> this sampler) thus runs unchanged.

Without its inputs a FLEX.2 or Fill DiT gets flux_core's default, as in FluxImagePipeline: zeros and an all-ones
mask (ComfyUI's own Fill default takes a zero raw latent; a concat_latent_image without concat_mask takes an
all-ones mask here, where ComfyUI would take the latent's noise_mask). Each CFG branch reads its own side: a side
without inputs gets the default. A 64-channel DiT ignores ComfyUI's keys (as ComfyUI does: InpaintModelConditioning
also serves plain models through its noise_mask) and refuses a FLEX.2 payload.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flux_core.adapters import BRANCHES
from flux_core.flex import (FILL_CHANNELS, FLEX_CHANNELS, PLAIN_CHANNELS, ChannelAdapter, control_stop_sigma,
                            fill_channels, fill_condition, flex_channels, for_batch, picture_problems)
from flux_core.image import tensor_to_pil

from . import comfy_bridge as bridge
from .conditioning import image_to_model
from .handles import VAE_TYPE, VAEHandle
from .loaders import NodeInputError

FLEX_KEY = "fluxcore_flex"
FILL_KEYS = ("concat_latent_image", "concat_mask")
CHANNEL_KEYS = frozenset({FLEX_KEY, *FILL_KEYS})
FLEX_NODE = "FLEX.2 Inputs (FluxCore)"
log = logging.getLogger("FluxCore")


@dataclass(eq=False)
class FlexPayload:
    """One FLEX.2 Inputs (FluxCore): what the sampler turns into flux_core.flex's adapter."""
    vae: VAEHandle
    inpaint_image: torch.Tensor | None = None   # IMAGE (B, H, W, C) in [0, 1]: kept outside the mask
    inpaint_mask: torch.Tensor | None = None    # MASK (B, H, W) or (H, W), 1 = redraw
    control_image: torch.Tensor | None = None   # IMAGE: the control map (pose, depth, lines, ...)
    control_strength: float = 0.5
    control_stop: float = 0.5


class FluxCoreFlexInputs:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    DESCRIPTION = ("FLEX.2-preview's built-in inpainting and control: the image to keep outside the mask and/or a "
                   "control image, for FLUX Sampler (FluxCore) with a FLEX.2 DiT. Encoded when sampling.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning (used when cfg > 1)."}),
                "vae": (VAE_TYPE, {"tooltip": "The FLUX VAE (Load FLUX VAE (FluxCore)) that encodes the images."}),
                "control_strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip":
                                     "Factor on the control image's latent (DiffSynth's flex_control_strength)."}),
                "control_stop": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                 "Fraction of the steps the control image acts for (DiffSynth's flex_control_stop: "
                                 "on up to step int(control_stop * (steps - 1)), then off)."}),
            },
            "optional": {
                "inpaint_image": ("IMAGE", {"tooltip": "The image to inpaint; kept where the mask is 0. Any "
                                                       "resolution of the output's aspect ratio."}),
                "inpaint_mask": ("MASK", {"tooltip": "1 where FLEX.2 redraws inpaint_image (LoadImage's mask "
                                                     "painted in the mask editor); needed with inpaint_image."}),
                "control_image": ("IMAGE", {"tooltip": "A control map (pose, depth, line art); any resolution of "
                                                       "the output's aspect ratio."}),
            },
        }

    def apply(self, positive, negative, vae, control_strength=0.5, control_stop=0.5, inpaint_image=None,
              inpaint_mask=None, control_image=None):
        node = "FluxCoreFlexInputs"
        problems = []
        for name, value in (("inpaint_image", inpaint_image), ("control_image", control_image)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[0] == 0
                                      or value.shape[-1] < 3):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                problems.append(f"input '{name}': expected an IMAGE (B, H, W, 3), got {shape}")
        if inpaint_mask is not None and (not isinstance(inpaint_mask, torch.Tensor) or inpaint_mask.ndim not in (2, 3)):
            shape = tuple(inpaint_mask.shape) if isinstance(inpaint_mask, torch.Tensor) else type(inpaint_mask).__name__
            problems.append(f"input 'inpaint_mask': expected a MASK (B, H, W), got {shape}")
        if inpaint_mask is not None and inpaint_image is None:
            problems.append("input 'inpaint_mask' is connected without 'inpaint_image': the mask says which part of "
                            "that image to redraw; connect the image too")
        if inpaint_image is not None and inpaint_mask is None:
            problems.append("input 'inpaint_image' is connected without 'inpaint_mask': without a mask FLEX.2 "
                            "redraws everything and ignores the image; connect the mask (1 = redraw)")
        if inpaint_image is None and inpaint_mask is None and control_image is None:
            problems.append("nothing to add: connect inpaint_image with inpaint_mask, and/or control_image (a "
                            "FLEX.2 DiT samples plain text-to-image without this node)")
        if problems:
            raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")
        payload = FlexPayload(vae=vae, inpaint_image=inpaint_image, inpaint_mask=inpaint_mask,
                              control_image=control_image, control_strength=float(control_strength),
                              control_stop=float(control_stop))
        return with_flex(positive, payload), with_flex(negative, payload)


def with_flex(conditioning, payload: FlexPayload) -> list:
    """A copy of the conditioning with `payload` under `fluxcore_flex` in every entry (a later node replaces it)."""
    return [[tokens, {**extra, FLEX_KEY: payload}] for tokens, extra in conditioning]


# ---------------------------------------------------------------- sampling
def channel_adapters(node: str, sides: dict, dit, batch: int, h: int, w: int, sigmas: torch.Tensor,
                     vae_tiling: dict, device: torch.device | str = "cpu") -> list[ChannelAdapter]:
    """The adapters that fill a FLEX.2 or Fill DiT's extra channels for a run on a (batch, 16, h, w) latent over
    `sigmas`: one for the branches whose sides carry the same inputs (`sides`: {"positive": conditioning,
    "negative": ...}, only the sides the run uses). None for a 64-channel DiT. Runs before the DiT is placed."""
    entries = {side: (conditioning[0][1] if conditioning else {}) for side, conditioning in sides.items()}
    flex = {side: extra.get(FLEX_KEY) for side, extra in entries.items()}
    for side, payload in flex.items():
        if payload is not None and not isinstance(payload, FlexPayload):
            raise NodeInputError(f"{node}, input '{side}': {FLEX_KEY} is a {type(payload).__name__}; only "
                                 f"{FLEX_NODE} makes this entry.")
    native = {side: tuple(extra.get(k) for k in FILL_KEYS) for side, extra in entries.items()}
    native = {side: keys if any(k is not None for k in keys) else None for side, keys in native.items()}
    channels = dit.in_channels
    flex_sides = [s for s, p in flex.items() if p is not None]
    native_sides = [s for s, k in native.items() if k is not None]
    if flex_sides and channels != FLEX_CHANNELS:
        raise NodeInputError(f"{node}, input '{flex_sides[0]}': {FLEX_NODE} needs a FLEX.2 DiT ({FLEX_CHANNELS} "
                             f"input channels), but the model has {channels}: load FLEX.2-preview, or remove the "
                             f"node.")
    if channels == PLAIN_CHANNELS:
        if native_sides:
            log.info("%s: concat_latent_image / concat_mask (InpaintModelConditioning) on %s are for inpainting "
                     "models; this DiT has no extra input channels, so only the latent's noise_mask applies.",
                     node, " and ".join(f"'{s}'" for s in native_sides))
        return []
    if channels not in (FLEX_CHANNELS, FILL_CHANNELS):
        raise NodeInputError(f"{node}, input 'model': the DiT has {channels} input channels; FluxCore samples "
                             f"FLUX.1 ({PLAIN_CHANNELS}), FLEX.2 ({FLEX_CHANNELS}) and FLUX.1-Fill "
                             f"({FILL_CHANNELS}).")
    if channels == FLEX_CHANNELS and native_sides:
        raise NodeInputError(f"{node}, input '{native_sides[0]}': concat_latent_image / concat_mask "
                             f"(InpaintModelConditioning) are FLUX.1-Fill's inputs, but the model is a FLEX.2 DiT: "
                             f"give its image and mask through {FLEX_NODE} instead.")
    # One adapter per distinct input (sides holding the same payload or tensors share it).
    groups: dict[tuple, list[str]] = {}
    for side in sides:
        source = flex[side] if channels == FLEX_CHANNELS else native[side]
        key = ("none",) if source is None else tuple(id(s) for s in (source if isinstance(source, tuple)
                                                                       else (source,)))
        groups.setdefault(key, []).append(side)
    adapters = []
    for side_list in groups.values():
        side = side_list[0]
        try:
            if channels == FLEX_CHANNELS:
                condition, uncondition, stop = flex_inputs(flex[side], batch, h, w, sigmas, vae_tiling)
                name = f"{FLEX_KEY} ({side})" if flex[side] is not None else "FLEX.2 default"
            else:
                condition, uncondition, stop = native_fill(native[side], batch, h, w), None, 0.0
                name = f"concat_latent_image ({side})" if native[side] is not None else "FLUX.1-Fill default"
            branches = frozenset(side_list) & frozenset(BRANCHES)
            adapters.append(ChannelAdapter(name, condition.to(device), None if uncondition is None
                                           else uncondition.to(device), stop, branches))
        except ValueError as e:
            raise NodeInputError(f"{node}, input '{side}': {e}") from None
    return adapters


def flex_inputs(payload: FlexPayload | None, batch: int, h: int, w: int, sigmas: torch.Tensor, vae_tiling: dict
                ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(condition, uncondition or None, stop sigma) of one FLEX.2 payload (None: the default), image by image."""
    if payload is None:
        condition, _ = flex_channels(None, h * 8, w * 8)
        return for_batch(condition, batch), None, 0.0
    pictures = {name: None if image is None else tensor_to_pil(image_to_model(image))
                for name, image in (("inpaint_image", payload.inpaint_image),
                                    ("control_image", payload.control_image))}
    masks = payload.inpaint_mask
    masks = None if masks is None else [masks] if masks.ndim == 2 else list(masks)
    counts = {name: len(items) for name, items in (*pictures.items(), ("inpaint_mask", masks)) if items is not None}
    problems = [f"{FLEX_NODE}'s {name} is a batch of {n}, the latent a batch of {batch}: give one for all, or one "
                f"per latent" for name, n in counts.items() if n not in (1, batch)]
    for name, items in (*pictures.items(), ("inpaint_mask", masks)):
        if items is not None:
            problems += picture_problems(items[0], f"{FLEX_NODE}'s {name}", h * 8, w * 8, masks=name == "inpaint_mask")
    if problems:
        raise ValueError("; ".join(problems) + ".")
    bridge.ready(payload.vae.model)
    module = payload.vae.model.module

    def encode(x: torch.Tensor) -> torch.Tensor:
        return module.encode(x.to(module.device, module.dtype), **vae_tiling).float().cpu()

    def item(items, i):
        return None if items is None else items[min(i, len(items) - 1)]

    conditions, unconditions = [], []
    with torch.no_grad():
        for i in range(max(counts.values())):
            c, u = flex_channels(encode, h * 8, w * 8, item(pictures["inpaint_image"], i), item(masks, i),
                                 item(pictures["control_image"], i), payload.control_strength)
            conditions.append(c)
            unconditions.append(u)
    condition, uncondition = for_batch(torch.cat(conditions), batch), for_batch(torch.cat(unconditions), batch)
    if payload.control_image is None:
        return condition, None, 0.0
    return condition, uncondition, control_stop_sigma(sigmas, payload.control_stop)


def native_fill(keys: tuple | None, batch: int, h: int, w: int) -> torch.Tensor:
    """FLUX.1-Fill's channels (1 or B, 80, h, w) from ComfyUI's concat_latent_image / concat_mask, as ComfyUI's Flux
    model builds them; flux_core's default without them."""
    from .sampler import FLUX_LATENT  # ComfyUI's FLUX latent format (the sampler imports this module)
    if keys is None:
        return for_batch(fill_condition(None, h * 8, w * 8), batch)
    latent, mask = keys
    if latent is None:
        latent = torch.zeros(1, 16, h, w)
    elif not isinstance(latent, torch.Tensor) or latent.ndim != 4 or latent.shape[1] != 16:
        shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"concat_latent_image must be a FLUX latent (B, 16, h, w), got {shape}")
    else:
        latent = FLUX_LATENT.raw_to_scaled(comfy_resize(latent.float().cpu(), w, h))
    if mask is None:
        mask = torch.ones(1, 1, h * 8, w * 8)
    elif not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"concat_mask must be a mask (B, 1, H, W) or (B, H, W), got {shape}")
    else:
        mask = mask.float().cpu()
        mask = mask.reshape(-1, 1, *mask.shape[-2:]) if mask.ndim < 4 else mask.mean(dim=1, keepdim=True)
        mask = comfy_resize(mask, w * 8, h * 8)
    for name, tensor in (("concat_latent_image", latent), ("concat_mask", mask)):
        if tensor.shape[0] not in (1, batch):
            raise ValueError(f"{name} is a batch of {tensor.shape[0]}, the latent a batch of {batch}: give one for "
                             f"all, or one per latent")
    latent, mask = latent.expand(batch, -1, -1, -1), mask.expand(batch, -1, -1, -1)
    return fill_channels(latent, mask)


def comfy_resize(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """x (B, C, H, W) at width x height as ComfyUI's common_upscale(..., "bilinear", "center") makes it: the
    centre cut to the new aspect ratio, then bilinear interpolation (no change at the same size)."""
    old_h, old_w = x.shape[-2:]
    if (old_h, old_w) == (height, width):
        return x
    old_aspect, new_aspect = old_w / old_h, width / height
    cut_x = round((old_w - old_w * (new_aspect / old_aspect)) / 2) if old_aspect > new_aspect else 0
    cut_y = round((old_h - old_h * (old_aspect / new_aspect)) / 2) if old_aspect < new_aspect else 0
    x = x[..., cut_y:old_h - cut_y, cut_x:old_w - cut_x]
    return F.interpolate(x, size=(height, width), mode="bilinear")


NODE_CLASS_MAPPINGS = {"FluxCoreFlexInputs": FluxCoreFlexInputs}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreFlexInputs": FLEX_NODE}
