"""The FLUX DiT layers DiffSynth-Studio's LoRA models are keyed by ("sites"), with their sizes.

LoRA-Encoder (models/lora_encoder.py) and LoRA-Fusion (models/lora_patcher.py) both hold one module per site, named
by DiffSynth's module name with `.` written `___` (`blocks___0___attn___a_to_qkv`). The sites are the ten LoRA
targets of every double block and the three of every single block: 19 x 10 + 38 x 3 = 304 in FLUX.1. DiffSynth's
fused layers keep BFL's row order, so a site's LoRA delta is the delta of one FluxCore (BFL-named) layer; the
name mapping is lora_tools' DiffSynth table.

Sizes follow from the hidden width D and the MLP width M (4D in FLUX.1): double `a_to_qkv` (D, 3D), `a_to_out`
(D, D), `ff_a.0` (D, M), `ff_a.2` (M, D), `norm1_a.linear` (D, 6D), the same for the text stream `b`; single
`to_qkv_mlp` (D, 3D + M), `proj_out` (D + M, D), `norm.linear` (D, 3D), as (in, out).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from lora_tools.names import TABLES

# DiffSynth's per-block site types, in its order (LoRAEmbedder / FluxLoraPatcher default_lora_patterns).
DOUBLE_SITE_TYPES = ("attn.a_to_qkv", "attn.a_to_out", "ff_a.0", "ff_a.2", "norm1_a.linear",
                     "attn.b_to_qkv", "attn.b_to_out", "ff_b.0", "ff_b.2", "norm1_b.linear")
SINGLE_SITE_TYPES = ("to_qkv_mlp", "proj_out", "norm.linear")

_KEY_BLOCK = re.compile(r"^(blocks|single_blocks)___(\d+)___")


@dataclass(frozen=True)
class LoraSite:
    name: str            # DiffSynth's module name: "blocks.0.attn.a_to_qkv"
    type: str            # the site within its block: "attn.a_to_qkv"
    layer: str           # the FluxCore (BFL) layer: "double_blocks.0.img_attn.qkv"
    in_features: int
    out_features: int

    @property
    def key(self) -> str:
        """The ModuleDict key DiffSynth's models use for this site."""
        return module_key(self.name)

    @property
    def type_key(self) -> str:
        return module_key(self.type)


def module_key(name: str) -> str:
    return name.replace(".", "___")


def _dims(site_type: str, hidden: int, mlp_hidden: int) -> tuple[int, int]:
    """(in, out) of a site type; the image (a) and text (b) streams of a double block have the same sizes."""
    d, m = hidden, mlp_hidden
    double = {"attn.{}_to_qkv": (d, 3 * d), "attn.{}_to_out": (d, d), "ff_{}.0": (d, m), "ff_{}.2": (m, d),
              "norm1_{}.linear": (d, 6 * d)}
    sizes = {k.format(stream): v for k, v in double.items() for stream in "ab"}
    sizes.update({"to_qkv_mlp": (d, 3 * d + m), "proj_out": (d + m, d), "norm.linear": (d, 3 * d)})
    return sizes[site_type]


def lora_sites(depth: int, depth_single: int, hidden: int, mlp_hidden: int) -> tuple[LoraSite, ...]:
    """Every site of a DiT with `depth` double and `depth_single` single blocks, hidden width `hidden` and MLP
    width `mlp_hidden`, in DiffSynth's order (double blocks first, each block's sites in the order above)."""
    sites = []
    for prefix, count, types in (("blocks", depth, DOUBLE_SITE_TYPES), ("single_blocks", depth_single,
                                                                          SINGLE_SITE_TYPES)):
        for i in range(count):
            for site_type in types:
                name = f"{prefix}.{i}.{site_type}"
                layer = TABLES["diffsynth"].lookup(name).name
                sites.append(LoraSite(name, site_type, layer, *_dims(site_type, hidden, mlp_hidden)))
    return tuple(sites)


def dit_lora_sites(dit: nn.Module) -> tuple[LoraSite, ...]:
    """The sites of a FluxCore DiT (flux_core.models.dit.FluxDiT), from its config."""
    p = dit.params
    return lora_sites(p.depth, p.depth_single_blocks, p.hidden_size, int(p.hidden_size * p.mlp_ratio))


def count_site_blocks(keys: Iterable[str]) -> tuple[int, int]:
    """(double blocks, single blocks) named by ModuleDict site keys (`blocks___3___ff_a___0`, ...): the highest
    index + 1 of each."""
    highest = {"blocks": -1, "single_blocks": -1}
    for key in keys:
        m = _KEY_BLOCK.match(key)
        if m:
            highest[m.group(1)] = max(highest[m.group(1)], int(m.group(2)))
    return highest["blocks"] + 1, highest["single_blocks"] + 1


def site_mismatch(sites: tuple[LoraSite, ...], dit_sites: tuple[LoraSite, ...], what: str,
                  out_only: bool = False, listed: int = 3) -> list[str]:
    """What keeps a model keyed by `sites` from fitting a DiT with `dit_sites` (empty: it fits): sites of another
    size, DiT sites the model lacks, model sites the DiT lacks. `out_only`: compare output sizes only (LoRA-Fusion
    knows nothing else)."""
    ours = {s.name: s for s in sites}
    theirs = {s.name: s for s in dit_sites}

    def size(s: LoraSite) -> str:
        return f"{s.out_features}" if out_only else f"{s.in_features}->{s.out_features}"

    resized = [f"{n} ({what} {size(ours[n])}, DiT {size(theirs[n])})" for n in theirs
               if n in ours and size(ours[n]) != size(theirs[n])]
    lacking = [n for n in theirs if n not in ours]
    extra = [n for n in ours if n not in theirs]
    problems = []
    for items, text in ((resized, "of another size"), (lacking, f"of the DiT without a {what} module"),
                        (extra, f"of the {what} that the DiT does not have")):
        if items:
            more = f", ... ({len(items) - listed} more)" if len(items) > listed else ""
            problems.append(f"{len(items)} sites {text}: {', '.join(items[:listed])}{more}")
    return problems
