"""What a run will cost, checked before it starts: the activation memory of one DiT forward (refused when it
cannot fit the compute device) and the compute of the whole run (warned about when a CPU would take very long).

A FLUX DiT forward works on one sequence of tokens per image: the image tokens (one per 2x2 patch of the
latent: H/16 * W/16), the T5 text tokens (t5_sequence_length) and the Kontext reference tokens (one per 2x2
patch of each reference latent). Weights are not counted (they may be offloaded or FP8; see flux_core.vram).
"""
from __future__ import annotations

import logging
import warnings

from typing import Sequence

import torch

from .inputs import SIZE_MULTIPLE
from .tiled_dit import tile_boxes
from .vram import GiB, stored_compute_dtype

logger = logging.getLogger(__name__)

# Fraction of the compute device's memory above which a run is warned about: the weights (or at least the
# layers in use) and the allocator's slack need the rest.
WARN_FRACTION = 0.5


# A run is warned about on a CPU above this many floating-point operations: about 10 minutes at 1 TFLOP/s, what
# a fast desktop CPU reaches in bf16/fp32 matrix products (FLUX.1-dev at 1024x1024: about 74 TFLOP a step).
CPU_WARN_FLOPS = 6e14
ASSUMED_CPU_FLOPS = 1e12


class SlowRunWarning(UserWarning):
    """A run that would take a long time on the device it computes on (a CPU)."""


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
               f"(flux_core.run_cost.dit_activation_bytes)")
    if needed > available:
        raise ValueError(f"{message}, more than the {available / GiB:.2f} GiB of the compute device {device}. "
                         f"Lower height/width, generate fewer images per call (fewer prompts), or pass smaller "
                         f"kontext_images.")
    if needed > WARN_FRACTION * available:
        warnings.warn(f"{message}, over {WARN_FRACTION:.0%} of the {available / GiB:.2f} GiB of the compute device "
                      f"{device}; with the weights this may not fit. Lower height/width, the batch or the "
                      f"kontext_images if the run fails for memory.", ActivationMemoryWarning, stacklevel=stacklevel + 1)
    else:
        logger.info("%s; the compute device %s has %.2f GiB.", message, device, available / GiB)


# Linear layers a DiT applies once per image (to the timestep/guidance/pooled vector), not once per token.
PER_IMAGE_LAYERS = ("img_mod.", "txt_mod.", "modulation.", "adaLN_modulation.", "time_in.", "vector_in.",
                    "guidance_in.")
# Layers of the double-stream blocks (and the input/output projections) that see only one stream's tokens.
IMAGE_STREAM_LAYERS = ("img_in.", "img_attn.", "img_mlp.", "final_layer.linear.")
TEXT_STREAM_LAYERS = ("txt_in.", "txt_attn.", "txt_mlp.")


def dit_forward_flops(dit: torch.nn.Module, image_tokens: int, text_tokens: int) -> float:
    """Floating-point operations of one DiT forward for one image. Every per-token weight matrix is used once
    for each token it sees, a multiply and an add per weight: the image-stream layers see the image tokens
    (Kontext references included), the text-stream layers the text tokens, the single-stream blocks both.
    Attention in every block adds two tokens x tokens x hidden products (scores and weighted sum:
    4 x tokens^2 x hidden). The per-image layers (modulation, embedders), norms, RoPE and activations are
    negligible beside these. Weights count as in x out (a GGUF layer's weight holds its blocks as bytes)."""
    tokens = image_tokens + text_tokens
    flops = 0.0
    for name, m in dit.named_modules():
        if not isinstance(m, torch.nn.Linear) or any(p in name + "." for p in PER_IMAGE_LAYERS):
            continue
        seen = (image_tokens if any(p in name + "." for p in IMAGE_STREAM_LAYERS)
                else text_tokens if any(p in name + "." for p in TEXT_STREAM_LAYERS) else tokens)
        flops += 2.0 * seen * m.in_features * m.out_features
    params = dit.params
    return flops + 4.0 * tokens * tokens * params.hidden_size * (params.depth + params.depth_single_blocks)


def dit_calls_per_step(latent_height: int, latent_width: int, tiling) -> tuple[int, int, int]:
    """(DiT calls per step and branch, latent height and width one call sees): one call, or one per tile of the
    tiled DiT (flux_core.tiled_dit; all its tiles have one size)."""
    if tiling is None:
        return 1, latent_height, latent_width
    boxes = tile_boxes(latent_height, latent_width, tiling)
    top, bottom, left, right = boxes[0]
    return len(boxes), bottom - top, right - left


def controlnet_passes(dit: torch.nn.Module, controlnets: Sequence[tuple[torch.nn.Module, int]], image_tokens: int,
                      text_tokens: int) -> float:
    """The ControlNets' forwards in one step, counted in DiT forwards: each (ControlNet, number of CFG branches it
    runs in) costs its own FLOPs (`dit_forward_flops` reads any module with the DiT's block layout) per branch."""
    if not controlnets:
        return 0.0
    return (sum(dit_forward_flops(model, image_tokens, text_tokens) * branches for model, branches in controlnets)
            / dit_forward_flops(dit, image_tokens, text_tokens))


def ipadapter_kv_bytes(num_blocks: int, num_tokens: int, hidden_size: int, images: int, branches: int,
                       dtype: torch.dtype) -> int:
    """Bytes of the keys and values an IP-Adapter keeps on the compute device for a whole run (flux_core.ipadapter
    makes them once, before the denoise loop): for each of its blocks, a key and a value of `num_tokens` tokens per
    reference image at the DiT's width, for each CFG branch it acts in. InstantX (57 blocks, 128 tokens per image,
    width 3072) in bf16: 85.5 MiB per reference image and branch, a fifth of FLUX.1's 0.40 GiB of activations at
    1024x1024, so a few reference images under true CFG change what fits. (Their attention adds under 1% to a step's
    compute: 128 tokens per image beside the 4608 of the DiT's own attention.)"""
    per_element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_blocks * num_tokens * images * hidden_size * branches * per_element


def check_run_time(flops: float, device: torch.device, what: str, stacklevel: int = 2) -> None:
    """Warn (SlowRunWarning) before a run on a CPU that needs more than CPU_WARN_FLOPS; GPUs are not warned
    about (their speed spans 100x, and a run that fits their memory finishes)."""
    minutes = flops / ASSUMED_CPU_FLOPS / 60
    if device.type != "cpu" or flops <= CPU_WARN_FLOPS:
        logger.info("%s: about %.3g TFLOP of DiT compute.", what, flops / 1e12)
        return
    warnings.warn(f"{what} needs about {flops / 1e12:.0f} TFLOP of DiT compute, about {minutes:.0f} minutes on a "
                  f"CPU at {ASSUMED_CPU_FLOPS / 1e12:.0f} TFLOP/s (flux_core.run_cost.dit_forward_flops). Run on a "
                  f"GPU (device='cuda'), or lower the size, the steps or the batch.", SlowRunWarning,
                  stacklevel=stacklevel + 1)


def check_run_cost(dit: torch.nn.Module, device, batch: int, image_tokens: int, text_tokens: int, steps: int,
                   passes: float, what: str, work: str, stacklevel: int = 2, *, held_bytes: int = 0) -> None:
    """Both checks for one run of `dit` on `device` (a flux_core.vram.ComputeDevice): the activation memory of
    one forward (refused above the device's memory, warned above half of it) and the run's compute (warned on a
    CPU). `what` names the inputs that set the size, `work` the steps, passes and batch; image tokens include
    the Kontext references. `held_bytes`: what the run keeps on the device beside them for all its steps (the
    IP-Adapter's keys and values, `ipadapter_kv_bytes`), counted with the activations."""
    params = dit.params
    tokens = image_tokens + text_tokens
    needed = dit_activation_bytes(batch, tokens, params.hidden_size, params.mlp_ratio, stored_compute_dtype(dit))
    needed += int(held_bytes)
    check_activation_memory(needed, device.total_memory(), str(device.torch_device), what, stacklevel + 1)
    check_run_time(steps * passes * batch * dit_forward_flops(dit, image_tokens, text_tokens), device.torch_device,
                   work, stacklevel + 1)
