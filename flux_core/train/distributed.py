"""Several processes through accelerate: which backend a launch gets, and (for the trainer) what DDP, FSDP and
DeepSpeed each need from the code.

`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that set WORLD_SIZE,
but accelerate only joins them into one gloo group when told it runs on the CPU (`cpu=True`); without it every
process runs alone (checked with accelerate 1.15: DistributedType.NO, num_processes 1).
"""
from __future__ import annotations

import os

import torch


def cpu_processes(env: dict | None = None) -> bool:
    """True when several processes were launched (WORLD_SIZE > 1) and there is no GPU: they then work together
    over gloo, which accelerate sets up only with cpu=True."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState for this process: its index, the process count and its device (cuda:LOCAL_RANK
    with GPUs); one process when not launched by `accelerate launch`."""
    from accelerate import PartialState
    return PartialState(cpu=cpu_processes())
