"""Sampling as plain functions: seeds and noise, predict velocity (with CFG), denoise, references.

The pipeline and the ComfyUI nodes both call these: one code path, two front doors (their input checks are in
flux_core.inputs). Latents here are the VAE's scaled latents, (B, 16, H/8, W/8), kept in float32 through the
loop; the DiT computes in its own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from .inputs import check_seed, random_seed
from .adapters import Adapter, DiTCall, apply_adapters
from .dit_inputs import PromptEmbeds, prepare_dit_inputs, run_dit  # noqa: F401  (PromptEmbeds: re-exported)
from .math import image_ids, pack_latents, pad_to_patches
from .models.dit import DiTExtras, FluxDiT
from .scheduler import euler_step, next_sigmas
from .teacache import TeaCache, TeaCacheStats
from .text_conditioning import Conditioning
from .tiled_dit import DiTTiling, tiled_forward
from .vram import compute_place

LATENT_CHANNELS = 16


def resolve_seed(seed: int | None) -> int:
    """The seed a run uses: `seed` checked (0..2**64-1), or a random one over that range when None."""
    seed = check_seed(seed)
    return random_seed() if seed is None else seed


def make_noise(batch: int, height: int, width: int, seed: int, rand_device: str | torch.device = "cpu",
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Gaussian noise (B, 16, H/8, W/8) drawn in float32 on `rand_device`, so a seed gives the same image on
    any compute device (DiffSynth-Studio's convention)."""
    generator = torch.Generator(rand_device).manual_seed(seed)
    noise = torch.randn((batch, LATENT_CHANNELS, height // 8, width // 8), generator=generator,
                        device=rand_device, dtype=torch.float32)
    return noise.to(device)


def predict_velocity(dit: FluxDiT, latents: torch.Tensor, call: DiTCall | float, prompt: Conditioning,
                     guidance: float | None, extras: DiTExtras | None = None, adapters: Sequence[Adapter] = (),
                     tiling: DiTTiling | None = None) -> torch.Tensor:
    """The DiT's velocity for unpacked latents (B, C, h, w) in one call (`call`: step, sigma and branch; a float is
    the sigma of a lone call), with each adapter's contribution; with `tiling`, tile by tile (flux_core.tiled_dit)."""
    call = call if isinstance(call, DiTCall) else DiTCall(sigma=float(call))
    dtype = compute_place(dit)[1]  # fp8-stored weights compute in bf16

    prompt = prompt.at(call)  # a timestep-conditioned encoder (Step1X-Edit's connector) runs once per call

    def velocity_of(lat: torch.Tensor, top: int = 0, left: int = 0) -> torch.Tensor:
        inputs = prepare_dit_inputs(lat, call.sigma, prompt, guidance, dtype, extras, top, left)
        return run_dit(dit, apply_adapters(inputs, adapters, call))

    return velocity_of(latents) if tiling is None else tiled_forward(velocity_of, latents, tiling)


def guided_velocity(dit: FluxDiT, latents: torch.Tensor, call: DiTCall | float, positive: Conditioning,
                    negative: Conditioning | None, cfg_scale: float, guidance: float | None,
                    extras: DiTExtras | None = None, negative_extras: DiTExtras | None = None,
                    adapters: Sequence[Adapter] = (), tiling: DiTTiling | None = None) -> torch.Tensor:
    """True classifier-free guidance when cfg_scale != 1: nega + cfg * (posi - nega), two DiT passes (the second
    with `call.branch` "negative", which adapters may treat differently). `negative_extras` (default: `extras`)
    lets the negative pass carry its own state, e.g. its own TeaCache."""
    call = call if isinstance(call, DiTCall) else DiTCall(sigma=float(call))
    posi = predict_velocity(dit, latents, replace(call, branch="positive"), positive, guidance, extras, adapters,
                            tiling)
    if cfg_scale == 1.0 or negative is None:
        return posi
    nega = predict_velocity(dit, latents, replace(call, branch="negative"), negative, guidance,
                            extras if negative_extras is None else negative_extras, adapters, tiling)
    return nega + cfg_scale * (posi - nega)


def tea_cache_extras(extras: DiTExtras | None, num_steps: int, rel_l1_thresh: float | None, cfg: bool
                     ) -> tuple[DiTExtras | None, DiTExtras | None, dict[str, TeaCacheStats]]:
    """(positive extras, negative extras, stats by branch) for a run with TeaCache at `rel_l1_thresh`: each
    branch gets its own TeaCache (the negative one only under true CFG), and the stats fill in as the run goes.
    None means no TeaCache (the extras are returned as they are, the stats empty); 0 attaches caches that
    never skip (the output is the uncached one exactly)."""
    if rel_l1_thresh is None:
        return extras, extras, {}
    base = extras or DiTExtras()
    posi = TeaCache(num_steps, rel_l1_thresh, "positive")
    nega = TeaCache(num_steps, rel_l1_thresh, "negative") if cfg else None
    stats = {c.stats.branch: c.stats for c in (posi, nega) if c is not None}
    return replace(base, tea_cache=posi), (replace(base, tea_cache=nega) if nega else None), stats


def denoise(latents: torch.Tensor, sigmas: torch.Tensor, velocity: Callable[[torch.Tensor, DiTCall], torch.Tensor],
            progress_bar_cmd: Callable[[Iterable], Iterable] | None = None,
            callback: Callable[[int, int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Euler integration over `sigmas` (then to 0); `velocity(latents, call)` is asked once per step, with the
    step, the step count and sigma in `call` (adapters' start/end ranges read them). `callback(step, total,
    latents)` runs after each step: the nodes use it for progress, previews and interrupts (raising stops the
    loop); a tensor it returns replaces the latents (inpainting puts the kept region back this way)."""
    latents = latents.float()
    nexts = next_sigmas(sigmas)
    steps = range(len(sigmas))
    for i in (progress_bar_cmd(steps) if progress_bar_cmd else steps):
        v = velocity(latents, DiTCall(step=i, num_steps=len(sigmas), sigma=float(sigmas[i])))
        latents = euler_step(latents, v, float(sigmas[i]), float(nexts[i]))
        if callback is not None:
            replaced = callback(i, len(sigmas), latents)
            latents = latents if replaced is None else replaced
    return latents


@dataclass(frozen=True)
class Placement:
    """Where one reference's tokens sit: position index, and row/column offsets in latent pixels (ComfyUI's units;
    ids count patches, so an offset of o pixels is (o + 1) // 2 patches)."""
    index: int
    row: int = 0
    col: int = 0


def reference_extras(latents: list[torch.Tensor], batch: int, index: int = 1,
                     placements: Sequence[Placement] | None = None) -> DiTExtras:
    """Reference images as extra image tokens: each (1 or B, 16, h, w) latent packed at its own resolution with ids
    [index, row, col] (Kontext: 1; Step1X-Edit: 0, the image's own positions), or where `placements` put each (one
    per latent: ComfyUI's ref_latents_method, flux_core.native_forward); all references are appended after the
    image tokens and dropped from the output by the DiT."""
    placements = placements or [Placement(index)] * len(latents)
    tokens, ids = [], []
    for i, (lat, at) in enumerate(zip(latents, placements, strict=True)):
        if batch % lat.shape[0]:
            raise ValueError(f"reference {i} has a batch of {lat.shape[0]} images, which does not divide the batch "
                             f"of {batch}; give one reference image, or one per image.")
        lat = lat.repeat_interleave(batch // lat.shape[0], dim=0)
        lat = pad_to_patches(lat)
        _, _, h, w = lat.shape
        tokens.append(pack_latents(lat))
        ids.append(image_ids(batch, h, w, index=at.index, device=lat.device, row_offset=(at.row + 1) // 2,
                             col_offset=(at.col + 1) // 2))
    return DiTExtras(ref_tokens=torch.cat(tokens, dim=1), ref_ids=torch.cat(ids, dim=1))


def with_references(extras: DiTExtras | None, latents: list[torch.Tensor], batch: int, index: int) -> DiTExtras:
    """`extras` (or none) with more reference latents appended after its references (`reference_extras`)."""
    more = reference_extras(latents, batch, index)
    if extras is None or extras.ref_tokens is None:
        return more if extras is None else replace(extras, ref_tokens=more.ref_tokens, ref_ids=more.ref_ids)
    return replace(extras, ref_tokens=torch.cat((extras.ref_tokens, more.ref_tokens), dim=1),
                   ref_ids=torch.cat((extras.ref_ids, more.ref_ids), dim=1))
