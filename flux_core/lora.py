"""LoRAs on the FluxCore DiT: any file format, several stacked with their own strengths, fused or hooked.

    report = load_lora(dit, "style.safetensors", alpha=0.8)     # kohya, diffusers/PEFT, XLabs, DiffSynth, ...
    load_lora(dit, ["a.safetensors", "b.safetensors"], alpha=[0.7, -0.3])
    clear_lora(dit)                                              # original weights back, bit for bit

Files are read into lora_tools' canonical form (one (down, up, alpha) per BFL layer, each layer with its own
alpha), checked against the DiT's layer shapes, then applied in one of two ways:

- fused: W = W_original + sum_i strength_i * up_i @ down_i * alpha_i / rank_i, computed in float32 from the
  original and cast once, so the result does not depend on load order or accumulate rounding. The original
  of every touched layer is kept on the CPU (as ComfyUI keeps its weight backups) and `clear_lora` copies it
  back: unfusing restores the original bits. Cost: CPU memory for one copy of the touched layers.
- hook: a forward hook on each target nn.Linear adds sum_i (x @ down_i^T) @ (strength_i * scale_i * up_i)^T
  in the input's (compute) dtype. The weights are never touched, so this is the mode for weights stored in
  float8 (fusing would round most of the delta away: the "LoRA is weak on fp8" complaint), for weights that
  live elsewhere (meta device), and for offloaded models.

LoRA-Fusion (`enable_lora_merger(dit, patcher)`, DiffSynth-Studio's LoRA-Fusion-Preview): the hooks of the layers the
patcher has a merger for hand it the base output and each LoRA's own output, and it combines them with learned
gates instead of summing (flux_core.models.lora_patcher). Hook mode only: fused LoRAs cannot be merged.

`hotload=None` picks hook mode when any target layer's weight is stored in a float8 dtype or on the meta
device, or when the model is marked offloaded: a VRAM manager that streams weights sets
`state_of(dit).offloaded` (or that of individual nn.Linear modules; flux_core.model_state), or while the LoRA
merger is enabled. Otherwise it fuses.
`hotload=True` / `False` force the mode.

Reporting (never a silent no-op): a file matching no layer raises LoraFormatError naming what the file looks
like; a layer of another size raises LoraShapeError naming the key and both shapes; keys that matched nothing
(and text-encoder keys, which FluxCore does not apply) are reported with Python `warnings`
(`LoraKeyWarning`, a UserWarning: printed once per message, filterable, catchable by hosts) and listed in
the returned `LoraReport`. A file whose safetensors metadata `modelspec.architecture` (written by kohya's
sd-scripts and others: "flux-1-dev/lora", "flux-1-schnell/lora", "stable-diffusion-xl-v1-base/lora", ...)
names another model than the DiT (schnell on a DiT with a guidance embedder, or not FLUX.1 at all) is applied,
with a `LoraArchitectureWarning` naming the file, the architecture and the model.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from lora_tools import LoraError, LoraFile, LoraKeyWarning, LoraShapeError, describe_foreign, parse_lora

from .dtypes import FLOAT8_DTYPES
from .fp8 import fuse_refusal
from .model_state import peek_state, state_of
from .vram import compute_place
from .loading.files import checkpoint_files, open_state_dict, safetensors_metadata

_MAX_LISTED = 30
MODELSPEC_ARCHITECTURE = "modelspec.architecture"   # safetensors metadata key of the model a file was made for


class LoraArchitectureWarning(UserWarning):
    """A LoRA's metadata says it was made for another model than the DiT it is applied to."""

LoraSource = str | os.PathLike | Mapping[str, torch.Tensor] | LoraFile


@dataclass
class LoraSourceReport:
    source: str
    format: str
    strength: float
    mode: str                                   # "fused" or "hook"
    matched: dict[str, tuple[str, ...]]         # DiT layer -> the file keys applied to it
    unmatched: dict[str, str]                   # file key -> why it was not applied
    skipped_keys: list[str]                     # text-encoder keys (not applied to the DiT)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        extra = f", {len(self.unmatched)} keys unmatched" if self.unmatched else ""
        extra += f", {len(self.skipped_keys)} text-encoder keys skipped" if self.skipped_keys else ""
        return (f"{self.source}: {self.format} LoRA, strength {self.strength:g}, {self.mode}, "
                f"{len(self.matched)} layers{extra}")


@dataclass
class LoraReport:
    mode: str
    loras: list[LoraSourceReport]

    @property
    def layers(self) -> list[str]:
        return sorted({name for r in self.loras for name in r.matched})

    @property
    def unmatched_keys(self) -> list[str]:
        return [k for r in self.loras for k in r.unmatched]

    def __str__(self) -> str:
        return "\n".join(r.summary() for r in self.loras)


@dataclass
class _Factor:
    down: torch.Tensor      # (rank, in), as read
    up: torch.Tensor        # (out, rank), as read
    weight: float           # strength * alpha / rank


@dataclass
class _Fused:
    original: torch.Tensor  # CPU copy of the weight before any LoRA
    factors: list[_Factor] = field(default_factory=list)


@dataclass
class _LayerMerger:
    """LoRA-Fusion for one layer: the patcher's merger for it, run in the patcher's compute place."""
    patcher: nn.Module
    merger: nn.Module

    def __call__(self, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
        device, dtype = compute_place(self.patcher)
        return self.merger(base.to(device, dtype), loras.to(device, dtype)).to(base.device, base.dtype)


@dataclass
class _Merger:
    """The enabled LoRA-Fusion patcher (enable_lora_merger): its merger per FluxCore layer."""
    patcher: nn.Module
    layers: dict[str, _LayerMerger]


class _LoraHook:
    """Forward hook of one nn.Linear: adds each LoRA's low-rank path to the layer's output, or, with a merger
    (LoRA-Fusion), hands the base output and each LoRA's output to it."""

    def __init__(self, merger: _LayerMerger | None = None):
        self.factors: list[_Factor] = []
        self.handle = None
        self.merger = merger
        self._cache: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, factor: _Factor) -> None:
        self.factors.append(factor)
        self._cache.clear()

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        key = (x.device, x.dtype)
        mats = self._cache.get(key)
        if mats is None:  # the LoRA in compute precision on the compute device, made once per place
            mats = [(f.down.to(x.device, x.dtype), (f.up.float() * f.weight).to(x.device, x.dtype))
                    for f in self.factors]
            self._cache[key] = mats
        if self.merger is not None:
            loras = torch.stack([nn.functional.linear(nn.functional.linear(x, down), up) for down, up in mats])
            return self.merger(output, loras)
        for down, up in mats:
            output = output + nn.functional.linear(nn.functional.linear(x, down), up).to(output.dtype)
        return output


@dataclass
class _State:
    fused: dict[str, _Fused] = field(default_factory=dict)
    hooks: dict[str, _LoraHook] = field(default_factory=dict)
    loaded: list[LoraSourceReport] = field(default_factory=list)
    merger: _Merger | None = None   # LoRA-Fusion (enable_lora_merger); kept by clear_lora, as in DiffSynth


def load_lora(dit: nn.Module, source: LoraSource | Sequence[LoraSource], alpha: float | Sequence[float] = 1.0,
              hotload: bool | None = None) -> LoraReport:
    """Apply one LoRA or several (a list) to `dit`, each with its strength (`alpha`: one value for all, or
    one per source). Sources: a file path, a folder holding one LoRA file, a state dict, or a parsed
    `lora_tools.LoraFile`. Every source is read and checked before any weight changes.
    LoRAs loaded by successive calls stack; `clear_lora` removes them all."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise LoraError("load_lora: no LoRA source given.")
    strengths = [float(a) for a in alpha] if isinstance(alpha, (list, tuple)) else [float(alpha)] * len(sources)
    if len(strengths) != len(sources):
        raise LoraError(f"load_lora: {len(sources)} LoRA sources but {len(strengths)} strengths in alpha.")
    linears = _linears(dit)
    loras = [read_lora_for(dit, s) for s in sources]

    hook_reason = _hook_reason(dit, [linears[n] for lora in loras for n in lora.layers])
    merging = _merger(dit) is not None
    if merging and hotload is not None and not hotload:
        raise LoraError("load_lora(hotload=False): the LoRA merger is enabled (enable_lora_merger), and it merges "
                        "hooked LoRAs only: load with hotload=True (or None), or call disable_lora_merger first.")
    use_hooks = (bool(hook_reason) or merging) if hotload is None else bool(hotload)
    if not use_hooks:
        _check_fusable([linears[n] for lora in loras for n in lora.layers])
    mode = "hook" if use_hooks else "fused"

    record = state_of(dit)
    if record.lora is None:
        record.lora = _State()
    state = record.lora
    reports = []
    for lora, strength in zip(loras, strengths):
        for name, layer in lora.layers.items():
            factor = _Factor(layer.down, layer.up, strength * layer.scale)
            (_add_hook if use_hooks else _fuse)(state, name, linears[name], factor)
        report = LoraSourceReport(lora.source, lora.format, strength, mode, lora.matched(), dict(lora.unmatched),
                                  list(lora.skipped_keys), list(lora.notes))
        state.loaded.append(report)
        reports.append(report)
        _warn_unmatched(lora)
        _warn_architecture(dit, lora)
        if merging:
            _warn_unmerged(lora, state.merger)
    return LoraReport(mode, reports)


def clear_lora(dit: nn.Module) -> None:
    """Remove every LoRA: hooks detached, fused layers given back their original weights (bit-exact while
    the layer's storage dtype and device are unchanged since the LoRA was fused). An enabled LoRA merger stays
    enabled for the LoRAs loaded next (DiffSynth's clear_lora keeps it too); `disable_lora_merger` turns it off."""
    state: _State | None = _lora_state(dit)
    if state is None:
        return
    for hook in state.hooks.values():
        hook.handle.remove()
    with torch.no_grad():
        for name, entry in state.fused.items():
            weight = dit.get_submodule(name).weight
            weight.copy_(entry.original.to(weight.device))
    state_of(dit).lora = _State(merger=state.merger) if state.merger is not None else None


def loaded_loras(dit: nn.Module) -> list[LoraSourceReport]:
    """What `load_lora` has applied to `dit` since the last `clear_lora`, in order."""
    state = _lora_state(dit)
    return list(state.loaded) if state else []


def _lora_state(dit: nn.Module) -> "_State | None":
    record = peek_state(dit)
    return record.lora if record is not None else None


# ---------------------------------------------------------------------------------------------------------

def read_lora_for(dit: nn.Module | Mapping[str, tuple[int, int]], source: LoraSource) -> LoraFile:
    """Read and check one LoRA against `dit`'s layers without applying it (a LoRA matching nothing, or made for
    another model size, is refused here); `load_lora` accepts the result as a source. `dit` may also be the layer
    shapes themselves ({FluxCore layer: (out, in)}: a model keyed by DiT layers, such as the LoRA-Encoder)."""
    if isinstance(dit, Mapping):
        return _read(source, dict(dit))
    shapes = {name: (m.out_features, m.in_features) for name, m in _linears(dit).items()}
    return _read(source, shapes)


def _linears(dit: nn.Module) -> dict[str, nn.Linear]:
    """The DiT's Linear layers by name; a layer peft wrapped (the trainer's own LoRA) under its own name, not peft's
    `<name>.base_layer`, so LoRAs are read and applied to a DiT being LoRA-trained too."""
    return {name.removesuffix(".base_layer"): m for name, m in dit.named_modules() if isinstance(m, nn.Linear)}


def _read(source: LoraSource, shapes: dict[str, tuple[int, int]]) -> LoraFile:
    if isinstance(source, LoraFile):
        return _fit(source, shapes)
    if isinstance(source, Mapping):
        return parse_lora(dict(source), None, shapes, source="(state dict)")
    files = checkpoint_files(source)
    tensors = {k: v.load() for k, v in open_state_dict(files).items()}
    metadata: dict[str, str] = {}
    for f in files:
        if f.suffix.lower() == ".safetensors":
            metadata.update(safetensors_metadata(f))
    return parse_lora(tensors, metadata, shapes, source=str(Path(source)))


def _fit(lora: LoraFile, shapes: dict[str, tuple[int, int]]) -> LoraFile:
    """A LoraFile parsed without this model's shapes: keep the layers it has, check their sizes."""
    layers, unmatched = {}, dict(lora.unmatched)
    for name, layer in lora.layers.items():
        if name not in shapes:
            unmatched.update({k: f"this model has no layer {name}" for k in layer.source_keys})
        elif layer.shape != tuple(shapes[name]):
            raise LoraShapeError(f"{lora.source or 'LoRA'}: {', '.join(layer.source_keys)}: LoRA delta has shape "
                                 f"{layer.shape} but the model's {name} weight is {tuple(shapes[name])}; this LoRA "
                                 f"was made for a different model.")
        else:
            layers[name] = layer
    if not layers:
        raise LoraError(f"{lora.source or 'LoRA'}: none of its {len(lora.layers)} layers exists in this model.")
    return LoraFile(layers, lora.format, unmatched, lora.skipped_keys, lora.metadata, lora.notes, lora.source)


def _offloaded(module: nn.Module) -> bool:
    state = peek_state(module)
    return state is not None and state.offloaded


def _hook_reason(dit: nn.Module, modules: list[nn.Module]) -> str:
    if _offloaded(dit):
        return "the model is offloaded"
    for m in modules:
        if _offloaded(m):
            return "a layer is offloaded"
        if m.weight.dtype in FLOAT8_DTYPES:
            return f"weights are stored in {m.weight.dtype}"
        if not m.weight.is_floating_point():
            return "weights are stored block-quantized (GGUF)"
        if m.weight.is_meta:
            return "weights are on the meta device"
    return ""


def _check_fusable(modules: list[nn.Module]) -> None:
    refusal = next((r for r in map(fuse_refusal, modules) if r), None)
    if refusal:
        raise LoraError(refusal)
    for m in modules:
        if m.weight.is_meta:
            raise LoraError("load_lora(hotload=False): the DiT's weights are on the meta device (not loaded "
                            "or offloaded), so a LoRA cannot be fused into them; use hotload=True or None.")
        if not m.weight.is_floating_point():
            raise LoraError("load_lora(hotload=False): the DiT's weights are stored block-quantized (a GGUF file), "
                            "so a LoRA cannot be fused into them; use hotload=True or None (hook mode).")
    if any(m.weight.dtype in FLOAT8_DTYPES for m in modules):
        warnings.warn("load_lora(hotload=False) fuses into float8-stored weights, which rounds most of a LoRA's "
                      "delta away; hotload=None (hook mode) keeps the LoRA in compute precision.",
                      UserWarning, stacklevel=3)


def _fuse(state: _State, name: str, module: nn.Linear, factor: _Factor) -> None:
    entry = state.fused.get(name)
    if entry is None:
        entry = _Fused(module.weight.detach().to("cpu", copy=True))
        state.fused[name] = entry
    entry.factors.append(factor)
    weight = module.weight
    with torch.no_grad():
        total = entry.original.to(weight.device, torch.float32, copy=True)
        for f in entry.factors:
            up = f.up.to(weight.device, torch.float32)
            down = f.down.to(weight.device, torch.float32)
            total += (up @ down) * f.weight
        weight.copy_(total.to(weight.dtype))


def _add_hook(state: _State, name: str, module: nn.Linear, factor: _Factor) -> None:
    hook = state.hooks.get(name)
    if hook is None:
        hook = _LoraHook(state.merger.layers.get(name) if state.merger is not None else None)
        hook.handle = module.register_forward_hook(hook)
        state.hooks[name] = hook
    hook.add(factor)


def _warn_unmatched(lora: LoraFile) -> None:
    where = lora.source or "LoRA"
    if lora.unmatched:
        listed = [f"{k} ({why})" for k, why in list(lora.unmatched.items())[:_MAX_LISTED]]
        more = len(lora.unmatched) - len(listed)
        looks = describe_foreign(lora.unmatched)
        hint = f" The unmatched keys look like {looks}." if "not a FLUX" in looks else ""
        warnings.warn(f"{where}: {len(lora.unmatched)} keys matched no layer of this DiT and were NOT applied "
                      f"({len(lora.layers)} layers were): " + "; ".join(listed)
                      + (f"; ... and {more} more (all in the LoraReport)" if more > 0 else "") + "." + hint,
                      LoraKeyWarning, stacklevel=3)
    if lora.skipped_keys:
        warnings.warn(f"{where}: {len(lora.skipped_keys)} text-encoder keys (e.g. {lora.skipped_keys[0]}) were "
                      f"skipped: FluxCore applies LoRAs to the DiT only.", LoraKeyWarning, stacklevel=3)


def architecture_mismatch(architecture: str, guidance_embed: bool) -> str | None:
    """Why a LoRA made for `architecture` (its `modelspec.architecture`, e.g. "flux-1-dev/lora") does not fit a
    FLUX.1 DiT with (dev, Kontext, Krea) or without (schnell) a guidance embedder; None when it fits or the
    string does not tell ("flux-1/lora")."""
    base = architecture.strip().lower().split("/")[0]
    if base == "flux-1-dev" and not guidance_embed:
        return "a FLUX.1-dev LoRA on a DiT without guidance_in (schnell-type)"
    if base == "flux-1-schnell" and guidance_embed:
        return "a FLUX.1-schnell LoRA on a DiT with guidance_in (dev-type)"
    if not base.startswith("flux-1"):
        return "a LoRA for another model than FLUX.1"
    return None


def _warn_architecture(dit: nn.Module, lora: LoraFile) -> None:
    architecture = (lora.metadata or {}).get(MODELSPEC_ARCHITECTURE)
    params = getattr(dit, "params", None)
    if not architecture or params is None:
        return
    why = architecture_mismatch(architecture, bool(params.guidance_embed))
    if why is None:
        return
    model = "FLUX.1-dev-type DiT (guidance_in)" if params.guidance_embed else "FLUX.1-schnell-type DiT (no guidance_in)"
    warnings.warn(f"{lora.source or 'LoRA'}: its metadata says {MODELSPEC_ARCHITECTURE}={architecture!r}, but the "
                  f"model is a {model}: {why}. It was applied; expect a weak or broken effect, and pick a LoRA made "
                  f"for this model.", LoraArchitectureWarning, stacklevel=3)


class LoraMergerWarning(UserWarning):
    """Hooked LoRA layers that the enabled LoRA merger has no merger for: their LoRAs are summed."""


def enable_lora_merger(dit: nn.Module, patcher: nn.Module) -> None:
    """LoRA-Fusion (DiffSynth-Studio's `enable_lora_merger`): on every layer the patcher has a merger for
    (flux_core.models.lora_patcher, its 304 sites in FLUX.1), the hooked LoRAs are combined by that merger instead
    of summed, for the LoRAs already hooked and those loaded later (`load_lora` then hooks: hotload=None picks hook
    mode, hotload=False is refused). LoRAs on other layers (img_in, final_layer, ...) are summed, as in DiffSynth,
    with a LoraMergerWarning naming them. Fused LoRAs cannot be merged: enabling it while any is fused is refused.
    The patcher must be made for this DiT (the same blocks and widths). `disable_lora_merger` turns it off."""
    from .models.lora_patcher import FluxLoraPatcher
    from .models.lora_sites import dit_lora_sites, site_mismatch
    if not isinstance(patcher, FluxLoraPatcher):
        raise TypeError(f"enable_lora_merger: patcher is a {type(patcher).__name__}; pass the LoRA-Fusion model "
                        f"(DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev, loaded by load_model or from_pretrained).")
    problems = site_mismatch(patcher.sites, dit_lora_sites(dit), "patcher", out_only=True)
    if problems:
        raise LoraShapeError("enable_lora_merger: the LoRA-Fusion patcher does not fit this DiT: " + "; ".join(problems)
                             + ". It was made for a model of another size; use the patcher made for this DiT.")
    record = state_of(dit)
    if record.lora is None:
        record.lora = _State()
    state: _State = record.lora
    if state.fused:
        names = sorted(state.fused)
        raise LoraError(f"enable_lora_merger: {len(names)} layers hold fused LoRAs (e.g. {', '.join(names[:3])}), "
                        f"which cannot be merged: the merger needs each LoRA's own output. Call clear_lora and load "
                        f"the LoRAs again with hotload=True.")
    state.merger = _Merger(patcher, {s.layer: _LayerMerger(patcher, patcher.merger(s)) for s in patcher.sites})
    for name, hook in state.hooks.items():
        hook.merger = state.merger.layers.get(name)
    unmerged = sorted(name for name, hook in state.hooks.items() if hook.merger is None)
    if unmerged:
        _warn_unmerged_layers(unmerged)


def disable_lora_merger(dit: nn.Module) -> None:
    """Back to the plain sum of hooked LoRAs (the LoRAs stay loaded)."""
    state = _lora_state(dit)
    if state is None or state.merger is None:
        return
    state.merger = None
    for hook in state.hooks.values():
        hook.merger = None


def lora_merger_enabled(dit: nn.Module) -> bool:
    return _merger(dit) is not None


def _merger(dit: nn.Module) -> _Merger | None:
    state = _lora_state(dit)
    return state.merger if state is not None else None


def _warn_unmerged(lora: LoraFile, merger: _Merger) -> None:
    unmerged = sorted(name for name in lora.layers if name not in merger.layers)
    if unmerged:
        _warn_unmerged_layers(unmerged, lora.source or "LoRA")


def _warn_unmerged_layers(names: list[str], where: str = "LoRA merger") -> None:
    listed = ", ".join(names[:_MAX_LISTED]) + (f", ... ({len(names) - _MAX_LISTED} more)"
                                               if len(names) > _MAX_LISTED else "")
    warnings.warn(f"{where}: {len(names)} hooked layers have no LoRA-Fusion merger (not among its LoRA sites): "
                  f"{listed}; their LoRAs are summed, as DiffSynth-Studio does.", LoraMergerWarning, stacklevel=3)
