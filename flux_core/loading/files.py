"""Reading checkpoint files into lazy state dicts.

safetensors files are parsed here directly (an 8-byte header length, a JSON header, then raw data) and
each tensor is read with plain file reads on demand. Not memory-mapping keeps the peak resident memory of a
load at "the model plus one tensor": a mapped file's touched pages would count as a second copy.

Accepted inputs: one file, a list of files (shards: the union of their keys), a folder holding
`*.safetensors` (with or without a `*.safetensors.index.json`). `.bin`/`.pt`/`.pth` files are read with
`torch.load(weights_only=True)` only, never unpickled freely. `.gguf` files (city96's GGUF DiTs) are read by
gguf_file.py, their quantized tensors kept in their block format.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from lora_tools.io import atomic_write

from .errors import CheckpointError
from .gguf_file import open_gguf
from .lazy import LazyTensor, file_range_reader, lazy_from_tensor

PathLike = str | os.PathLike

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_safetensors_header(path: PathLike) -> tuple[dict, int]:
    """Return (header dict, data offset), refusing files that are not safetensors or are cut short."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes); download it again.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 1 or header_len > min(size - 8, 100 * 2**20):
            raise CheckpointError(
                f"{path}: not a safetensors file (bad header length {header_len}). FluxCore reads .safetensors "
                f"checkpoints; convert other formats first, or check that the download is complete.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object).")
    data_start = 8 + header_len
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: the header describes {data_start + data_end} bytes but the file has {size}. "
            f"The download or copy was interrupted; fetch the file again.")
    return header, data_start


def safetensors_metadata(path: PathLike) -> dict[str, str]:
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def open_safetensors(path: PathLike) -> dict[str, LazyTensor]:
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    out: dict[str, LazyTensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype_name = info["dtype"]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {dtype_name}, which FluxCore cannot read.")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        out[key] = LazyTensor(shape, dtype, file_range_reader(path, data_start + begin, end - begin, shape, dtype),
                              f"{path.name}:{key}")
    for key, conf in _quantization_layers(header.get("__metadata__") or {}, path).items():
        out.setdefault(key, LazyTensor((len(conf),), torch.uint8, lambda c=conf: torch.tensor(list(c), dtype=torch.uint8),
                                       f"{path.name}:__metadata__:_quantization_metadata"))
    return out


def _quantization_layers(metadata: Mapping[str, str], path: Path) -> dict[str, bytes]:
    """ComfyUI's quantized files name each layer's format in the `_quantization_metadata` entry; as ComfyUI does,
    give it as a `<layer>.comfy_quant` tensor of UTF-8 JSON bytes (read by loading/scaled_fp8.py)."""
    raw = metadata.get("_quantization_metadata")
    if raw is None:
        return {}
    try:
        layers = json.loads(raw)["layers"]
        return {f"{layer}.comfy_quant": json.dumps(conf if isinstance(conf, dict) else {"format": conf}).encode()
                for layer, conf in layers.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable _quantization_metadata entry ({e}).") from None


def open_torch_file(path: PathLike) -> dict[str, LazyTensor]:
    """A `.bin`/`.pt` state dict, loaded with `weights_only=True` (no arbitrary unpickling)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never for a file we are given
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file: it holds pickled Python objects, "
                              f"not only tensors, and FluxCore never unpickles those (they can run code). Prefer "
                              f"the .safetensors release of this model.") from None
    except Exception as e:  # noqa: BLE001 - any other failure means: unreadable as a safe torch file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch weights file ({type(e).__name__}: {e}). "
                              f"Prefer the .safetensors release of this model.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors.")
    return {k: lazy_from_tensor(v, f"{path.name}:{k}") for k, v in _flatten(obj).items()}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def open_file(path: PathLike) -> dict[str, LazyTensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file.")
    if path.suffix.lower() in TORCH_PICKLE_SUFFIXES:
        return open_torch_file(path)
    if path.suffix.lower() == ".gguf":
        return open_gguf(path)
    return open_safetensors(path)


def checkpoint_files(source: PathLike | Sequence[PathLike]) -> list[Path]:
    """The weight files a source names: a file, a list of files, or a folder (following its shard index)."""
    if isinstance(source, (list, tuple)):
        files: list[Path] = []
        for s in source:
            files.extend(checkpoint_files(s))
        return files
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TORCH_PICKLE_SUFFIXES)
    if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors weights.")
    return files


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a valid shard index ({e}).") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard(s) {', '.join(missing)} listed in the index are missing from "
            f"{index_path.parent}; download all shards of this model.")
    return [index_path.parent / n for n in names]


def open_state_dict(source: PathLike | Sequence[PathLike]) -> dict[str, LazyTensor]:
    """Union of the lazy state dicts of every file the source names."""
    out: dict[str, LazyTensor] = {}
    for f in checkpoint_files(source):
        out.update(open_file(f))
    return out


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + rename): an interrupted save never leaves a broken file."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=dict(metadata or {})))


def strip_prefix(sd: Mapping[str, LazyTensor], prefixes: Iterable[str]) -> dict[str, LazyTensor]:
    """Keep the keys under the first of `prefixes` that any key carries, with the prefix removed.

    A ComfyUI full checkpoint holds `model.diffusion_model.*` beside VAE and text-encoder keys: taking the
    prefixed keys selects the DiT. With no prefix present the dict is returned as it is."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def rename_keys(sd: Mapping[str, LazyTensor], rules: Sequence[tuple[str, str]]) -> dict[str, LazyTensor]:
    """Rename every key by the first matching (regex, replacement) rule; keys no rule matches are kept."""
    out: dict[str, LazyTensor] = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out


def invert_rules(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The inverse of a table of simple renaming rules (`^literal(group)literal` -> `literal\\1literal`), so one
    table serves reading and writing. A rule of another shape raises (the table's author then writes it out)."""
    inverse = []
    for pattern, repl in rules:
        anchored_end = pattern.endswith("$")
        body = pattern[1:-1] if anchored_end else pattern[1:]
        if not pattern.startswith("^"):
            raise ValueError(f"cannot invert {pattern!r}: not anchored at the start")
        groups = re.findall(r"\(([^()]*)\)", body)
        refs = [int(n) for n in re.findall(r"\\(\d)", repl)]
        if refs != list(range(1, len(groups) + 1)):
            raise ValueError(f"cannot invert {pattern!r} -> {repl!r}: groups used out of order")
        parts = re.split(r"\\\d", repl)
        new_pattern = "^" + "".join(re.escape(part) + (f"({groups[i]})" if i < len(groups) else "")
                                    for i, part in enumerate(parts)) + ("$" if anchored_end else "")
        literal = re.split(r"\([^()]*\)", body)
        if any(re.search(r"[\^$*+?\[\]{}|]", re.sub(r"\\\.", "", part)) for part in literal):
            raise ValueError(f"cannot invert {pattern!r}: not a literal with groups")
        new_repl = "".join(part.replace("\\.", ".") + (f"\\{i + 1}" if i < len(groups) else "")
                           for i, part in enumerate(literal))
        inverse.append((new_pattern, new_repl))
    return inverse
