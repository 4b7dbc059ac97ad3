"""Checks of generation inputs, as plain functions: the pipeline runs them all before any model runs, and the
ComfyUI nodes can call the same ones. Each raises TypeError (wrong type) or ValueError (wrong value) with a
message that names the parameter, the value given and what to pass instead.

    prompts = check_prompts(prompt, "prompt")             # -> list[str]
    check_seed(seed); seed = seed if seed is not None else random_seed()
    check_t5_sequence_length(n)                           # None or 1..T5_MAX_SEQUENCE_LENGTH
"""
from __future__ import annotations

import math
import numbers
import random
from typing import Any

import torch
from PIL import Image

SIZE_MULTIPLE = 16                 # 8x VAE downscale, then 2x2 packing
SEED_MAX = 2**64 - 1               # seeds are 0..2**64-1, ComfyUI's range (torch.Generator takes 64 bits)
T5_MAX_SEQUENCE_LENGTH = 512       # FLUX.1 was trained with at most 512 T5 tokens (dev 512, schnell 256)
DEFAULT_SIZE = (1024, 1024)        # (height, width) of a FLUX.1 image when none is given (pipe.default_size)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_int(name: str, value: Any, minimum: int | None = None, hint: str = "") -> int:
    """An int (numpy ints too; not bool, not float) at least `minimum`."""
    if not _is_int(value):
        raise TypeError(f"{name}={value!r} is a {_type_name(value)}; pass an int{hint}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}{hint}.")
    return int(value)


def check_real(name: str, value: Any, hint: str = "") -> float:
    """A finite real number (int or float, not bool)."""
    if not _is_real(value):
        raise TypeError(f"{name}={value!r} is a {_type_name(value)}; pass a number{hint}.")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not a finite number{hint}.")
    return float(value)


def check_size(height: Any, width: Any) -> None:
    """Height and width must be positive multiples of 16; the message proposes the nearest valid values."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value):
            raise TypeError(f"{name}={value!r} must be an int (pixels, a multiple of {SIZE_MULTIPLE}).")
        if value <= 0 or value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise ValueError(f"{name}={value} is not a positive multiple of {SIZE_MULTIPLE} (FLUX packs 2x2 patches of "
                             f"the 8x-downscaled latent); use {lower} or {lower + SIZE_MULTIPLE}.")


def check_prompts(value: Any, name: str = "prompt") -> list[str]:
    """A prompt string or a non-empty list/tuple of strings -> list of strings. None and non-string elements
    are refused by index and type (a tokenizer would fail on them far from the call)."""
    if isinstance(value, str):
        return [value]
    if value is None:
        raise TypeError(f"{name}=None: pass a string (\"\" for no text) or a list of strings.")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} is a {_type_name(value)}; pass a string or a list of strings.")
    if not value:
        raise ValueError(f"{name}=[]: give a prompt, or a list of at least one.")
    bad = [f"{name}[{i}] is {_type_name(v)}" for i, v in enumerate(value) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{'; '.join(bad)}: every element of {name} must be a string (\"\" for no text).")
    return list(value)


def check_negative_prompts(value: Any, batch: int) -> list[str]:
    """negative_prompt: one string for every prompt, or a list with one per prompt."""
    negatives = check_prompts(value, "negative_prompt")
    if isinstance(value, str):
        return negatives * batch
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts; give one string, or "
                         f"one per prompt.")
    return negatives


def check_cfg_scale(cfg_scale: Any) -> float:
    """True classifier-free guidance scale: 1 is off (one DiT pass per step), above 1 runs a negative pass too."""
    value = check_real("cfg_scale", cfg_scale)
    if value < 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} is below 1: 1 turns true CFG off (one DiT pass per step), values "
                         f"above 1 (e.g. 2-5) push away from negative_prompt. FLUX.1-dev's own guidance is "
                         f"embedded_guidance.")
    return value


def check_seed(seed: Any) -> int | None:
    """None (a random seed) or an int in 0..SEED_MAX (2**64-1). -1 is refused rather than wrapped to 2**64-1."""
    if seed is None:
        return None
    if not _is_int(seed):
        raise TypeError(f"seed={seed!r} is a {_type_name(seed)}; pass an int in 0..2**64-1, or None for a random "
                        f"seed (then read it from pipe.last_seed).")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed={seed} is outside 0..2**64-1 ({SEED_MAX}); pass a seed in that range, or None for a "
                         f"random seed (then read it from pipe.last_seed).")
    return int(seed)


def random_seed() -> int:
    """A random seed over the whole accepted range 0..2**64-1."""
    return random.randint(0, SEED_MAX)


def check_t5_sequence_length(length: Any) -> int | None:
    """None (the T5 tokenizer's own length: flux_core.models.text_encoders.t5_sequence_length_of) or an int in
    1..T5_MAX_SEQUENCE_LENGTH."""
    if length is None:
        return None
    hint = (f" (T5 tokens: 1..{T5_MAX_SEQUENCE_LENGTH}; FLUX.1-dev 512, schnell 256), or None for the T5 tokenizer's "
            f"own length")
    value = check_int("t5_sequence_length", length, 1, hint)
    if value > T5_MAX_SEQUENCE_LENGTH:
        raise ValueError(f"t5_sequence_length={value} is above {T5_MAX_SEQUENCE_LENGTH}, the longest prompt FLUX.1 was "
                         f"trained on; use {T5_MAX_SEQUENCE_LENGTH} (FLUX.1-dev) or 256 (schnell), or None for the T5 "
                         f"tokenizer's own length.")
    return value


def check_steps(num_inference_steps: Any) -> int:
    return check_int("num_inference_steps", num_inference_steps, 1, " (at least 1 denoising step)")


def check_denoising_strength(strength: Any) -> float:
    value = check_real("denoising_strength", strength, " in (0, 1]")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"denoising_strength={strength} must be in (0, 1]: 1 starts from pure noise, smaller values "
                         f"keep more of input_image.")
    return value


def check_embedded_guidance(guidance: Any) -> float:
    """FLUX.1-dev's distilled guidance (3.5 by default); ignored by DiTs without a guidance embedder (schnell)."""
    value = check_real("embedded_guidance", guidance, " (FLUX.1-dev: 3.5; Kontext: 2.5)")
    if value < 0:
        raise ValueError(f"embedded_guidance={guidance} is negative; use a value >= 0 (FLUX.1-dev: 3.5; Kontext: 2.5).")
    return value


def check_sigma_shift(shift: Any) -> float | None:
    """None (FLUX's 3) or a positive shift of the sigma schedule."""
    if shift is None:
        return None
    value = check_real("sigma_shift", shift, " > 0 (None: 3, FLUX's default)")
    if value <= 0:
        raise ValueError(f"sigma_shift={shift} must be > 0 (None: 3, FLUX's default); larger values spend more steps "
                         f"at high noise.")
    return value


def check_tiling(tiled: Any, tile_size: Any, tile_stride: Any) -> None:
    """VAE tiling: `tiled` a bool; tile_size and tile_stride ints in latent pixels, 1 <= tile_stride <= tile_size
    (what flux_core.models.vae.tiled_apply needs). Checked whether or not tiling is on."""
    if not isinstance(tiled, bool):
        raise TypeError(f"tiled={tiled!r} is a {_type_name(tiled)}; pass True or False.")
    size = check_int("tile_size", tile_size, 1, " (latent pixels, e.g. 128)")
    stride = check_int("tile_stride", tile_stride, 1, " (latent pixels, e.g. 64)")
    if stride > size:
        raise ValueError(f"tile_stride={stride} is larger than tile_size={size}: tiles would leave gaps; use a stride "
                         f"<= tile_size (e.g. half of it).")


def check_dit_tiling(tiled: bool, tile_size: int, tea_cache_l1_thresh: float | None) -> None:
    """`tiled=True` tiles the DiT too (flux_core.tiled_dit): its tiles need an even tile_size (FLUX packs 2x2
    latent patches), and TeaCache, which follows one DiT call per step, cannot run with it."""
    if not tiled:
        return
    if tea_cache_l1_thresh is not None:
        raise ValueError("tiled=True runs the DiT once per tile, and TeaCache follows one DiT call per step: use one "
                         "of them (tea_cache_l1_thresh=None, or tiled=False).")
    if tile_size % 2:
        raise ValueError(f"tile_size={tile_size}: with tiled=True the DiT is tiled too, and its tiles must be an even "
                         f"number of latent pixels (FLUX packs 2x2 patches); use {tile_size + 1}.")


def check_rand_device(rand_device: Any) -> torch.device:
    """The device the noise is drawn on must be able to make a torch.Generator ('cpu' gives the same noise on
    every machine)."""
    if not isinstance(rand_device, (str, torch.device)):
        raise TypeError(f"rand_device={rand_device!r} is a {_type_name(rand_device)}; pass a device name such as "
                        f"'cpu' (the default: the same noise on any machine) or 'cuda'.")
    try:
        device = torch.device(rand_device)
        torch.Generator(device)
    except RuntimeError as e:
        raise ValueError(f"rand_device={str(rand_device)!r} cannot draw random numbers here ({str(e).splitlines()[0]}); "
                         f"use 'cpu' (the default) or an available device.") from None
    return device


def check_device(name: str, value: Any) -> torch.device | None:
    """None (the default device) or a device this machine has: 'cpu', 'cuda' / 'cuda:N' with CUDA available
    and N below the GPU count, 'mps' (Apple) when available. Checked before loading, where a missing backend
    would otherwise fail deep inside torch (an AssertionError for CUDA on a CPU-only build)."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}={value!r} is a {_type_name(value)}; pass a device name such as 'cuda' or 'cpu'.")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name}={str(value)!r} is not a device name; use 'cuda', 'cuda:1', 'cpu' or 'mps'.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(value)!r}: CUDA is not available here (no GPU, or a CPU-only torch "
                             f"build {torch.__version__}); use 'cpu'.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}={str(value)!r}: this machine has {count} CUDA device(s), 'cuda:0'.."
                             f"'cuda:{count - 1}'.")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name}={str(value)!r}: Apple's MPS is not available here; use 'cpu' or 'cuda'.")
        if device.index not in (None, 0):
            raise ValueError(f"{name}={str(value)!r}: MPS has one device, 'mps'.")
        return device
    raise ValueError(f"{name}={str(value)!r}: FluxCore runs on 'cuda', 'cpu' or 'mps', not {device.type!r}.")


def check_image(value: Any, name: str) -> None:
    """None or a PIL image."""
    if value is not None and not isinstance(value, Image.Image):
        raise TypeError(f"{name} must be a PIL.Image (got {_type_name(value)}); load a file with "
                        f"PIL.Image.open(path).convert('RGB').")


def check_images(value: Any, name: str) -> list[Image.Image]:
    """None, one PIL image, or a non-empty list of them -> a list (empty for None); `name` is the parameter
    (kontext_images, ipadapter_images)."""
    if value is None:
        return []
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    if not images:
        raise ValueError(f"{name}=[]: pass one PIL image, a list of them, or None.")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{name}[{i}] is a {_type_name(image)}; pass PIL images (one, or a list). "
                            f"Load files with PIL.Image.open(path).convert('RGB').")
    return images


def check_tea_cache_threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    value = check_real("tea_cache_l1_thresh", threshold, " (None: off; 0.25-0.8 skip more and more)")
    if value < 0:
        raise ValueError(f"tea_cache_l1_thresh={threshold} is negative; use None (off) or a value >= 0 "
                         f"(0.25 / 0.4 / 0.6 / 0.8 skip more and more steps).")
    return value


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: use " + ", ".join(repr(t) for t in OUTPUT_TYPES) + ".")
    return output_type


def check_callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}={value!r} is not callable; pass a function, or None.")
