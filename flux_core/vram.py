"""Low-VRAM running: weights stored in one place, computed in another, within a byte budget.

Every model has a storage place (where its weights rest: a device and, for the weight matrices, a dtype such
as float8_e4m3fn) and a compute place (the compute device and the pipeline's dtype). `VRAMManager` bridges
the two for any `nn.Module`:

    vram = VRAMManager(ComputeDevice("cuda"), budget=8 * GiB)
    vram.add("dit", dit, compute_dtype=torch.bfloat16)            # dit stored on the CPU, maybe in fp8
    vram.load_models_to_device(["dit"])                           # the stage: other models move out
    dit(...)                                                      # computes on cuda in bf16

Units: every module that owns parameters or buffers directly (nn.Linear, RMSNorm, Conv2d, Embedding, ...)
is one unit, except that a module which reads its children's weights itself (T5's feed-forward checks
`wo.weight.dtype`; SigLIP's and CLIP's vision embeddings, torch's MultiheadAttention) is one unit with its whole
subtree (`WHOLE_UNITS`). When a stage starts, its models'
units are made resident on the compute device, in module order, while their stored bytes fit in the budget
(first fit); the others are streamed: copied to the compute device for each call and dropped after it. Resident units keep their storage dtype (fp8 stays fp8
on the device); each call casts to the compute dtype, so a call needs at most one unit's weights in the
compute dtype on top of what is resident (floating buffers, e.g. float32 rotary frequencies, keep their dtype). At rest (outside a call) a module's tensors are always its
stored ones, so `state_dict()`, LoRA shape checks and `weight.dtype` see the storage. Block-quantized weights
(flux_core.quantized.QuantizedLinear, from GGUF files) are uint8 tensors to the manager: moved as they are, never
cast, so the budget counts quantized bytes; the layer dequantizes them on the compute device in its call.

FP8-compute layers (flux_core.fp8.Fp8Linear) are moved in float8 with their float32 row scales and never cast
either: their call multiplies in FP8 (`torch._scaled_mm`), which a bf16 copy of the weight would lose.

Prefetch: a streamed unit's copy would otherwise start in its own call, on the compute stream, so transfers and
compute take turns. With `prefetch` (on by default for CUDA devices) the manager learns the order in which streamed
units are called (each unit remembers the streamed unit called after it, relearned on every call: the first call of
a stage only learns) and, when a streamed unit is entered, starts copying the units predicted next, in their stored
dtype (fp8 bytes over the bus), on a side CUDA stream from page-locked memory (`store_model(pin_memory=True)`),
up to `prefetch_bytes` ahead (default: twice the largest streamed unit). The unit's call then waits on the copy's
event instead of copying; copies predicted wrongly (TeaCache skipping the blocks, a stage change) are dropped
unused. On other devices the same logic runs synchronously (tested on `SimulatedDevice`).

The budget counts weight bytes only. `resident_bytes` is exact: the bytes of the tensors the manager keeps
on the compute device (stored there, made resident, in flight for a call, or prefetched); it never exceeds the
budget plus the largest unit in the compute dtype (`largest_unit_bytes`) plus the prefetch window
(`prefetch_window_bytes`: `prefetch_bytes`, or the largest streamed unit if that is larger; 0 without prefetch).
Units do not nest in the FLUX DiT; in CLIP the embeddings module keeps its 616-byte position ids on the device
while its child runs, and InfiniteYou's projector its learned latents, 8 x 1280 values, while its layers run.
Activations come on top.
`budget=0` is the minimum-memory mode (everything streamed); `budget=None` keeps every unit of the stage
resident, which is plain model-level offload.

Devices are parameters: `ComputeDevice("cuda")` is the real thing; `SimulatedDevice()` is a compute device
simulated in host memory whose every tensor is a fresh copy tracked by its storage's lifetime, so the policy
and the byte count are tested on a CPU against what is actually alive.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from .dtypes import FLOAT8_DTYPES
from .fp8 import Fp8Linear
from .model_state import peek_state, state_of
from .quantized import QuantizedLinear

GiB = 1024 ** 3
# Modules placed as one unit with their subtree, by class name: their forward reads a child's weight directly.
# T5's feed-forward checks `wo.weight.dtype`; the vision towers' embeddings cast the pixels to
# `patch_embedding.weight.dtype` (fp8 at rest under FP8 storage); torch's MultiheadAttention (SigLIP's pooling head)
# passes `out_proj.weight` to its functional form without calling out_proj.
WHOLE_UNITS = ("T5DenseGatedActDense", "T5DenseActDense", "SiglipVisionEmbeddings", "CLIPVisionEmbeddings",
               "MultiheadAttention")


def is_matrix(t: torch.Tensor) -> bool:
    """The tensors a low-precision storage dtype applies to: floating weights of 2+ dims (Linear, Conv,
    Embedding). Biases and norm scales stay in the compute dtype: they are tiny and precision-sensitive."""
    return t.is_floating_point() and t.dim() >= 2


def storage_dtype(t: torch.Tensor, weight_dtype: torch.dtype | None, torch_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is stored in: `weight_dtype` for weight matrices when given, else `torch_dtype` for
    floating tensors; integer buffers keep theirs."""
    if not t.is_floating_point():
        return t.dtype
    return weight_dtype if weight_dtype is not None and is_matrix(t) else torch_dtype


def compute_place(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) a model computes in: the manager's compute place if it is managed, else where its first
    floating parameter is (a float8-stored unmanaged model reports bfloat16)."""
    state = peek_state(module)
    place = state.compute if state is not None else None
    if place is not None:
        return place
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (torch.bfloat16 if p.dtype in FLOAT8_DTYPES else p.dtype)


def stored_compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in, read from its stored tensors: biases and norm scales keep it under FP8 or
    GGUF storage of the weight matrices (`storage_dtype`). bfloat16 for a model without such tensors."""
    return next((p.dtype for p in model.parameters() if p.dim() == 1 and p.is_floating_point()), torch.bfloat16)


@torch.no_grad()
def store_model(model: nn.Module, device: str | torch.device | None = None, weight_dtype: torch.dtype | None = None,
                pin_memory: bool = False) -> nn.Module:
    """Move a model's storage in place, one tensor at a time: to `device`, weight matrices to `weight_dtype`
    (e.g. torch.float8_e4m3fn; lossy, there is no way back but reloading). Parameters keep their identity.
    `pin_memory`: page-lock CPU storage so that streaming it to a CUDA device is faster and asynchronous.
    Do this before `VRAMManager.add`."""
    for t in [*model.parameters(), *model.buffers()]:
        dtype = weight_dtype if weight_dtype is not None and is_matrix(t) else t.dtype
        data = t.data.to(device=device if device is not None else t.device, dtype=dtype)
        if pin_memory and data.device.type == "cpu" and torch.cuda.is_available() and not data.is_pinned():
            data = data.pin_memory()
        t.data = data
    return model


# ------------------------------------------------------------------------------------------------- devices
# Assumed when the platform cannot tell its memory size (no sysconf names, e.g. Windows): a common desktop size.
FALLBACK_HOST_MEMORY = 16 * GiB


def host_memory() -> int:
    """Bytes of physical memory of this machine, from the OS itself (no package needed)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _windows_memory() or FALLBACK_HOST_MEMORY


def _windows_memory() -> int | None:
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
        status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullTotalPhys)
    except (AttributeError, OSError):
        pass
    return None


class ComputeDevice:
    """The compute device as the manager sees it: `put` brings a tensor there (no copy if it already is),
    `holds` tells whether a tensor lives there."""

    def __init__(self, device: str | torch.device = "cuda"):
        d = torch.device(device)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        self.torch_device = d

    def put(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # From page-locked memory the copy runs asynchronously on the current stream (ordered before its use).
        return t.to(self.torch_device, dtype=dtype, non_blocking=self.torch_device.type == "cuda" and t.is_pinned())

    def holds(self, t: torch.Tensor) -> bool:
        return t.device == self.torch_device

    def prefetch(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        """(copies of `tensors` on the device in their own dtypes, a ready token for `wait`). On CUDA the copies
        run on a side stream, overlapping the compute stream's work (asynchronously from page-locked memory), and
        the token is an event recorded after them; elsewhere they are made now and the token is None."""
        if self.torch_device.type != "cuda":
            return [self.put(t, t.dtype) for t in tensors], None
        if getattr(self, "_copy_stream", None) is None:
            self._copy_stream = torch.cuda.Stream(self.torch_device)
        # Allocated on the side stream: the caching allocator hands out a block the side stream may write now
        # (a block last used by the compute stream comes back only after the work recorded on it has finished).
        with torch.cuda.stream(self._copy_stream):
            copies = [t.to(self.torch_device, non_blocking=t.is_pinned()) for t in tensors]
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return copies, ready

    def wait(self, copies: Iterable[torch.Tensor], ready: object) -> None:
        """Before the compute stream reads prefetched `copies`: it waits for their copy to finish, and each copy is
        marked used by it (`record_stream`), so that when the copy is freed after the call, its memory is not handed
        to the side stream for the next prefetch before the compute stream's reads of it have run."""
        if ready is None:
            return
        stream = torch.cuda.current_stream(self.torch_device)
        stream.wait_event(ready)
        for c in copies:
            c.record_stream(stream)

    def total_memory(self) -> int:
        if self.torch_device.type == "cuda":
            return torch.cuda.get_device_properties(self.torch_device).total_memory
        return host_memory()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.torch_device)!r})"


class SimulatedDevice(ComputeDevice):
    """A compute device simulated in host memory (for tests and CPU benchmarks). `put` always makes a fresh
    copy and tracks its storage; `live_bytes` / `peak_bytes` follow the storages' actual lifetimes (a
    finalizer runs when a storage is freed), so they check the manager's own count independently."""

    def __init__(self, total_memory: int = 16 * GiB):
        super().__init__("cpu")
        self._total = total_memory
        self._live: dict[int, int] = {}   # id(storage) -> nbytes, for storages alive
        self.live_bytes = 0
        self.peak_bytes = 0

    def put(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.holds(t) and t.dtype == dtype:
            return t
        copy = t.to(dtype=dtype, copy=True)
        storage = copy.untyped_storage()
        key, size = id(storage), storage.nbytes()
        self._live[key] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._freed, key)
        return copy

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key)

    def holds(self, t: torch.Tensor) -> bool:
        return id(t.untyped_storage()) in self._live

    def total_memory(self) -> int:
        return self._total

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


# ------------------------------------------------------------------------------------------------- manager
def _units(model: nn.Module, prefix: str = "", seen: set | None = None):
    """(name, module, tensors) for each module whose forward needs tensors placed, in module order: its own
    parameters and buffers (its whole subtree's for WHOLE_UNITS). A module reached twice is listed once; a
    tensor may appear in several units (tied weights in two modules)."""
    seen = set() if seen is None else seen
    if id(model) in seen:
        return
    seen.add(id(model))
    whole = type(model).__name__ in WHOLE_UNITS
    named = ([*model.named_parameters(), *model.named_buffers()] if whole else
             [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)])
    tensors = [t for _, t in named if t is not None]
    if tensors:
        yield prefix, model, tensors
    if whole:
        seen.update(id(m) for m in model.modules())
        return
    for name, child in model.named_children():
        yield from _units(child, f"{prefix}.{name}" if prefix else name, seen)


@dataclass(eq=False)
class _Unit:
    """One module whose tensors the manager places for each of its calls."""
    name: str
    module: nn.Module
    model: "PlacedModel"
    uses: list[torch.Tensor]                   # the Parameter / buffer objects its forward reads
    owns: list[torch.Tensor]                   # those it places for a stage (a tensor is owned by one unit)
    stored_elsewhere: bool = False             # some of its tensors rest off the compute device
    in_flight: int = 0                         # bytes of this call's compute copies
    hooks: list = field(default_factory=list)

    @property
    def resident(self) -> bool:
        return bool(self.owns) and id(self.owns[0]) in self.model.resident

    def numel(self) -> int:
        return sum(t.numel() for t in self.owns)


@dataclass(eq=False)
class _Prefetch:
    """A streamed unit's tensors copied to the compute device ahead of its call (in their stored dtypes)."""
    copies: dict[int, torch.Tensor]            # id(Parameter / buffer) -> its copy on the compute device
    ready: object                              # ComputeDevice.prefetch's token (a CUDA event, or None)
    nbytes: int


@dataclass
class PrefetchStats:
    """What the prefetcher did: copies started, used by the call they were made for, dropped unused (a wrong
    prediction, or the stage ended), and streamed calls that found no prefetched copy (then copied in the call)."""
    issued: int = 0
    used: int = 0
    dropped: int = 0
    missed: int = 0


@dataclass(eq=False)
class PlacedModel:
    name: str
    model: nn.Module
    compute_dtype: torch.dtype
    persistent_params: int | None = None       # resident by parameter count instead of the budget
    units: list[_Unit] = field(default_factory=list)
    stored: dict[int, torch.Tensor] = field(default_factory=dict)     # id(tensor) -> its stored data
    resident: dict[int, torch.Tensor] = field(default_factory=dict)   # id(tensor) -> copy on the compute device
    marked: list[nn.Module] = field(default_factory=list)             # modules this manager marked offloaded
    # ids of the tensors that keep their stored dtype in a call: the model's buffers (the float32 rotary frequencies
    # of transformers' Qwen2.5-VL: in bf16 they move its rotary angles by up to a radian at ~900 tokens; FP8
    # layers' float32 row scales) and the float8 weights of FP8-compute layers (flux_core.fp8: cast to the compute
    # dtype they would lose their FP8 matmul).
    buffers: set[int] = field(default_factory=set)

    def home(self, t: torch.Tensor) -> torch.Tensor:
        """Where a call takes `t` from: its resident copy on the compute device, else its stored data."""
        resident = self.resident.get(id(t))
        return self.stored[id(t)] if resident is None else resident

    def call_dtype(self, t: torch.Tensor, home: torch.Tensor) -> torch.dtype:
        """The dtype of `t` in a call: parameters in the compute dtype; buffers, FP8-compute weights and integers
        as stored."""
        return self.compute_dtype if home.is_floating_point() and id(t) not in self.buffers else home.dtype

    @property
    def streamed(self) -> list[str]:
        """Names of the units streamed per call (stored off the compute device and not resident now)."""
        return [u.name for u in self.units if u.owns and not u.resident and u.stored_elsewhere]


class VRAMManager:
    """Places the weights of several models on one compute device within `budget` bytes (None: no limit).

    `add` a model (already at its storage place: see `store_model`), then call `load_models_to_device(names)`
    before each stage: models not named are moved out (their resident copies dropped), the named ones are
    made resident unit by unit while the budget allows; the rest stream. `resident_bytes` is the exact count
    of weight bytes on the compute device, `peak_bytes` its high-water mark."""

    def __init__(self, device: ComputeDevice | str | torch.device, budget: int | None = None,
                 prefetch: bool | None = None, prefetch_bytes: int | None = None):
        """`prefetch`: copy the next streamed units ahead of their calls (None: on CUDA devices only, where the
        copies overlap compute; on the CPU they would only add memory). `prefetch_bytes`: how many bytes may be in
        flight ahead (None: twice the largest streamed unit's stored bytes; one unit always may)."""
        self.device = device if isinstance(device, ComputeDevice) else ComputeDevice(device)
        self.budget = None if budget is None else max(0, int(budget))
        self.models: dict[str, PlacedModel] = {}
        self.resident_bytes = 0
        self.peak_bytes = 0
        self.prefetch = self.device.torch_device.type == "cuda" if prefetch is None else bool(prefetch)
        self.prefetch_bytes = prefetch_bytes
        self.prefetch_stats = PrefetchStats()
        self._window = 0                                  # bytes the prefetcher may hold ahead; 0: off
        self._next: dict[_Unit, _Unit] = {}               # streamed unit -> the streamed unit called after it last
        self._last: _Unit | None = None                   # the streamed unit called last
        self._prefetched: dict[_Unit, _Prefetch] = {}
        self._stage: list[str] | None = None              # the models of the current stage (None: before any)

    # -- models ----------------------------------------------------------------------------------------
    def add(self, name: str, model: nn.Module, compute_dtype: torch.dtype,
            persistent_params: int | None = None) -> PlacedModel:
        """Manage `model` (nothing moves yet). `persistent_params`: keep that many parameters resident, in
        module order, regardless of the budget (DiffSynth's `num_persistent_param_in_dit`)."""
        if name in self.models:
            self.remove(name)
        managed = PlacedModel(name, model, compute_dtype, persistent_params)
        managed.buffers = {id(b) for b in model.buffers()}
        managed.buffers.update(id(m.weight) for m in model.modules() if isinstance(m, Fp8Linear))
        for unit_name, module, tensors in _units(model):
            owns = [t for t in tensors if id(t) not in managed.stored]
            managed.stored.update((id(t), t.data) for t in owns)
            unit = _Unit(unit_name, module, managed, tensors, owns)
            unit.hooks = [module.register_forward_pre_hook(lambda m, a, u=unit: self._enter(u)),
                          module.register_forward_hook(lambda m, a, o, u=unit: self._exit(u), always_call=True)]
            unit.stored_elsewhere = any(not self.device.holds(t) for t in tensors)
            if unit.stored_elsewhere:
                for m in [*module.modules(), model]:
                    if not state_of(m).offloaded:  # marked here, unmarked by remove (others' marks stay)
                        state_of(m).offloaded = True
                        managed.marked.append(m)
            managed.units.append(unit)
        self._count(self._bytes(managed.stored.values(), held=True))
        state_of(model).compute = (self.device.torch_device, compute_dtype)
        self.models[name] = managed
        self._set_window()
        return managed

    def remove(self, name: str) -> nn.Module:
        """Stop managing a model: hooks removed, resident copies dropped, the model left at its storage place."""
        managed = self.models.pop(name)
        self._offload(managed)
        for unit in managed.units:
            for h in unit.hooks:
                h.remove()
        self._next = {a: b for a, b in self._next.items() if a.model is not managed and b.model is not managed}
        self._last = None if self._last is not None and self._last.model is managed else self._last
        for m in managed.marked:
            state_of(m).offloaded = False
        self._count(-self._bytes(managed.stored.values(), held=True))
        state_of(managed.model).compute = None
        return managed.model

    def remove_all(self) -> None:
        for name in list(self.models):
            self.remove(name)

    # -- stages ----------------------------------------------------------------------------------------
    def load_models_to_device(self, names: Iterable[str]) -> None:
        """Start a stage: every managed model not in `names` moves out, then the named ones move in (in the
        order given) as far as the budget allows. Names of unmanaged models are ignored."""
        names = [n for n in names if n in self.models]
        self._stage = names
        self._drop_prefetches()  # predictions of the last stage; the new stage's calls start new ones
        freed = False
        for name, managed in self.models.items():
            if name not in names and managed.resident:
                self._offload(managed)
                freed = True
        if freed and self.device.torch_device.type == "cuda":
            torch.cuda.empty_cache()
        for name in names:
            self._onload(self.models[name])
        self._set_window()

    def _onload(self, managed: PlacedModel) -> None:
        params_left = managed.persistent_params
        for unit in managed.units:
            homes = [managed.stored[id(t)] for t in unit.owns]
            cost = self._bytes(homes, held=False)
            if unit.resident or not cost:
                continue
            if params_left is not None:
                fits = unit.numel() <= params_left
                params_left -= unit.numel() if fits else 0
            else:
                fits = self.budget is None or self.resident_bytes + cost <= self.budget
            if fits:
                managed.resident.update((id(t), self.device.put(h, h.dtype)) for t, h in zip(unit.owns, homes))
                self._count(cost)

    def _offload(self, managed: PlacedModel) -> None:
        self._drop_prefetches(managed)
        self._count(-self._bytes(managed.resident.values(), held=True))
        managed.resident.clear()

    # -- calls -----------------------------------------------------------------------------------------
    def _enter(self, unit: _Unit) -> None:
        """Before a unit's forward: point its tensors at compute copies (compute device, compute dtype), taken
        from its prefetched copies where there are some; then prefetch the units predicted to run next."""
        managed, new, streamed = unit.model, 0, False
        fetched = self._prefetched.pop(unit, None)
        if fetched is not None:  # its bytes move from the prefetch count to this call's
            self.device.wait(fetched.copies.values(), fetched.ready)
            self._count(-fetched.nbytes)
            self.prefetch_stats.used += 1
        for t in unit.uses:
            home = managed.home(t)
            source = fetched.copies.get(id(t), home) if fetched is not None else home
            view = self.device.put(source, managed.call_dtype(t, home))
            if view is not home:  # a copy made for this call (or prefetched for it)
                new += view.untyped_storage().nbytes()
            streamed = streamed or not self.device.holds(home)
            t.data = view
        unit.in_flight = new
        self._count(new)
        if streamed:
            self._advance(unit, fetched is not None)

    def _exit(self, unit: _Unit) -> None:
        """After a unit's forward (also on error): its tensors rest at the storage place again."""
        for t in unit.uses:
            t.data = unit.model.stored[id(t)]
        self._count(-unit.in_flight)
        unit.in_flight = 0

    # -- prefetch --------------------------------------------------------------------------------------
    # The order is learned from the calls themselves, not taken from module order: FLUX's forward runs its modules in
    # another order than they are declared (time_in before vector_in before guidance_in's declared place, txt_mod
    # before img_attn in a double block, ...), TeaCache runs only the first block's modulation on a skipped step, and
    # a ControlNet's units run between the DiT's. Each streamed unit remembers the streamed unit that followed it in
    # its latest call (so a changed order is relearned by the next call); on entering a unit the prefetcher follows
    # that chain up to the byte window, starts the copies not yet in flight and drops those not on the chain (a
    # wrong prediction), so no more than the window is ever held ahead.
    def _advance(self, unit: _Unit, hit: bool) -> None:
        self.prefetch_stats.missed += not hit
        if self._last is not None and self._last is not unit:
            self._next[self._last] = unit
        self._last = unit
        if not self._window:
            return
        chain = self._chain(unit)
        for stale in [u for u in self._prefetched if u not in chain]:
            self._drop(stale)
        for u, homes in chain.items():
            if u not in self._prefetched:
                self._start(u, homes)

    def _chain(self, unit: _Unit) -> dict[_Unit, dict[int, torch.Tensor]]:
        """The streamed units predicted to follow `unit`, in order, as far as the window allows (at least one), each
        with the stored tensors a prefetch copies (`_homes_to_copy`)."""
        chain, total, seen = {}, 0, {unit}
        u = self._next.get(unit)
        while u is not None and u not in seen:
            seen.add(u)
            homes = self._homes_to_copy(u)
            cost = sum(h.untyped_storage().nbytes() for h in homes.values())
            if cost:
                if chain and total + cost > self._window:
                    break
                chain[u] = homes
                total += cost
            u = self._next.get(u)
        return chain

    def _homes_to_copy(self, unit: _Unit) -> dict[int, torch.Tensor]:
        managed = unit.model
        homes = {id(t): managed.home(t) for t in unit.uses}
        return {key: home for key, home in homes.items() if not self.device.holds(home)}

    def _copy_bytes(self, unit: _Unit) -> int:
        return sum(h.untyped_storage().nbytes() for h in self._homes_to_copy(unit).values())

    def _start(self, unit: _Unit, homes: dict[int, torch.Tensor]) -> None:
        copies, ready = self.device.prefetch(list(homes.values()))
        fetched = _Prefetch(dict(zip(homes, copies)), ready, sum(c.untyped_storage().nbytes() for c in copies))
        self._prefetched[unit] = fetched
        self._count(fetched.nbytes)
        self.prefetch_stats.issued += 1

    def _drop(self, unit: _Unit) -> None:
        # On CUDA the copy may still be running on the side stream: its memory goes back to the side stream's pool,
        # where the next side-stream work is ordered after it, and the compute stream never read it.
        self._count(-self._prefetched.pop(unit).nbytes)
        self.prefetch_stats.dropped += 1

    def _drop_prefetches(self, managed: PlacedModel | None = None) -> None:
        for unit in [u for u in self._prefetched if managed is None or u.model is managed]:
            self._drop(unit)

    def _largest_copy(self, stage_only: bool = True) -> int:
        """Stored bytes of the largest unit streamed in the current stage (of all models before the first stage,
        or with stage_only=False)."""
        names = self._stage if self._stage is not None and stage_only else list(self.models)
        return max((self._copy_bytes(u) for n in names if n in self.models for u in self.models[n].units), default=0)

    def _set_window(self) -> None:
        if not self.prefetch:
            self._window = 0
        elif self.prefetch_bytes is not None:
            self._window = max(0, int(self.prefetch_bytes))
        else:
            self._window = 2 * self._largest_copy()

    def prefetch_window_bytes(self) -> int:
        """The most bytes prefetched copies may hold on the device (0: prefetch off): the window, or one unit
        if it is larger. `resident_bytes` stays within budget + largest_unit_bytes() + this."""
        return max(self._window, self._largest_copy(stage_only=False)) if self._window else 0

    # -- counting --------------------------------------------------------------------------------------
    def _bytes(self, tensors: Iterable[torch.Tensor], held: bool) -> int:
        """Bytes of the tensors that are (held=True) or are not (held=False) on the compute device."""
        return sum(t.untyped_storage().nbytes() for t in tensors if self.device.holds(t) == held)

    def _count(self, delta: int) -> None:
        self.resident_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.resident_bytes

    def largest_unit_bytes(self, names: Sequence[str] | None = None) -> int:
        """The largest unit of the named models (all by default), in its compute dtype: what one call adds."""
        out = 0
        for name, managed in self.models.items():
            if names is None or name in names:
                for u in managed.units:
                    size = sum(t.numel() * managed.call_dtype(t, t).itemsize for t in u.uses)
                    if isinstance(u.module, (QuantizedLinear, Fp8Linear)):  # a call may dequantize the weight
                        size += u.module.in_features * u.module.out_features * managed.compute_dtype.itemsize
                    out = max(out, size)
        return out

    def summary(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget / GiB:.2f} GiB"
        lines = [f"VRAMManager on {self.device}: budget {budget}, resident {self.resident_bytes / GiB:.3f} GiB "
                 f"(peak {self.peak_bytes / GiB:.3f} GiB)"]
        for name, m in self.models.items():
            resident = sum(1 for u in m.units if u.resident)
            lines.append(f"  {name}: {len(m.units)} units, {resident} resident, {len(m.streamed)} streamed, "
                         f"compute {m.compute_dtype}")
        if self._window:
            st = self.prefetch_stats
            lines.append(f"  prefetch: window {self._window / GiB:.3f} GiB; {st.issued} issued, {st.used} used, "
                         f"{st.dropped} dropped, {st.missed} streamed calls without one")
        return "\n".join(lines)
