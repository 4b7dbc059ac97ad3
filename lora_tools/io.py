"""Reading and writing LoRA tensor files (safetensors; `.pt`/`.bin` read with `weights_only=True`).

lora_tools stays free of flux_core, so it carries these few lines itself; flux_core passes state dicts it
read with its own lazy reader. `atomic_write` is the project's one way to write a file safely: flux_core, the
trainer and the nodes use it too (lora_tools is the package every other one may import).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from .model import LoraError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything here means "not a plain tensor file"
            raise LoraError(f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {e}); "
                            f"prefer the .safetensors release of this LoRA.") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise LoraError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({e}); check that the download is complete.") from None
    return tensors, metadata


def write_state_dict(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: a temp file beside the target, then a rename, so an interrupted
    write never leaves a half-written LoRA under the real name."""
    from safetensors.torch import save_file

    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(_unshared(tensors), str(tmp), metadata=metadata))


TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, and setting it is not thread-safe);
    0o022 where /proc does not tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def temp_path(path: Path) -> Path:
    """The hidden temporary name `atomic_write` uses beside `path` (one per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` so that it is either the old file or the complete new one, never half written: `write(tmp)`
    fills a hidden temporary file beside it, which is flushed to disk and renamed over `path`. On any failure
    the temporary file is removed and the target is untouched. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # A new file's usual mode (0666 less the umask): safetensors creates its files 0600, which left LoRAs written
        # into a shared ComfyUI models folder unreadable to other users.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; split q/k/v parts share one down matrix or are views of
    one up matrix, so those are copied."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    return out
