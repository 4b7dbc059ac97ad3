"""ControlNet nodes: Load ControlNet (FluxCore) and Apply ControlNet (FluxCore), and what the sampler does with them.

Apply ControlNet has the shape of ComfyUI's ControlNetApplyAdvanced: it takes and gives positive and negative
CONDITIONING and can be chained. It adds one payload (`ControlNetPayload`) to the list under the documented
conditioning key `fluxcore_controlnets` of every entry; the same object goes into positive and negative (as native
does), so the sampler can tell which branches a payload was applied to by identity. Payloads compare by identity
(eq=False): ComfyUI compares conditioning values with `!=`.

Nothing is encoded when Apply runs: the control image is VAE-encoded at sampling time, at the latent's size (the
image resized to it with Lanczos, as FluxImagePipeline does; native ControlNets resize their hint to the latent
too). Percentages count steps, not sigmas: start_percent 0 is the first step, end_percent 1 the last, and a
ControlNet is active at step i of N while start_percent <= i / (N - 1) <= end_percent (DiffSynth-Studio's start/end
with start = 1 - start_percent, end = 1 - end_percent; a run of one step counts as its last step, at 1; ComfyUI's
own ControlNets convert percents to sigmas instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

import torch

from flux_core.adapters import BRANCHES, StepRange
from flux_core.controlnet import ControlNetAdapter, ControlNetInput, control_latent, is_inpainting
from flux_core.dtypes import FLOAT8_DTYPES, WEIGHT_DTYPES
from flux_core.image import tensor_to_pil
from flux_core.models.controlnet import UNION_MODES, union_mode_id
from flux_core.model_state import state_of
from flux_core.vram import GiB, VRAMManager, store_model, stored_compute_dtype

from . import comfy_bridge as bridge
from . import vram_nodes
from .conditioning import PERCENT_INPUTS, image_to_model, payloads_with_branches, with_payload
from .handles import CONTROLNET_TYPE, VAE_TYPE, ControlNetHandle, DiTHandle, VAEHandle
from .loaders import NodeInputError, load_kind, model_file, validate_weight_dtype, weight_dtype_choice

CONTROLNETS_KEY = "fluxcore_controlnets"   # CONDITIONING key: list of ControlNetPayload, in the order applied
NO_MODE = "none"


@dataclass(eq=False)
class ControlNetPayload:
    """One Apply ControlNet (FluxCore): what the sampler turns into a flux_core ControlNetAdapter."""
    controlnet: ControlNetHandle
    image: torch.Tensor             # IMAGE (B, H, W, C) in [0, 1]: the control map
    vae: VAEHandle                  # encodes the control image at sampling time
    strength: float = 1.0           # the residuals' scale (DiffSynth's ControlNetInput.scale)
    steps: StepRange = StepRange()  # active range in DiffSynth's progress (from start/end_percent)
    mode: int | None = None         # union mode id, None for other ControlNets
    mask: torch.Tensor | None = None  # MASK (B, H, W) or (H, W), 1 = repaint: inpainting ControlNets only


def percent_range(start_percent: float, end_percent: float) -> StepRange:
    """ComfyUI's start/end percent (0 = the first step, 1 = the last) as DiffSynth's StepRange (1 - percent)."""
    return StepRange(_one_minus(start_percent), _one_minus(end_percent))


def _one_minus(percent: float) -> float:
    """1 - percent, subtracted on the decimal as written (its repr), then rounded once: a percent that is exactly
    step i of N then meets DiffSynth's progress of that step exactly (in binary, 1 - 0.7 is 0.30000000000000004,
    above step 7 of 11's progress 0.3, so end_percent 0.7 would drop that step)."""
    return float(1 - Decimal(repr(float(percent))))


# ---------------------------------------------------------------- nodes
class FluxCoreControlNetLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (CONTROLNET_TYPE,)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a FLUX.1 ControlNet in the diffusers format (InstantX Union-alpha, alimama "
                   "Inpainting-Beta, jasperai Upscaler, ...) for Apply ControlNet (FluxCore).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "controlnet_name": (bridge.list_models("controlnet") or ["(none found)"], {
                "tooltip": "FLUX ControlNet from models/controlnet: diffusion_pytorch_model.safetensors as published "
                           "(in its own folder, or renamed), or the whole folder with its config.json. XLabs and "
                           "SD ControlNets are refused."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "tooltip": "default: bf16 on GPU, float32 on CPU. fp8_*: weight matrices stored in FP8 (half the "
                           "memory), computed in bf16."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_dtype="default"):
        return validate_weight_dtype(weight_dtype)

    def load(self, controlnet_name, weight_dtype="default"):
        node = "FluxCoreControlNetLoader"
        weight_dtype = weight_dtype_choice(node, weight_dtype)
        path = model_file(node, "controlnet_name", "controlnet", controlnet_name)
        module = load_kind(node, "controlnet_name", path, "controlnet", WEIGHT_DTYPES[weight_dtype])
        # castable: on a native MODEL ComfyUI loads it with the DiT (additional_models), possibly partially
        return (ControlNetHandle(bridge.ManagedModel(bridge.make_castable(module)), controlnet_name),)


class FluxCoreApplyControlNet:
    CATEGORY = "FluxCore/controlnet"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    DESCRIPTION = ("Adds a ControlNet with its control image to positive and negative (chain several). FLUX "
                   "Sampler (FluxCore) runs it; the image is encoded when sampling, at the latent's size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning (used when cfg > 1)."}),
                "control_net": (CONTROLNET_TYPE, {"tooltip": "From Load ControlNet (FluxCore)."}),
                "image": ("IMAGE", {"tooltip": "The control map (canny edges, depth, ...; for the upscaler the "
                                               "upscaled image; for inpainting the image to inpaint). Resized to "
                                               "the latent's size when sampling."}),
                "vae": (VAE_TYPE, {"tooltip": "The FLUX VAE (Load FLUX VAE (FluxCore)) that encodes the image."}),
                "union_mode": ([NO_MODE, *UNION_MODES], {"default": NO_MODE, "tooltip":
                               "Union ControlNets only: what the image is (canny 0, tile 1, depth 2, blur 3, pose "
                               "4, gray 5, lq 6). Other ControlNets: none."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of the ControlNet's residuals; 0 leaves it out."}),
                **PERCENT_INPUTS,
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Inpainting ControlNets (alimama) only, and required there: 1 where "
                                             "the image is repainted, e.g. LoadImage's mask painted in the mask "
                                             "editor."}),
            },
        }

    def apply(self, positive, negative, control_net, image, vae, union_mode=NO_MODE, strength=1.0,
              start_percent=0.0, end_percent=1.0, mask=None):
        node = "FluxCoreApplyControlNet"
        model = control_net.model.module
        problems = []
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] < 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            problems.append(f"input 'image': expected an IMAGE (B, H, W, 3), got {shape}")
        if model.params.num_modes and union_mode == NO_MODE:
            problems.append(f"input 'union_mode': {control_net.name} is a union ControlNet; pick the mode of the "
                            f"control image ({', '.join(UNION_MODES)})")
        elif not model.params.num_modes and union_mode != NO_MODE:
            problems.append(f"input 'union_mode': {control_net.name} is not a union ControlNet (it has no modes); "
                            f"set union_mode to {NO_MODE}")
        elif union_mode != NO_MODE:
            try:
                union_mode_id(union_mode)
            except ValueError as e:
                problems.append(f"input 'union_mode': {e}")
        if is_inpainting(model) and mask is None:
            problems.append(f"input 'mask': {control_net.name} is an inpainting ControlNet; connect a mask (1 where "
                            f"it repaints: LoadImage's MASK output, painted in the mask editor)")
        elif mask is not None and not is_inpainting(model):
            problems.append(f"input 'mask': {control_net.name} is not an inpainting ControlNet (only alimama's "
                            f"Inpainting-Beta takes a mask); disconnect the mask")
        elif mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            problems.append(f"input 'mask': expected a MASK (B, H, W), got {shape}")
        if end_percent < start_percent:
            problems.append(f"input 'end_percent': {end_percent} is before start_percent {start_percent}; the "
                            f"ControlNet acts from start_percent to end_percent of the steps")
        if problems:
            raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")
        if strength == 0:  # as native: nothing to add
            return (positive, negative)
        payload = ControlNetPayload(
            controlnet=control_net, image=image, vae=vae, strength=float(strength),
            steps=percent_range(start_percent, end_percent),
            mode=None if union_mode == NO_MODE else union_mode_id(union_mode), mask=mask)
        models = (payload.controlnet.model,)
        return (with_payload(positive, CONTROLNETS_KEY, payload, models),
                with_payload(negative, CONTROLNETS_KEY, payload, models))


# ---------------------------------------------------------------- sampling
def controlnet_payloads(node: str, sides: dict) -> list[tuple[ControlNetPayload, frozenset[str]]]:
    """The ControlNet payloads of the run's sides with the branches each was applied to."""
    return payloads_with_branches(node, sides, CONTROLNETS_KEY, ControlNetPayload, "Apply ControlNet (FluxCore)")


def check_payload(node: str, where: str, payload: ControlNetPayload, dit, batch: int) -> None:
    """What can only be checked against the DiT and the latent; all problems of one payload at once."""
    cn, p = payload.controlnet.model.module.params, dit.params
    problems = []
    if (cn.hidden_size, cn.context_in_dim, cn.vec_in_dim) != (p.hidden_size, p.context_in_dim, p.vec_in_dim):
        problems.append(f"{payload.controlnet.name} was made for another model (hidden size {cn.hidden_size}, text "
                        f"width {cn.context_in_dim}, pooled width {cn.vec_in_dim}; this DiT's are {p.hidden_size}, "
                        f"{p.context_in_dim}, {p.vec_in_dim}): use a FLUX.1 ControlNet")
    for name, tensor in (("image", payload.image), ("mask", payload.mask)):
        count = 1 if tensor is None or tensor.ndim == 2 else tensor.shape[0]
        if count not in (1, batch):
            problems.append(f"its {name} is a batch of {count}, the latent a batch of {batch}: give one {name} "
                            f"for all, or one per latent")
    if problems:
        raise NodeInputError(f"{node}, {where}: " + "; ".join(problems) + ".")


def encode_control(payload: ControlNetPayload, width: int, height: int, name: str,
                   vae_tiling: dict) -> torch.Tensor:
    """The payload's scaled control latent (1 or B, 16 (+1 mask channel), height/8, width/8), as
    FluxImagePipeline builds it (flux_core.controlnet.control_latent), image by image."""
    bridge.ready(payload.vae.model)
    module = payload.vae.model.module

    def encode(x: torch.Tensor) -> torch.Tensor:
        return module.encode(x.to(module.device, module.dtype), **vae_tiling)

    images = tensor_to_pil(image_to_model(payload.image))
    masks = payload.mask
    count = max(len(images), 1 if masks is None or masks.ndim == 2 else masks.shape[0])
    latents = []
    with torch.no_grad():
        for i in range(count):
            mask = None if masks is None else masks if masks.ndim == 2 else masks[min(i, masks.shape[0] - 1)]
            item = ControlNetInput(image=images[min(i, len(images) - 1)], inpaint_mask=mask)
            latents.append(control_latent(item, width, height, encode, name).cpu())
    return torch.cat(latents)


def controlnet_adapters(node: str, payloads: list[tuple[ControlNetPayload, frozenset[str]]], dit, batch: int, h: int,
                        w: int, vae_tiling: dict, device: torch.device | str = "cpu"
                        ) -> tuple[list[ControlNetAdapter], list[ControlNetHandle]]:
    """One flux_core ControlNetAdapter per (payload, branches) of `controlnet_payloads`, its control latent
    encoded (and put on `device`), and the ControlNet handles they use (each once). Runs before the DiT is placed."""
    def where(i: int, payload: ControlNetPayload, branches: frozenset[str]) -> str:
        side = "positive" if "positive" in branches else "negative"
        return f"input '{side}' ({CONTROLNETS_KEY}[{i}], {payload.controlnet.name})"

    for i, (payload, branches) in enumerate(payloads):  # every payload checked before any image is encoded
        check_payload(node, where(i, payload, branches), payload, dit, batch)
    adapters, handles = [], {}
    for i, (payload, branches) in enumerate(payloads):
        try:
            control = encode_control(payload, w * 8, h * 8, f"{CONTROLNETS_KEY}[{i}]", vae_tiling).to(device)
        except (ValueError, TypeError) as e:
            raise NodeInputError(f"{node}, {where(i, payload, branches)}: {e}") from None
        module = payload.controlnet.model.module
        handles.setdefault(id(module), payload.controlnet)
        adapters.append(ControlNetAdapter(
            name=f"{CONTROLNETS_KEY}[{i}] {payload.controlnet.name}", model=module, control=control,
            dit_depth=(dit.params.depth, dit.params.depth_single_blocks), scale=payload.strength,
            steps=payload.steps, mode=payload.mode, branches=branches & frozenset(BRANCHES)))
    return adapters, list(handles.values())


def place_beside_dit(dit_handle: DiTHandle, handles: list[ControlNetHandle]) -> Callable[[], None]:
    """Put the ControlNets on the compute device for a run, the way the DiT went there (call after
    place_dit); returns what gives their VRAM back after the run.

    - DiT without VRAM options and no FP8-stored ControlNet: ComfyUI's model manager loads them beside the DiT
      (standalone: moved to the compute device), as it does the DiT.
    - DiT with VRAM options (FP8 storage, offload): the ControlNets join the DiT's VRAMManager for the run, so their
      bytes count against the same vram_limit (resident after the DiT's layers while it lasts, streamed beyond); they
      keep their own storage dtype (choose FP8 in Load ControlNet (FluxCore)).
    - An FP8-stored ControlNet beside a plain DiT gets a VRAMManager of its own (FP8 weights compute in bf16 there).
    Managed ControlNets are removed from the manager after the run, so a ControlNet may go with another DiT next."""
    modules = [h.model.module for h in handles]
    if not modules:
        return lambda: None
    placement = state_of(dit_handle.model.module).vram_placement
    fp8 = any(p.dtype in FLOAT8_DTYPES for m in modules for p in m.parameters())
    if placement is None and not fp8:
        bridge.ready(dit_handle.model, *(h.model for h in handles))
        return lambda: None
    manager = placement[1] if placement is not None else VRAMManager(vram_nodes.make_compute_device(), budget=None)
    cuda = manager.device.torch_device.type == "cuda"
    names = []

    def release() -> None:
        for n in names:
            manager.remove(n)

    try:
        for i, module in enumerate(modules):
            store_model(module, bridge.offload_device(), None, pin_memory=cuda)
            manager.add(f"controlnet.{i}", module, stored_compute_dtype(module))
            names.append(f"controlnet.{i}")  # after add: release() removes only what was added
        weights = sum(t.untyped_storage().nbytes() for n in names for t in manager.models[n].stored.values())
        room = weights if manager.budget is None else min(weights, max(0, manager.budget - manager.resident_bytes))
        bridge.free_memory(room + manager.largest_unit_bytes(names) + GiB)  # + one layer in flight + activations
        manager.load_models_to_device([n for n in ("dit", *names) if n in manager.models])
    except BaseException:
        release()
        raise
    return release


NODE_CLASS_MAPPINGS = {"FluxCoreControlNetLoader": FluxCoreControlNetLoader,
                       "FluxCoreApplyControlNet": FluxCoreApplyControlNet}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreControlNetLoader": "Load ControlNet (FluxCore)",
                              "FluxCoreApplyControlNet": "Apply ControlNet (FluxCore)"}
