"""GGUF checkpoints (city96's ComfyUI-GGUF format, the usual low-VRAM FLUX DiT files) as lazy state dicts.

The header is parsed with the ggml project's own reader (`gguf.GGUFReader`); tensor data is read later with
plain file reads, one tensor at a time, as for safetensors (files.py). Facts of the format, from city96's
loader.py: `general.architecture` is "flux" for a FLUX DiT (files converted by stable-diffusion.cpp carry none);
tensor names are the checkpoint's own (BFL names, perhaps under `model.diffusion_model.`); GGUF lists dimensions
innermost first, so the torch shape is the reverse, unless `comfy.gguf.orig_shape.<name>` gives the shape.

F32/F16/BF16 tensors are plain tensors. Block-quantized tensors (Q8_0, Q4_K, ...) come with `quantized` set:
reading them dequantizes, and the loader keeps a Linear's weight in its blocks instead (flux_core.quantized).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..quantized import BLOCK_FORMATS, dequantize, raw_shape
from .errors import CheckpointError
from .lazy import LazyTensor, QuantizedData, file_range_reader

# GGUF architectures holding a FLUX DiT: "flux", and none at all (stable-diffusion.cpp conversions).
FLUX_ARCHITECTURES = ("flux", None)
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def open_gguf(path: str | Path) -> dict[str, LazyTensor]:
    path = Path(path)
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in FLUX_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: a GGUF file of architecture {arch!r}. FluxCore reads GGUF FLUX DiT files (architecture "
            f"'flux', as city96's ComfyUI-GGUF converts them); load text encoders and VAEs from .safetensors.")
    out: dict[str, LazyTensor] = {}
    unsupported: dict[str, list[str]] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        orig = _field(reader, f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(int(v) for v in orig) if orig is not None else tuple(int(v) for v in reversed(t.shape.tolist()))
        source = f"{path.name}:{t.name}"
        offset, length = int(t.data_offset), int(t.n_bytes)
        if qtype in PLAIN_TYPES:
            dtype = PLAIN_TYPES[qtype]
            out[t.name] = LazyTensor(shape, dtype, file_range_reader(path, offset, length, shape, dtype), source)
        elif qtype in BLOCK_FORMATS:
            stored = raw_shape(shape, qtype)
            raw = file_range_reader(path, offset, length, stored, torch.uint8)
            out[t.name] = LazyTensor(shape, torch.float32, lambda r=raw, q=qtype, s=shape: dequantize(r(), q, s), source,
                                     QuantizedData(qtype, stored, raw))
        else:
            unsupported.setdefault(qtype, []).append(t.name)
    if unsupported:
        listed = "; ".join(f"{q}: {len(names)} tensor(s), e.g. {names[0]}" for q, names in unsupported.items())
        raise CheckpointError(f"{path}: tensor types FluxCore cannot dequantize ({listed}). Supported: F32, F16, "
                              f"{', '.join(BLOCK_FORMATS)}; pick one of those quantizations of the model.")
    return out


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means: not a (complete) GGUF file
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}). The download may be "
                              f"incomplete; fetch the file again.") from None


def _field(reader, name: str):
    """A metadata value: a string, or a list of numbers (the only kinds read here). Read through `parts`/`data`,
    which every gguf release since 0.10 has."""
    from gguf import GGUFValueType

    field = reader.get_field(name)
    if field is None:
        return None
    if field.types == [GGUFValueType.STRING]:
        return bytes(field.parts[field.data[-1]]).decode("utf-8")
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[-1]].tolist()[0]
