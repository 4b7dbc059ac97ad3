"""FLUX DiT checkpoint layouts, converted to the BFL names by pure functions on lazy state dicts.

Layouts:
- "bfl": `flux1-dev.safetensors` and friends (also under ComfyUI's `model.diffusion_model.` prefix);
- "diffusers": `transformer/` folders (`transformer_blocks.N.attn.to_q`, ...; q/k/v split, final AdaLN as
  (scale, shift));
- "diffsynth": DiffSynth-Studio's internal names (`blocks.N.attn.a_to_qkv`, `single_blocks.N.to_qkv_mlp`, ...);
- "nexus-gen": Nexus-Gen checkpoints: DiffSynth names under `pipe.dit.`, the final AdaLN in (scale, shift) order
  (DiffSynth 2.x's converter swaps those halves when it loads a `pipe.dit.` file).

Step1X-Edit's `step1x-edit-i1258.safetensors` is a "bfl" DiT (no guidance embedder) with its connector beside it under
`connector.` (DiffSynth-Studio loads that file twice: its BFL DiT converter drops every key it does not rename, and
its connector converter keeps only `connector.*`); the DiT takes the file without those keys.
"""
from __future__ import annotations

from typing import Mapping

from lora_tools.names import FINAL_ADALN  # the final AdaLN layer, whose halves layouts store swapped

from ..models.controlnet import CONTROLNET_HEADS
from .files import CheckpointError, invert_rules, rename_keys
from .lazy import LazyTensor, lazy_cat, swap_halves

NEXUS_GEN_PREFIX = "pipe.dit."
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", NEXUS_GEN_PREFIX, "dit.")


def detect_dit_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    if "img_in.weight" in sd and "final_layer.linear.weight" in sd:
        return "bfl"
    if "x_embedder.weight" in sd and "time_text_embed.timestep_embedder.linear_1.weight" in sd:
        return "diffusers"
    if "x_embedder.weight" in sd and "time_embedder.timestep_embedder.0.weight" in sd:
        return "diffsynth"
    return None


# Other models published in one file with a BFL-layout DiT, by key prefix (Step1X-Edit's connector).
BESIDE_DIT_PREFIXES = ("connector.",)


def dit_to_bfl(sd: Mapping[str, LazyTensor], layout: str) -> dict[str, LazyTensor]:
    if layout == "bfl":
        return {k: v for k, v in sd.items() if not k.startswith(BESIDE_DIT_PREFIXES)}
    if layout == "diffusers":
        return _diffusers_to_bfl(sd)
    if layout == "diffsynth":
        return rename_keys(sd, DIFFSYNTH_RULES)
    if layout == "nexus-gen":
        out = rename_keys(sd, DIFFSYNTH_RULES)
        return {k: swap_halves(v) if k.startswith(FINAL_ADALN + ".") else v for k, v in out.items()}
    raise ValueError(f"unknown DiT layout {layout!r}")


# DiffSynth internal name -> BFL name (DiffSynth-Studio's diffsynth/utils/state_dict_converters/flux_dit.py).
# Final AdaLN is already (shift, scale).
DIFFSYNTH_RULES: list[tuple[str, str]] = [
    (r"^x_embedder\.", "img_in."),
    (r"^time_embedder\.timestep_embedder\.0\.", "time_in.in_layer."),
    (r"^time_embedder\.timestep_embedder\.2\.", "time_in.out_layer."),
    (r"^guidance_embedder\.timestep_embedder\.0\.", "guidance_in.in_layer."),
    (r"^guidance_embedder\.timestep_embedder\.2\.", "guidance_in.out_layer."),
    (r"^pooled_text_embedder\.0\.", "vector_in.in_layer."),
    (r"^pooled_text_embedder\.2\.", "vector_in.out_layer."),
    (r"^context_embedder\.", "txt_in."),
    (r"^final_norm_out\.linear\.", "final_layer.adaLN_modulation.1."),
    (r"^final_proj_out\.", "final_layer.linear."),
    (r"^blocks\.(\d+)\.norm1_a\.linear\.", r"double_blocks.\1.img_mod.lin."),
    (r"^blocks\.(\d+)\.norm1_b\.linear\.", r"double_blocks.\1.txt_mod.lin."),
    (r"^blocks\.(\d+)\.attn\.a_to_qkv\.", r"double_blocks.\1.img_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.b_to_qkv\.", r"double_blocks.\1.txt_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.norm_q_a\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^blocks\.(\d+)\.attn\.norm_k_a\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^blocks\.(\d+)\.attn\.norm_q_b\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^blocks\.(\d+)\.attn\.norm_k_b\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^blocks\.(\d+)\.attn\.a_to_out\.", r"double_blocks.\1.img_attn.proj."),
    (r"^blocks\.(\d+)\.attn\.b_to_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^blocks\.(\d+)\.ff_a\.(0|2)\.", r"double_blocks.\1.img_mlp.\2."),
    (r"^blocks\.(\d+)\.ff_b\.(0|2)\.", r"double_blocks.\1.txt_mlp.\2."),
    (r"^single_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.lin."),
    (r"^single_blocks\.(\d+)\.to_qkv_mlp\.", r"single_blocks.\1.linear1."),
    (r"^single_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    (r"^single_blocks\.(\d+)\.norm_q_a\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_blocks\.(\d+)\.norm_k_a\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
]

# diffusers name -> BFL name, for the one-to-one parts.
DIFFUSERS_RULES: list[tuple[str, str]] = [
    (r"^x_embedder\.", "img_in."),
    (r"^time_text_embed\.timestep_embedder\.linear_1\.", "time_in.in_layer."),
    (r"^time_text_embed\.timestep_embedder\.linear_2\.", "time_in.out_layer."),
    (r"^time_text_embed\.guidance_embedder\.linear_1\.", "guidance_in.in_layer."),
    (r"^time_text_embed\.guidance_embedder\.linear_2\.", "guidance_in.out_layer."),
    (r"^time_text_embed\.text_embedder\.linear_1\.", "vector_in.in_layer."),
    (r"^time_text_embed\.text_embedder\.linear_2\.", "vector_in.out_layer."),
    (r"^context_embedder\.", "txt_in."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^transformer_blocks\.(\d+)\.norm1\.linear\.", r"double_blocks.\1.img_mod.lin."),
    (r"^transformer_blocks\.(\d+)\.norm1_context\.linear\.", r"double_blocks.\1.txt_mod.lin."),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
    (r"^transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"double_blocks.\1.img_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.attn\.to_add_out\.", r"double_blocks.\1.txt_attn.proj."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"double_blocks.\1.img_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff\.net\.2\.", r"double_blocks.\1.img_mlp.2."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.", r"double_blocks.\1.txt_mlp.0."),
    (r"^transformer_blocks\.(\d+)\.ff_context\.net\.2\.", r"double_blocks.\1.txt_mlp.2."),
    (r"^single_transformer_blocks\.(\d+)\.norm\.linear\.", r"single_blocks.\1.modulation.lin."),
    (r"^single_transformer_blocks\.(\d+)\.proj_out\.", r"single_blocks.\1.linear2."),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$", r"single_blocks.\1.norm.query_norm.scale"),
    (r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$", r"single_blocks.\1.norm.key_norm.scale"),
]

# Fused BFL projections and the diffusers parts they concatenate (in order).
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _diffusers_to_bfl(sd: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    rest = dict(sd)
    out: dict[str, LazyTensor] = {}
    for group, fused_map in (("transformer_blocks", _DOUBLE_FUSED), ("single_transformer_blocks", _SINGLE_FUSED)):
        bfl_group = "double_blocks" if group == "transformer_blocks" else "single_blocks"
        ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith(group + ".")})
        for i in ids:
            for fused, parts in fused_map.items():
                for suffix in ("weight", "bias"):
                    keys = [f"{group}.{i}.{p}.{suffix}" for p in parts]
                    if not any(k in rest for k in keys):
                        continue
                    out[f"{bfl_group}.{i}.{fused}.{suffix}"] = lazy_cat([_take(rest, k, keys) for k in keys])
    if "norm_out.linear.weight" in rest:
        for suffix in ("weight", "bias"):
            out[f"{FINAL_ADALN}.{suffix}"] = swap_halves(rest.pop(f"norm_out.linear.{suffix}"))
    out.update(rename_keys(rest, DIFFUSERS_RULES))
    return out


def _take(rest: dict[str, LazyTensor], key: str, siblings: list[str]) -> LazyTensor:
    if key not in rest:
        raise CheckpointError(f"diffusers DiT checkpoint has {', '.join(k for k in siblings if k != key)} but not "
                              f"'{key}'; the file is incomplete or not a FLUX transformer.")
    return rest.pop(key)


def bfl_to_diffsynth(names: list[str]) -> dict[str, str]:
    """{our (BFL trunk) name: DiffSynth's name} for a ControlNet's parameters. Checked: every trunk name is renamed
    (only the heads keep their published names), and every new name reads back through the loader's table as the
    name it came from."""

    forward = dict(zip(names, rename_keys({n: n for n in names}, invert_rules(DIFFSYNTH_RULES))))
    back = rename_keys({theirs: ours for ours, theirs in forward.items()}, DIFFSYNTH_RULES)
    wrong = [ours for theirs, ours in back.items() if theirs != ours]
    wrong += [ours for ours, theirs in forward.items() if ours == theirs and not ours.startswith(CONTROLNET_HEADS)]
    if wrong:
        raise RuntimeError(f"no DiffSynth name that reads back as {wrong[:3]}: the table "
                           f"flux_core.loading.dit_layouts.DIFFSYNTH_RULES lacks them")
    return forward
