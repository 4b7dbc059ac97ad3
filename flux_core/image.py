"""Conversions between PIL images and the tensors the models take."""
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
