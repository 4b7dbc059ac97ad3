"""Conditioning encoders: what turns a request's prompts into the DiT's text conditioning.

The DiT reads three things from a prompt: text tokens (B, L, 4096), a pooled vector (B, 768) and the tokens'
position ids (B, L, 3). FLUX.1 makes them with CLIP-L and T5 (`ClipT5Encoder`); Step1X-Edit with Qwen2.5-VL and a
connector (flux_core.step1x); Nexus-Gen with its autoregressive Qwen2.5-VL and an adapter (flux_core.nexus_gen).
Each is a `ConditioningEncoder`: `encode(prompts, branch)` gives one `Conditioning` per CFG branch.

A `Conditioning` is either fixed for the whole run (`PromptEmbeds`) or made per DiT call (`StepConditioning`:
Step1X-Edit's connector is timestep-conditioned, so it runs at every step). The denoise loop, the sampler node
and the trainer call `conditioning.at(call)` once per DiT call and hand the result to the DiT; `PromptEmbeds.at`
returns itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

import torch
from torch import nn

from .dit_inputs import DiTCall, PromptEmbeds
from .models.text_encoders import clip_pooled, encode_prompt, t5_sequence_length_of


class StepConditioning(Protocol):
    """Text conditioning that depends on the DiT call (its noise level): `at(call)` makes the call's embeddings."""

    @property
    def tokens(self) -> int:
        """The number of text tokens it gives the DiT (for memory estimates)."""

    def at(self, call: DiTCall) -> PromptEmbeds:
        """The embeddings of one DiT call."""


Conditioning = Union[PromptEmbeds, StepConditioning]


class ConditioningEncoder(Protocol):
    """Turns prompts into conditioning. `slots` are the pipeline slots it runs while encoding (moved onto the
    device for that stage, and named when one is empty); `step_slots` those its conditioning runs at every DiT
    call (kept on the device with the DiT); `max_tokens` the most text tokens a branch gives the DiT (the run's
    memory estimate counts them before anything is encoded)."""
    name: str
    slots: tuple[str, ...]
    step_slots: tuple[str, ...]

    @property
    def max_tokens(self) -> int:
        """The most text tokens one branch's conditioning holds."""

    def encode(self, prompts: Sequence[str], branch: str) -> Conditioning:
        """The conditioning of `prompts` (one per image of the batch) for CFG branch "positive" or "negative"."""


@dataclass
class ClipT5Encoder:
    """FLUX.1's own: CLIP-L's pooled vector, T5's tokens (padded to t5_sequence_length), zero text ids.
    t5_sequence_length None: the T5 tokenizer's model_max_length, capped at 512 (`t5_sequence_length_of`), resolved
    when the encoder is made."""
    clip: nn.Module
    t5: nn.Module
    clip_tokenizer: object
    t5_tokenizer: object
    t5_sequence_length: int | None = None
    device: torch.device | str | None = None
    name: str = "CLIP-L + T5"
    slots: tuple[str, ...] = ("text_encoder_1", "text_encoder_2")
    step_slots: tuple[str, ...] = ()

    def __post_init__(self):
        self.t5_sequence_length = t5_sequence_length_of(self.t5_tokenizer, self.t5_sequence_length)

    @property
    def max_tokens(self) -> int:
        return self.t5_sequence_length

    def encode(self, prompts: Sequence[str], branch: str = "positive") -> PromptEmbeds:
        prompt_emb, pooled = encode_prompt(list(prompts), self.clip, self.t5, self.clip_tokenizer, self.t5_tokenizer,
                                           t5_sequence_length=self.t5_sequence_length, device=self.device)
        return PromptEmbeds(prompt_emb, pooled)

    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-L's pooled vector alone (Nexus-Gen takes it beside its own tokens), on `device`."""
        pooled = clip_pooled(list(prompts), self.clip, self.clip_tokenizer)
        return pooled if self.device is None else pooled.to(self.device)

