"""Tiny LoRA-Encoder / LoRA-Fusion models and full-coverage LoRAs for tests, made with DiffSynth-Studio's own modules
(tests/diffsynth_ref.py) and written as published files, with LoRAs on every site of the tiny DiT (tests/tiny_dit.py:
2 double + 2 single blocks, width 32, MLP 128, text width 32) in three formats.

    their = diffsynth_encoder(seed=0)                  # DiffSynth's FluxLoRAEncoder, random weights
    write_state_dict(their, tmp / "encoder.safetensors", prefix="pipe.lora_encoder.")
    path = write_site_lora(tmp / "a.safetensors", "kohya", seed=1)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.tiny_dit import make_diffusers_dit
from tests.tiny_lora import bfl_shapes, bfl_to_diffsynth, diffusers_shapes, random_pairs, write_kohya, write_peft

TINY_ENCODER = dict(embed_dim=32, intermediate=64, heads=2, head_dim=128, rows=4)  # 2 heads x 128 (inner 256)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (DiffSynth's init leaves LayerNorms at 1/0 and the mergers' weight_out at 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def diffsynth_encoder(seed: int = 0, **sizes) -> torch.nn.Module:
    from tests.diffsynth_ref import tiny_diffsynth_lora_encoder, tiny_lora_patterns
    return randomize(tiny_diffsynth_lora_encoder(tiny_lora_patterns(), **{**TINY_ENCODER, **sizes}), seed)


def diffsynth_patcher(seed: int = 0, **dims) -> torch.nn.Module:
    from tests.diffsynth_ref import tiny_diffsynth_lora_patcher, tiny_lora_patterns
    return randomize(tiny_diffsynth_lora_patcher(tiny_lora_patterns(**dims)), seed)


def write_state_dict(module: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    return Path(path)


# ---- LoRAs on every site -----------------------------------------------------------------------------------

def _in_blocks(name: str) -> bool:
    return name.startswith(("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."))


def site_pairs(fmt: str, seed: int, rank: int = 4, alpha: float | None = None, std: float = 0.3) -> dict:
    """Random (down, up, alpha) for every block layer of the tiny DiT, keyed by the module names of `fmt`
    ("kohya" and "diffsynth": BFL names, one LoRA per fused layer; "diffusers": diffusers' split q/k/v/proj_mlp)."""
    model = make_diffusers_dit()
    if fmt == "diffusers":
        shapes = {n: s for n, s in diffusers_shapes(model).items() if _in_blocks(n)}
    else:
        shapes = {n: s for n, s in bfl_shapes(model).items() if _in_blocks(n)}
    return random_pairs(shapes, seed, rank=rank, alpha=alpha, std=std)


def write_site_lora(path: Path, fmt: str, seed: int, rank: int = 4, alpha: float | None = None,
                    drop: tuple[str, ...] = ()) -> Path:
    """A LoRA on every site of the tiny DiT in `fmt`: "kohya" (lora_unet_*, with alpha), "diffusers" (PEFT keys under
    `transformer.`, no alpha: scale 1) or "diffsynth" (DiffSynth's module names, lora_A/lora_B, no alpha). `drop`:
    modules (in the format's own names) to leave out."""
    pairs = {n: p for n, p in site_pairs(fmt, seed, rank, alpha).items() if n not in drop}
    if fmt == "kohya":
        return write_kohya(path, pairs)
    if fmt == "diffusers":
        return write_peft(path, pairs, prefix="transformer.")
    if fmt == "diffsynth":
        return write_peft(path, {bfl_to_diffsynth(n): p for n, p in pairs.items()}, prefix="")
    raise ValueError(fmt)
