"""`load_model`: recognise a FLUX component by its key signature and load it without a second copy.

Every kind of model (DiT, VAE, CLIP-L, T5) is a `ModelKind`: a `select` that finds that kind's keys in a state
dict (any wrapper prefix, any published layout) and returns them under our canonical names, and a `build` that
makes the module on the meta device from the canonical shapes. Loading then reads, casts and assigns one
tensor at a time (`load_state_dict(assign=True)`), so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..model_state import state_of
from ..quantized import QuantizedLinear
from ..vram import storage_dtype
from .controlnet_kind import CONTROLNET_KIND, describe_unsupported_controlnet
from .dit_kind import DIT_KIND
from .files import CheckpointError, checkpoint_files, open_state_dict
from .image_encoder_kind import IMAGE_ENCODER_KIND
from .infiniteyou_kind import INFINITEYOU_KIND
from .ipadapter_kind import IPADAPTER_KIND
from .lora_encoder_kind import LORA_ENCODER_KIND
from .lora_patcher_kind import LORA_PATCHER_KIND
from .nexus_gen_kind import NEXUS_GEN_ADAPTER_KIND, NEXUS_GEN_KIND, NEXUS_GEN_MERGER_KIND
from .qwen_vl_kind import QWEN_VL_KIND
from .step1x_connector_kind import STEP1X_CONNECTOR_KIND
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor
from .text_kinds import CLIP_KIND, T5_KIND
from .vae_kind import VAE_KIND

PathLike = str | os.PathLike


# A load shows a progress bar (progress=None) when it reads more than this: large models take seconds to minutes.
PROGRESS_MIN_BYTES = 256 * 2**20

# Every kind load_model recognises, in the order detection tries them. The ControlNet goes first: its trunk has
# DiT key names (the DiT kind also refuses a state dict with ControlNet heads).
# Nexus-Gen's autoregressive model is a Qwen2.5-VL with more heads: it goes before the plain Qwen2.5-VL.
KINDS: tuple[ModelKind, ...] = (CONTROLNET_KIND, DIT_KIND, VAE_KIND, CLIP_KIND, T5_KIND, IPADAPTER_KIND,
                                IMAGE_ENCODER_KIND, INFINITEYOU_KIND, LORA_ENCODER_KIND, LORA_PATCHER_KIND,
                                NEXUS_GEN_KIND, NEXUS_GEN_ADAPTER_KIND, NEXUS_GEN_MERGER_KIND, QWEN_VL_KIND,
                                STEP1X_CONNECTOR_KIND)


@dataclass(frozen=True)
class Detected:
    kind: ModelKind
    layout: str
    state_dict: StateDict


def detect(state_dict: Mapping[str, LazyTensor]) -> list[Detected]:
    """Every kind of FLUX component found in a state dict (a ComfyUI all-in-one checkpoint holds several)."""
    found = []
    for kind in KINDS:
        hit = kind.select(state_dict)
        if hit is not None:
            found.append(Detected(kind, hit[0], hit[1]))
    return found


def describe_source(source: PathLike | Sequence[PathLike]) -> str:
    if isinstance(source, (list, tuple)):
        return f"{Path(source[0])} (+{len(source) - 1} more)" if len(source) > 1 else str(Path(source[0]))
    return str(Path(source))


def read_config_json(source: PathLike | Sequence[PathLike]) -> dict:
    """`config.json` beside the weights (diffusers folders), or {}."""
    first = Path(source[0] if isinstance(source, (list, tuple)) else source)
    folder = first if first.is_dir() else first.parent
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}).") from None


def config_json_for(kind: ModelKind, config: dict) -> dict:
    """The config.json beside the weights if it describes `kind`'s model, else {}."""
    return config if kind.reads_config is None or kind.reads_config(config) else {}


def load_model(source: PathLike | Sequence[PathLike], config: Mapping | None = None,
               torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               kind: str | None = None, weight_dtype: torch.dtype | None = None,
               progress: bool | None = None) -> nn.Module:
    """Load one FLUX component from a file, a list of shard files or a folder.

    The kind (DiT / VAE / CLIP-L / T5) and layout are detected from key names and shapes; `kind` states what
    the caller expects and turns a wrong file into a clear error. `config` overrides what the shapes and a
    diffusers `config.json` say. Floating-point weights are cast to `torch_dtype` (fp8-stored files included);
    with `weight_dtype` (FP8 storage: torch.float8_e4m3fn), weight matrices are stored in it instead, while
    biases and norm scales keep `torch_dtype` (see flux_core.vram: such a model computes through a VRAMManager).
    GGUF files keep their block-quantized weight matrices quantized (flux_core.quantized), computed in `torch_dtype`.
    `progress`: a progress bar on stderr while the weights are read; None shows it for models over 256 MiB.
    """
    found = _detect_source(source)
    where = describe_source(source)
    if kind is not None:
        match = [d for d in found if d.kind.name == kind]
        if not match:
            wanted = next((k.title for k in KINDS if k.name == kind), kind)
            raise CheckpointError(f"{where}: expected a {wanted}, but {_looks_like(found)}.")
        chosen = match[0]
    elif len(found) == 1:
        chosen = found[0]
    else:
        raise CheckpointError(f"{where}: holds several components ({', '.join(d.kind.name for d in found)}); "
                              f"pass kind= one of them, or use load_models() to load them all.")
    overrides = {**config_json_for(chosen.kind, read_config_json(source)), **dict(config or {})}
    return _build_and_load(chosen, overrides, torch_dtype, device, where, weight_dtype, progress)


def load_models(source: PathLike | Sequence[PathLike], torch_dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "cpu", weight_dtype: torch.dtype | None = None,
                progress: bool | None = None) -> dict[str, nn.Module]:
    """Every component a file holds, by kind name (for all-in-one checkpoints)."""
    where = describe_source(source)
    overrides = read_config_json(source)
    return {d.kind.name: _build_and_load(d, config_json_for(d.kind, overrides), torch_dtype, device, where,
                                         weight_dtype, progress)
            for d in _detect_source(source)}


def _detect_source(source) -> list[Detected]:
    files = checkpoint_files(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / "model_index.json").is_file():
        raise CheckpointError(
            f"{source}: is a diffusers pipeline folder; give one component folder (transformer/, vae/, "
            f"text_encoder/, text_encoder_2/) to load_model, or the whole folder to FluxImagePipeline.from_pretrained.")
    return detect_components_of(open_state_dict(files), describe_source(source))


def detect_components_of(state_dict: Mapping[str, LazyTensor], where: str) -> list[Detected]:
    """`detect`, refusing a state dict that holds no FLUX component with what it looks like instead."""
    found = detect(state_dict)
    if not found:
        unsupported = describe_unsupported_controlnet(state_dict)
        if unsupported:
            raise CheckpointError(f"{where}: this is {unsupported}")
        sd_keys = list(state_dict)[:5]
        kinds = ", ".join(k.title for k in KINDS)
        raise CheckpointError(f"{where}: not a FLUX component (none of: {kinds}); its first keys are {sd_keys}. "
                              f"Check that you picked the right file.")
    return found


def _looks_like(found: list[Detected]) -> str:
    if not found:
        return "it is not a FLUX component at all"
    return "it looks like a " + " + ".join(d.kind.title for d in found)


def _build_and_load(d: Detected, overrides: dict, torch_dtype: torch.dtype, device, where: str,
                    weight_dtype: torch.dtype | None = None, progress: bool | None = None) -> nn.Module:
    try:
        with torch.device("meta"):
            module = d.kind.build(d.state_dict, overrides)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build a {d.kind.title} from its {d.layout}-layout keys: {e}") from None
    keep_quantized(module, d.state_dict)
    assign_weights(module, d.state_dict, torch_dtype, device, f"{where} ({d.kind.title}, {d.layout} layout)",
                   weight_dtype, progress, d.kind.title)
    if d.kind.finalize is not None:
        d.kind.finalize(module)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{where}: no weights for {leftover[:5]} of the {d.kind.title}.")
    module.eval().requires_grad_(False)
    state_of(module).layout = d.layout
    return module


def cast_weight(t: torch.Tensor, torch_dtype: torch.dtype, device, weight_dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """Floating-point tensors (fp8 storage included) go to `torch_dtype`, weight matrices to `weight_dtype` when
    given; integer buffers keep their dtype."""
    return t.to(device=device, dtype=storage_dtype(t, weight_dtype, torch_dtype))


def assign_weights(module: nn.Module, sd: Mapping[str, LazyTensor], torch_dtype: torch.dtype, device,
                   where: str, weight_dtype: torch.dtype | None = None, progress: bool | None = None,
                   title: str = "") -> None:
    """Read each expected tensor once, cast it, and assign it into `module` (built on the meta device).
    `progress`: a progress bar over the bytes read, on stderr; None shows it for models over PROGRESS_MIN_BYTES."""
    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} weight(s) missing, e.g. {missing[:5]}. The file is "
                              f"incomplete (a missing shard?) or a different model variant.")
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[:5]}. "
                              f"This is a different model variant than the one detected.")
    for name, target in expected.items():
        stored = _kept_raw(sd[name], target)
        shape = sd[name].quantized.raw_shape if stored else sd[name].shape
        if tuple(shape) != tuple(target.shape):
            kept = " (as stored quantized blocks)" if stored else ""
            raise CheckpointError(f"{where}: '{name}' has shape {tuple(shape)}{kept} but the model "
                                  f"needs {tuple(target.shape)}.")
    loaded: dict[str, torch.Tensor] = {}
    by_source: dict[int, torch.Tensor] = {}  # tied weights (one LazyTensor, several names) load once
    total = sum({id(sd[n]): sd[n].nbytes() for n in expected}.values())
    show = total > PROGRESS_MIN_BYTES if progress is None else progress
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Loading {title or where}",
              file=sys.stderr, disable=not show) as bar:
        for name, target in expected.items():
            lazy = sd[name]
            if id(lazy) not in by_source:
                by_source[id(lazy)] = (lazy.quantized.read().to(device) if _kept_raw(lazy, target)
                                       else cast_weight(lazy.load(), torch_dtype, device, weight_dtype))
                bar.update(lazy.nbytes())
            loaded[name] = by_source[id(lazy)]
    module.load_state_dict(loaded, strict=True, assign=True)


def keep_quantized(module: nn.Module, sd: Mapping[str, LazyTensor]) -> None:
    """Make each nn.Linear whose weight is block-quantized in `sd` (a GGUF file) a QuantizedLinear, so that the
    weight stays in its blocks and is dequantized per call. Such layers are marked for LoRA hook mode: a LoRA
    cannot be fused into quantized blocks (flux_core.lora reads `state_of(layer).offloaded`)."""
    for name, lazy in sd.items():
        if lazy.quantized is None or not name.endswith(".weight"):
            continue
        owner_name = name[: -len(".weight")]
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            continue  # not a weight of this model: assign_weights names it
        if type(owner) is nn.Linear:
            replacement = QuantizedLinear.replacing(owner, lazy.quantized.qtype)
            parent_name, _, attr = owner_name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, replacement)
            state_of(replacement).offloaded = True


def _kept_raw(lazy: LazyTensor, target: torch.Tensor) -> bool:
    """Whether the loader assigns this tensor's raw blocks (a QuantizedLinear weight) rather than its values."""
    return lazy.quantized is not None and target.dtype == torch.uint8
