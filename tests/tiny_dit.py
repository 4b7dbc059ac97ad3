"""Tiny FLUX DiTs for tests: a diffusers `FluxTransformer2DModel` with random weights, and writers for each
published checkpoint layout of the same weights.

    ref = make_diffusers_dit()                       # the reference (diffusers) model
    folder = write_diffusers_dit(ref, tmp / "transformer")
    bfl = write_bfl_dit(ref, tmp / "flux.safetensors", prefix="model.diffusion_model.")
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

# head_dim 16 = 4 + 6 + 6 rope axes; text dim and pooled dim match tests/tiny_text.py encoders.
TINY_DIT = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))


def make_diffusers_dit(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_DIT, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():  # default init zeroes gates/out layers: randomise so every path matters
            p.normal_(0.0, 0.15)
    return model


def diffusers_forward(model: FluxTransformer2DModel, x: dict) -> torch.Tensor:
    """The reference forward on FluxCore-style inputs (ids with a batch dimension; diffusers takes them without)."""
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"]).sample


def write_diffusers_dit(model: FluxTransformer2DModel, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def bfl_state_dict(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The BFL-named weights of a diffusers model, written out independently of flux_core's converter."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    simple = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    }
    for src, dst in simple.items():
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    n_double = model.config.num_layers
    for i in range(n_double):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[q + f"img_mod.lin.{s}"] = sd[p + f"norm1.linear.{s}"]
            out[q + f"txt_mod.lin.{s}"] = sd[p + f"norm1_context.linear.{s}"]
            out[q + f"img_attn.qkv.{s}"] = torch.cat([sd[p + f"attn.to_{x}.{s}"] for x in "qkv"])
            out[q + f"txt_attn.qkv.{s}"] = torch.cat([sd[p + f"attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[q + f"img_attn.proj.{s}"] = sd[p + f"attn.to_out.0.{s}"]
            out[q + f"txt_attn.proj.{s}"] = sd[p + f"attn.to_add_out.{s}"]
            out[q + f"img_mlp.0.{s}"] = sd[p + f"ff.net.0.proj.{s}"]
            out[q + f"img_mlp.2.{s}"] = sd[p + f"ff.net.2.{s}"]
            out[q + f"txt_mlp.0.{s}"] = sd[p + f"ff_context.net.0.proj.{s}"]
            out[q + f"txt_mlp.2.{s}"] = sd[p + f"ff_context.net.2.{s}"]
        out[q + "img_attn.norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "img_attn.norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
        out[q + "txt_attn.norm.query_norm.scale"] = sd[p + "attn.norm_added_q.weight"]
        out[q + "txt_attn.norm.key_norm.scale"] = sd[p + "attn.norm_added_k.weight"]
    for i in range(model.config.num_single_layers):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[q + f"linear1.{s}"] = torch.cat([sd[p + f"attn.to_{x}.{s}"] for x in "qkv"] + [sd[p + f"proj_mlp.{s}"]])
            out[q + f"linear2.{s}"] = sd[p + f"proj_out.{s}"]
            out[q + f"modulation.lin.{s}"] = sd[p + f"norm.linear.{s}"]
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    return out


def write_bfl_dit(model: FluxTransformer2DModel, path: Path, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
    sd = bfl_state_dict(model)
    save_file({prefix + k: (v.to(dtype) if dtype else v).contiguous() for k, v in sd.items()}, str(path))
    return Path(path)


def diffsynth_state_dict(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The weights in DiffSynth-Studio's internal names, converted by DiffSynth 2.1.12's own converter (from the
    BFL names: its diffusers converter splits at a literal 3072 and would skip the final-layer swap here)."""
    from tests.diffsynth_ref import diffsynth_flux
    _, convert, _ = diffsynth_flux()
    return {k: v.contiguous() for k, v in convert(bfl_state_dict(model)).items()}


def write_diffsynth_dit(model: FluxTransformer2DModel, path: Path) -> Path:
    save_file(diffsynth_state_dict(model), str(path))
    return Path(path)


def write_nexus_gen_dit(model: FluxTransformer2DModel, path: Path) -> Path:
    """A Nexus-Gen checkpoint's DiT: DiffSynth names under `pipe.dit.`, the final AdaLN in (scale, shift) order
    (DiffSynth's converter swaps the halves of `pipe.dit.final_norm_out.linear.*` when it loads such a file), beside
    keys of other parts of the pipeline."""
    out = {}
    for k, v in diffsynth_state_dict(model).items():
        if k.startswith("final_norm_out.linear."):
            shift, scale = v.chunk(2)
            v = torch.cat([scale, shift])
        out["pipe.dit." + k] = v.contiguous()
    out["pipe.adapter.proj.weight"] = torch.zeros(4, 4)  # other parts of the pipeline: not the DiT
    save_file(out, str(path))
    return Path(path)


def dit_inputs(context_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One forward's inputs for a tiny DiT with 64 input channels: a 2x3 grid of image tokens (ids [0, row, col]),
    5 text tokens and a pooled vector of `context_dim`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, 6, 3)
    ids[0, :, 1], ids[0, :, 2] = torch.arange(6) // 3, torch.arange(6) % 3
    return dict(img=torch.randn(1, 6, 64, generator=g), img_ids=ids, txt=torch.randn(1, 5, context_dim, generator=g),
                txt_ids=torch.zeros(1, 5, 3), timesteps=torch.tensor([0.7]), y=torch.randn(1, context_dim, generator=g),
                guidance=torch.tensor([3.5]))
