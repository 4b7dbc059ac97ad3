"""ComfyUI's FLUX call on FluxCore's DiT, in plain torch (nothing here imports ComfyUI).

ComfyUI's samplers call a FLUX diffusion model as

    diffusion_model(x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                    transformer_options={}, ref_latents_method=..., attention_mask=...)

with `x` the scaled latent (B, C, h, w) (C > 16 when ComfyUI joined extra channels, e.g. FLUX.1-Fill's image and
mask), `timestep` sigma (B,), `context` the T5 tokens, `y` the pooled CLIP vector, `guidance` FLUX.1-dev's
distilled guidance, `ref_latents` Kontext references (each (B, 16, h_i, w_i)), `control` ControlNet residuals per
block index ({"input": after double block i, "output": after single block i}) and `transformer_options` the
sampler's state (`cond_or_uncond`, `sigmas`, `sample_sigmas`, ...). `native_forward` runs that call as one
`FluxDiT.forward`, with the conventions of ComfyUI's own FLUX model (comfy/ldm/flux/model.py): odd sides padded to
whole patches by wrapping around, the output cropped back; text ids zero; references placed by
`ref_latents_method` (`reference_placements`). Where FluxCore differs on purpose it says so: guidance stays float32
(ComfyUI casts it to the model dtype first, and 1000 x 3.5 in bf16 is 3504).

FluxCore adapters (flux_core.adapters) ride along as `adapters`: each DiT call asks them for their contribution,
with the call's step and sigma read from `transformer_options` and its CFG branch from `cond_or_uncond`; a batch that
holds both branches runs one DiT call per branch, so each adapter sees the branch it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from .adapters import Adapter, Contribution, apply_adapters
from .dit_inputs import DiTCall, DiTInputs
from .math import image_ids, pack_latents, pad_to_patches, unpack_latents
from .models.dit import DiTExtras, FluxDiT
from .sampling import Placement, reference_extras

REFERENCE_METHODS = ("offset", "index", "uxo")
BRANCH_OF = {0: "positive", 1: "negative"}   # ComfyUI's cond_or_uncond: 0 cond, 1 uncond


def reference_placements(height: int, width: int, references: Sequence[tuple[int, int]], method: str = "offset"
                         ) -> list[Placement]:
    """Where each reference (its latent sides (h_i, w_i)) goes for a latent of (height, width), by ComfyUI's
    `ref_latents_method`:
    - "offset" (ComfyUI's default): index 1, each reference beside the ones before it (to the right when the
      references so far are taller than wide, else below), so no two share a position;
    - "index": reference i at index i + 1, no offset;
    - "uxo": index 0, each reference after the image's bottom-right corner and after the references before it.
    FluxCore's own sampler and pipeline put every reference at index 1 with no offset (DiffSynth-Studio's Kontext):
    the same as "offset" and "index" for one reference."""
    if method not in REFERENCE_METHODS:
        raise ValueError(f"ref_latents_method {method!r}: use one of {', '.join(REFERENCE_METHODS)}.")
    placements, h, w = [], 0, 0
    for i, (rh, rw) in enumerate(references):
        if method == "index":
            placements.append(Placement(i + 1))
        elif method == "uxo":
            placements.append(Placement(0, height + (height % 2) + h, width + (width % 2) + w))
            h, w = h + rh, w + rw
        else:
            row, col = (0, w) if rh + h > rw + w else (h, 0)
            placements.append(Placement(1, row, col))
            h, w = max(h, rh + row), max(w, rw + col)
    return placements


@dataclass
class PromptFromEncoder:
    """An adapter that puts a conditioning encoder's text (flux_core.text_conditioning: Step1X-Edit's connector output
    per call, Nexus-Gen's tokens) in place of the call's `context` and `y`, and its reference latents (scaled, index 0:
    Step1X-Edit's image to edit, at the image's own positions) after the call's references. It comes first among a
    call's adapters: the others see its text, as in FluxCore's own sampler."""
    conditioning: object                        # a PromptEmbeds or a StepConditioning (`.at(call)`)
    references: Sequence[torch.Tensor] = ()
    name: str = "fluxcore_text"

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution:
        embeds = self.conditioning.at(call).repeat_to(inputs.batch)
        device = inputs.img.device
        ids = (torch.zeros(inputs.batch, embeds.tokens, 3, device=device) if embeds.text_ids is None
               else embeds.text_ids.to(device, torch.float32))
        refs = reference_extras(list(self.references), inputs.batch, index=0) if self.references else None
        return Contribution(self.name, txt=embeds.prompt_emb.to(inputs.txt), txt_ids=ids, y=embeds.pooled.to(inputs.y),
                            ref_tokens=None if refs is None else refs.ref_tokens.to(device),
                            ref_ids=None if refs is None else refs.ref_ids.to(device))


def native_inputs(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                  guidance: torch.Tensor | float | None, dtype: torch.dtype, vec_in_dim: int,
                  ref_latents: Sequence[torch.Tensor] | None = None, ref_latents_method: str | None = None,
                  control: Mapping | None = None, attention_mask: torch.Tensor | None = None) -> DiTInputs:
    """The DiT inputs of one ComfyUI-style call (see the module docstring); `x` may be odd-sided and carry extra
    channels, which are packed with the latent's (so `img` has 4 x C channels)."""
    b, _, h, w = x.shape
    device = x.device
    padded = pad_to_patches(x)
    hp, wp = padded.shape[-2:]
    extras = DiTExtras()
    if ref_latents:
        refs = [r.to(device, dtype) for r in ref_latents]
        placements = reference_placements(h, w, [tuple(r.shape[-2:]) for r in refs], ref_latents_method or "offset")
        extras = reference_extras(refs, b, placements=placements)
    if control:
        extras = replace(extras, double_residuals=control.get("input") or None,
                         single_residuals=control.get("output") or None)
    if attention_mask is not None:
        extras = replace(extras, attention_mask=attention_mask.unsqueeze(1) if attention_mask.dim() == 3
                         else attention_mask)
    if y is None:  # ComfyUI's rule: a model without pooled conditioning gets zeros
        y = torch.zeros(b, vec_in_dim, device=device, dtype=dtype)
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32).to(device).reshape(-1).expand(b)
    return DiTInputs(
        img=pack_latents(padded).to(dtype),
        img_ids=image_ids(b, hp, wp, device=device),
        txt=context.to(device, dtype),
        txt_ids=torch.zeros(b, context.shape[1], 3, device=device),
        timesteps=timestep.to(device, torch.float32).reshape(-1).expand(b).clone(),
        y=y[:, :vec_in_dim].to(device, dtype),
        guidance=guidance,
        height=hp, width=wp, extras=extras)


def call_of(transformer_options: Mapping, sigma: float) -> DiTCall:
    """The DiTCall (step, step count, sigma) of a native sampler's model call: the step is the last of the run's
    `sample_sigmas` at or above this call's sigma (multistep samplers evaluate between them), the count the
    sigmas less the final 0. Without `sample_sigmas` (a lone call), step 0 of 1."""
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None or len(sigmas) < 2:
        return DiTCall(sigma=sigma)
    levels = [float(s) for s in sigmas[:-1]]
    step = max((i for i, s in enumerate(levels) if s >= sigma - 1e-6), default=0)
    return DiTCall(step=step, num_steps=len(levels), sigma=sigma)


def native_forward(dit: FluxDiT, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   y: torch.Tensor | None = None, guidance: torch.Tensor | float | None = None,
                   ref_latents: Sequence[torch.Tensor] | None = None, control: Mapping | None = None,
                   transformer_options: Mapping | None = None, adapters: Sequence[Adapter] = (),
                   dtype: torch.dtype | None = None, ref_latents_method: str | None = None,
                   attention_mask: torch.Tensor | None = None, **_ignored) -> torch.Tensor:
    """ComfyUI's FLUX forward on a FluxDiT: the model output (B, out_channels / 4, h, w) in float32 for `x`
    (B, C, h, w). `dtype` is the compute dtype (default: the DiT's); keywords ComfyUI adds in later versions are
    accepted and ignored."""
    options = transformer_options or {}
    dtype = dtype or next(dit.parameters()).dtype
    h, w = x.shape[-2:]
    inputs = native_inputs(x, timestep, context, y, guidance, dtype, dit.params.vec_in_dim, ref_latents,
                           ref_latents_method, control, attention_mask)
    call = call_of(options, float(inputs.timesteps[0]))
    chunks = list(options.get("cond_or_uncond") or [0])
    if adapters and len(set(chunks)) > 1:  # each branch's own contributions: one DiT call per chunk
        outs = [_run(dit, part, adapters, replace(call, branch=BRANCH_OF.get(c, "positive")))
                for part, c in zip(split_batch(inputs, len(chunks)), chunks)]
        out = torch.cat(outs)
    else:
        out = _run(dit, inputs, adapters, replace(call, branch=BRANCH_OF.get(chunks[0], "positive")))
    return out[:, :, :h, :w]


def _run(dit: FluxDiT, inputs: DiTInputs, adapters: Sequence[Adapter], call: DiTCall) -> torch.Tensor:
    inputs = apply_adapters(inputs, adapters, call)
    out = dit(**inputs.forward_kwargs())
    return unpack_latents(out.float(), inputs.height, inputs.width)


def split_batch(inputs: DiTInputs, parts: int) -> list[DiTInputs]:
    """`inputs` cut into `parts` equal batches (ComfyUI's cond/uncond chunks): every per-sample tensor is cut, the
    residual lists and the attention mask too when they have a batch of their own."""
    def cut(t):
        if t is None or t.shape[0] == 1 and inputs.batch != 1:
            return [t] * parts
        return list(t.chunk(parts))

    def cut_list(residuals):
        if residuals is None:
            return [None] * parts
        per_block = [cut(r) for r in residuals]
        return [[r[k] for r in per_block] for k in range(parts)]

    e = inputs.extras
    fields = dict(img=cut(inputs.img), img_ids=cut(inputs.img_ids), txt=cut(inputs.txt), txt_ids=cut(inputs.txt_ids),
                  timesteps=cut(inputs.timesteps), y=cut(inputs.y), guidance=cut(inputs.guidance))
    extras = dict(ref_tokens=cut(e.ref_tokens), ref_ids=cut(e.ref_ids), extra_channels=cut(e.extra_channels),
                  double_residuals=cut_list(e.double_residuals), single_residuals=cut_list(e.single_residuals),
                  attention_mask=cut(e.attention_mask))
    return [replace(inputs, **{k: v[i] for k, v in fields.items()},
                    extras=replace(e, **{k: v[i] for k, v in extras.items()})) for i in range(parts)]
