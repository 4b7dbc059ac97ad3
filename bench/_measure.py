"""Measurement helpers shared by the bench scripts (run as `python bench/<script>.py`, so this imports as `_measure`)."""
from __future__ import annotations

from pathlib import Path

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB: VmRSS (resident now), VmHWM (peak resident), RssFile (file pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
