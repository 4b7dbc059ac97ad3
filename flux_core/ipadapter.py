"""IP-Adapters as adapters: reference images -> per-block keys and values, attended to through the attention-hook slot.

DiffSynth-Studio's semantics (reference notes §3.3), for both families (flux_core.models.ipadapter):
- every reference image is encoded (SigLIP pooled / CLIP image_embeds), projected to image tokens, and all images'
  tokens are joined into one sequence; each block's keys and values are made from it once per run;
- InstantX: double block i uses module i, single block i module (double depth + i); the image queries' attention to
  the keys/values, times `scale`, is added to the attention output before the projection. XLabs: double blocks
  only, added to the image stream after the block (diffusers' place);
- under true CFG (cfg_scale != 1) the negative branch gets the adapter fed an all-zero image encoding.
  DiffSynth runs that negative adapter at scale 1.0 whatever ipadapter_scale is; FluxCore applies the same
  `scale` to both branches (identical results at scale 1, and a weight then means one thing on both sides).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .adapters import BRANCHES, Contribution, DiTCall, StepRange
from .dit_inputs import DiTInputs
from .models.dit import AfterBlock, BlockSite
from .models.image_encoders import CLIP, SIGLIP, TITLES, feature_dim, vision_family
from .models.ipadapter import FAMILIES, INSTANTX, XLABS, FluxIPAdapter, ip_attention
from .vram import compute_place

# The image encoder each family was trained with.
ENCODER_OF = {INSTANTX: SIGLIP, XLABS: CLIP}


@dataclass(eq=False)
class IPAdapterAdapter:
    """One IP-Adapter bound to its reference images: the keys/values of every block, per CFG branch, and the scale
    and step range it acts in."""
    name: str
    family: str
    keys_values: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]   # branch -> per adapter block (k, v)
    double_depth: int                                                 # the DiT's double blocks
    scale: float = 1.0
    steps: StepRange = field(default_factory=StepRange)

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        kv = self.keys_values.get(call.branch)
        if kv is None or not self.steps.contains(call) or self.scale == 0:
            return None

        def hook(site: BlockSite, q: torch.Tensor):
            index = site.index if site.kind == "double" else self.double_depth + site.index
            if index >= len(kv):   # XLabs: no single blocks
                return None
            out = self.scale * ip_attention(q, *kv[index])
            return out if self.family == INSTANTX else AfterBlock(out)
        return Contribution(source=self.name, attention_hooks=(hook,))


def check_ipadapter_models(model: FluxIPAdapter, encoder: torch.nn.Module, dit_depth: tuple[int, int],
                           dit_hidden: int, where: str) -> None:
    """The IP-Adapter fits the DiT and the image encoder fits the IP-Adapter; every mismatch in one ValueError."""
    p = model.params
    problems = []
    family = ENCODER_OF[p.family]
    if vision_family(encoder) != family or feature_dim(encoder) != p.image_embed_dim:
        problems.append(f"the {FAMILIES[p.family]} takes {p.image_embed_dim}-wide features from a "
                        f"{TITLES[family]}, but the image encoder is a {TITLES[vision_family(encoder)]} giving "
                        f"{feature_dim(encoder)}-wide ones (InstantX: google/siglip-so400m-patch14-384; XLabs: "
                        f"openai/clip-vit-large-patch14)")
    blocks = sum(dit_depth) if p.family == INSTANTX else dit_depth[0]
    if p.hidden_size != dit_hidden or p.num_blocks != blocks:
        problems.append(f"the IP-Adapter has {p.num_blocks} blocks of width {p.hidden_size}, but the DiT needs "
                        f"{blocks} of width {dit_hidden} ({dit_depth[0]} double + {dit_depth[1]} single blocks): "
                        f"it was made for another model")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + ".")


def bind_ipadapter(model: FluxIPAdapter, features: torch.Tensor, num_heads: int, dit_depth: tuple[int, int],
                   scale: float = 1.0, steps: StepRange | None = None, branches: Sequence[str] = BRANCHES,
                   name: str = "ipadapter") -> IPAdapterAdapter:
    """The adapter for image features (N, image_embed_dim) of N reference images: keys/values computed once for
    the positive branch from the features, and for the negative branch (when asked) from zeros."""
    device, dtype = compute_place(model)
    features = features.to(device, dtype)
    keys_values = {}
    for branch in branches:
        tokens = model.image_tokens(features if branch == "positive" else torch.zeros_like(features))
        keys_values[branch] = model.keys_values(tokens, num_heads)
    return IPAdapterAdapter(name=name, family=model.params.family, keys_values=keys_values,
                            double_depth=dit_depth[0], scale=float(scale), steps=steps or StepRange())

