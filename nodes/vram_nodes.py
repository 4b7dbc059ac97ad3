"""Memory and speed options for the FLUX DiT: FP8 storage / layer offload, TeaCache, and FP8 compute / compile.

The nodes only record options on a new model handle (the upstream handle is left as it is); the sampler
applies them: `place_dit` before sampling (instead of moving the whole model to the device; FP8 compute and
compile there too), the handle's `tea_cache_l1_thresh` through `flux_core.sampling.tea_cache_extras`, and
`release_dit` after sampling.

FP8 storage converts the loaded model's weights in place (there is no copy to go back to): a model once
stored in FP8 stays so until its loader runs again, even for handles without this node. Placed layers are
managed by flux_core.vram, not by ComfyUI's model manager, which does not count their bytes: before moving
them in, ComfyUI is asked to free that much VRAM (its own models are unloaded as needed), and after sampling
the resident copies of an offloaded DiT are dropped again.

FP8 compute (flux_core.fp8) converts the loaded model in place too, and supersedes FP8 storage (see
`effective_vram_options`). Compile (flux_core.compile) is a per-handle switch on the shared module: applied when the
handle asks for it, undone (eager blocks) for a handle that does not; refused with the VRAM manager (offload, FP8
storage), whose per-call weight swaps torch.compile cannot trace.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from flux_core.compile import CompileRefused, compile_dit, is_compiled, uncompile_dit
from flux_core.lora import clear_lora, disable_lora_merger
from flux_core.dtypes import FLOAT8_DTYPES, WEIGHT_DTYPES
from flux_core.fp8 import Fp8Linear, enable_fp8_compute, fp8_compute_layers, is_fp8_compute
from flux_core.model_state import state_of
from flux_core.vram import GiB, ComputeDevice, VRAMManager, store_model, stored_compute_dtype

from . import comfy_bridge as bridge
from .handles import DIT_TYPE
from .loaders import NodeInputError, validate_weight_dtype, weight_dtype_choice

log = logging.getLogger("FluxCore")
WEIGHT_DTYPE_NAMES = {dtype: name for name, dtype in WEIGHT_DTYPES.items() if dtype is not None}
VRAM_NODE, SPEED_NODE = "FLUX VRAM Options (FluxCore)", "FLUX Speed Options (FluxCore)"


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
    whole model to the device. Without options (and never stored in FP8) it does exactly that.

    The speed options (FluxCoreSpeedOptions) come around it: FP8 compute converts the blocks before any VRAMManager
    is built for the DiT (one that manages it is dropped first: it records each tensor's storage), and compile is
    applied once the DiT is placed resident; a handle without compile runs a DiT compiled by another handle eagerly,
    so the option never leaks between handles."""
    dit = handle.model.module
    options = effective_vram_options(handle, dit)
    conflict = compile_conflict(handle, options, dit)
    if conflict:  # before anything is converted or placed
        raise NodeInputError(conflict)
    if handle.fp8_compute and not is_fp8_compute(dit):
        _convert_to_fp8_compute(dit)
    elif not handle.fp8_compute and is_fp8_compute(dit):
        log.warning("FluxCore: this DiT was converted to FP8 compute by a %s node; it stays so until it is loaded "
                    "again (its loader re-runs when its inputs change).", SPEED_NODE)
    if not handle.compile and is_compiled(dit):
        uncompile_dit(dit)  # before any VRAMManager takes it: compiled calls refuse a managed DiT
        log.info("FluxCore: the DiT runs eagerly (compiled by another %s node; this model has no compile)",
                 SPEED_NODE)
    _place(handle, dit, options)
    if handle.compile:
        _compile(dit)
    return dit


def effective_vram_options(handle, dit=None) -> VRAMOptions:
    """The VRAM options a handle's DiT is placed with. FP8 compute supersedes FP8 storage (weight_dtype fp8_*):
    the blocks hold float8_e4m3fn codes with row scales and multiply in FP8, and the other layers (0.5 % of the
    weights, kept in their dtype by FP8 compute on purpose) are not stored in FP8, so without offload the DiT needs
    no VRAMManager (and can be compiled). A DiT whose other layers are already stored in FP8 in place (by its loader
    or an earlier VRAM options node) keeps that storage, which only the VRAMManager computes from."""
    options = handle.vram or VRAMOptions()
    if handle.fp8_compute and options.weight_dtype != "default":
        options = replace(options, weight_dtype="default")
    stored_fp8 = _stored_fp8(dit, skip_fp8_compute_layers=handle.fp8_compute) if dit is not None else None
    if options.weight_dtype == "default" and stored_fp8 is not None:
        options = replace(options, weight_dtype=WEIGHT_DTYPE_NAMES[stored_fp8])
    return options


def _stored_fp8(dit, skip_fp8_compute_layers: bool):
    """The FP8 dtype the DiT's weights are stored in, outside FP8-compute layers (which compute from their own
    codes and scales), and outside the layers FP8 compute is about to convert; None when there is none."""
    skipped = set(fp8_compute_layers(dit).values()) if skip_fp8_compute_layers else set()
    for module in dit.modules():
        if isinstance(module, Fp8Linear) or module in skipped:
            continue
        stored = next((p.dtype for p in module.parameters(recurse=False) if p.dtype in FLOAT8_DTYPES), None)
        if stored is not None:
            return stored
    return None


def compile_conflict(handle, options: VRAMOptions | None = None, dit=None) -> str | None:
    """Why the handle's compile option cannot run with its VRAM options (both nodes named, and what to change),
    or None. `options`/`dit` as place_dit sees them; without, from the handle's options alone (at the nodes)."""
    if not handle.compile:
        return None
    asked = handle.vram or VRAMOptions()
    options = options or effective_vram_options(handle)
    reasons = []
    if options.offload:
        reasons.append(f"offload is on in {VRAM_NODE}")
    if asked.weight_dtype != "default" and not handle.fp8_compute:
        reasons.append(f"weight_dtype {asked.weight_dtype} in {VRAM_NODE} stores the weights in FP8 for the VRAM "
                       f"manager to compute from (fp8_compute in {SPEED_NODE} supersedes it and compiles)")
    elif options.weight_dtype != "default":
        source = "its loader's weight_dtype" if dit is not None and state_of(dit).fp8_on_load else \
            f"an earlier {VRAM_NODE} node (in place)"
        reasons.append(f"the loaded DiT's weights are stored in {options.weight_dtype} by {source}, which only the "
                       f"VRAM manager computes from; load the DiT again with weight_dtype default (fp8_compute gives "
                       f"the same memory)")
    if not reasons:
        return None
    return (f"{SPEED_NODE}, input 'compile': torch.compile cannot run this DiT as the VRAM manager places it: "
            + "; ".join(reasons) + ". The VRAM manager swaps each layer's weights in at every call, which "
            f"torch.compile cannot trace. Either set compile to false in {SPEED_NODE}, or in {VRAM_NODE} turn "
            f"offload off and set weight_dtype to default (with fp8_compute true in {SPEED_NODE} if the bf16 "
            f"weights do not fit: half their memory, and compiled).")


def _convert_to_fp8_compute(dit) -> None:
    """enable_fp8_compute on the loaded DiT, in place, outside any VRAMManager and without fused LoRAs (the sampler
    applies the handle's LoRAs again afterwards, in hook mode on FP8 weights)."""
    drop_placement(dit)  # the manager records each tensor's storage: convert outside it
    unload_loras(dit)
    device = bridge.compute_device()
    try:
        path = enable_fp8_compute(dit, device)
    except ValueError as e:
        raise NodeInputError(f"{SPEED_NODE}, input 'fp8_compute': {e}") from None
    log.info("FluxCore: the DiT's blocks compute in FP8 (converted in place until it is loaded again): %s on %s",
             path, device)


def _compile(dit) -> None:
    newly = not is_compiled(dit)
    try:
        compile_dit(dit)
    except CompileRefused as e:  # compile_conflict covers the node options; this is the library's own check
        raise NodeInputError(f"{SPEED_NODE}, input 'compile': {e}") from None
    if newly:
        log.info("FluxCore: the DiT's blocks are compiled (torch.compile, one graph per block kind; the first run "
                 "and each new image size compile, which takes a while)")


def _place(handle, dit, options: VRAMOptions) -> None:
    state = state_of(dit).vram_placement
    if options.weight_dtype != "default" and effective_vram_options(handle).weight_dtype == "default":
        if not state_of(dit).fp8_on_load:
            log.warning("FluxCore: this DiT was converted to %s by a VRAM options node; it stays so until it is loaded "
                        "again (its loader re-runs when its inputs change).", options.weight_dtype)
    if state is not None and state[0] == options:
        _onload(state[1])
        return
    drop_placement(dit)
    if options == VRAMOptions():
        bridge.ready(handle.model)  # in ComfyUI this also takes a native MODEL's LoRA patches off (one container)
        return
    bridge.take_back_weights(handle.model)  # the VRAM manager stores the weights itself: the originals first
    unload_loras(dit)  # the sampler applies them again once the weights are placed: in hook mode if fp8/offloaded
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


def _onload(manager: VRAMManager) -> None:
    weights = sum(t.untyped_storage().nbytes() for t in manager.models["dit"].stored.values())
    needed = weights if manager.budget is None else min(weights, manager.budget)
    # + one layer in flight, the layers prefetched ahead of it, and activations
    bridge.free_memory(needed + manager.largest_unit_bytes() + manager.prefetch_window_bytes() + GiB)
    manager.load_models_to_device(["dit"])


def unload_loras(dit) -> None:
    """The DiT without the LoRAs a sampler run applied (fused ones given back their weights, hooks and merger removed);
    the sampler applies its handle's again (prepare_dit)."""
    if state_of(dit).applied_loras:
        clear_lora(dit)
        disable_lora_merger(dit)
        state_of(dit).applied_loras = ()


def drop_placement(dit) -> None:
    """The DiT out of its VRAM manager, if one holds it (hooks removed, weights at their storage place, in their storage
    dtype): before it is placed anew or converted, and after each FluxCore run in ComfyUI, where ComfyUI may load it
    next as a native MODEL (the next FluxCore run places it again)."""
    state = state_of(dit)
    if state.vram_placement is not None:
        state.vram_placement[1].remove_all()
        state.vram_placement = None


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
        handle = replace(model, vram=options)
        conflict = compile_conflict(handle)  # a Speed Options node upstream asked for compile
        if conflict:
            raise NodeInputError(conflict)
        return (handle,)


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


class FluxCoreSpeedOptions:
    CATEGORY = "FluxCore/memory"
    RETURN_TYPES = (DIT_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Inference speed options for the FLUX DiT: FP8 compute (the blocks' matrix products in FP8) and "
                   "torch.compile of its blocks. Both work with LoRAs, TeaCache and ControlNets; FP8 compute also with "
                   "the VRAM options (it supersedes their fp8 weight_dtype); compile not with offload.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "The FLUX DiT (from the loader, or after LoRA / VRAM / TeaCache nodes)."}),
            "fp8_compute": ("BOOLEAN", {"default": False, "tooltip":
                            "FP8 matmuls via torch._scaled_mm on Ada/Hopper/Blackwell GPUs (weights and activations "
                            "in FP8, per-row scales), storage-only elsewhere (FP8 weights, bf16 compute). Lossy: "
                            "converts the loaded model in place until it is loaded again, like the VRAM node's fp8 "
                            "weight_dtype, which it supersedes."}),
            "compile": ("BOOLEAN", {"default": False, "tooltip":
                        "torch.compile of each transformer block: the first run (and each new image size) is slower "
                        "while it compiles, later runs faster. Not with offload or fp8 weight_dtype in the VRAM "
                        "options (use fp8_compute instead)."}),
        }}

    def apply(self, model, fp8_compute=False, compile=False):
        handle = replace(model, fp8_compute=bool(fp8_compute), compile=bool(compile))
        conflict = compile_conflict(handle)  # VRAM options upstream that the compiled blocks cannot run under
        if conflict:
            raise NodeInputError(conflict)
        return (handle,)


NODE_CLASS_MAPPINGS = {"FluxCoreVRAMOptions": FluxCoreVRAMOptions, "FluxCoreTeaCache": FluxCoreTeaCache,
                       "FluxCoreSpeedOptions": FluxCoreSpeedOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreVRAMOptions": VRAM_NODE, "FluxCoreTeaCache": "FLUX TeaCache (FluxCore)",
                              "FluxCoreSpeedOptions": SPEED_NODE}
