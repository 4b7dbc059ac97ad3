"""How ComfyUI's frontend lines up a node's saved `widgets_values` with its inputs (the UI/graph workflow format).
Shared by the workflow writer here and the workflow runner of the tests (tests/workflow_harness.py).

- The widget inputs are the INPUT_TYPES entries, required then optional, whose type is a list of choices or
  INT/FLOAT/STRING/BOOLEAN/COMBO and that are not `forceInput`; `widgets_values` holds one value per widget
  input in that order, also for a widget input that is connected by a link.
- An input with `control_after_generate`, or named "seed" / "noise_seed", is followed by one more value (the
  "fixed"/"randomize"/... control), which is not an input.
- An upload combo (LoadImage's `image_upload`) saves its upload button's value after all widgets.
"""
from __future__ import annotations

from typing import Mapping

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_NAMES = ("seed", "noise_seed")


def options(spec: tuple) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}


def is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options(spec).get("forceInput")


def widget_slots(input_types: Mapping) -> list[tuple[str, int]]:
    """(widget input name, how many extra saved values follow it) in the order of `widgets_values`."""
    slots = []
    for group in ("required", "optional"):
        for name, spec in (input_types.get(group) or {}).items():
            spec = tuple(spec)
            if is_widget(spec):
                slots.append((name, 1 if options(spec).get("control_after_generate") or name in CONTROL_NAMES else 0))
    return slots


def saved_value_count(input_types: Mapping) -> int:
    """How many values `widgets_values` holds for a node with these inputs (upload buttons included)."""
    uploads = sum(1 for group in input_types.values() if isinstance(group, Mapping) for s in group.values()
                  if options(tuple(s)).get("image_upload"))
    return sum(1 + extra for _, extra in widget_slots(input_types)) + uploads


def combo_choices(input_types: Mapping, name: str) -> list | None:
    for group in ("required", "optional"):
        spec = (input_types.get(group) or {}).get(name)
        if spec is not None:
            spec = tuple(spec)
            if isinstance(spec[0], (list, tuple)):
                return list(spec[0])
            if spec[0] == "COMBO":
                return list(options(spec).get("options") or [])
    return None
