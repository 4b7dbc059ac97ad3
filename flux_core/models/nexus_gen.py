"""Nexus-Gen (DiffSynth-Studio's Nexus-GenV2): an autoregressive Qwen2.5-VL that writes 81 image embeddings, and the
two adapters that turn them into FLUX DiT text tokens.

- `NexusGenAutoregressiveModel`: transformers' own `Qwen2_5_VLForConditionalGeneration` plus Nexus-Gen's head:
  `vision_head` (a bias-free square Linear on the last hidden states) and `image_prefill_embeds` (81 learned input
  embeddings that stand in for the image being generated). `target_embeddings` computes what DiffSynth's
  `NexusGenAutoregressiveModel.get_target_embeddings` computes: ONE forward pass (not 81 decoding steps) with the
  placeholder image's tokens replaced by the prefill embeddings; the head's outputs one position before those
  tokens are the 81 target embeddings.
- `NexusGenAdapter` (generation decoder, `adapter.*`): Linear - LayerNorm - ReLU - Linear - LayerNorm.
- `NexusGenImageEmbeddingMerger` (editing decoder, `embedding_merger.*`): target + reference embeddings with
  multimodal-RoPE positions scaled to a 72x72 grid, one Qwen2.5-VL decoder layer (transformers' class, attending in
  both directions as DiffSynth's maskless layer does), then an RMSNorm/Linear projector.

Parameter names are DiffSynth's, so the published decoders' `adapter.*` / `embedding_merger.*` keys load strictly.
Sizes come from the weights' shapes (the Params dataclasses); what shapes cannot tell (the attention head size)
takes Qwen2.5-VL-7B's value unless given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLDecoderLayer, Qwen2_5_VLRMSNorm,
                                                                Qwen2_5_VLRotaryEmbedding)

# Qwen2.5-VL's attention head size and its multimodal-RoPE split of the head's frequencies (time, height, width).
QWEN_HEAD_DIM = 128
QWEN_MROPE_SECTION = (16, 24, 24)
# What a merger's config may set beyond its shapes.
_MERGER_CONFIG_FIELDS = ("num_heads", "mrope_section", "rope_theta", "rms_norm_eps")
# The merger places every image's tokens on this grid, whatever the image's own size (DiffSynth's base_grid).
MERGER_BASE_GRID = 72


# ----------------------------------------------------------------------------------------------- generation adapter
@dataclass(frozen=True)
class NexusGenAdapterParams:
    input_dim: int = 3584    # the AR model's hidden size
    output_dim: int = 4096   # the DiT's text-token width

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple]) -> "NexusGenAdapterParams":
        output_dim, input_dim = shapes["adapter.0.weight"]
        return cls(input_dim=input_dim, output_dim=output_dim)


class NexusGenAdapter(nn.Module):
    """The generation decoder's adapter: (B, 81, 3584) target embeddings -> (B, 81, 4096) DiT text tokens."""

    def __init__(self, params: NexusGenAdapterParams = NexusGenAdapterParams()):
        super().__init__()
        self.params = params
        d_in, d_out = params.input_dim, params.output_dim
        self.adapter = nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.ReLU(),
                                     nn.Linear(d_out, d_out), nn.LayerNorm(d_out))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter(embeds)


# ------------------------------------------------------------------------------------------------ editing adapter
@dataclass(frozen=True)
class NexusGenMergerParams:
    hidden_size: int = 3584
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    num_layers: int = 1
    out_channels: int = 4096
    projector_hidden: int = 16384      # out_channels * expand_ratio (4)
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = QWEN_MROPE_SECTION
    rms_norm_eps: float = 1e-6
    spatial_merge_size: int = 2        # the vision tower's 2x2 token merge: grid (t, h, w) -> h/2 x w/2 tokens
    tokens_per_second: int = 2         # Qwen2.5-VL's temporal position step

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple], overrides: Mapping | None = None
                               ) -> "NexusGenMergerParams":
        """Widths and depth from the shapes. The head size is not in them: Qwen2.5-VL's 128 unless `overrides`
        give `num_heads` (or `head_dim`); `mrope_section` must then be given for head sizes other than 128."""
        overrides = dict(overrides or {})
        hidden = shapes["layers.0.input_layernorm.weight"][0]
        head_dim = overrides.pop("head_dim", None)
        num_heads = overrides.get("num_heads") or hidden // (head_dim or QWEN_HEAD_DIM)
        head_dim = hidden // num_heads
        if num_heads * head_dim != hidden:
            raise ValueError(f"hidden size {hidden} is not a multiple of the head size {head_dim}; pass num_heads")
        kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
        if kv_rows % head_dim:
            raise ValueError(f"k_proj has {kv_rows} rows, not a multiple of the head size {head_dim}; pass num_heads")
        if head_dim != QWEN_HEAD_DIM and "mrope_section" not in overrides:
            raise ValueError(f"head size {head_dim} is not Qwen2.5-VL's {QWEN_HEAD_DIM}: pass mrope_section "
                             f"(three numbers summing to {head_dim // 2})")
        found = dict(
            hidden_size=hidden, num_heads=num_heads, num_kv_heads=kv_rows // head_dim,
            intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
            num_layers=len({k.split(".")[1] for k in shapes if k.startswith("layers.")}),
            out_channels=shapes["projector.4.weight"][0], projector_hidden=shapes["projector.1.weight"][0])
        # Only what the shapes cannot tell: a config.json beside a decoder file is the AR model's, not the merger's.
        found.update({k: v for k, v in overrides.items() if k in _MERGER_CONFIG_FIELDS})
        found["mrope_section"] = tuple(found.get("mrope_section", QWEN_MROPE_SECTION))
        if sum(found["mrope_section"]) * 2 != head_dim:
            raise ValueError(f"mrope_section {found['mrope_section']} does not cover the head size {head_dim}")
        return cls(**found)

    def text_config(self) -> Qwen2_5_VLTextConfig:
        """The transformers config of the merger's decoder layer(s)."""
        config = Qwen2_5_VLTextConfig(
            hidden_size=self.hidden_size, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers, hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps, attention_dropout=0.0, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "mrope_section": list(self.mrope_section)})
        config._attn_implementation = "sdpa"
        return config


def merger_position_ids(grid_thw: torch.Tensor, params: NexusGenMergerParams,
                        base_grid: int = MERGER_BASE_GRID) -> torch.Tensor:
    """(3, B, L) float positions (time, row, column) of one image's merged tokens, as DiffSynth's
    `NexusGenImageEmbeddingMerger.get_position_ids`: rows and columns spread over `base_grid` whatever the image's
    size (row i at i * base_grid / h, h being the unmerged grid height), time at t * tokens_per_second.
    Only the first row of `grid_thw` is read (one image per batch entry, all the same size)."""
    t, h, w = (int(v) for v in grid_thw[0])
    merge = params.spatial_merge_size
    rows, cols = h // merge, w // merge
    device = grid_thw.device
    time = (torch.arange(t, device=device) * params.tokens_per_second).repeat_interleave(rows * cols)
    row = torch.arange(rows, device=device).view(1, -1, 1).expand(t, -1, cols).flatten() * (base_grid / h)
    col = torch.arange(cols, device=device).view(1, 1, -1).expand(t, rows, -1).flatten() * (base_grid / w)
    ids = torch.stack([time.to(row.dtype), row, col])           # (3, L)
    return ids[:, None, :].expand(-1, grid_thw.shape[0], -1)    # (3, B, L)


class NexusGenImageEmbeddingMerger(nn.Module):
    """The editing decoder's adapter: target embeddings (B, 81, 3584) + reference image embeddings (B, N, 3584) ->
    DiT text tokens (B, 81 + N, 4096)."""

    def __init__(self, params: NexusGenMergerParams = NexusGenMergerParams()):
        super().__init__()
        self.params = params
        config = params.text_config()
        self.layers = nn.ModuleList([Qwen2_5_VLDecoderLayer(config, i) for i in range(params.num_layers)])
        d, wide, out = params.hidden_size, params.projector_hidden, params.out_channels
        eps = params.rms_norm_eps
        self.projector = nn.Sequential(Qwen2_5_VLRMSNorm(d, eps=eps), nn.Linear(d, wide),
                                       Qwen2_5_VLRMSNorm(wide, eps=eps), nn.SiLU(), nn.Linear(wide, out),
                                       Qwen2_5_VLRMSNorm(out, eps=eps))
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config)

    def reset_rotary(self) -> None:
        """Re-create the rotary frequencies (a non-persistent buffer: after a meta-device build they hold no data)."""
        device = next(self.parameters()).device
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(self.params.text_config()).to(device)

    def forward(self, embeds: torch.Tensor, embeds_grid: torch.Tensor, ref_embeds: torch.Tensor | None = None,
                ref_embeds_grid: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = merger_position_ids(embeds_grid, self.params)
        hidden = embeds
        if ref_embeds is not None:
            position_ids = torch.cat([position_ids, merger_position_ids(ref_embeds_grid, self.params)], dim=-1)
            hidden = torch.cat([embeds, ref_embeds], dim=1)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            # No mask and not causal: every token sees every other (DiffSynth's layer applies no mask).
            hidden = layer(hidden, position_embeddings=position_embeddings, is_causal=False)
        return self.projector(hidden)


# ---------------------------------------------------------------------------------------- the autoregressive model
class NexusGenAutoregressiveModel(Qwen2_5_VLForConditionalGeneration):
    """transformers' Qwen2.5-VL with Nexus-Gen's image-embedding head instead of its language-model head. Key names:
    transformers' own (`model.visual.*`, `model.language_model.*`) plus `vision_head.weight` and
    `image_prefill_embeds.weight`."""

    def __init__(self, config: Qwen2_5_VLConfig, num_image_tokens: int = 81):
        super().__init__(config)
        # The language-model head is not kept: Nexus-Gen's image embeddings come from vision_head, and the 7B's
        # lm_head is 1.0 GiB in bfloat16 (its file's `lm_head.weight` is left unread).
        self.lm_head = None
        hidden = config.text_config.hidden_size
        self.vision_head = nn.Linear(hidden, hidden, bias=False)
        self.image_prefill_embeds = nn.Embedding(num_image_tokens, hidden)

    @property
    def num_image_tokens(self) -> int:
        """How many embeddings it writes for the image being generated (81: a 9x9 grid of merged tokens)."""
        return self.image_prefill_embeds.num_embeddings

    @torch.no_grad()
    def target_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                          image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target (81, hidden), reference (N, hidden)) for one processed conversation (batch 1) whose last image
        is the placeholder of the image to generate and whose earlier images (editing: the reference) are real.

        The reference images' tokens get their vision-tower embeddings, the placeholder's tokens the 81 prefill
        embeddings; one causal forward over the whole sequence; the head's output at the position BEFORE each
        placeholder token is that token's target embedding (DiffSynth's shift by one)."""
        n = self.num_image_tokens
        embed_tokens = self.model.get_input_embeddings()
        inputs_embeds = embed_tokens(input_ids)
        image_embeds = torch.cat(self.model.get_image_features(pixel_values, image_grid_thw).pooler_output)
        image_embeds = image_embeds.to(inputs_embeds.dtype)
        reference = image_embeds[:-n]
        image_tokens = input_ids == self.config.image_token_id
        is_reference = image_tokens & (image_tokens.cumsum(dim=1) <= reference.shape[0])
        is_target = image_tokens & ~is_reference
        if int(is_target.sum()) != n:
            raise ValueError(f"the placeholder image has {int(is_target.sum())} image tokens; Nexus-Gen's head "
                             f"writes {n}: the processor's patch or merge size differs from the model's")
        inputs_embeds = inputs_embeds.masked_scatter(is_reference[..., None].expand_as(inputs_embeds), reference)
        # Through the module's forward (as DiffSynth does), so a VRAM manager's hooks place its weights.
        prefill = self.image_prefill_embeds(torch.arange(n, device=input_ids.device)).to(inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(is_target[..., None].expand_as(inputs_embeds), prefill)
        position_ids, _ = self.model.get_rope_index(input_ids, mm_token_type_ids=image_tokens.int(),
                                                    image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        hidden = self.model.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                           attention_mask=attention_mask).last_hidden_state
        predicted = self.vision_head(hidden)
        return predicted[:, :-1][is_target[:, 1:]], reference
