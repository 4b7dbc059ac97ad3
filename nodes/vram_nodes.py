"""Memory and speed options for the FLUX DiT: FP8 storage / layer offload, and TeaCache.

Both nodes only record options on a new model handle (the upstream handle is left as it is); the sampler
applies them: `place_dit` before sampling (instead of moving the whole model to the device), the handle's
`tea_cache_l1_thresh` through `flux_core.sampling.tea_cache_extras`, and `release_dit` after sampling.

FP8 storage converts the loaded model's weights in place (there is no copy to go back to): a model once
stored in FP8 stays so until its loader runs again, even for handles without this node. Placed layers are
managed by flux_core.vram, not by ComfyUI's model manager, which does not count their bytes: before moving
them in, ComfyUI is asked to free that much VRAM (its own models are unloaded as needed), and after sampling
the resident copies of an offloaded DiT are dropped again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from flux_core.lora import clear_lora
from flux_core.dtypes import FLOAT8_DTYPES, WEIGHT_DTYPES
from flux_core.model_state import state_of
from flux_core.vram import GiB, ComputeDevice, VRAMManager, store_model, stored_compute_dtype

from . import comfy_bridge as bridge
from .handles import DIT_TYPE
from .loaders import NodeInputError, validate_weight_dtype, weight_dtype_choice

log = logging.getLogger("FluxCore")
WEIGHT_DTYPE_NAMES = {dtype: name for name, dtype in WEIGHT_DTYPES.items() if dtype is not None}


@dataclass(frozen=True)
class VRAMOptions:
    weight_dtype: str = "default"   # a WEIGHT_DTYPES key: how the weight matrices are stored
    offload: bool = False           # store on the offload device (CPU) and stream what does not fit
    vram_limit: float = 0.0         # GiB of DiT weights kept on the device when offloading (0: stream all)


def make_compute_device() -> ComputeDevice:
    """The device the managed DiT computes on (tests put a flux_core.vram.SimulatedDevice here)."""
    return ComputeDevice(bridge.compute_device())


def place_dit(handle):
    """Put the handle's DiT where its options say, ready to compute: the sampler's replacement for moving the
    whole model to the device. Without options (and never stored in FP8) it does exactly that."""
    dit = handle.model.module
    options = handle.vram or VRAMOptions()
    state = state_of(dit).vram_placement
    stored_fp8 = next((p.dtype for p in dit.parameters() if p.dtype in FLOAT8_DTYPES), None)
    if options.weight_dtype == "default" and stored_fp8 is not None:
        if not state_of(dit).fp8_on_load:
            log.warning("FluxCore: this DiT was converted to %s by a VRAM options node; it stays so until it is loaded "
                        "again (its loader re-runs when its inputs change).", stored_fp8)
        options = replace(options, weight_dtype=WEIGHT_DTYPE_NAMES[stored_fp8])
    if state is not None and state[0] == options:
        _onload(state[1])
        return dit
    if state is not None:
        state[1].remove_all()
        state_of(dit).vram_placement = None
    if options == VRAMOptions():
        bridge.ready(handle.model)
        return dit

    if state_of(dit).applied_loras:
        clear_lora(dit)  # the sampler applies them again once the weights are placed: in hook mode if fp8/offloaded
        state_of(dit).applied_loras = ()
    weight_dtype = WEIGHT_DTYPES[options.weight_dtype]
    device = make_compute_device()
    compute_dtype = stored_compute_dtype(dit)
    # Weights rest on ComfyUI's offload device even without layer offload: ComfyUI's memory manager cannot see
    # what flux_core.vram places, so the DiT is on the GPU only while it samples (all of it when not offloading).
    store_model(dit, bridge.offload_device(), weight_dtype, pin_memory=device.torch_device.type == "cuda")
    manager = VRAMManager(device, budget=int(options.vram_limit * GiB) if options.offload else None)
    manager.add("dit", dit, compute_dtype)
    state_of(dit).vram_placement = (options, manager)
    _onload(manager)
    return dit


def _onload(manager: VRAMManager) -> None:
    weights = sum(t.untyped_storage().nbytes() for t in manager.models["dit"].stored.values())
    needed = weights if manager.budget is None else min(weights, manager.budget)
    bridge.free_memory(needed + manager.largest_unit_bytes() + GiB)  # + one layer in flight + activations
    manager.load_models_to_device(["dit"])


def release_dit(handle) -> None:
    """After sampling: drop the placed DiT's copies on the device, so the VAE and ComfyUI's own models get the
    VRAM. Nothing to do for a DiT without VRAM options (ComfyUI's model manager handles that one)."""
    state = state_of(handle.model.module).vram_placement
    if state is not None:
        state[1].load_models_to_device([])


class FluxCoreVRAMOptions:
    CATEGORY = "FluxCore/memory"
    RETURN_TYPES = (DIT_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Low-VRAM options for the FLUX DiT: FP8 weight storage (half the memory, bf16 compute; LoRAs keep "
                   "full strength) and/or layer offload (weights stay on the CPU; as many layers as vram_limit allows "
                   "stay on the GPU, the rest are streamed in for each step).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "The FLUX DiT (from the loader, or after LoRA loaders)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip":
                             "How the weight matrices are stored. fp8_e4m3fn halves their memory (computed in "
                             "bf16); e5m2 has more range, less precision. Converts the loaded model in place."}),
            "offload": ("BOOLEAN", {"default": False, "tooltip":
                        "Keep the weights on the CPU and stream the layers that do not fit in vram_limit to the "
                        "GPU for each step (slower, much less VRAM)."}),
            "vram_limit": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip":
                           "With offload: GB of DiT weights kept on the GPU; 0 streams every layer (minimum "
                           "memory). Activations (a few GB at 1024x1024) come on top."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_dtype="default"):
        return validate_weight_dtype(weight_dtype)

    def apply(self, model, weight_dtype="default", offload=False, vram_limit=8.0):
        weight_dtype = weight_dtype_choice("FluxCoreVRAMOptions", weight_dtype)  # "float8_e4m3fn" (old) migrated
        options = VRAMOptions(weight_dtype, bool(offload), float(vram_limit) if offload else 0.0)
        return (replace(model, vram=options),)


class FluxCoreTeaCache:
    CATEGORY = "FluxCore/memory"
    RETURN_TYPES = (DIT_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("TeaCache: skip the DiT's blocks on steps where their input barely changed and reuse the last "
                   "change. Upstream FLUX.1-dev speed-ups: 0.25 -> 1.5x, 0.4 -> 1.8x, 0.6 -> 2.0x, 0.8 -> 2.25x. "
                   "The first and last steps always run; with CFG each prompt keeps its own cache.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "The FLUX DiT to sample with."}),
            "rel_l1_thresh": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip":
                              "How much accumulated change to skip before computing again: higher is faster and "
                              "less faithful (0.25 nearly lossless, 0.4 ~1.8x, 0.8 ~2.25x); 0 turns it off."}),
        }}

    def apply(self, model, rel_l1_thresh=0.4):
        if rel_l1_thresh < 0:
            raise NodeInputError(f"FluxCoreTeaCache, input 'rel_l1_thresh': must be >= 0, got {rel_l1_thresh}.")
        return (replace(model, tea_cache_l1_thresh=float(rel_l1_thresh) or None),)


NODE_CLASS_MAPPINGS = {"FluxCoreVRAMOptions": FluxCoreVRAMOptions, "FluxCoreTeaCache": FluxCoreTeaCache}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreVRAMOptions": "FLUX VRAM Options (FluxCore)",
                              "FluxCoreTeaCache": "FLUX TeaCache (FluxCore)"}
