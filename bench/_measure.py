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


def dit_forward(impl: str, model, x: dict) -> torch.Tensor:
    """One forward of FluxCore's DiT ("ours") or diffusers' FluxTransformer2DModel on the same inputs (ids without
    a batch dimension, as diffusers takes them)."""
    if impl == "ours":
        return model(img=x["img"], img_ids=x["img_ids"][None], txt=x["txt"], txt_ids=x["txt_ids"][None],
                     timesteps=x["sigma"], y=x["y"], guidance=x["guidance"])
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["sigma"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                 return_dict=False)[0]
