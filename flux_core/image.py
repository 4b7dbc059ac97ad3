"""Conversions between PIL images (and masks) and the tensors the models take."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_tools.io import atomic_write


def pil_to_tensor(image: Image.Image, name: str = "image") -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}. "
                        f"Open files with PIL.Image.open(path).convert('RGB').")
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image | torch.Tensor, name: str) -> torch.Tensor:
    """An inpaint mask as (1, 1, H, W) float32 in [0, 1] (1 = repaint): a PIL image (its RGB mean, as DiffSynth
    reads it) or a tensor (H, W), (1, H, W) or (1, 1, H, W) such as a ComfyUI MASK."""
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).mean(dim=-1)[None, None]
    if isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4) and all(s == 1 for s in mask.shape[:-2]):
        return mask.float().reshape(1, 1, *mask.shape[-2:]).clamp(0, 1)
    raise TypeError(f"{name} must be a PIL image or a (H, W) tensor in [0, 1] (one mask), got "
                    f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}.")



def mask_at_size(mask: Image.Image | torch.Tensor, width: int, height: int, name: str) -> torch.Tensor:
    """The mask resized to width x height, (1, 1, H, W) in [0, 1], with PIL's default (bicubic) resize, as DiffSynth
    resizes its PIL masks. A tensor mask (a ComfyUI MASK) is resized as its 8-bit picture (what LoadImage read it
    from), so a MASK and its PIL picture give the same pixels; torch's bicubic kernel differs from PIL's and would
    move edge pixels across one half."""
    if isinstance(mask, torch.Tensor):
        values = mask_to_tensor(mask, name)[0, 0]
        if values.shape == (height, width):
            return values[None, None]
        mask = Image.fromarray((values * 255).round().to(torch.uint8).numpy(), mode="L")
    return mask_to_tensor(mask if mask.size == (width, height) else mask.resize((width, height)), name)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> list of PIL images (rounded to uint8)."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def resize_to_multiple(image: Image.Image, multiple: int = 16) -> Image.Image:
    """Shrink to the nearest multiples of `multiple` below the current size (as diffusers does for references)."""
    w, h = image.size
    new_w, new_h = max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
    return image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.LANCZOS)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image atomically, in the format its extension names (.png, .jpg, .webp, ...)."""
    path = Path(path)
    image_format = saving_format(path)
    if image_format is None:
        raise ValueError(f"{path}: PIL cannot write {path.suffix!r} files; use .png, .jpg or .webp.")
    return atomic_write(path, lambda tmp: image.save(tmp, format=image_format))


def saving_format(path: str | Path) -> str | None:
    """The PIL format `save_image` writes for `path`'s extension, or None when PIL has no writer for it (it
    reads .psd, .pcd, .xpm, ... but cannot save them)."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())  # runs Image.init()
    return image_format if image_format in Image.SAVE else None
