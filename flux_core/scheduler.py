"""Flow-matching schedule and Euler step, as DiffSynth-Studio's `FlowMatchScheduler("FLUX.1")` computes them.

Sigmas run from `sigma_start` down to a shifted `sigma_min` in `num_inference_steps` points; each Euler step
moves the latent from sigma_i to sigma_{i+1} (0 after the last point). Timesteps are sigma in [0, 1]; the
DiT scales them by 1000 itself.
"""
from __future__ import annotations

from typing import Sequence

import torch

SIGMA_MIN = 0.003 / 1.002
SIGMA_MAX = 1.0
DEFAULT_SHIFT = 3.0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_sigmas(num_inference_steps: int, denoising_strength: float = 1.0, shift: float | None = None) -> torch.Tensor:
    """The inference schedule: (num_inference_steps,) float32 sigmas, highest first."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}.")
    if not 0.0 < denoising_strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}.")
    shift = DEFAULT_SHIFT if shift is None else shift
    sigma_start = SIGMA_MIN + (SIGMA_MAX - SIGMA_MIN) * denoising_strength
    sigmas = torch.linspace(sigma_start, SIGMA_MIN, num_inference_steps, dtype=torch.float64)
    return shift_sigmas(sigmas, shift).float()


def explicit_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """A caller's own schedule (for reproducing another tool's run): decreasing values in (0, 1]."""
    s = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    # NaN fails every comparison below, so it is refused first (with inf: not a point of any schedule).
    if s.numel() == 0 or not torch.isfinite(s).all() or (s <= 0).any() or (s > 1).any() or (s[1:] >= s[:-1]).any():
        shown = ", ".join(f"{v:g}" for v in s.tolist())
        raise ValueError(f"sigmas=[{shown}] must be a non-empty, strictly decreasing list of finite values in "
                         f"(0, 1]; the final step to 0 is implied.")
    return s


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One step of the rectified-flow ODE, x <- x + v * (sigma_next - sigma); computed in float32."""
    return (latents.float() + velocity.float() * (sigma_next - sigma)).to(latents.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def next_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """sigma_{i+1} for every step, 0 after the last."""
    return torch.cat([sigmas[1:], sigmas.new_zeros(1)])
