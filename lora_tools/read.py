"""Any FLUX.1 LoRA state dict -> the canonical `LoraFile`.

Each key is split into a module path and a role (down / up / alpha); the module path is looked up in every
naming scheme (kohya, OneTrainer, diffusers/PEFT, XLabs, DiffSynth, BFL names under any wrapper prefix); the
file's format is the scheme most of its modules use. Nothing is dropped silently: keys for text encoders go
to `skipped_keys`, every other key that does not become part of a layer goes to `unmatched` with the reason.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Mapping

import torch

from .detect import FORMAT_TITLES, describe_foreign, is_text_encoder_key
from .model import LoraFile, LoraFormatError, LoraShapeError
from .names import TABLES, Target, layer_suffix, part_sizes
from .parts import Piece, assemble, check_piece

# key -> (module path, role). PEFT may insert an adapter name: `lora_A.default.weight`.
_ROLES = [
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_\-]+)?\.weight$"), "up"),
    (re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora\d?)\.down\.weight$"), "down"),   # XLabs
    (re.compile(r"^(.+\.processor\.(?:qkv|proj)_lora\d?)\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]
# Wrappers around module names: PEFT's model wrapper, ComfyUI's model prefix, diffusers' component prefix,
# DiffSynth's pipeline attribute. Removed repeatedly, in any combination.
_WRAPPERS = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "pipe.dit.",
             "dit.", "unet.")
_DOTTED_SCHEMES = ("xlabs", "bfl", "diffusers", "diffsynth")
_PEFT_SCHEMES = ("diffusers", "bfl", "diffsynth")   # schemes whose alpha may live in PEFT's metadata


def split_key(key: str) -> tuple[str, str] | None:
    for regex, role in _ROLES:
        m = regex.match(key)
        if m:
            return m.group(1), role
    return None


def resolve(path: str) -> tuple[str, Target, str] | None:
    """(scheme, target, module name without wrappers) of a module path, or None if no FLUX layer has it."""
    for prefix, scheme in (("lora_unet_", "kohya"), ("lora_transformer_", "onetrainer")):
        if path.startswith(prefix):
            name = path[len(prefix):]
            target = TABLES[scheme].lookup(name)
            return (scheme, target, name) if target else None
    name = path
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    for scheme in _DOTTED_SCHEMES:
        target = TABLES[scheme].lookup(name)
        if target:
            return scheme, target, name
    return None


def parse_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               target_shapes: Mapping[str, tuple[int, int]] | None = None, source: str = "") -> LoraFile:
    """Read a LoRA state dict into canonical BFL-named layers.

    target_shapes: {BFL layer name: (out, in)} of the model it is meant for. With it, layers the model lacks
    are reported as unmatched, split q/k/v/MLP parts are laid out exactly, and a LoRA for another model size
    raises LoraShapeError. Without it (conversion), shapes come from the file itself.
    Raises LoraFormatError if no key matches a FLUX.1 DiT layer.
    """
    metadata = dict(metadata or {})
    where = source or "LoRA"
    unmatched: dict[str, str] = {}
    skipped: list[str] = []
    modules: dict[str, dict[str, str]] = {}
    for key in state_dict:
        if is_text_encoder_key(key):
            skipped.append(key)
            continue
        parsed = split_key(key)
        if parsed is None:
            unmatched[key] = "not a low-rank LoRA tensor (DoRA scale, bias/weight diff or LyCORIS tensors are not applied)"
            continue
        path, role = parsed
        roles = modules.setdefault(path, {})
        if role in roles:
            unmatched[key] = f"a second {role} tensor for module {path} (several adapters in one file)"
            continue
        roles[role] = key

    peft_config = _peft_config(metadata)
    pieces: list[Piece] = []
    for path, roles in modules.items():
        keys = tuple(roles[r] for r in ("down", "up", "alpha") if r in roles)
        hit = resolve(path)
        if hit is None:
            unmatched.update({k: "no FLUX.1 DiT layer has this name" for k in keys})
            continue
        if "down" not in roles or "up" not in roles:
            unmatched.update({k: "its lora_down/lora_up partner is missing" for k in keys})
            continue
        scheme, target, name = hit
        down, up = _matrix(state_dict[roles["down"]], roles["down"]), _matrix(state_dict[roles["up"]], roles["up"])
        if down.shape[0] != up.shape[1]:
            raise LoraShapeError(f"{where}: '{roles['down']}' {tuple(down.shape)} and '{roles['up']}' "
                                 f"{tuple(up.shape)} disagree on the rank; the file is damaged.")
        alpha = _alpha(scheme, name, state_dict.get(roles.get("alpha", "")), down.shape[0], peft_config)
        pieces.append(Piece(down, up, alpha, keys, target=target, scheme=scheme))

    if not pieces:
        raise LoraFormatError(f"{where}: no key matches a layer of the FLUX.1 DiT: the file looks like "
                              f"{describe_foreign(state_dict)}.")
    counts = Counter(p.scheme for p in pieces)
    fmt = counts.most_common(1)[0][0]
    notes = []
    if len(counts) > 1:
        notes.append("keys in several formats: " + ", ".join(f"{s} ({n})" for s, n in counts.most_common()))

    by_layer: dict[str, list[Piece]] = {}
    for p in sorted(pieces, key=lambda p: p.scheme != fmt):  # the file's own format wins a conflict
        by_layer.setdefault(p.target.name, []).append(p)

    layers = {}
    hints = _size_hints(pieces)
    for name, group in sorted(by_layer.items()):
        if target_shapes is not None and name not in target_shapes:
            unmatched.update({k: f"this model has no layer {name}" for p in group for k in p.source_keys})
            continue
        shape = tuple(target_shapes[name]) if target_shapes is not None else _infer_shape(name, group, hints, notes)
        sizes = part_sizes(name, shape)
        group = _drop_overlaps(group, len(sizes), unmatched)
        for p in group:
            check_piece(p, name, shape, sizes)
        layers[name] = assemble(name, group, sizes)
    if not layers:
        raise LoraFormatError(f"{where}: a {FORMAT_TITLES[fmt]} LoRA, but none of its layers exists in this "
                              f"model (e.g. {sorted(by_layer)[:3]}); it was made for a model with other blocks.")
    return LoraFile(layers, fmt, unmatched, skipped, metadata, notes, source)


def _matrix(t: torch.Tensor, key: str) -> torch.Tensor:
    if t.ndim == 4 and tuple(t.shape[2:]) == (1, 1):  # a 1x1-conv LoRA written for a Linear
        t = t[:, :, 0, 0]
    if t.ndim != 2:
        raise LoraShapeError(f"'{key}': a {t.ndim}-D tensor {tuple(t.shape)}; FLUX LoRA matrices are 2-D.")
    return t


def _alpha(scheme: str, name: str, alpha_tensor: torch.Tensor | None, rank: int, peft_config: dict | None) -> float:
    """Per-layer alpha: the layer's `.alpha` tensor; else PEFT's adapter metadata (lora_alpha/alpha_pattern);
    else alpha = rank (scale 1, the PEFT and XLabs convention). alpha 0 means rank, as in kohya's trainer."""
    if scheme == "xlabs":
        return float(rank)
    if alpha_tensor is not None:
        alpha = float(alpha_tensor.float().item())
        return alpha if alpha != 0 else float(rank)
    if peft_config is not None and scheme in _PEFT_SCHEMES:
        alpha = float(peft_config["lora_alpha"])
        for pattern, value in (peft_config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = float(value)
                break
        # rsLoRA scales by alpha / sqrt(rank); as alpha' / rank that is alpha' = alpha * sqrt(rank).
        return alpha * math.sqrt(rank) if peft_config.get("use_rslora") else alpha
    return float(rank)


def _peft_config(metadata: Mapping[str, str]) -> dict | None:
    """diffusers' `lora_adapter_metadata` (a JSON PEFT LoraConfig, keys prefixed `transformer.`), if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if any(k.startswith("transformer.") for k in config):
        config = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return config if "lora_alpha" in config else None


def _drop_overlaps(group: list[Piece], n_parts: int, unmatched: dict[str, str]) -> list[Piece]:
    """Keep one piece per part of a layer: a file holding the same layer twice (two formats) is not summed."""
    taken: set[int] = set()
    kept = []
    for p in group:
        parts = set(p.parts(n_parts))
        if parts & taken:
            unmatched.update({k: f"{p.target.name} is already given by other keys of this file" for k in p.source_keys})
            continue
        taken |= parts
        kept.append(p)
    return kept


def _size_hints(pieces: list[Piece]) -> dict[str, int]:
    """The MLP hidden size, read off whichever layers of the file reveal it (for `linear1` LoRAs that do
    not cover its MLP rows, when no model shape is given)."""
    for p in pieces:
        suffix = layer_suffix(p.target.name)
        if suffix == "linear1" and not p.target.whole and p.target.first == 3:
            return {"mlp": int(p.up.shape[0])}
        if suffix == "linear1" and p.target.whole:
            return {"mlp": int(p.up.shape[0]) - 3 * int(p.down.shape[1])}
        if suffix == "linear2":
            return {"mlp": int(p.down.shape[1]) - int(p.up.shape[0])}
        if suffix in ("img_mlp.0", "txt_mlp.0"):
            return {"mlp": int(p.up.shape[0])}
        if suffix in ("img_mlp.2", "txt_mlp.2"):
            return {"mlp": int(p.down.shape[1])}
    return {}


def _infer_shape(name: str, group: list[Piece], hints: dict[str, int], notes: list[str]) -> tuple[int, int]:
    whole = [p for p in group if p.target.whole]
    if whole:
        return int(whole[0].up.shape[0]), int(whole[0].down.shape[1])
    first = group[0]
    in_features = int(first.down.shape[1])
    if layer_suffix(name) == "linear1":
        mlp = next((int(p.up.shape[0]) for p in group if p.target.first == 3), None) or hints.get("mlp")
        if mlp is None:
            mlp = 4 * in_features
            note = f"MLP width of single-block linear1 not in the file; assumed FLUX's 4 x hidden = {mlp}"
            if note not in notes:
                notes.append(note)
        return 3 * in_features + mlp, in_features
    return 3 * (int(first.up.shape[0]) // first.target.count), in_features
