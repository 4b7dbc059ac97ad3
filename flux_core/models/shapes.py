"""Reading a model's structure from its state dict's key names and shapes (config inference)."""
from __future__ import annotations

from typing import Mapping

FLUX_AXES_DIM = (16, 56, 56)  # RoPE axes of the released models: head_dim 128 = 16 + 56 + 56


def count_blocks(shapes: Mapping, prefix: str) -> int:
    """Number of numbered blocks under `prefix` ("double_blocks.", "encoder.layers."): the highest index + 1."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def trunk_config(shapes: Mapping, overrides: Mapping, what: str) -> dict:
    """The transformer trunk's config read off BFL-named shapes, shared by the DiT and the ControlNet: hidden size,
    depths, heads (from the QK-norm scale), MLP ratio, qkv bias, pooled/text widths, guidance embedder, and the
    RoPE axes. The axes cannot be read from shapes: they take FLUX's for head dim 128 and must be given
    (`overrides["axes_dim"]`, diffusers `axes_dims_rope`) for any other head dim. `what` names the model in errors."""
    hidden, in_channels = shapes["img_in.weight"]
    depth = count_blocks(shapes, "double_blocks.")
    depth_single = count_blocks(shapes, "single_blocks.")
    if depth:
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
    elif depth_single:
        head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
    else:
        raise ValueError(f"the {what} has no double_blocks and no single_blocks.")
    axes = overrides.get("axes_dim")
    if axes is None:
        if head_dim != sum(FLUX_AXES_DIM):
            raise ValueError(
                f"{what} head dim is {head_dim}, not FLUX's 128, so the RoPE axes cannot be inferred: pass "
                f"config={{'axes_dim': (a, b, c)}} with a + b + c = {head_dim} (diffusers: axes_dims_rope).")
        axes = FLUX_AXES_DIM
    return dict(
        in_channels=in_channels, vec_in_dim=shapes["vector_in.in_layer.weight"][1],
        context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden, mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim, depth=depth, depth_single_blocks=depth_single,
        qkv_bias=("double_blocks.0.img_attn.qkv.bias" in shapes) if depth else True,
        guidance_embed="guidance_in.in_layer.weight" in shapes, axes_dim=tuple(axes))
