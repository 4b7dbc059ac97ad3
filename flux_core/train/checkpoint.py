"""Resumable training states, written so that a kill at any moment leaves the latest complete one usable.

    <output_path>/checkpoints/
        latest                  text file naming the newest complete state ("step-120")
        step-120/
            trainable.safetensors   the trained parameters, exact (LoRA A/B in float32, or the whole DiT)
            optimizer.pt            AdamW state (loaded with weights_only=True)
            lr_scheduler.pt
            state.json              step, epoch, place in the epoch's data order, settings that must match

A state is written into a hidden temporary folder, each file flushed to disk, then the folder is renamed to
its final name, and only then is `latest` replaced (write a temp file, fsync, os.replace). Older states are
deleted after that. A crash before the rename leaves only a temp folder (removed at the next start or save,
run_folder.py); a crash between the rename and the pointer update leaves `latest` at the previous state.

`--resume` verifies a state before using it (every tensor of the safetensors file read, the optimizer and
scheduler states loaded, state.json parsed) and falls back to the newest complete state, naming each corrupt
one it passes over; when states exist but none is usable it stops with an error, never starting afresh.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_tools.io import atomic_write

from .args import TrainError
from .run_folder import CHECKPOINTS, remove_stale_temps

LATEST = "latest"
FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "state.json")


def checkpoints_dir(output_path: str | os.PathLike) -> Path:
    return Path(output_path) / CHECKPOINTS


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(output_path: str | os.PathLike, trainable: dict[str, torch.Tensor], optimizer_state: dict,
               scheduler_state: dict, state: dict, keep: int = 1) -> Path:
    """Write one resumable state atomically and point `latest` at it; returns its folder."""
    root = checkpoints_dir(output_path)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    remove_stale_temps(Path(output_path))
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / FILES[0]))
    torch.save(optimizer_state, tmp / FILES[1])
    torch.save(scheduler_state, tmp / FILES[2])
    (tmp / FILES[3]).write_text(json.dumps({**state, "saved_at": time.time()}, indent=1), encoding="utf-8")
    for f in FILES:
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved before (a resumed run reached it again): replace it
        old = root / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    _write_pointer(root, name)
    _prune(root, keep, name)
    return final


def _write_pointer(root: Path, name: str) -> None:
    atomic_write(root / LATEST, lambda tmp: tmp.write_text(name + "\n", encoding="utf-8"))
    _fsync_dir(root)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _prune(root: Path, keep: int, current: str) -> None:
    for old in state_folders(root.parent)[keep:] if keep > 0 else []:  # newest first
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


class CorruptCheckpoint(Exception):
    """A state folder that cannot be resumed from; the message says which file and why."""


@dataclass
class TrainingState:
    folder: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    state: dict                                   # state.json: step, epoch, position, weights, settings
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # newer states that were corrupt, and why


def load_state(folder: Path) -> TrainingState:
    """Read and verify every file of a state folder: the safetensors header and all its tensors, the optimizer
    and scheduler states (torch.load with weights_only=True), state.json (UTF-8 JSON with the step, epoch and
    place in the epoch). Raises CorruptCheckpoint naming the first bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorruptCheckpoint(f"{folder}: no such folder")
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise CorruptCheckpoint(f"{folder}: missing {', '.join(missing)}")
    try:
        trainable = load_file(str(folder / FILES[0]))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
        raise CorruptCheckpoint(f"{folder / FILES[0]}: not a complete safetensors file ({e})") from None
    pickled = []
    for name in FILES[1:3]:
        try:
            obj = torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means the file is damaged
            raise CorruptCheckpoint(f"{folder / name}: cannot be loaded ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise CorruptCheckpoint(f"{folder / name}: holds a {type(obj).__name__}, not a state dict")
        pickled.append(obj)
    if not {"state", "param_groups"} <= set(pickled[0]):
        raise CorruptCheckpoint(f"{folder / FILES[1]}: not an optimizer state (no 'state'/'param_groups')")
    try:
        state = json.loads((folder / FILES[3]).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpoint(f"{folder / FILES[3]}: not UTF-8 JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "epoch", "position")) \
            or not isinstance(state.get("weights"), str):
        raise CorruptCheckpoint(f"{folder / FILES[3]}: lacks the step, epoch, position or weights entry")
    return TrainingState(folder, trainable, pickled[0], pickled[1], state)


def state_folders(output_path: str | os.PathLike) -> list[Path]:
    """The state folders of a run, newest first."""
    root = checkpoints_dir(output_path)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of, reverse=True)


def _pointer_target(root: Path) -> tuple[Path | None, str | None]:
    """(folder `latest` names, None) or (None, why it names none usable) or (None, None) when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None, None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{pointer}: unreadable ({e})"
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None, f"{pointer}: names no checkpoint folder ({name!r})"
    return root / name, None


def find_resumable(output_path: str | os.PathLike, resume: str) -> TrainingState | None:
    """The state --resume continues from, verified. "latest": the folder `latest` names, else (it is missing
    or corrupt) the newest complete state, with the corrupt ones it passed over in `skipped`; None when the
    run has no state at all. A folder: that one, or TrainError saying what is wrong with it."""
    if resume != "latest":
        try:
            return load_state(Path(resume))
        except CorruptCheckpoint as e:
            raise TrainError(f"--resume {resume}: not a usable training state: {e}. Give another checkpoint folder, "
                             f"or --resume alone for the newest complete one in --output_path.") from None
    root = checkpoints_dir(output_path)
    target, pointer_problem = _pointer_target(root)
    candidates = ([target] if target is not None else []) + [p for p in state_folders(output_path) if p != target]
    skipped: list[tuple[Path, str]] = []
    if pointer_problem:
        skipped.append((root / LATEST, pointer_problem))
    for folder in candidates:
        try:
            loaded = load_state(folder)
        except CorruptCheckpoint as e:
            skipped.append((folder, str(e)))
            continue
        loaded.skipped = skipped
        return loaded
    if candidates:
        listed = "; ".join(f"{folder.name}: {why}" for folder, why in skipped)
        raise TrainError(f"--resume: no usable checkpoint in {root} ({listed}). Start again with --overwrite "
                         f"(deletes them) or with a new --output_path.")
    return None
