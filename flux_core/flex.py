"""The DiT's extra input channels: FLEX.2-preview (196 input channels) and FLUX.1-Fill (384), as one adapter.

Both DiTs take more than the 16 latent channels: the extra channels are concatenated to the latent before the 2x2
packing (so, once packed, after the latent's 64 channels) and go in through `DiTExtras.extra_channels`.

FLEX.2-preview (ostris), as DiffSynth-Studio's FluxImageUnit_Flex and model_fn build it (reference notes §3.11):
- 33 channels: the inpaint latent (VAE posterior mean of `flex_inpaint_image`) times `1 - mask`, the mask at the
  latent's size (1 = redraw; PIL's default resize of the mask picture), and the control latent (of
  `flex_control_image`) times `flex_control_strength`; a missing image is a zero latent, a missing mask all ones;
- the control part is zeroed from the step whose sigma is below that of step int(flex_control_stop * (N - 1)):
  DiffSynth conditions while timestep >= timesteps[int(stop * (N - 1))].
FLUX.1-Fill, as diffusers' FluxFillPipeline and DiffSynth's FluxImageUnit_FillCondition build it (§3.4):
- 80 channels: the latent of the image with the masked pixels set to 0 (grey in [-1, 1]) and the full-resolution
  mask, binarised at one half after a Lanczos resize, unshuffled 8x8 into 64 channels (channel = 8 * dy + dx).

Without inputs either DiT gets zeros and an all-ones mask (DiffSynth's default), so a FLEX.2 or Fill DiT also
samples plain text-to-image. The adapter keeps the condition of the whole latent; a tile of the tiled DiT takes its
crop (`DiTInputs.top/left`), as flux_core.controlnet does with a control latent.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from .adapters import BRANCHES, Contribution, DiTCall
from .dit_inputs import DiTInputs
from .eligen import ASPECT_TOLERANCE
from .image import mask_at_size, mask_to_tensor, pil_to_tensor
from .math import pack_latents

PLAIN_CHANNELS = 64      # 16 latent channels x 2x2
FLEX_CHANNELS = 196      # 4 x (16 latent + 16 inpaint latent + 1 mask + 16 control latent)
FILL_CHANNELS = 384      # 4 x (16 latent + 16 masked-image latent + 64 mask)
FLEX_IMAGES = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image")
FILL_IMAGES = ("flux_fill_image", "flux_fill_mask")
CHANNEL_INPUTS = (*FLEX_IMAGES, "flex_control_strength", "flex_control_stop", *FILL_IMAGES)

Encode = Callable[[torch.Tensor], torch.Tensor]   # (B, 3, H, W) in [-1, 1] -> scaled latent (B, 16, H/8, W/8)


@dataclass(eq=False)
class ChannelAdapter:
    """Contributes the extra input channels to every DiT call of its branches.

    condition: (1 or B, C, h, w) unpacked extra channels of the whole latent (C = 33 FLEX.2, 80 Fill), float32;
    uncondition: what replaces it once call.sigma < stop_sigma (FLEX.2 with its control part zeroed), or None."""
    name: str
    condition: torch.Tensor
    uncondition: torch.Tensor | None = None
    stop_sigma: float = 0.0
    branches: frozenset[str] = frozenset(BRANCHES)

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        if call.branch not in self.branches:
            return None
        # DiffSynth: `timestep >= flex_control_stop_timestep` keeps the condition; both are points of one schedule.
        stopped = self.uncondition is not None and call.sigma < self.stop_sigma
        channels = self.uncondition if stopped else self.condition
        crop = channels[:, :, inputs.top:inputs.top + inputs.height, inputs.left:inputs.left + inputs.width]
        packed = pack_latents(crop.expand(inputs.batch, -1, -1, -1)).to(inputs.img.device, inputs.img.dtype)
        # Another source name once the control stops: TeaCache never reuses a residual across the switch.
        return Contribution(source=f"{self.name} (control stopped)" if stopped else self.name, extra_channels=packed)


# ---------------------------------------------------------------- input checks
def check_channel_inputs(dit, height: int, width: int, **channel_inputs) -> None:
    """Everything wrong with the FLEX.2 / Fill inputs for this DiT and a height x width image, in one ValueError
    (before any model runs). `channel_inputs` are the pipeline's parameters of those names (CHANNEL_INPUTS)."""
    given = {k: v for k, v in channel_inputs.items() if v is not None}
    unknown = sorted(set(given) - set(CHANNEL_INPUTS))
    if unknown:
        raise TypeError(f"check_channel_inputs: unknown input(s) {', '.join(unknown)}; the extra-channel inputs are "
                        f"{', '.join(CHANNEL_INPUTS)}.")
    channels = dit.in_channels
    kind = {FLEX_CHANNELS: "FLEX.2", FILL_CHANNELS: "Fill"}.get(channels)
    problems = []
    if channels != PLAIN_CHANNELS and kind is None:
        problems.append(f"the DiT has {channels} input channels: FluxCore knows FLUX.1's {PLAIN_CHANNELS}, "
                        f"FLEX.2's {FLEX_CHANNELS} and FLUX.1-Fill's {FILL_CHANNELS}")
    flex = [k for k in FLEX_IMAGES if k in given]
    fill = [k for k in FILL_IMAGES if k in given]
    if flex and kind != "FLEX.2":
        problems.append(f"{', '.join(flex)} {needs(flex)} a FLEX.2 DiT ({FLEX_CHANNELS} input channels), but the loaded "
                        f"DiT has {channels}: load FLEX.2-preview, or leave them None")
    if fill and kind != "Fill":
        problems.append(f"{', '.join(fill)} {needs(fill)} a FLUX.1-Fill DiT ({FILL_CHANNELS} input channels), but the "
                        f"loaded DiT has {channels}: load FLUX.1-Fill-dev, or leave them None")
    if "flex_inpaint_mask" in given and "flex_inpaint_image" not in given:
        problems.append("flex_inpaint_mask is given without flex_inpaint_image: the mask says which part of that "
                        "image to redraw; give the image too")
    if "flex_inpaint_image" in given and "flex_inpaint_mask" not in given:
        problems.append("flex_inpaint_image is given without flex_inpaint_mask: without a mask FLEX.2 redraws "
                        "everything and ignores the image (DiffSynth's all-ones mask); give the mask (white = redraw)")
    for image, mask in (("flux_fill_image", "flux_fill_mask"), ("flux_fill_mask", "flux_fill_image")):
        if image in given and mask not in given:
            problems.append(f"{image} is given without {mask}: FLUX.1-Fill needs both the image and the mask "
                            f"(white = redraw)")
    for name in ("flex_inpaint_image", "flex_control_image", "flux_fill_image"):
        if name in given:
            problems += picture_problems(given[name], name, height, width, masks=False)
    for name in ("flex_inpaint_mask", "flux_fill_mask"):
        if name in given:
            problems += picture_problems(given[name], name, height, width, masks=True)
    strength = channel_inputs.get("flex_control_strength", 0.5)
    if not is_number(strength):
        problems.append(f"flex_control_strength={strength!r} must be a number (the control latent's factor)")
    stop = channel_inputs.get("flex_control_stop", 0.5)
    if stop is not None and not (is_number(stop) and 0.0 <= stop <= 1.0):
        problems.append(f"flex_control_stop={stop!r} must be a number in [0, 1] (the fraction of the steps after "
                        f"which the control image stops) or None (1: to the last step)")
    if problems:
        raise ValueError(f"{kind or 'FLUX'} DiT inputs: " + "; ".join(problems) + ".")


def needs(names: list[str]) -> str:
    return "needs" if len(names) == 1 else "need"


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def picture_problems(value, name: str, height: int, width: int, masks: bool) -> list[str]:
    """What is wrong with one image (a PIL image) or mask (PIL, or one (H, W) tensor in [0, 1]) for the output."""
    if isinstance(value, Image.Image):
        w, h = value.size
    elif masks and isinstance(value, torch.Tensor) and value.dim() in (2, 3, 4) and \
            all(s == 1 for s in value.shape[:-2]):
        h, w = value.shape[-2:]
    else:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ""
        what = "a PIL image (white = redraw) or one (H, W) tensor in [0, 1]" if masks else "a PIL image"
        return [f"{name} is a {type(value).__name__}{shape}; pass {what}"]
    if name == "flux_fill_mask" and isinstance(value, torch.Tensor) and (h, w) != (height, width):
        return [f"flux_fill_mask is a {w}x{h} tensor, the image {width}x{height}: pass the mask at the output's size, "
                f"or as a PIL image (resized with Lanczos, as diffusers does)"]
    if abs(w / h - width / height) > ASPECT_TOLERANCE * width / height:
        return [f"{name} is {w}x{h} but the output is {width}x{height}: give it the output's aspect ratio (any "
                f"resolution of that shape is resized to it)"]
    return []


# ---------------------------------------------------------------- the channels
def at_output_size(image: Image.Image, width: int, height: int, name: str) -> torch.Tensor:
    """An RGB picture resized (Lanczos) to width x height, (1, 3, H, W) in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return pil_to_tensor(image, name)


def flex_channels(encode: Encode, height: int, width: int, inpaint_image: Image.Image | None = None,
                  inpaint_mask: Image.Image | torch.Tensor | None = None, control_image: Image.Image | None = None,
                  control_strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """FLEX.2's (condition, uncondition), each (1, 33, height/8, width/8) float32: [inpaint latent * (1 - mask),
    mask, control latent * strength], and the same with a zero control latent."""
    h, w = height // 8, width // 8
    latent_shape = (1, 16, h, w)
    if inpaint_image is None:
        inpaint = torch.zeros(latent_shape)
    else:
        inpaint = encode(at_output_size(inpaint_image, width, height, "flex_inpaint_image")).float()
    device = inpaint.device
    # DiffSynth resizes the mask picture itself to the latent's size (PIL's default filter) and reads it in [0, 1].
    mask = (torch.ones(1, 1, h, w) if inpaint_mask is None
            else mask_at_size(inpaint_mask, w, h, "flex_inpaint_mask")).to(device)
    inpaint = inpaint * (1 - mask)
    if control_image is None:
        control = torch.zeros(latent_shape, device=device)
    else:
        control = encode(at_output_size(control_image, width, height, "flex_control_image")).float().to(device)
        control = control * control_strength
    condition = torch.cat((inpaint, mask, control), dim=1)
    uncondition = torch.cat((inpaint, mask, torch.zeros_like(control)), dim=1)
    return condition, uncondition


def control_stop_sigma(sigmas: torch.Tensor, stop: float | None) -> float:
    """The sigma of the last step with FLEX.2's control: DiffSynth's timesteps[int(stop * (N - 1))] (stop None: 1)."""
    stop = 1.0 if stop is None else stop
    return float(sigmas[int(stop * (len(sigmas) - 1))])


def fill_mask(mask: Image.Image | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """FLUX.1-Fill's pixel mask (1, 1, H, W) of 0 and 1: the grey picture resized with Lanczos, then >= 0.5
    (diffusers' mask processor and DiffSynth do the same); a tensor mask at the output's size as it is."""
    if isinstance(mask, Image.Image):
        grey = mask.convert("L")
        mask = grey if grey.size == (width, height) else grey.resize((width, height), Image.LANCZOS)
    return (mask_to_tensor(mask, "flux_fill_mask") >= 0.5).float()


def fill_channels(masked_latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FLUX.1-Fill's 80 channels from the masked image's scaled latent (B, 16, h, w) and the pixel mask
    (B, 1, 8h, 8w): the latent, then the mask unshuffled 8x8 (channel 8 * dy + dx of each latent pixel)."""
    unshuffled = rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)
    return torch.cat((masked_latent.float(), unshuffled.to(masked_latent.device, torch.float32)), dim=1)


def fill_condition(encode: Encode, height: int, width: int, image: Image.Image | None = None,
                   mask: Image.Image | torch.Tensor | None = None) -> torch.Tensor:
    """FLUX.1-Fill's condition (1, 80, height/8, width/8): the latent of the image with the masked pixels set to 0,
    and the unshuffled mask; zeros and an all-ones mask without inputs."""
    h, w = height // 8, width // 8
    if image is None:
        return fill_channels(torch.zeros(1, 16, h, w), torch.ones(1, 1, height, width))
    pixels = fill_mask(mask, width, height)
    picture = at_output_size(image, width, height, "flux_fill_image")
    latent = encode(picture * (1 - pixels)).float()
    return fill_channels(latent, pixels)


def for_batch(channels: torch.Tensor, batch: int) -> torch.Tensor:
    """Channels of one image (1, C, h, w) shared by a batch (an expanded view), or one per image (B, C, h, w)."""
    if channels.shape[0] not in (1, batch):
        raise ValueError(f"{channels.shape[0]} sets of extra channels for a batch of {batch} images: give one for "
                         f"all, or one per image.")
    return channels.expand(batch, -1, -1, -1)


def channel_adapter(dit, encode: Encode, height: int, width: int, batch: int, sigmas: torch.Tensor,
                    **channel_inputs) -> ChannelAdapter:
    """The adapter of a FLEX.2 (196 input channels) or FLUX.1-Fill (384) DiT for a height x width run of `batch`
    images over `sigmas` (the run's steps); `channel_inputs` as check_channel_inputs takes them (checked there)."""
    inputs = {k: channel_inputs.get(k) for k in CHANNEL_INPUTS}
    if dit.in_channels == FLEX_CHANNELS:
        strength = inputs["flex_control_strength"]
        condition, uncondition = flex_channels(
            encode, height, width, inputs["flex_inpaint_image"], inputs["flex_inpaint_mask"],
            inputs["flex_control_image"], 0.5 if strength is None else strength)
        if inputs["flex_control_image"] is None:  # nothing to stop
            return ChannelAdapter("FLEX.2 inputs", for_batch(condition, batch))
        return ChannelAdapter("FLEX.2 inputs", for_batch(condition, batch), for_batch(uncondition, batch),
                              control_stop_sigma(sigmas, inputs["flex_control_stop"]))
    if dit.in_channels == FILL_CHANNELS:
        condition = fill_condition(encode, height, width, inputs["flux_fill_image"], inputs["flux_fill_mask"])
        return ChannelAdapter("FLUX.1-Fill inputs", for_batch(condition, batch))
    raise ValueError(f"channel_adapter: the DiT has {dit.in_channels} input channels; only FLEX.2 "
                     f"({FLEX_CHANNELS}) and FLUX.1-Fill ({FILL_CHANNELS}) take extra channels.")
