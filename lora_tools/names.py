"""The FLUX.1 DiT layers a LoRA can target, and what each published naming scheme calls them.

The canonical name of a layer is its Black Forest Labs module name (`double_blocks.3.img_attn.qkv`). Other
schemes name the same layer differently, and diffusers splits three of them into parts:

| BFL (fused)                 | diffusers parts, in row order                                   |
| `double_blocks.N.img_attn.qkv` | `transformer_blocks.N.attn.to_q`, `to_k`, `to_v`             |
| `double_blocks.N.txt_attn.qkv` | `transformer_blocks.N.attn.add_q_proj`, `add_k_proj`, `add_v_proj` |
| `single_blocks.N.linear1`      | `single_transformer_blocks.N.attn.to_q`, `to_k`, `to_v`, `proj_mlp` |

A part is addressed as (canonical name, first part, number of parts), so XLabs' single-block `qkv_lora`, which
covers the q, k and v rows of `linear1` but not its MLP rows, is (linear1, 0, 3).

diffusers also stores the final AdaLN projection as (scale, shift) where BFL has (shift, scale): a LoRA on
`norm_out.linear` has the two halves of its up rows swapped relative to `final_layer.adaLN_modulation.1`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# BFL Linear layers inside each block, and outside the blocks.
DOUBLE_LAYERS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                 "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
SINGLE_LAYERS = ("linear1", "linear2", "modulation.lin")
GLOBAL_LAYERS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                 "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                 "final_layer.adaLN_modulation.1")

FINAL_ADALN = "final_layer.adaLN_modulation.1"  # the layer whose up rows diffusers stores half-swapped

# Fused layers: the names of their parts ("q", "k", "v", "mlp"). Sizes come from the layer's shape (below).
FUSED_PARTS: dict[str, tuple[str, ...]] = {"img_attn.qkv": ("q", "k", "v"), "txt_attn.qkv": ("q", "k", "v"),
                                            "linear1": ("q", "k", "v", "mlp")}


def layer_suffix(name: str) -> str:
    """`double_blocks.3.img_attn.qkv` -> `img_attn.qkv`; global layers are returned as they are."""
    m = re.match(r"^(?:double|single)_blocks\.\d+\.(.+)$", name)
    return m.group(1) if m else name


def block_of(name: str) -> tuple[str, int] | None:
    """("double", 3) for `double_blocks.3.img_attn.qkv`, None for layers outside the blocks."""
    m = re.match(r"^(double|single)_blocks\.(\d+)\.", name)
    return (m.group(1), int(m.group(2))) if m else None


def part_sizes(name: str, shape: tuple[int, int]) -> list[int]:
    """Output rows of each part of a fused layer of weight shape (out, in). q, k, v have the hidden size
    each: out/3 for the attention qkv, in_features for `linear1` (whose remaining rows are the MLP)."""
    out_features, in_features = shape
    suffix = layer_suffix(name)
    if suffix == "linear1":
        return [in_features] * 3 + [out_features - 3 * in_features]
    if suffix in FUSED_PARTS:
        return [out_features // 3] * 3
    return [out_features]


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: rows `parts` [first, first + count) of the canonical layer `name`
    (count None: the whole layer). `swap_halves`: the up rows are in diffusers' (scale, shift) order."""
    name: str
    first: int = 0
    count: int | None = None
    swap_halves: bool = False

    @property
    def whole(self) -> bool:
        return self.count is None


# ---------------------------------------------------------------------------------------------------------
# Naming schemes: (pattern with {i} for the block index, Target factory). Built once into regexes.

TargetOf = Callable[[int], Target]   # block index -> Target

def _double(suffix: str, first: int = 0, count: int | None = None) -> TargetOf:
    return lambda i: Target(f"double_blocks.{i}.{suffix}", first, count)


def _single(suffix: str, first: int = 0, count: int | None = None) -> TargetOf:
    return lambda i: Target(f"single_blocks.{i}.{suffix}", first, count)


def _glob(name: str, swap: bool = False) -> TargetOf:
    return lambda i: Target(name, swap_halves=swap)


BFL_NAMES = ([(f"double_blocks.{{i}}.{s}", _double(s)) for s in DOUBLE_LAYERS]
             + [(f"single_blocks.{{i}}.{s}", _single(s)) for s in SINGLE_LAYERS]
             + [(g, _glob(g)) for g in GLOBAL_LAYERS])

DIFFUSERS_NAMES = [
    ("transformer_blocks.{i}.norm1.linear", _double("img_mod.lin")),
    ("transformer_blocks.{i}.norm1_context.linear", _double("txt_mod.lin")),
    ("transformer_blocks.{i}.attn.to_q", _double("img_attn.qkv", 0, 1)),
    ("transformer_blocks.{i}.attn.to_k", _double("img_attn.qkv", 1, 1)),
    ("transformer_blocks.{i}.attn.to_v", _double("img_attn.qkv", 2, 1)),
    ("transformer_blocks.{i}.attn.add_q_proj", _double("txt_attn.qkv", 0, 1)),
    ("transformer_blocks.{i}.attn.add_k_proj", _double("txt_attn.qkv", 1, 1)),
    ("transformer_blocks.{i}.attn.add_v_proj", _double("txt_attn.qkv", 2, 1)),
    ("transformer_blocks.{i}.attn.to_out.0", _double("img_attn.proj")),
    ("transformer_blocks.{i}.attn.to_add_out", _double("txt_attn.proj")),
    ("transformer_blocks.{i}.ff.net.0.proj", _double("img_mlp.0")),
    ("transformer_blocks.{i}.ff.net.2", _double("img_mlp.2")),
    ("transformer_blocks.{i}.ff_context.net.0.proj", _double("txt_mlp.0")),
    ("transformer_blocks.{i}.ff_context.net.2", _double("txt_mlp.2")),
    ("single_transformer_blocks.{i}.attn.to_q", _single("linear1", 0, 1)),
    ("single_transformer_blocks.{i}.attn.to_k", _single("linear1", 1, 1)),
    ("single_transformer_blocks.{i}.attn.to_v", _single("linear1", 2, 1)),
    ("single_transformer_blocks.{i}.proj_mlp", _single("linear1", 3, 1)),
    ("single_transformer_blocks.{i}.proj_out", _single("linear2")),
    ("single_transformer_blocks.{i}.norm.linear", _single("modulation.lin")),
    ("x_embedder", _glob("img_in")),
    ("context_embedder", _glob("txt_in")),
    ("time_text_embed.timestep_embedder.linear_1", _glob("time_in.in_layer")),
    ("time_text_embed.timestep_embedder.linear_2", _glob("time_in.out_layer")),
    ("time_text_embed.guidance_embedder.linear_1", _glob("guidance_in.in_layer")),
    ("time_text_embed.guidance_embedder.linear_2", _glob("guidance_in.out_layer")),
    ("time_text_embed.text_embedder.linear_1", _glob("vector_in.in_layer")),
    ("time_text_embed.text_embedder.linear_2", _glob("vector_in.out_layer")),
    ("proj_out", _glob("final_layer.linear")),
    ("norm_out.linear", _glob(FINAL_ADALN, swap=True)),
]

# DiffSynth-Studio's internal module names (its diffsynth/utils/state_dict_converters/flux_dit.py and LoRA loader).
DIFFSYNTH_NAMES = [
    ("blocks.{i}.norm1_a.linear", _double("img_mod.lin")),
    ("blocks.{i}.norm1_b.linear", _double("txt_mod.lin")),
    ("blocks.{i}.attn.a_to_qkv", _double("img_attn.qkv")),
    ("blocks.{i}.attn.b_to_qkv", _double("txt_attn.qkv")),
    ("blocks.{i}.attn.a_to_out", _double("img_attn.proj")),
    ("blocks.{i}.attn.b_to_out", _double("txt_attn.proj")),
    ("blocks.{i}.ff_a.0", _double("img_mlp.0")),
    ("blocks.{i}.ff_a.2", _double("img_mlp.2")),
    ("blocks.{i}.ff_b.0", _double("txt_mlp.0")),
    ("blocks.{i}.ff_b.2", _double("txt_mlp.2")),
    ("single_blocks.{i}.to_qkv_mlp", _single("linear1")),
    ("single_blocks.{i}.proj_out", _single("linear2")),
    ("single_blocks.{i}.norm.linear", _single("modulation.lin")),
    ("x_embedder", _glob("img_in")),
    ("context_embedder", _glob("txt_in")),
    ("time_embedder.timestep_embedder.0", _glob("time_in.in_layer")),
    ("time_embedder.timestep_embedder.2", _glob("time_in.out_layer")),
    ("guidance_embedder.timestep_embedder.0", _glob("guidance_in.in_layer")),
    ("guidance_embedder.timestep_embedder.2", _glob("guidance_in.out_layer")),
    ("pooled_text_embedder.0", _glob("vector_in.in_layer")),
    ("pooled_text_embedder.2", _glob("vector_in.out_layer")),
    ("final_norm_out.linear", _glob(FINAL_ADALN)),
    ("final_proj_out", _glob("final_layer.linear")),
]

# XLabs (x-flux) attention processors: double blocks carry image (1) and text (2) LoRAs on qkv and proj.
# Single blocks follow diffusers' reading of them: qkv_lora -> the q, k, v rows of linear1, proj_lora -> linear2.
XLABS_NAMES = [
    ("double_blocks.{i}.processor.qkv_lora1", _double("img_attn.qkv")),
    ("double_blocks.{i}.processor.proj_lora1", _double("img_attn.proj")),
    ("double_blocks.{i}.processor.qkv_lora2", _double("txt_attn.qkv")),
    ("double_blocks.{i}.processor.proj_lora2", _double("txt_attn.proj")),
    ("single_blocks.{i}.processor.qkv_lora", _single("linear1", 0, 3)),
    ("single_blocks.{i}.processor.proj_lora", _single("linear2")),
]


class NameTable:
    """Looks a module path up in one scheme, dotted (`transformer_blocks.0.attn.to_q`) or with kohya's
    underscores (`transformer_blocks_0_attn_to_q`), and writes canonical names back in that scheme."""

    def __init__(self, entries: list[tuple[str, TargetOf]], underscores: bool = False):
        self.underscores = underscores
        self._entries = []
        for pattern, factory in entries:
            text = pattern.replace(".", "_") if underscores else pattern
            regex = re.escape(text).replace(re.escape("{i}"), r"(\d+)")
            self._entries.append((re.compile(f"^{regex}$"), factory, text))

    def lookup(self, path: str) -> Target | None:
        for regex, factory, _ in self._entries:
            m = regex.match(path)
            if m:
                return factory(int(m.group(1)) if m.groups() else 0)
        return None

    def name_for(self, target: Target) -> str | None:
        """The module path of this scheme that lands exactly on `target` (block index filled in)."""
        block = block_of(target.name)
        index = block[1] if block else 0
        for _, factory, text in self._entries:
            if factory(index) == target:
                return text.replace("{i}", str(index))
        return None


TABLES = {
    "bfl": NameTable(BFL_NAMES),
    "kohya": NameTable(BFL_NAMES, underscores=True),
    "diffusers": NameTable(DIFFUSERS_NAMES),
    "onetrainer": NameTable(DIFFUSERS_NAMES, underscores=True),
    "diffsynth": NameTable(DIFFSYNTH_NAMES),
    "xlabs": NameTable(XLABS_NAMES),
}
