"""How much memory one DiT forward needs for its activations, checked before a run starts.

A FLUX DiT forward works on one sequence of tokens per image: the image tokens (one per 2x2 patch of the
latent: H/16 * W/16), the T5 text tokens (t5_sequence_length) and the Kontext reference tokens (one per 2x2
patch of each reference latent). Weights are not counted (they may be offloaded or FP8; see flux_core.vram).
"""
from __future__ import annotations

import logging
import warnings

import torch

from .inputs import SIZE_MULTIPLE

logger = logging.getLogger(__name__)

GiB = 1024**3
# Fraction of the compute device's memory above which a run is warned about: the weights (or at least the
# layers in use) and the allocator's slack need the rest.
WARN_FRACTION = 0.5


class ActivationMemoryWarning(UserWarning):
    """A run whose DiT activations take more than half the compute device's memory (a UserWarning: shown by
    default, filterable)."""


def image_tokens(height: int, width: int) -> int:
    """Tokens of an image of height x width pixels: one per 2x2 patch of the 8x-downscaled latent."""
    return (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def dit_activation_bytes(batch: int, tokens: int, hidden_size: int, mlp_ratio: float, dtype: torch.dtype) -> int:
    """Estimated peak activation memory of one DiT forward in inference, in bytes:

        batch * tokens * (7 + 2 * mlp_ratio) * hidden_size * bytes_per_element(dtype)

    tokens = image tokens + text tokens + Kontext reference tokens. Why 7 + 2r (15 for FLUX's r = 4): the peak
    is inside a single-stream block (a double block holds the same widths on two streams that add up to the
    same tokens), where at once there live the residual stream (1 x hidden), the fused QKV+MLP projection
    (3 + r), the normalised q, k, v taken from it (3) and the MLP's activation (r). Attention is counted at the
    model width only: torch's scaled_dot_product_attention uses fused (flash / memory-efficient) kernels on CUDA
    and on the CPU, which keep no tokens x tokens score matrix. True CFG runs its two passes one after the other,
    so it does not double the peak. FLUX.1 at 1024x1024 with 512 text tokens in bf16:
    4608 * 15 * 3072 * 2 bytes = 0.40 GiB per image."""
    per_element = torch.empty((), dtype=dtype).element_size()
    return int(batch * tokens * (7 + 2 * mlp_ratio) * hidden_size * per_element)


def check_activation_memory(needed: int, available: int, device: str, what: str, stacklevel: int = 2) -> None:
    """Refuse (ValueError) when `needed` bytes exceed the device's `available` memory, warn
    (ActivationMemoryWarning) above WARN_FRACTION of it. `what` names the inputs that set the size (height,
    width, batch, kontext_images), so the message says what to lower. `stacklevel` as for warnings.warn, counted
    from the caller of this function (2: the line that called the caller)."""
    message = (f"the DiT's activations for {what} need about {needed / GiB:.2f} GiB "
               f"(flux_core.activation_memory.dit_activation_bytes)")
    if needed > available:
        raise ValueError(f"{message}, more than the {available / GiB:.2f} GiB of the compute device {device}. "
                         f"Lower height/width, generate fewer images per call (fewer prompts), or pass smaller "
                         f"kontext_images.")
    if needed > WARN_FRACTION * available:
        warnings.warn(f"{message}, over {WARN_FRACTION:.0%} of the {available / GiB:.2f} GiB of the compute device "
                      f"{device}; with the weights this may not fit. Lower height/width, the batch or the "
                      f"kontext_images if the run fails for memory.", ActivationMemoryWarning, stacklevel=stacklevel + 1)
    else:
        logger.debug("%s; the compute device %s has %.2f GiB.", message, device, available / GiB)
