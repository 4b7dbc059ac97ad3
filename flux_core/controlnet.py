"""ControlNets as adapters: the control latent of each input, and its residuals in every DiT call.

DiffSynth-Studio's semantics, exactly (reference notes §3.2):
- the control image is VAE-encoded with the posterior mean and scaled like the latents; inpainting ControlNets
  (alimama, 4 extra condition channels) get the image with the masked pixels blacked out, plus `1 - mask` at latent
  size as a 17th channel;
- each input runs its ControlNet and spreads the ControlNet's residuals over the DiT's blocks first
  (`spread_residuals`), then scales them; the inputs' spread residuals are summed (one adapter per input, summed by
  flux_core.adapters). diffusers' multi-ControlNet sums the raw lists before spreading, which differs when the nets
  have different depths;
- an input is active at step i of N while end <= (N-1-i)/max(N-1, 1) <= start (`StepRange`);
- `controlnet_id` indexes the ControlNets in the order `model_configs` listed them (`pipe.controlnet.models`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .adapters import BRANCHES, Contribution, DiTCall, StepRange
from .dit_inputs import DiTInputs
from .image import mask_at_size, mask_to_tensor, pil_to_tensor
from .infiniteyou import IdentityTokens
from .math import pack_latents
from .models.controlnet import FluxControlNet, spread_residuals, union_mode_id
from .vram import compute_place

INPAINT_CONDITION_CHANNELS = 4  # alimama's 68-wide input: 16 latent channels + the mask channel, packed 2x2


@dataclass
class ControlNetInput:
    """One control input of `pipe(controlnet_inputs=[...])` (DiffSynth-Studio's names and defaults).

    image: the control map (a canny edge image, a depth map, the low-resolution image for the upscaler, the image to
        inpaint), resized to the generation size if it has another;
    inpaint_mask: white where the inpainting ControlNet repaints (PIL image, or a (H, W) / (1, H, W) tensor in
        [0, 1] such as a ComfyUI MASK); only for inpainting ControlNets;
    scale: residual strength; start, end: the active range in DiffSynth's progress (1 = first step, 0 = last);
    processor_id: the union ControlNet's mode, by name ("canny", "tile", "depth", "blur", "pose", "gray", "lq") or id;
        None (or the string "None", as DiffSynth's InfiniteYou example passes it) for other ControlNets;
    inpaint_image: accepted for DiffSynth compatibility; FLUX ControlNets do not use it (DiffSynth's neither).
    """
    controlnet_id: int = 0
    scale: float = 1.0
    start: float = 1.0
    end: float = 0.0
    image: Image.Image | None = None
    inpaint_image: Image.Image | None = None
    inpaint_mask: Image.Image | torch.Tensor | None = None
    processor_id: str | int | None = None


class ControlNets(nn.Module):
    """The pipeline's ControlNets (`pipe.controlnet.models[i]`), in model_configs order: DiffSynth's layout, so
    its checkpoint prefix `pipe.controlnet.models.0.` names the same module."""

    def __init__(self, models: list[FluxControlNet] | None = None):
        super().__init__()
        self.models = nn.ModuleList(models or [])

    def __len__(self) -> int:
        return len(self.models)


@dataclass(eq=False)
class ControlNetAdapter:
    """One control input bound to its ControlNet: contributes the ControlNet's residuals, spread over the DiT's
    blocks and scaled, to every call in its step range and branches. `control` is the scaled control latent
    (1 or B, 16 (+1 mask channel), H/8, W/8) of the whole image; a tile of the tiled DiT takes its crop."""
    name: str
    model: FluxControlNet
    control: torch.Tensor
    dit_depth: tuple[int, int]               # the DiT's (double, single) block counts
    scale: float = 1.0
    steps: StepRange = field(default_factory=StepRange)
    mode: int | None = None
    branches: frozenset[str] = frozenset(BRANCHES)
    identity: IdentityTokens | None = None   # InfiniteYou: replaces the ControlNet's text and guidance

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        if call.branch not in self.branches or not self.steps.contains(call):
            return None
        device, dtype = compute_place(self.model)
        control = self.control[:, :, inputs.top:inputs.top + inputs.height, inputs.left:inputs.left + inputs.width]
        control = pack_latents(control.expand(inputs.batch, -1, -1, -1)).to(device, dtype)
        txt, txt_ids, guidance = inputs.txt, inputs.txt_ids, inputs.guidance
        if self.identity is not None:
            txt, txt_ids, guidance = self.identity.text_inputs(inputs.batch, device)
        double, single = self.model(
            img=inputs.img.to(device, dtype), img_ids=inputs.img_ids.to(device), txt=txt.to(device, dtype),
            txt_ids=txt_ids.to(device), timesteps=inputs.timesteps.to(device), y=inputs.y.to(device, dtype),
            guidance=None if guidance is None else guidance.to(device), control=control, mode=self.mode)
        # Scaled before spreading: DiT blocks that share a ControlNet residual share one tensor (15 per call for the
        # union net instead of 57 copies: about 1 GiB less at 1024x1024 in bf16).
        return Contribution(
            source=self.name,
            double_residuals=spread_residuals([r * self.scale for r in double], self.dit_depth[0]),
            single_residuals=spread_residuals([r * self.scale for r in single], self.dit_depth[1]))


def black_out_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting ControlNet's control image: (1, 3, H, W) in [-1, 1] with black (-1) wherever the mask (at the
    image's size) is above one half."""
    return image.masked_fill(mask > 0.5, -1.0)


def control_latent(item: ControlNetInput, width: int, height: int, encode, name: str) -> torch.Tensor:
    """The scaled control latent (1, 16 (+1), height/8, width/8) of one input; `encode` maps a (1, 3, H, W) image in
    [-1, 1] to its scaled latent (the VAE's posterior mean)."""
    image = item.image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = pil_to_tensor(image, f"{name}.image")
    if item.inpaint_mask is not None:
        x = black_out_masked(x, mask_at_size(item.inpaint_mask, width, height, f"{name}.inpaint_mask"))
    latent = encode(x).float()
    if item.inpaint_mask is not None:
        latent = with_mask_channel(latent, mask_to_tensor(item.inpaint_mask, f"{name}.inpaint_mask"))
    return latent


def with_mask_channel(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """latent (B, 16, h, w) with `1 - mask` (nearest-resized to h, w) appended: the 17th channel of alimama's input."""
    keep = 1 - F.interpolate(mask.to(latent), size=latent.shape[-2:], mode="nearest")
    return torch.cat((latent, keep.expand(latent.shape[0], -1, -1, -1)), dim=1)


def is_inpainting(model: FluxControlNet) -> bool:
    return model.params.extra_condition_channels == INPAINT_CONDITION_CHANNELS


def no_mode(processor_id: str | int | None) -> str | int | None:
    """processor_id with DiffSynth's string "None" (its InfiniteYou example's) read as None."""
    return None if processor_id == "None" else processor_id


def check_controlnet_input(index: int, item, models: ControlNets) -> None:
    """Everything about one `controlnet_inputs[index]` that can be checked before a model runs; all problems of
    the entry in one ValueError/TypeError."""
    where = f"controlnet_inputs[{index}]"
    if not isinstance(item, ControlNetInput):
        raise TypeError(f"{where} is a {type(item).__name__}; pass flux_core.ControlNetInput(image=..., ...).")
    problems = []
    if not isinstance(item.controlnet_id, int) or not 0 <= item.controlnet_id < len(models):
        loaded = f"{len(models)} ControlNet(s) loaded" if len(models) else "no ControlNet is loaded (add its file to model_configs)"
        problems.append(f"controlnet_id={item.controlnet_id!r}, but {loaded}; ids count the ControlNets in "
                        f"model_configs order from 0")
    if not isinstance(item.image, Image.Image):
        problems.append(f"image must be a PIL image (the control map), got {type(item.image).__name__}")
    if not isinstance(item.scale, (int, float)) or isinstance(item.scale, bool):
        problems.append(f"scale must be a number, got {item.scale!r}")
    try:
        StepRange(float(item.start), float(item.end))
    except (TypeError, ValueError) as e:
        problems.append(str(e))
    processor_id = no_mode(item.processor_id)
    if not problems:
        model = models.models[item.controlnet_id]
        if model.params.num_modes and processor_id is None:
            problems.append(f"ControlNet {item.controlnet_id} is a union ControlNet: set processor_id to its mode "
                            f"(canny, tile, depth, blur, pose, gray, lq)")
        elif processor_id is not None and not model.params.num_modes:
            problems.append(f"processor_id={item.processor_id!r}, but ControlNet {item.controlnet_id} has no modes "
                            f"(only union ControlNets take processor_id); leave it None")
        elif processor_id is not None:
            try:
                union_mode_id(processor_id)
            except ValueError as e:
                problems.append(str(e))
        if is_inpainting(model) and item.inpaint_mask is None:
            problems.append(f"ControlNet {item.controlnet_id} is an inpainting ControlNet: give inpaint_mask (white "
                            f"where it repaints)")
        elif item.inpaint_mask is not None and not is_inpainting(model):
            problems.append(f"inpaint_mask is given, but ControlNet {item.controlnet_id} is not an inpainting "
                            f"ControlNet (its input has {model.params.extra_condition_channels} extra channels, "
                            f"alimama's has {INPAINT_CONDITION_CHANNELS}); leave inpaint_mask None")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + ".")
