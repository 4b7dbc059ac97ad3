"""Tiny IP-Adapter and InfiniteYou files for tests, in the published layouts, at tests/tiny_dit.py's TINY_DIT sizes
(width 32, 2 heads, 2 double + 2 single blocks, text width 32).

    siglip = make_siglip()                               # transformers SiglipModel (vision + text towers)
    write_siglip(siglip, tmp / "siglip")                 # google/siglip-so400m-patch14-384's folder layout
    clip = make_clip_vision()                            # transformers CLIPVisionModelWithProjection
    sd = instantx_state_dict()                           # {"image_proj": {...}, "ip_adapter": {...}}, as ip-adapter.bin
    write_instantx(sd, tmp / "ip-adapter.bin")
    write_xlabs(xlabs_state_dict(), tmp / "flux-ip-adapter.safetensors")
    write_projector(projector_state_dict(), tmp / "image_proj_model.bin")   # InfiniteYou's {"image_proj": {...}}

Weights are random tensors under the published key names with the published shapes' structure, made here without
FluxCore's modules, so a naming or shape mistake in FluxCore's loaders fails to load.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.tiny_dit import TINY_DIT

HIDDEN = TINY_DIT["num_attention_heads"] * TINY_DIT["attention_head_dim"]   # 32
TEXT_DIM = TINY_DIT["joint_attention_dim"]                                    # 32
DOUBLE, SINGLE = TINY_DIT["num_layers"], TINY_DIT["num_single_layers"]       # 2, 2
SIGLIP_DIM, CLIP_PROJECTION_DIM = 24, 16
VISION = dict(intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=28)


def _random(shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.15) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * std for k, s in shapes.items()}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model.eval()


def make_siglip(seed: int = 0, **vision):
    """A SigLIP model (both towers, as google/siglip-so400m-patch14-384 ships) with a 24-wide vision tower; `vision`
    overrides its config (image_size=384, patch_size=96: the published input size, for code that resizes to 384)."""
    from transformers import SiglipConfig, SiglipModel
    config = SiglipConfig(vision_config=dict(hidden_size=SIGLIP_DIM, **{**VISION, **vision}),
                          text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=1))
    return _randomise(SiglipModel(config), seed)


def write_siglip(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return Path(folder)


def make_clip_vision(seed: int = 0):
    """A CLIP vision tower with projection (openai/clip-vit-large-patch14's vision half), 24 wide, image_embeds 16."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    config = CLIPVisionConfig(hidden_size=24, projection_dim=CLIP_PROJECTION_DIM, **VISION)
    return _randomise(CLIPVisionModelWithProjection(config), seed)


def write_comfy_clip_vision(model, path: Path) -> Path:
    """ComfyUI's `models/clip_vision/*.safetensors`: `vision_model.*` and `visual_projection.weight` in one file."""
    sd = {k if k.startswith(("vision_model.", "visual_projection.")) else f"vision_model.{k}": v.contiguous()
          for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, str(path))
    return Path(path)


def instantx_state_dict(seed: int = 0, image_dim: int = SIGLIP_DIM, num_tokens: int = 3,
                        blocks: int = DOUBLE + SINGLE, hidden: int = HIDDEN) -> dict[str, dict[str, torch.Tensor]]:
    """InstantX's ip-adapter.bin: `image_proj` (MLP image_dim -> 2 image_dim -> num_tokens x text width, LayerNorm)
    and `ip_adapter` (per block `<i>.to_k_ip.weight`, `<i>.to_v_ip.weight`, no biases)."""
    proj = {"proj.0.weight": (2 * image_dim, image_dim), "proj.0.bias": (2 * image_dim,),
            "proj.2.weight": (num_tokens * TEXT_DIM, 2 * image_dim), "proj.2.bias": (num_tokens * TEXT_DIM,),
            "norm.weight": (TEXT_DIM,), "norm.bias": (TEXT_DIM,)}
    blocks_sd = {f"{i}.{name}.weight": (hidden, TEXT_DIM) for i in range(blocks) for name in ("to_k_ip", "to_v_ip")}
    return {"image_proj": _random(proj, seed), "ip_adapter": _random(blocks_sd, seed + 1)}


def write_instantx(sd: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """`.bin` as published (torch.save of the two dicts), or `.safetensors` with the keys flattened."""
    path = Path(path)
    if path.suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file({f"{group}.{k}": v for group, d in sd.items() for k, v in d.items()}, str(path))
    return path


def xlabs_state_dict(seed: int = 0, image_dim: int = CLIP_PROJECTION_DIM, num_tokens: int = 4,
                     blocks: int = DOUBLE) -> dict[str, torch.Tensor]:
    """XLabs' flux-ip-adapter.safetensors: `ip_adapter_proj_model.{proj,norm}` and per double block
    `double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`."""
    shapes = {"ip_adapter_proj_model.proj.weight": (num_tokens * TEXT_DIM, image_dim),
              "ip_adapter_proj_model.proj.bias": (num_tokens * TEXT_DIM,),
              "ip_adapter_proj_model.norm.weight": (TEXT_DIM,), "ip_adapter_proj_model.norm.bias": (TEXT_DIM,)}
    for i in range(blocks):
        for kv in "kv":
            stem = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            shapes[f"{stem}.weight"] = (HIDDEN, TEXT_DIM)
            shapes[f"{stem}.bias"] = (HIDDEN,)
    return _random(shapes, seed)


def write_xlabs(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(sd, str(path))
    return Path(path)


# InfiniteYou's projector at a tiny size: width 128 = 2 heads of 64 (the published head width, so no config is
# needed), 4 queries, 2 layers, output at the text width.
PROJECTOR = dict(dim=128, depth=2, dim_head=64, heads=2, num_queries=4, embedding_dim=512, output_dim=TEXT_DIM,
                 ff_mult=4)


def projector_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """The resampler's weights under ByteDance's names (`image_proj_model.bin`'s `image_proj` dict)."""
    p = {**PROJECTOR, **overrides}
    dim, inner = p["dim"], p["dim_head"] * p["heads"]
    shapes = {"latents": (1, p["num_queries"], dim), "proj_in.weight": (dim, p["embedding_dim"]),
              "proj_in.bias": (dim,), "proj_out.weight": (p["output_dim"], dim), "proj_out.bias": (p["output_dim"],),
              "norm_out.weight": (p["output_dim"],), "norm_out.bias": (p["output_dim"],)}
    for i in range(p["depth"]):
        shapes.update({f"layers.{i}.0.norm1.weight": (dim,), f"layers.{i}.0.norm1.bias": (dim,),
                       f"layers.{i}.0.norm2.weight": (dim,), f"layers.{i}.0.norm2.bias": (dim,),
                       f"layers.{i}.0.to_q.weight": (inner, dim), f"layers.{i}.0.to_kv.weight": (2 * inner, dim),
                       f"layers.{i}.0.to_out.weight": (dim, inner),
                       f"layers.{i}.1.0.weight": (dim,), f"layers.{i}.1.0.bias": (dim,),
                       f"layers.{i}.1.1.weight": (dim * p["ff_mult"], dim),
                       f"layers.{i}.1.3.weight": (dim, dim * p["ff_mult"])})
    sd = _random(shapes, seed)
    for name in sd:   # LayerNorm scales near 1, as trained ones are
        if "norm" in name and name.endswith("weight") or name.endswith(".1.0.weight"):
            sd[name] = sd[name] + 1.0
    return sd


def write_projector(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """As published: `image_proj_model.bin` = torch.save({"image_proj": state dict})."""
    path = Path(path)
    if path.suffix == ".bin":
        torch.save({"image_proj": sd}, path)
    else:
        save_file({f"image_proj.{k}": v for k, v in sd.items()}, str(path))
    return path


def face_embedding(seed: int = 0) -> torch.Tensor:
    """A unit-length 512-d vector, as ArcFace gives."""
    v = torch.randn(512, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def reference_image(seed: int = 0, size: tuple[int, int] = (40, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
