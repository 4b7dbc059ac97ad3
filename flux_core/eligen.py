"""EliGen (DiffSynth-Studio's entity-level control): one prompt per painted region.

Each entity is a prompt and a mask (white = the entity's region). The entity prompts are encoded like the main
prompt (CLIP+T5, the pooled CLIP vector dropped) and put before it in the DiT's text sequence; an attention mask then
lets each entity prompt and the image tokens of its region see each other only:

    sequence  [entity 1 | ... | entity N | global prompt | image | references]
    entity i  <-> its own tokens; <-> image tokens inside region i
    global    <-> its own tokens; <-> every image token; <-> references
    image     <-> every image and reference token
    entity i  x   entity j, the global prompt, references (blocked)

This is DiffSynth's `construct_mask` / `process_entity_masks` (the global prompt is its all-ones last mask), with
segments of their own lengths (the global prompt may carry LoRA-Encoder tokens after it) and Kontext reference
tokens, which DiffSynth's mask does not cover: they belong to the image and answer to the global prompt only.

An image token is inside a region when any latent pixel of its 2x2 patch is: masks are resized to the latent grid
with nearest-neighbour sampling, and a pixel is in the region when its mean RGB value is above one half.

The mask is additive (0 / -inf) in the compute dtype, (1, 1, S, S), broadcast over batch and heads by the attention
(`torch.nn.functional.scaled_dot_product_attention`): S^2 elements, e.g. 5632^2 x 2 bytes = 63 MiB for two entities
at 1024x1024 in bf16 (`eligen_mask_bytes`). It is made once per tile size and reused every step.

Inpaint mode (`eligen_enable_inpaint`, DiffSynth's legacy pipeline): outside the union of the entity masks the
velocity is replaced by the one that leads straight to the input image's latent, (x_t - x0) / sigma, so only the
entities' regions change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .adapters import Contribution, DiTCall
from .dit_inputs import DiTInputs
from .image import mask_at_size, mask_to_tensor
from .math import text_ids

ASPECT_TOLERANCE = 0.02   # a mask may be painted at another resolution, not another shape


class EliGenInputError(ValueError):
    """Entity prompts and masks that do not fit together or the image; the message names every problem."""


def check_entities(prompts, masks, height: int, width: int, prompts_name: str = "eligen_entity_prompts",
                   masks_name: str = "eligen_entity_masks") -> tuple[list[str], list[Image.Image | torch.Tensor]]:
    """The entity prompts and masks, checked together against an image of `height` x `width`: the same number of
    each, at least one, strings and masks (PIL images or (H, W) tensors in [0, 1]) of the image's shape. Every
    problem is listed in one error."""
    if prompts is None and masks is None:
        return [], []
    problems = []
    if prompts is None or masks is None:
        given, missing = (prompts_name, masks_name) if masks is None else (masks_name, prompts_name)
        raise EliGenInputError(f"{given} is given but {missing} is not: EliGen needs one mask per entity prompt.")
    prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
    masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
    if not prompts:
        problems.append(f"{prompts_name} is empty: give at least one entity")
    if len(prompts) != len(masks):
        problems.append(f"{len(prompts)} {prompts_name} but {len(masks)} {masks_name}: give one mask per prompt, "
                        f"in the same order")
    problems += [f"{prompts_name}[{i}] is a {type(p).__name__}, not a string" for i, p in enumerate(prompts)
                 if not isinstance(p, str)]
    for i, mask in enumerate(masks):
        problems += mask_problems(mask, height, width, f"{masks_name}[{i}]")
    if problems:
        raise EliGenInputError("EliGen: " + "; ".join(problems) + ".")
    return prompts, masks


def mask_problems(mask, height: int, width: int, name: str) -> list[str]:
    """What is wrong with one entity mask for a `height` x `width` image (empty list: nothing)."""
    if isinstance(mask, Image.Image):
        w, h = mask.size
    elif isinstance(mask, torch.Tensor) and mask.dim() in (2, 3, 4) and all(s == 1 for s in mask.shape[:-2]):
        h, w = mask.shape[-2:]
    else:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else ""
        return [f"{name} is a {type(mask).__name__}{shape}; pass a PIL image (white = the entity) or one (H, W) "
                f"tensor in [0, 1]"]
    if abs(w / h - width / height) > ASPECT_TOLERANCE * width / height:
        return [f"{name} is {w}x{h} but the image is {width}x{height}: paint the mask on an image of the output's "
                f"shape (it may be another resolution of the same aspect ratio)"]
    if not entity_grid(mask, height // 8, width // 8, name).any():
        return [f"{name} has no white pixel at the latent resolution ({width // 8}x{height // 8}): an empty region "
                f"gives its prompt nowhere to act; paint the region white or leave the entity out"]
    return []


def entity_grid(mask, latent_height: int, latent_width: int, name: str = "mask") -> torch.Tensor:
    """One entity mask on the latent grid, (latent_height, latent_width) bool: resized with nearest-neighbour
    sampling (PIL's NEAREST, torch's "nearest-exact": the same pixel centres), in the region where the mean of
    its RGB values (a tensor mask: its value) is above one half (DiffSynth: mean of the [-1, 1] image > 0)."""
    if isinstance(mask, Image.Image):
        mask = mask.resize((latent_width, latent_height), resample=Image.NEAREST)
        return mask_to_tensor(mask, name)[0, 0] > 0.5
    mask = mask_to_tensor(mask, name)
    if mask.shape[-2:] != (latent_height, latent_width):
        mask = F.interpolate(mask, size=(latent_height, latent_width), mode="nearest-exact")
    return mask[0, 0] > 0.5


def inpaint_region(masks: Sequence, latent_height: int, latent_width: int) -> torch.Tensor:
    """The union of the entity masks on the latent grid, (1, 1, h, w) bool: where inpaint mode lets the image
    change. Resized as DiffSynth's legacy pipeline does for it (PIL's default resampling, bicubic; a tensor mask as
    its 8-bit picture: flux_core.image.mask_at_size), a pixel inside when its mean is above one half."""
    region = torch.zeros(latent_height, latent_width, dtype=torch.bool)
    for i, mask in enumerate(masks):
        region |= mask_at_size(mask, latent_width, latent_height, f"eligen_entity_masks[{i}]")[0, 0] > 0.5
    return region[None, None]


def inpaint_velocity(velocity: torch.Tensor, latents: torch.Tensor, x0: torch.Tensor, region: torch.Tensor,
                     sigma: float) -> torch.Tensor:
    """Inpaint mode: the predicted velocity inside `region` (1, 1, h, w) bool, and outside it the velocity that
    takes `latents` (at noise level sigma) straight to the input image's latent `x0`: (x_t - x0) / sigma."""
    keep = (latents - x0.to(latents)) / sigma
    return torch.where(region.to(latents.device), velocity, keep)


def patch_regions(grids: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool latent-grid regions -> (N, h/2 * w/2) bool per image token (its 2x2 patch, rows first as the
    tokens are packed): a token is in a region when any of its four latent pixels is."""
    n, h, w = grids.shape
    patches = grids[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2)
    return patches.any(dim=4).any(dim=2).reshape(n, -1)


def eligen_attention_mask(regions: torch.Tensor, entity_lengths: Sequence[int], global_length: int,
                          reference_tokens: int = 0, dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """The additive attention mask (1, 1, S, S) over [entity prompts..., global prompt, image, references] (see the
    module docstring): `regions` (N, image tokens) bool per entity, `entity_lengths` the tokens of each entity
    prompt, `global_length` those of the global prompt (with anything appended to it)."""
    n, image = regions.shape
    starts = [sum(entity_lengths[:i]) for i in range(n)]
    text = sum(entity_lengths) + global_length
    total = text + image + reference_tokens
    allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    allowed[:text, :text] = False
    image_span = slice(text, text + image)
    reference_span = slice(text + image, total)
    for start, length, region in zip(starts, entity_lengths, regions.to(device)):
        span = slice(start, start + length)
        allowed[span, span] = True
        allowed[span, image_span] = region
        allowed[image_span, span] = region[:, None]
        allowed[span, reference_span] = False
        allowed[reference_span, span] = False
    glob = slice(text - global_length, text)
    allowed[glob, glob] = True
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, float("-inf"))[None, None]


def eligen_mask_bytes(tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of EliGen's attention mask over a joint sequence of `tokens` (entity and global prompts, image and
    reference tokens) in `dtype`; the bool mask it is made from takes a further tokens^2 bytes while it is built."""
    return tokens * tokens * torch.empty((), dtype=dtype).element_size()


@dataclass
class EliGenAdapter:
    """EliGen in the adapter mechanism: the entity prompts go before the text and the attention mask into its slot.

    prompts: per CFG branch, the entity prompt embeddings (B or 1, N, L, D); a branch without an entry runs without
        EliGen (the negative one unless `eligen_enable_on_negative`).
    grids: the entity regions on the whole latent grid (N, h, w) bool; a tile of the tiled DiT takes its crop."""
    prompts: dict[str, torch.Tensor]
    grids: torch.Tensor
    name: str = "eligen"
    _masks: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def contribute(self, inputs: DiTInputs, call: DiTCall) -> Contribution | None:
        embeds = self.prompts.get(call.branch)
        if embeds is None:
            return None
        b, device = inputs.batch, inputs.txt.device
        n, length = embeds.shape[1], embeds.shape[2]
        entity_txt = embeds.to(device, inputs.txt.dtype).reshape(embeds.shape[0], n * length, -1)
        entity_txt = entity_txt.expand(b, -1, -1) if entity_txt.shape[0] == 1 else entity_txt
        references = 0 if inputs.extras.ref_tokens is None else inputs.extras.ref_tokens.shape[1]
        key = (inputs.top, inputs.left, inputs.height, inputs.width, inputs.txt.shape[1], references,
               inputs.txt.dtype, device)
        mask = self._masks.get(key)
        if mask is None:
            grids = self.grids[:, inputs.top:inputs.top + inputs.height, inputs.left:inputs.left + inputs.width]
            mask = eligen_attention_mask(patch_regions(grids), [length] * n, inputs.txt.shape[1], references,
                                         inputs.txt.dtype, device)
            self._masks[key] = mask
        return Contribution(
            source=self.name,
            txt=torch.cat((entity_txt, inputs.txt), dim=1),
            txt_ids=torch.cat((text_ids(b, n * length, device=device, dtype=inputs.txt_ids.dtype), inputs.txt_ids),
                              dim=1),
            attention_mask=mask)


def eligen_adapter(entity_embeds: torch.Tensor, masks: Sequence, height: int, width: int,
                   negative_embeds: torch.Tensor | None = None) -> EliGenAdapter:
    """EliGen bound to its entities: `entity_embeds` (N, L, D) the encoded entity prompts, `masks` one per entity
    (checked by `check_entities`), `height`/`width` the image's pixels. `negative_embeds` (B or 1, L, D), the
    negative prompt's embedding, turns EliGen on for the negative branch too, with that prompt in every entity
    (DiffSynth's `eligen_enable_on_negative`)."""
    grids = torch.stack([entity_grid(m, height // 8, width // 8, f"eligen_entity_masks[{i}]")
                         for i, m in enumerate(masks)])
    prompts = {"positive": entity_embeds[None]}
    if negative_embeds is not None:
        prompts["negative"] = negative_embeds[:, None].expand(-1, entity_embeds.shape[0], -1, -1)
    return EliGenAdapter(prompts, grids)
