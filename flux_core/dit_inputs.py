"""One preparation of the DiT's inputs, shared by sampling, training and the nodes.

`prepare_dit_inputs` turns unpacked latents, a noise level and text conditioning into the DiT forward's arguments
(`DiTInputs`); adapters (flux_core.adapters) then change those inputs for one call; `run_dit` runs the DiT and
unpacks its velocity. The tiled DiT prepares one `DiTInputs` per tile, whose `top`/`left` say where the tile sits,
so adapters with spatial inputs (a ControlNet's control latent) crop them to match.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .math import image_ids, pack_latents, text_ids, unpack_latents
from .models.dit import DiTExtras


@dataclass(frozen=True)
class DiTCall:
    """Which DiT call this is: step `step` of `num_steps` at noise level `sigma`, for a CFG branch."""
    step: int = 0
    num_steps: int = 1
    sigma: float = 1.0
    branch: str = "positive"

    @property
    def progress(self) -> float:
        """DiffSynth-Studio's progress: 1 at the first step, 0 at the last."""
        return (self.num_steps - 1 - self.step) / max(self.num_steps - 1, 1)


@dataclass
class PromptEmbeds:
    """One side (positive or negative) of the text conditioning: what a conditioning encoder
    (flux_core.text_conditioning) gives the DiT."""
    prompt_emb: torch.Tensor   # (B, L, 4096) text tokens (T5's, or a Step1X / Nexus-Gen encoder's)
    pooled: torch.Tensor       # (B, 768) pooled vector (CLIP-L's)
    text_ids: torch.Tensor | None = None   # (B, L, 3) position ids of the text tokens; None: all zero (T5's)

    @property
    def tokens(self) -> int:
        return self.prompt_emb.shape[1]

    def at(self, call: DiTCall) -> "PromptEmbeds":
        """The conditioning of one DiT call: the same at every call (a timestep-conditioned encoder's changes)."""
        return self

    def repeat_to(self, batch: int) -> "PromptEmbeds":
        if self.prompt_emb.shape[0] == batch:
            return self
        if batch % self.prompt_emb.shape[0]:
            raise ValueError(f"cannot spread {self.prompt_emb.shape[0]} prompt(s) over a batch of {batch}.")
        n = batch // self.prompt_emb.shape[0]
        ids = None if self.text_ids is None else self.text_ids.repeat_interleave(n, 0)
        return PromptEmbeds(self.prompt_emb.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0), ids)


@dataclass
class DiTInputs:
    """The arguments of one DiT forward (compute dtype, on the latents' device) and where its image tokens come from.

    img (B, L, 64) packed latent tokens of a (height, width) latent; img_ids (B, L, 3); txt (B, Lt, 4096) text tokens
    with txt_ids (B, Lt, 3); timesteps: sigma (B,) float32; y: pooled CLIP (B, 768); guidance (B,) float32 or None.
    top, left: where this latent sits in the whole latent, in latent pixels (non-zero for a tile of the tiled DiT).
    """
    img: torch.Tensor
    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor
    timesteps: torch.Tensor
    y: torch.Tensor
    guidance: torch.Tensor | None
    height: int
    width: int
    top: int = 0
    left: int = 0
    extras: DiTExtras = field(default_factory=DiTExtras)

    @property
    def batch(self) -> int:
        return self.img.shape[0]

    def forward_kwargs(self) -> dict:
        return dict(img=self.img, img_ids=self.img_ids, txt=self.txt, txt_ids=self.txt_ids, timesteps=self.timesteps,
                    y=self.y, guidance=self.guidance, extras=self.extras)


def prepare_dit_inputs(latents: torch.Tensor, sigma: float | torch.Tensor, prompt: PromptEmbeds,
                       guidance: float | None, dtype: torch.dtype, extras: DiTExtras | None = None,
                       top: int = 0, left: int = 0) -> DiTInputs:
    """The DiT inputs for unpacked latents (B, 16, h, w) at noise level `sigma` (a float, or (B,) per sample)."""
    b, _, h, w = latents.shape
    device = latents.device
    prompt = prompt.repeat_to(b)
    ids = (text_ids(b, prompt.tokens, device=device) if prompt.text_ids is None
           else prompt.text_ids.to(device, torch.float32))
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).to(device).expand(b).clone()
    return DiTInputs(
        img=pack_latents(latents).to(dtype),
        img_ids=image_ids(b, h, w, device=device),
        txt=prompt.prompt_emb.to(device, dtype),
        txt_ids=ids,
        timesteps=sigmas,
        y=prompt.pooled.to(device, dtype),
        guidance=torch.full((b,), guidance, device=device, dtype=torch.float32) if guidance is not None else None,
        height=h, width=w, top=top, left=left,
        extras=extras or DiTExtras(),
    )


def run_dit(model: nn.Module, inputs: DiTInputs) -> torch.Tensor:
    """The velocity (B, 16, h, w) float32 of one DiT forward. `model` may be the DiT or a DDP wrapper of it."""
    out = model(**inputs.forward_kwargs())
    return unpack_latents(out.float(), inputs.height, inputs.width)
