"""Which scaled-dot-product-attention kernels the DiT may use, per device, and the line that reports it at start.

    with attention_backend(device, dtype):          # around the denoising loop
        ...
    print(describe_attention(device, dtype))        # attention: cuDNN > flash > efficient > math on cuda:0 (...)

All FLUX attention goes through `torch.nn.functional.scaled_dot_product_attention` (flux_core.math.attention), which
picks the first eligible kernel among the allowed ones. `sdpa_backends` is the choice as a pure function of the
device type, its compute capability, the dtype and whether an attention mask is present; `attention_backend` applies
it with `torch.nn.attention.sdpa_kernel(backends, set_priority=True)` (the order is the priority, not just the set).

The published facts the table follows:
- PyTorch 2.5 release notes (pytorch.org/blog/pytorch2-5, "[Beta] cuDNN backend for SDPA"): the cuDNN "Fused Flash
  Attention" backend "on NVIDIA H100 GPUs can provide up to 75% speed-up over FlashAttentionV2" and is meant for
  "H100 or newer GPUs": so cuDNN first from compute capability 9.0 (Hopper, Blackwell), flash (FlashAttention-2)
  first on Ampere / Ada (8.x).
- torch.nn.attention.sdpa_kernel docs (docs.pytorch.org/docs/stable/generated/torch.nn.attention.sdpa_kernel.html):
  `set_priority=True` makes the list order the priority order (its own example: [CUDNN_ATTENTION, FLASH_ATTENTION]).
- torch's kernel checks (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp): flash and cuDNN take float16 /
  bfloat16 only and flash takes no `attn_mask` (EliGen's masks), flash and cuDNN need sm_80+; the memory-efficient
  kernel takes float32 and masks on any CUDA GPU. A kernel that cannot run a call is skipped, so MATH stays last
  as the fallback that always can.
- On the CPU torch has a flash kernel (fp32/bf16/fp16, masks allowed) and math, tried in that fixed order; the
  CPU list is that same order, so the context changes nothing there (tests/test_attention_backend.py checks the
  output is bit-equal to plain SDPA).

Inside a compiled block (flux_core.compile) the kernel is fixed when the graph is traced: dynamo does not guard on
these settings, so entering or leaving the context causes neither a graph break nor a recompile, and the first
compiled call should happen inside the context (the pipeline wraps its whole loop).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDNN, FLASH, EFFICIENT, MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
NAMES = {CUDNN: "cuDNN", FLASH: "flash", EFFICIENT: "efficient", MATH: "math"}
HALF_DTYPES = (torch.float16, torch.bfloat16)   # the dtypes flash and cuDNN take
# sdpa_kernel's `set_priority` (torch >= 2.6); without it the list is only the allowed set, in torch's own order.
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def sdpa_backends(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, masked: bool
                  ) -> tuple[SDPBackend, ...] | None:
    """The SDPA kernels to allow, best first (see the module docstring for the sources). None: leave torch's own
    choice (device types other than cuda and cpu, e.g. mps, xpu)."""
    if device_type == "cpu":
        return (FLASH, MATH)
    if device_type != "cuda":
        return None
    fused = dtype in HALF_DTYPES and capability is not None and capability >= (8, 0)
    if not fused:  # fp32, or a GPU before Ampere: only the memory-efficient kernel is fused
        return (EFFICIENT, MATH)
    order = (CUDNN, FLASH, EFFICIENT, MATH) if capability >= (9, 0) else (FLASH, EFFICIENT, MATH)
    return tuple(b for b in order if not (masked and b is FLASH))


def backends_for(device: torch.device | str, dtype: torch.dtype, masked: bool = False
                 ) -> tuple[SDPBackend, ...] | None:
    """`sdpa_backends` for an actual device (reads its compute capability)."""
    device = torch.device(device)
    return sdpa_backends(device.type, cuda_capability(device), dtype, masked)


@contextlib.contextmanager
def attention_backend(device: torch.device | str, dtype: torch.dtype, masked: bool = False) -> Iterator[None]:
    """Allow only `backends_for(device, dtype, masked)`, in that priority order, for the block inside."""
    backends = backends_for(device, dtype, masked)
    if backends is None:
        yield
        return
    kwargs = {"set_priority": True} if _HAS_PRIORITY else {}
    with sdpa_kernel(list(backends), **kwargs):
        yield


def log_attention_once(logger, who: str, device: torch.device | str, dtype: torch.dtype, masked: bool,
                       logged: set[str]) -> None:
    """Log `describe_attention`'s line (INFO, prefixed by `who`) unless it is in `logged` already, then add it: the
    pipeline and the ComfyUI sampler say which kernels a run uses once per distinct choice."""
    line = describe_attention(device, dtype, masked)
    if line not in logged:
        logged.add(line)
        logger.info("%s: %s", who, line)


def describe_attention(device: torch.device | str, dtype: torch.dtype, masked: bool = False) -> str:
    """One line for the start of a run: "attention: cuDNN > flash > efficient > math on cuda:0 (NVIDIA H200, sm_90),
    bfloat16"."""
    device = torch.device(device)
    backends = backends_for(device, dtype, masked)
    order = "torch's default" if backends is None else " > ".join(NAMES[b] for b in backends)
    where = str(device)
    capability = cuda_capability(device)
    if capability is not None:
        if device.index is None:
            where = f"cuda:{torch.cuda.current_device()}"
        where += f" ({torch.cuda.get_device_name(device)}, sm_{capability[0]}{capability[1]})"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"attention: {order} on {where}, {dtype_name}" + (", with an attention mask" if masked else "")


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device, e.g. (9, 0) for an H200; None for other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)
