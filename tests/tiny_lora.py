"""Tiny random FLUX LoRA files in every published format, written here independently of lora_tools, with the
weight deltas each one should produce on the BFL-named layers (the test oracle).

A LoRA is first made as `pairs`: {module name in the format's own naming: (down, up, alpha)}; a writer turns
that into a file. `expected_*` functions turn pairs into {BFL layer: delta} using their own name tables.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def random_pairs(shapes: dict[str, tuple[int, int]], seed: int, rank: int = 4, alpha=None, std: float = 0.2) -> Pairs:
    """Random (down, up, alpha) per module; `alpha` is None (= rank), a number, or a function of the name.
    up is non-zero (random) so that every LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (o, n_in)) in enumerate(sorted(shapes.items())):
        r = rank(name) if callable(rank) else rank
        a = alpha(name) if callable(alpha) else (float(r) if alpha is None else float(alpha))
        out[name] = (torch.randn(r, n_in, generator=g) * std, torch.randn(o, r, generator=g) * std, a)
    return out


def delta(down, up, alpha) -> torch.Tensor:
    return up.double() @ down.double() * (alpha / down.shape[0])


# ---- shapes of the tiny model's layers, in each naming -----------------------------------------------------

def diffusers_shapes(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def bfl_shapes(model) -> dict[str, tuple[int, int]]:
    from tests.tiny_dit import bfl_state_dict
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in bfl_state_dict(model).items()
            if k.endswith(".weight") and v.ndim == 2}


# ---- writers ------------------------------------------------------------------------------------------------

def write_kohya(path: Path, pairs: Pairs, extra: dict[str, torch.Tensor] | None = None, with_alpha: bool = True) -> Path:
    """pairs keyed by BFL names -> `lora_unet_<name with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`."""
    sd = {}
    for name, (down, up, alpha) in pairs.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        if with_alpha:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    sd.update(extra or {})
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return Path(path)


def write_peft(path: Path, pairs: Pairs, prefix: str = "transformer.", adapter: str = "", alpha_keys: bool = False,
               metadata: dict | None = None, down_up=("lora_A", "lora_B")) -> Path:
    """PEFT tensors: `<prefix><name>.lora_A[.adapter].weight`; alpha only as `.alpha` keys if asked."""
    a, b = down_up
    tok = f".{adapter}" if adapter else ""
    sd = {}
    for name, (down, up, alpha) in pairs.items():
        sd[f"{prefix}{name}.{a}{tok}.weight"] = down
        sd[f"{prefix}{name}.{b}{tok}.weight"] = up
        if alpha_keys:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path), metadata=metadata)
    return Path(path)


def write_onetrainer(path: Path, pairs: Pairs) -> Path:
    """pairs keyed by diffusers names -> `lora_transformer_<name with _>.lora_down.weight` + `.alpha`."""
    sd = {}
    for name, (down, up, alpha) in pairs.items():
        key = "lora_transformer_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return Path(path)


def write_xlabs(path: Path, pairs: Pairs, prefix: str = "") -> Path:
    """pairs keyed by XLabs processor names (`double_blocks.0.processor.qkv_lora1`) -> `.down.weight` /
    `.up.weight` (XLabs files carry no alpha: scale 1)."""
    sd = {}
    for name, (down, up, _) in pairs.items():
        sd[f"{prefix}{name}.down.weight"], sd[f"{prefix}{name}.up.weight"] = down, up
    save_file(sd, str(path))
    return Path(path)


# ---- name tables of the oracle ------------------------------------------------------------------------------

_BFL_TO_DIFFSYNTH = [
    (r"^double_blocks\.(\d+)\.img_mod\.lin$", r"blocks.\1.norm1_a.linear"),
    (r"^double_blocks\.(\d+)\.txt_mod\.lin$", r"blocks.\1.norm1_b.linear"),
    (r"^double_blocks\.(\d+)\.img_attn\.qkv$", r"blocks.\1.attn.a_to_qkv"),
    (r"^double_blocks\.(\d+)\.txt_attn\.qkv$", r"blocks.\1.attn.b_to_qkv"),
    (r"^double_blocks\.(\d+)\.img_attn\.proj$", r"blocks.\1.attn.a_to_out"),
    (r"^double_blocks\.(\d+)\.txt_attn\.proj$", r"blocks.\1.attn.b_to_out"),
    (r"^double_blocks\.(\d+)\.img_mlp\.(\d)$", r"blocks.\1.ff_a.\2"),
    (r"^double_blocks\.(\d+)\.txt_mlp\.(\d)$", r"blocks.\1.ff_b.\2"),
    (r"^single_blocks\.(\d+)\.linear1$", r"single_blocks.\1.to_qkv_mlp"),
    (r"^single_blocks\.(\d+)\.linear2$", r"single_blocks.\1.proj_out"),
    (r"^single_blocks\.(\d+)\.modulation\.lin$", r"single_blocks.\1.norm.linear"),
]


def bfl_to_diffsynth(name: str) -> str | None:
    for pattern, repl in _BFL_TO_DIFFSYNTH:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def _diffusers_location(name: str, hidden: int) -> tuple[str, int, bool]:
    """diffusers module -> (BFL layer, first output row inside it, rows swapped in halves)."""
    m = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", name)
    if m:
        i, rest = m.groups()
        qkv = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
               "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
               "attn.add_v_proj": ("txt_attn.qkv", 2)}
        if rest in qkv:
            layer, part = qkv[rest]
            return f"double_blocks.{i}.{layer}", part * hidden, False
        simple = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                  "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                  "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
        return f"double_blocks.{i}.{simple[rest]}", 0, False
    m = re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", name)
    if m:
        i, rest = m.groups()
        parts = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}
        if rest in parts:
            return f"single_blocks.{i}.linear1", parts[rest] * hidden, False
        return f"single_blocks.{i}.{ {'proj_out': 'linear2', 'norm.linear': 'modulation.lin'}[rest] }", 0, False
    glob = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
            "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
            "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
            "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}
    if name == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", 0, True
    return glob[name], 0, False


def expected_from_diffusers(pairs: Pairs, bfl_layer_shapes: dict[str, tuple[int, int]], hidden: int) -> dict[str, torch.Tensor]:
    """{BFL layer: delta} of a LoRA keyed by diffusers names (q/k/v/proj_mlp placed in their fused rows)."""
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in pairs.items():
        layer, row, swap = _diffusers_location(name, hidden)
        d = delta(down, up, alpha)
        if swap:
            a, b = d.chunk(2)
            d = torch.cat([b, a])
        full = out.setdefault(layer, torch.zeros(bfl_layer_shapes[layer], dtype=torch.float64))
        full[row:row + d.shape[0]] += d
    return out


def expected_from_bfl(pairs: Pairs, strength: float = 1.0) -> dict[str, torch.Tensor]:
    return {name: strength * delta(*p) for name, p in pairs.items()}


def expected_from_xlabs(pairs: Pairs, bfl_layer_shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    out = {}
    names = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
             "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}
    for name, (down, up, _) in pairs.items():
        group, i, _, proc = name.split(".")
        layer = f"{group}.{i}.{names[proc]}"
        full = torch.zeros(bfl_layer_shapes[layer], dtype=torch.float64)
        full[:up.shape[0]] = up.double() @ down.double()   # scale 1; single qkv covers the first 3*hidden rows
        out[layer] = full
    return out
