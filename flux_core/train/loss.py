"""The flow-matching training objective of DiffSynth-Studio's `FlowMatchSFTLoss` for FLUX.

- The timestep grid is the inference schedule with 1000 points (shift 3): sigmas from 1 down to the shifted
  sigma_min (`flux_core.scheduler.flux_sigmas(1000)`).
- Each sample draws a timestep id uniformly from the 1000 points (so noise levels are dense near 1: the
  grid is shifted), and Gaussian noise; x_t = (1 - sigma) x0 + sigma noise.
- The DiT predicts the velocity; the target is noise - x0; the loss is the MSE in float32 times the weight
  of that timestep: a bell curve over sigma * 1000 centred at 500, exp(-2 ((t - 500) / 1000)^2), minus its
  minimum, normalised to mean 1 over the grid (near zero at both ends of the schedule).
- The embedded guidance fed to the DiT is 1 (DiffSynth passes embedded_guidance=1 when training).

Randomness comes from a generator per sample (`sample_generator`), keyed by the run's seed and the sample's
place in the data order, never from global RNG state: a resumed run draws exactly what the uninterrupted run
would have, and N processes draw what one process with N-step accumulation would.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter, DiTCall, apply_adapters
from ..dit_inputs import PromptEmbeds, prepare_dit_inputs, run_dit
from ..models.dit import DiTExtras
from ..scheduler import DEFAULT_SHIFT, add_noise, flux_sigmas

TRAINING_STEPS = 1000


@dataclass(frozen=True)
class TrainingSchedule:
    sigmas: torch.Tensor    # (1000,) float32, highest first
    weights: torch.Tensor   # (1000,) float32, mean 1


def training_schedule(num_steps: int = TRAINING_STEPS, shift: float = DEFAULT_SHIFT) -> TrainingSchedule:
    sigmas = flux_sigmas(num_steps, 1.0, shift)
    t = sigmas.double() * 1000
    bell = torch.exp(-2 * ((t - num_steps / 2) / num_steps) ** 2)
    bell = bell - bell.min()
    weights = bell * num_steps / bell.sum()
    return TrainingSchedule(sigmas, weights.float())


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one sample: its timestep and noise depend on (seed, epoch, place in the epoch) only."""
    key = (seed * 1_000_003 + epoch) * 1_000_000_007 + position
    return torch.Generator().manual_seed(key % (2**63 - 1))


@contextlib.contextmanager
def training_attention():
    """Attention kernels for training: not cuDNN's fused attention, whose backward pass failed for FluxCore's
    (B, H, L, D) q/k/v on torch 2.11 + CUDA 13 on an H200 ("mha_graph.execute(...).is_good()", or an illegal
    memory access), while flash / memory-efficient attention work. Wrap the forward and the backward (gradient
    checkpointing recomputes the forward inside it). No effect without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def dit_velocity(model: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, prompt: PromptEmbeds,
                 guidance: float | None, extras: DiTExtras | None, dtype: torch.dtype,
                 adapters: Sequence[Adapter] = ()) -> torch.Tensor:
    """The DiT's velocity (float32, unpacked) for latents (B, 16, h, w) at noise levels `sigma` (B,), with the
    adapters' contributions (one call: a training sample is one step of one branch). `model` may be the DiT or a
    DDP wrapper of it; it computes in `dtype`."""
    call = DiTCall(sigma=float(sigma.flatten()[0]))
    inputs = prepare_dit_inputs(latents, sigma, prompt.at(call), guidance, dtype, extras)
    return run_dit(model, apply_adapters(inputs, adapters, call))


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, prompt: PromptEmbeds, schedule: TrainingSchedule,
                       generator: torch.Generator, guidance: float | None, dtype: torch.dtype,
                       extras: DiTExtras | None = None, adapters: Sequence[Adapter] = ()) -> tuple[torch.Tensor, float]:
    """(weighted loss, sigma) for one clean latent x0 (B, 16, h, w) float32."""
    index = int(torch.randint(0, len(schedule.sigmas), (1,), generator=generator))
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    sigma = float(schedule.sigmas[index])
    x_t = add_noise(x0, noise, sigma)
    target = noise - x0
    pred = dit_velocity(model, x_t, torch.full((x0.shape[0],), sigma), prompt, guidance, extras, dtype, adapters)
    loss = F.mse_loss(pred.float(), target.float()) * schedule.weights[index].to(pred.device)
    return loss, sigma
