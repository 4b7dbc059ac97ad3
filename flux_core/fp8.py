"""FP8 compute: weights in float8_e4m3fn with a per-output-row scale, activations quantized per token at each call,
and the matrix product in FP8 through `torch._scaled_mm` (twice bf16's peak on Ada/Hopper/Blackwell GPUs).

    path = enable_fp8_compute(dit, "cuda")     # "scaled_mm" or "storage-only (why)"
    image = pipe(...)                           # the blocks' Linear layers now compute in FP8

`enable_fp8_compute` turns the Linear layers of the DiT's double and single blocks into `Fp8Linear` in place (same
module objects, same BFL parameter names): `weight` becomes float8_e4m3fn codes and a float32 buffer
`weight_scale` of shape (out_features,) holds each row's scale, so the real weight is `weight * weight_scale[:, None]`
(state_dict carries both). Weights of higher precision are quantized with scale = amax(|row|) / 448; weights
already stored in float8_e4m3fn (FP8 storage, `store_model(weight_dtype=...)`) keep their codes with scale 1;
other float8 formats are re-quantized from their values.

In a call, each row of the input (each token) gets its own scale amax(|x_row|) / 448 (dynamic per-token scaling,
computed in float32), and `torch._scaled_mm(x_fp8, W_fp8^T, scale_x (M, 1), scale_w (1, N))` accumulates in
float32 and writes the input's dtype; the bias is added in that dtype. DiffSynth-Studio's `fp8_linear` does the
same with scale 1 for the weight and per-row input scales clamped to >= 1 (small activations then lose their
low bits); scaling both sides per row keeps the relative error near e4m3's own (2^-4 per value).

Where `_scaled_mm` cannot run (CUDA compute capability < 8.9, ROCm, MPS, a torch without it, a probe call that
raises), the layer takes the storage-only path: the weight is dequantized with its scale to the input's dtype for
the call and multiplied by `F.linear` (FP8 storage, bf16 compute: half the weight memory, no speed-up).
`fp8_compute_path(device)` tells which path a device gets; the layer decides per call from its input's device.

Shapes: CUDA's `_scaled_mm` needs the inner and output dimensions (in_features, out_features) to be multiples of
16; a layer whose are not takes the storage-only path (every FLUX.1 layer qualifies: 3072, 9216, 12288, 15360,
21504; padding would cost a padded weight copy for layers that do not exist in FLUX). The number of tokens is
free (the layer flattens any leading shape to rows and restores it).

LoRA: hook mode (flux_core.lora picks it for float8 weights) adds the low-rank path in the input's dtype on top of
the FP8 output. Fusing a LoRA into these weights would ignore their row scales: it must be refused (`lora.py`'s
`_check_fusable` refuses an `Fp8Linear` with `fuse_refusal`'s message). The VRAM manager moves `weight` in
float8 and `weight_scale` in float32 and never casts them (flux_core.vram).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention_backend import cuda_capability
from .dtypes import FP8_COMPUTE_DTYPE
from .model_state import peek_state
from .quantized import QuantizedLinear

FP8_MAX = float(torch.finfo(FP8_COMPUTE_DTYPE).max)   # 448
SCALE_NAME = "weight_scale"
# Smallest scale: an all-zero row (weight or token) is coded as zeros instead of dividing by zero (torchao's eps).
MIN_SCALE = 1e-12
# The DiT's parts computed in FP8: the transformer blocks, >99 % of FLUX.1's weights and FLOPs. img_in, txt_in, the
# time / vector / guidance embedders and final_layer keep their dtype: they are 0.5 % of the weights, txt_in reads raw
# T5 features (whose few huge outlier channels would set every token's scale), img_in the noisy latent, and
# final_layer writes the velocity itself, so their rounding would reach the output without the averaging the
# residual stream gives a block's.
FP8_COMPUTE_PARTS = ("double_blocks", "single_blocks")
SCALED_MM = "scaled_mm"


class Fp8ComputeWarning(UserWarning):
    """A layer fell back from `torch._scaled_mm` to the storage-only path during a call."""


# -------------------------------------------------------------------------------------------------- the decision
def decide_fp8_path(device_type: str, capability: tuple[int, int] | None = None, has_scaled_mm: bool = True,
                    rocm: bool = False) -> str:
    """The compute path FP8 layers take on a device, from its facts alone: "scaled_mm", or "storage-only (why)"."""
    if not has_scaled_mm:
        return f"storage-only (this torch {torch.__version__} has no torch._scaled_mm)"
    if device_type == "cpu":
        return SCALED_MM
    if device_type == "cuda":
        if rocm:
            return "storage-only (ROCm: its FP8 matmul uses the e4m3fnuz format; FluxCore's FP8 compute is CUDA's)"
        if capability is None or tuple(capability) < (8, 9):
            cc = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
            return (f"storage-only (compute capability {cc}: FP8 matrix cores need 8.9 or newer, i.e. Ada, Hopper, "
                    f"Blackwell)")
        return SCALED_MM
    return f"storage-only (no FP8 matmul on {device_type})"


_PROBED: dict[str, str] = {}


def fp8_compute_path(device: torch.device | str | None = None) -> str:
    """The path FP8 layers take on `device` (default: the current CUDA device, else the CPU): "scaled_mm" where the
    device has FP8 matmuls and a probe call of `torch._scaled_mm` with per-row scales succeeds there, else
    "storage-only (reason)". Decided once per device."""
    device = _device(device)
    key = str(device)
    if key not in _PROBED:
        path = decide_fp8_path(device.type, cuda_capability(device), hasattr(torch, "_scaled_mm"),
                               rocm=device.type == "cuda" and torch.version.hip is not None)
        _PROBED[key] = _probe(device) if path == SCALED_MM else path
    return _PROBED[key]


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _probe(device: torch.device) -> str:
    """One tiny FP8 product as the layers run it (one token, 16 x 16), so a torch or driver that lacks the kernel
    is found here, once, and not in the middle of a generation."""
    try:
        x = torch.ones(1, 16, device=device)
        weight, scale = quantize_rows(torch.eye(16, device=device))
        got = scaled_linear(x, weight, scale, None)
        if not torch.allclose(got.float(), x):
            return "storage-only (torch._scaled_mm gave wrong values in a probe)"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        return f"storage-only (torch._scaled_mm failed on {device}: {type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return SCALED_MM


_FORCE_STORAGE_ONLY = False


@contextlib.contextmanager
def storage_only_fp8():
    """Within the block, every Fp8Linear takes the storage-only path (to compare the two paths, in tests and benches)."""
    global _FORCE_STORAGE_ONLY
    before, _FORCE_STORAGE_ONLY = _FORCE_STORAGE_ONLY, True
    try:
        yield
    finally:
        _FORCE_STORAGE_ONLY = before


# -------------------------------------------------------------------------------------------------- the maths
def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 scale per row (rows,)) of a 2-D tensor: scale = amax(|row|) / 448, computed
    in float32, so that codes * scale[:, None] approximates `t` with e4m3's relative precision in every row."""
    values = t.float()
    scale = (values.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    codes = (values / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_COMPUTE_DTYPE)
    return codes, scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight * weight_scale[:, None])^T + bias with x quantized per row to FP8 and the product in
    `torch._scaled_mm`. Any leading shape; the output has x's dtype (on CUDA the kernel writes bfloat16, the one
    output type its row-wise scaling supports on every torch that has it, then cast)."""
    lead = x.shape[:-1]
    rows, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out_dtype = torch.bfloat16 if x.device.type == "cuda" else x.dtype
    # weight (N, K) is row-major, so weight.t() is the column-major (K, N) operand the kernel wants, without a copy.
    out = torch._scaled_mm(rows, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale.float()[None, :],
                           out_dtype=out_dtype)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*lead, weight.shape[0])


def dequantized_weight(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The real weight in `dtype`: the codes (float8, or already cast) times their row scales."""
    return weight.to(dtype) * weight_scale.to(dtype)[:, None]


class Fp8Linear(nn.Linear):
    """nn.Linear computing in FP8: `weight` holds float8_e4m3fn codes, the float32 buffer `weight_scale` (out,)
    their row scales. Made by `enable_fp8_compute` from an nn.Linear in place (not constructed directly)."""

    weight_scale: torch.Tensor
    _fallback: dict  # device string -> why `_scaled_mm` failed in a call there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._scaled_mm_here(x):
            try:
                return scaled_linear(x, self.weight, self.weight_scale, self.bias)
            except RuntimeError as e:  # a shape or dtype the probe did not cover: this layer falls back, and says so
                self._fallback[str(x.device)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                warnings.warn(f"Fp8Linear({self.in_features} -> {self.out_features}) on {x.device}: torch._scaled_mm "
                              f"failed ({self._fallback[str(x.device)]}); this layer computes storage-only from now "
                              f"on.", Fp8ComputeWarning, stacklevel=2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, dequantized_weight(self.weight, self.weight_scale, x.dtype), bias)

    def _scaled_mm_here(self, x: torch.Tensor) -> bool:
        return (not _FORCE_STORAGE_ONLY and self.weight.dtype == FP8_COMPUTE_DTYPE
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and str(x.device) not in self._fallback and fp8_compute_path(x.device) == SCALED_MM)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 compute (weight float8_e4m3fn, per-row {SCALE_NAME})"


def fuse_refusal(module: nn.Module) -> str | None:
    """Why a LoRA cannot be fused into `module` (flux_core.lora refuses hotload=False with this), or None."""
    if not isinstance(module, Fp8Linear):
        return None
    return ("load_lora(hotload=False): the DiT computes in FP8 (enable_fp8_compute): its weights are float8 codes "
            f"with per-row scales ({SCALE_NAME}), and a fused delta would be rounded to FP8 and would ignore those "
            "scales. Use hotload=True or None (hook mode: the LoRA runs in the compute dtype on top of the FP8 output).")


# -------------------------------------------------------------------------------------------------- conversion
def fp8_compute_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers `enable_fp8_compute` computes in FP8: those inside FP8_COMPUTE_PARTS, by qualified name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".", 1)[0] in FP8_COMPUTE_PARTS}


def _problems(model: nn.Module, layers: dict[str, nn.Linear]) -> list[str]:
    problems = []
    if not layers:
        problems.append(f"{type(model).__name__} has no Linear layers in {' / '.join(FP8_COMPUTE_PARTS)}: FP8 compute "
                        f"applies to FLUX DiT-shaped models")
    training = [n for n, p in model.named_parameters() if p.requires_grad]
    if training:
        problems.append(f"the model is being trained ({len(training)} parameters require grad, e.g. "
                        f"{', '.join(training[:3])}): torch._scaled_mm has no backward and FP8 activations would "
                        f"round the gradients' inputs; FP8 compute is for inference. Call model.requires_grad_(False) "
                        f"first (after training), or train without it")
    layers = {n: m for n, m in layers.items() if not isinstance(m, Fp8Linear)}
    if not layers:  # converted already: nothing below applies to a call that changes nothing
        return problems
    state = peek_state(model)
    if state is not None and state.compute is not None:
        problems.append("the model is managed by a VRAMManager (enable_vram_management / the VRAM options node), "
                        "which keeps its own copy of every weight's storage: call enable_fp8_compute before adding "
                        "the model, or remove it from the manager (VRAMManager.remove), convert, and add it again")
    if state is not None and state.lora is not None and getattr(state.lora, "fused", None):
        problems.append(f"{len(state.lora.fused)} layers hold fused LoRAs; their saved originals would be written "
                        f"back into FP8 codes by clear_lora: call clear_lora first and load the LoRAs again after "
                        f"(hook mode)")
    gguf = [n for n, m in layers.items() if isinstance(m, QuantizedLinear)]
    if gguf:
        problems.append(f"{len(gguf)} layers are GGUF block-quantized (e.g. {gguf[0]}): FP8 compute needs a bf16, "
                        f"fp16, fp32 or fp8 model file")
    meta = [n for n, m in layers.items() if m.weight.is_meta]
    if meta:
        problems.append(f"{len(meta)} layers have no weights loaded (meta device, e.g. {meta[0]})")
    return problems


@torch.no_grad()
def _convert(linear: nn.Linear) -> None:
    weight = linear.weight
    pinned = weight.device.type == "cpu" and torch.cuda.is_available() and weight.is_pinned()
    if weight.dtype == FP8_COMPUTE_DTYPE:  # stored in FP8 without a scale: the codes are the values
        scale = torch.ones(weight.shape[0], dtype=torch.float32, device=weight.device)
    else:
        codes, scale = quantize_rows(weight)
        weight.data = codes.pin_memory() if pinned else codes
    # Page-locked like the weight (store_model(pin_memory=True)): a streamed layer's copies then all run
    # asynchronously; one pageable scale would make the host wait for its copy at every call.
    linear.register_buffer(SCALE_NAME, scale.pin_memory() if pinned else scale)
    linear._fallback = {}
    linear.__class__ = Fp8Linear


def enable_fp8_compute(model: nn.Module, device: torch.device | str | None = None) -> str:
    """Make the Linear layers of `model`'s double and single blocks compute in FP8 (in place; idempotent) and return
    the path they take on `device` (default: the model's device; each call decides by its input's device):
    "scaled_mm" or "storage-only (reason)". Refused, with every reason at once, for a model being trained, and,
    while layers remain to convert, for one managed by a VRAMManager, holding fused LoRAs, GGUF layers or weights
    not loaded. Calling it again on a converted model only returns the path."""
    layers = fp8_compute_layers(model)
    problems = _problems(model, layers)
    if problems:
        raise ValueError("enable_fp8_compute: " + "; ".join(problems) + ".")
    for linear in layers.values():
        if not isinstance(linear, Fp8Linear):
            _convert(linear)
    if device is None:
        device = next(iter(layers.values())).weight.device
    return fp8_compute_path(device)


def is_fp8_compute(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


# -------------------------------------------------------------------------------------------------- quality
@dataclass(frozen=True)
class OutputDifference:
    """How far an output (a DiT velocity, a latent, an image) moved against a reference: mean |a - b|, max |a - b|,
    and ||a - b|| / ||b||."""
    mean_abs: float
    max_abs: float
    relative: float

    @classmethod
    def of(cls, candidate: torch.Tensor, reference: torch.Tensor) -> "OutputDifference":
        a, b = candidate.double(), reference.double()
        return cls((a - b).abs().mean().item(), (a - b).abs().max().item(), ((a - b).norm() / b.norm()).item())

    def __str__(self) -> str:
        return f"mean |diff| {self.mean_abs:.4g}, max |diff| {self.max_abs:.4g}, relative {self.relative:.4g}"


@torch.no_grad()
def fp8_compute_difference(model: nn.Module, run: Callable[[nn.Module], torch.Tensor],
                           device: torch.device | str | None = None) -> tuple[str, OutputDifference]:
    """(path, difference) of FP8 compute against the model as it is: `run(model)` (e.g. one DiT forward, or a whole
    generation returning an image) before and after `enable_fp8_compute(model, device)`. The model is converted in
    place and stays converted (no second copy of the weights is made)."""
    reference = run(model).detach().clone()
    path = enable_fp8_compute(model, device)
    return path, OutputDifference.of(run(model), reference)
