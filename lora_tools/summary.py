"""A human-readable account of a LoRA: format, ranks, alphas, blocks covered, what was left out."""
from __future__ import annotations

from collections import Counter

from .detect import FORMAT_TITLES
from .model import LoraFile
from .names import block_of


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def _counted(values: list) -> str:
    """'4' when all layers agree, else '2 (11 layers), 4 (25 layers)'."""
    counts = Counter(values)
    if len(counts) == 1:
        return f"{next(iter(counts)):g}"
    return ", ".join(f"{v:g} ({n} layers)" for v, n in sorted(counts.items()))


def describe_lora(lora: LoraFile, max_keys: int = 10) -> str:
    layers = lora.layers.values()
    double = sorted({b[1] for n in lora.layers if (b := block_of(n)) and b[0] == "double"})
    single = sorted({b[1] for n in lora.layers if (b := block_of(n)) and b[0] == "single"})
    other = sorted(n for n in lora.layers if block_of(n) is None)
    lines = [
        f"file:          {lora.source or '(state dict)'}",
        f"format:        {lora.format}: {FORMAT_TITLES.get(lora.format, lora.format)}",
        f"layers:        {len(lora.layers)}",
        f"rank:          {_counted([layer.rank for layer in layers])}",
        f"alpha:         {_counted([float(layer.alpha) for layer in layers])}",
        f"double blocks: {_ranges(double) or 'none'}",
        f"single blocks: {_ranges(single) or 'none'}",
        f"other layers:  {', '.join(other) or 'none'}",
    ]
    for note in lora.notes:
        lines.append(f"note:          {note}")
    if lora.skipped_keys:
        lines.append(f"skipped:       {len(lora.skipped_keys)} text-encoder keys (FluxCore applies LoRAs to the DiT)")
    if lora.unmatched:
        lines.append(f"unmatched:     {len(lora.unmatched)} keys")
        for key, why in list(lora.unmatched.items())[:max_keys]:
            lines.append(f"  {key}: {why}")
        if len(lora.unmatched) > max_keys:
            lines.append(f"  ... and {len(lora.unmatched) - max_keys} more")
    return "\n".join(lines)
