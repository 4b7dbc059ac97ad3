"""Reading a model's structure from its state dict's key names and shapes (config inference)."""
from __future__ import annotations

from typing import Mapping


def count_blocks(shapes: Mapping, prefix: str) -> int:
    """Number of numbered blocks under `prefix` ("double_blocks.", "encoder.layers."): the highest index + 1."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0
