"""The FLUX diffusion transformer (DiT) with the Black Forest Labs parameter names.

`flux1-dev.safetensors`, Krea-dev, Kontext-dev, ComfyUI checkpoints and kohya LoRAs all speak these names.
Adapters contribute through `DiTExtras`, so the forward stays one readable function.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..compile import block_runner
from ..math import embed_positions, timestep_embedding
from ..teacache import TeaCache
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock
from .shapes import FLUX_AXES_DIM, trunk_config


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64          # 16 latent channels x 2x2 patch; FLEX.2 196, Fill 384
    out_channels: int = 64
    vec_in_dim: int = 768          # CLIP-L pooled
    context_in_dim: int = 4096     # T5-XXL
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = FLUX_AXES_DIM
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True    # dev/Krea/Kontext; schnell and Step1X have none

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"FluxParams: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}.")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"FluxParams: axes_dim {tuple(self.axes_dim)} must sum to the head dim {head_dim}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None) -> "FluxParams":
        """Read the config off a BFL-named state dict's shapes. RoPE axes cannot be read from shapes: they take
        the FLUX value for head dim 128 and must be given (`overrides["axes_dim"]`) for any other head dim."""
        overrides = dict(overrides or {})
        inferred = trunk_config(shapes, overrides, "DiT")
        inferred["out_channels"] = shapes["final_layer.linear.weight"][0]
        inferred.update(overrides)
        inferred["axes_dim"] = tuple(inferred["axes_dim"])
        return cls(**inferred)


@dataclass(frozen=True)
class SequenceLayout:
    """The joint token sequence of one DiT call: [text | image | references]. Image tokens are the latent being
    denoised (the only ones that reach the output); references are Kontext-style extra image tokens."""
    text: int
    image: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.reference

    @property
    def image_span(self) -> slice:
        return slice(self.text, self.text + self.image)


@dataclass(frozen=True)
class BlockSite:
    """Where an attention hook runs: double block `index` (the image stream: image + reference tokens) or single
    block `index` (the whole joint sequence)."""
    kind: str   # "double" | "single"
    index: int
    layout: SequenceLayout


@dataclass(frozen=True)
class AfterBlock:
    """An attention hook's output that is added to the stream after the whole block (XLabs' IP-Adapter, as diffusers
    runs it) instead of to the attention output before its projection (InstantX's, as DiffSynth runs it)."""
    output: torch.Tensor


# An attention hook sees a block's queries as (B, heads, L, head_dim): in double blocks the image stream's (image and
# reference tokens) after QK-norm, before RoPE; in single blocks the whole sequence's after RoPE (where DiffSynth's
# IP-Adapter reads each). It returns an output (B, L, hidden) that is added to the block's attention output before the
# output projection, or `AfterBlock(output)` added to the stream after the block, or None (IP-Adapters).
AttentionHook = Callable[[BlockSite, torch.Tensor], "torch.Tensor | AfterBlock | None"]


@dataclass
class DiTExtras:
    """What adapters add to one DiT forward: each adapter contributes through one of these inputs (flux_core.adapters
    builds them from adapters' contributions; ComfyUI's own `control` dict maps onto the residual lists).

    ref_tokens / ref_ids: extra image tokens with their own position ids (Kontext references); they attend
        with the image and are dropped from the output.
    extra_channels: packed channels concatenated to the image tokens before `img_in` (FLEX.2, Fill).
    double_residuals / single_residuals: per block index, a (B, image tokens, hidden) tensor (or None) added to the
        image tokens after double / single block i (ControlNets); never to text or reference tokens. A list may be
        shorter than the depth (ComfyUI's `control["input"]` / `control["output"]`).
    attention_mask: over the joint sequence [text, image, references], (B or 1, 1 or heads, L, L): bool (True
        attends) or additive float; handed to every block (EliGen).
    attention_hooks: called in every block's attention (see AttentionHook; IP-Adapter).
    tea_cache: a cache that skips all blocks on steps where their input barely changed (flux_core.teacache);
        one per CFG branch.
    contributors: names of the adapters whose contributions are in these extras. TeaCache reuses a residual only
        across calls with the same contributors (a ControlNet whose step range starts or ends forces a computed step).
    """
    ref_tokens: torch.Tensor | None = None
    ref_ids: torch.Tensor | None = None
    extra_channels: torch.Tensor | None = None
    double_residuals: Sequence[torch.Tensor | None] | None = None
    single_residuals: Sequence[torch.Tensor | None] | None = None
    attention_mask: torch.Tensor | None = None
    attention_hooks: tuple[AttentionHook, ...] = ()
    tea_cache: TeaCache | None = None
    contributors: tuple[str, ...] = ()


class FluxDiT(nn.Module):
    # Training (flux_core.train): recompute each block's activations in the backward pass instead of keeping
    # them; with `gradient_checkpointing_offload` the blocks' saved inputs wait in CPU memory.
    gradient_checkpointing = False
    gradient_checkpointing_offload = False

    def __init__(self, params: FluxParams = FluxParams()):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None,
                extras: DiTExtras | None = None) -> torch.Tensor:
        """img (B, L, in_ch) packed latent tokens; txt (B, Lt, context_in_dim); timesteps: sigma in [0, 1],
        (B,); y: pooled CLIP (B, vec_in_dim); guidance (B,) embedded guidance. Returns (B, L, out_ch)."""
        extras = extras or DiTExtras()
        n_img = img.shape[1]
        if extras.extra_channels is not None:
            img = torch.cat((img, extras.extra_channels.to(img)), dim=-1)
        if extras.ref_tokens is not None:
            ref = extras.ref_tokens.to(img)
            if ref.shape[-1] < img.shape[-1]:  # references carry no extra channels: pad them with zeros
                ref = torch.cat((ref, ref.new_zeros(*ref.shape[:-1], img.shape[-1] - ref.shape[-1])), dim=-1)
            img = torch.cat((img, ref), dim=1)
            img_ids = torch.cat((img_ids, extras.ref_ids.to(img_ids)), dim=1)
        layout = SequenceLayout(text=txt.shape[1], image=n_img, reference=img.shape[1] - n_img)
        mask = checked_attention_mask(extras.attention_mask, layout)

        img = self.img_in(img)
        vec = self.time_embedding(timesteps, guidance, y, dtype=img.dtype)
        txt = self.txt_in(txt)
        pe = embed_positions(torch.cat((txt_ids, img_ids), dim=1), list(self.params.axes_dim), self.params.theta)

        cache = extras.tea_cache
        if cache is not None and cache.skip(self.tea_cache_probe(img, vec), extras.contributors):
            img = cache.reuse(img)
        else:
            img_before = img if cache is not None else None  # kept alive only when a cache needs it
            for i, block in enumerate(self.double_blocks):
                hook = block_hook(extras.attention_hooks, BlockSite("double", i, layout))
                img, txt = self.run_block(block, img=img, txt=txt, vec=vec, pe=pe, mask=mask, hook=hook)
                img = add_to_span(img, residual_at(extras.double_residuals, i), 0, n_img, ("double", i))
            x = torch.cat((txt, img), dim=1)
            del txt, img  # x holds both streams now; free them before the single blocks
            for i, block in enumerate(self.single_blocks):
                hook = block_hook(extras.attention_hooks, BlockSite("single", i, layout))
                x = self.run_block(block, x, vec=vec, pe=pe, mask=mask, hook=hook)
                x = add_to_span(x, residual_at(extras.single_residuals, i), layout.text, n_img, ("single", i))
            img = x[:, layout.text:]
            if cache is not None:
                cache.store(img_before, img, extras.contributors)

        img = self.final_layer(img, vec)
        return img[:, :n_img]

    def tea_cache_probe(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """TeaCache's probe: the first block's modulated image input (the image tokens after `img_in`)."""
        if len(self.double_blocks):
            first = self.double_blocks[0]
            return first.img_mod(vec)[0].modulate(first.img_norm1(img))
        first = self.single_blocks[0]
        return first.modulation(vec)[0].modulate(first.pre_norm(img))

    def run_block(self, block: nn.Module, *args, **kwargs):
        # A compiled block (flux_core.compile) runs eagerly for calls with attention hooks and under autograd.
        block = block_runner(block, kwargs.get("hook"))
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(*args, **kwargs)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) \
            if self.gradient_checkpointing_offload else contextlib.nullcontext()
        with offload:
            return checkpoint(block, *args, use_reentrant=False, **kwargs)

    def time_embedding(self, timesteps: torch.Tensor, guidance: torch.Tensor | None, y: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        # guidance=None leaves the embedder out, as ComfyUI's FluxDisableGuidance does for dev-family models.
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y.to(dtype))


def residual_at(residuals: Sequence[torch.Tensor | None] | None, index: int) -> torch.Tensor | None:
    return residuals[index] if residuals is not None and index < len(residuals) else None


def add_to_span(x: torch.Tensor, residual: torch.Tensor | None, start: int, length: int,
                site: tuple[str, int]) -> torch.Tensor:
    """x with `residual` (B, length, D) added to tokens start..start+length: the image tokens, never text or
    references."""
    if residual is None:
        return x
    if residual.shape[1] != length or residual.shape[-1] != x.shape[-1]:
        raise ValueError(f"the residual for {site[0]} block {site[1]} has shape {tuple(residual.shape)}; it must be "
                         f"(B, {length}, {x.shape[-1]}): one vector per image token (a control image of another "
                         f"size than the latent?).")
    end = start + length
    residual = residual.to(x.dtype)
    if torch.is_grad_enabled():  # out of place: autograd (and checkpointed blocks) must see a new tensor
        return torch.cat((x[:, :start], x[:, start:end] + residual, x[:, end:]), dim=1)
    x[:, start:end] += residual
    return x


def block_hook(hooks: Sequence[AttentionHook], site: BlockSite):
    """The attention hooks of one block as one function of its queries, giving the summed outputs (before the
    projection, after the block), either None; or None when there are no hooks."""
    if not hooks:
        return None

    def run(q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        before, after = [], []
        for out in (hook(site, q) for hook in hooks):
            if isinstance(out, AfterBlock):
                after.append(out.output)
            elif out is not None:
                before.append(out)
        return (sum(before[1:], before[0]) if before else None, sum(after[1:], after[0]) if after else None)
    return run


def checked_attention_mask(mask: torch.Tensor | None, layout: SequenceLayout) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (layout.total, layout.total):
        raise ValueError(
            f"DiTExtras.attention_mask has shape {tuple(mask.shape)}; it must be (B, 1 or heads, {layout.total}, "
            f"{layout.total}) over the joint sequence of {layout.text} text + {layout.image} image + "
            f"{layout.reference} reference tokens.")
    return mask
