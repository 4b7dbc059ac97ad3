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
deleted after that. A crash before the rename leaves only a temp folder (cleaned up by the next save);
a crash between the rename and the pointer update leaves `latest` at the previous complete state.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_tools.io import atomic_write

from .args import TrainError

LATEST = "latest"
FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "state.json")


def checkpoints_dir(output_path: str | os.PathLike) -> Path:
    return Path(output_path) / "checkpoints"


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
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    states = sorted((p for p in root.glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
    for old in states[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    if not all((folder / f).is_file() for f in FILES):
        return False
    try:
        json.loads((folder / FILES[3]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return True


def find_state(output_path: str | os.PathLike, resume: str) -> Path | None:
    """The state folder --resume names: "latest" (the pointer, else the newest complete state; None when the
    output folder has no state yet) or a folder."""
    if resume != "latest":
        folder = Path(resume)
        if not is_complete(folder):
            raise TrainError(f"--resume {folder}: not a complete training state (needs {', '.join(FILES)}).")
        return folder
    root = checkpoints_dir(output_path)
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(folder):
            return folder
    states = sorted((p for p in root.glob("step-*") if p.is_dir() and is_complete(p)), key=_step_of)
    return states[-1] if states else None


def load_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(trainable tensors, optimizer state, scheduler state, state.json) of a state folder."""
    trainable = load_file(str(folder / FILES[0]))
    optimizer_state = torch.load(folder / FILES[1], map_location="cpu", weights_only=True)
    scheduler_state = torch.load(folder / FILES[2], map_location="cpu", weights_only=True)
    state = json.loads((folder / FILES[3]).read_text(encoding="utf-8"))
    return trainable, optimizer_state, scheduler_state, state
