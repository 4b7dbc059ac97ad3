"""Where the adapters' one-off models compute: the image encoders, IP-Adapters and InfiniteYou's projector run once
per sampler run, before denoising (reference images -> keys and values, a face embedding -> identity tokens), so
they need the compute device only for that moment.

They go the way the sampler's ControlNets go (nodes/controlnet_nodes.place_beside_dit), so their bytes are counted
where the DiT's are:
- DiT without VRAM options and no FP8-stored model here: ComfyUI's model manager loads them (standalone: moved to
  the compute device). ComfyUI keeps them loaded while there is room and unloads them first when the DiT or another
  model needs the memory: the image encoder is freed after encoding when memory is short.
- DiT with VRAM options (FP8 storage, offload): they join the DiT's VRAMManager for the moment they compute, under
  the same vram_limit (resident while it lasts, streamed beyond), and leave it again; the DiT's own resident layers
  are moved out meanwhile (the manager's stages), and placed again by the sampler afterwards. Before the DiT's first
  run there is no such manager yet: they get one of their own with the DiT's vram_limit.
- An FP8-stored model beside a plain DiT gets a VRAMManager of its own for that moment (FP8 weights compute in bf16
  there).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from flux_core.dtypes import FLOAT8_DTYPES
from flux_core.model_state import state_of
from flux_core.vram import GiB, VRAMManager, store_model, stored_compute_dtype

from . import comfy_bridge as bridge
from . import vram_nodes
from .comfy_bridge import ManagedModel
from .handles import DiTHandle


@contextmanager
def computing(dit_handle: DiTHandle, models: dict[str, ManagedModel]) -> Iterator[None]:
    """The named models ready to compute while the block runs (names are the manager slots they take, e.g.
    "ipadapter_image_encoder.0"); a managed placement is undone after it, also on error."""
    modules = {name: m.module for name, m in models.items()}
    placement = state_of(dit_handle.model.module).vram_placement
    options = dit_handle.vram
    fp8 = any(p.dtype in FLOAT8_DTYPES for m in modules.values() for p in m.parameters())
    if placement is None and (options is None or options == vram_nodes.VRAMOptions()) and not fp8:
        bridge.ready(*models.values())
        yield
        return
    if placement is not None:
        manager = placement[1]
    else:  # the DiT's options, before its first run placed it: the same budget, in a manager of the moment
        budget = int(options.vram_limit * GiB) if options is not None and options.offload else None
        manager = VRAMManager(vram_nodes.make_compute_device(), budget=budget)
    cuda = manager.device.torch_device.type == "cuda"
    added = []
    try:
        for name, module in modules.items():
            store_model(module, bridge.offload_device(), None, pin_memory=cuda)
            manager.add(name, module, stored_compute_dtype(module))
            added.append(name)  # after add: the cleanup removes only what was added
        weights = sum(t.untyped_storage().nbytes() for n in added for t in manager.models[n].stored.values())
        room = weights if manager.budget is None else min(weights, manager.budget)
        bridge.free_memory(room + manager.largest_unit_bytes(added) + GiB)  # + one layer in flight + activations
        manager.load_models_to_device(added)
        yield
    finally:
        for name in added:
            manager.remove(name)
