"""Adapters: objects that contribute to one DiT call, per step and per CFG branch.

The denoise loop (flux_core.sampling), the sampler node and the trainer hold a list of adapters. For every DiT call
each adapter sees the prepared inputs (`DiTInputs`) and the call (`DiTCall`: step, sigma, branch) and returns a
`Contribution` or None (not active in this call). Contributions go into the DiT through the slots of
`flux_core.models.dit.DiTExtras`, in list order:

| slot                              | merged how                      | used by                               |
| --------------------------------- | ------------------------------- | ------------------------------------- |
| txt / txt_ids / y (replaced)      | the later adapter sees the new  | LoRA-Encoder (appends to txt)         |
| extra_channels                    | concatenated                    | FLEX.2, Fill                          |
| double_residuals/single_residuals | summed per block                | ControlNets, InfiniteYou              |
| attention_hooks                   | all run, outputs summed         | IP-Adapter                            |
| attention_mask                    | at most one (two is an error)   | EliGen                                |
| ref_tokens / ref_ids              | appended after the references   | Step1X-Edit's image on a native MODEL |

The prompt's own conditioning comes before any adapter, from a conditioning encoder (flux_core.text_conditioning:
CLIP-L + T5, Step1X-Edit, Nexus-Gen).

Every contribution names its source; the names become `DiTExtras.contributors`, which TeaCache compares before
reusing a residual (flux_core.teacache).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import torch

from .dit_inputs import DiTCall, DiTInputs  # noqa: F401  (DiTCall: adapters import it from here)
from .models.dit import AttentionHook

BRANCHES = ("positive", "negative")


@dataclass(frozen=True)
class StepRange:
    """DiffSynth-Studio's start/end of an adapter: active while end <= progress <= start (progress runs from 1 at the
    first step to 0 at the last), so start=1, end=0 is every step and start=1, end=0.5 the first half. diffusers'
    control_guidance_start/end count the other way: their (s, e) is this class's (1 - s, 1 - e)."""
    start: float = 1.0
    end: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.end <= self.start <= 1.0:
            raise ValueError(f"start={self.start}, end={self.end}: need 0 <= end <= start <= 1 (DiffSynth-Studio's "
                             f"convention: start is the progress where it begins, 1 = the first step).")

    def contains(self, call: DiTCall) -> bool:
        return not (call.progress > self.start or call.progress < self.end)


@dataclass
class Contribution:
    """What one adapter adds to one DiT call (see the module docstring for the slots)."""
    source: str
    txt: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None
    y: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    double_residuals: Sequence[torch.Tensor | None] | None = None
    single_residuals: Sequence[torch.Tensor | None] | None = None
    attention_mask: torch.Tensor | None = None
    attention_hooks: tuple[AttentionHook, ...] = ()
    ref_tokens: torch.Tensor | None = None
    ref_ids: torch.Tensor | None = None


class Adapter(Protocol):
    name: str

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        """This adapter's contribution to one DiT call, or None when it is not active in it."""


def apply_adapters(inputs: DiTInputs, adapters: Sequence[Adapter], call: DiTCall) -> DiTInputs:
    """The inputs of one DiT call with every adapter's contribution in its slot."""
    for adapter in adapters:
        contribution = adapter.contribute(inputs, call)
        if contribution is not None:
            inputs = with_contribution(inputs, contribution)
    return inputs


def with_contribution(inputs: DiTInputs, c: Contribution) -> DiTInputs:
    extras = inputs.extras
    if c.attention_mask is not None and extras.attention_mask is not None:
        raise ValueError(f"{c.source} gives an attention mask, but {', '.join(extras.contributors)} already gave "
                         f"one: one DiT call takes at most one attention mask (EliGen); use one of them.")
    channels = extras.extra_channels
    if c.extra_channels is not None:
        channels = c.extra_channels if channels is None else torch.cat((channels, c.extra_channels), dim=-1)
    refs, ref_ids = extras.ref_tokens, extras.ref_ids
    if c.ref_tokens is not None:
        refs = c.ref_tokens if refs is None else torch.cat((refs, c.ref_tokens.to(refs)), dim=1)
        ref_ids = c.ref_ids if ref_ids is None else torch.cat((ref_ids, c.ref_ids.to(ref_ids)), dim=1)
    extras = replace(
        extras,
        ref_tokens=refs,
        ref_ids=ref_ids,
        extra_channels=channels,
        double_residuals=sum_residuals(extras.double_residuals, c.double_residuals),
        single_residuals=sum_residuals(extras.single_residuals, c.single_residuals),
        attention_mask=c.attention_mask if c.attention_mask is not None else extras.attention_mask,
        attention_hooks=extras.attention_hooks + tuple(c.attention_hooks),
        contributors=extras.contributors + (c.source,),
    )
    return replace(inputs, extras=extras,
                   txt=inputs.txt if c.txt is None else c.txt,
                   txt_ids=inputs.txt_ids if c.txt_ids is None else c.txt_ids,
                   y=inputs.y if c.y is None else c.y)


def sum_residuals(a: Sequence[torch.Tensor | None] | None, b: Sequence[torch.Tensor | None] | None
                  ) -> list[torch.Tensor | None] | None:
    """Per-block sum of two residual lists (either may be shorter, or hold None for a block). Blocks that share a pair
    of tensors (a ControlNet spreads each residual over several blocks) share one sum."""
    if a is None or b is None:
        return list(b if a is None else a) if (a is not None or b is not None) else None
    out, sums = [], {}
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x is None or y is None:
            out.append(y if x is None else x)
            continue
        if (id(x), id(y)) not in sums:
            sums[(id(x), id(y))] = x + y
        out.append(sums[(id(x), id(y))])
    return out
