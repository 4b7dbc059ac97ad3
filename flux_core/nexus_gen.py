"""Nexus-Gen's conditioning encoder (flux_core.text_conditioning): prompts -> the DiT's text tokens through
Nexus-Gen's autoregressive Qwen2.5-VL and a decoder's adapter, as DiffSynth-Studio's `FluxImageUnit_NexusGen`.

- Text-to-image: the chat "Generate an image according to the following description: {prompt}" answered with
  "Here is an image based on the description: <image>", the image being a white placeholder whose 81 tokens the AR
  model fills with its prefill embeddings; its 81 target embeddings go through the generation adapter
  (`generation_decoder.bin`) -> 81 DiT text tokens at text ids 0.
- Editing (`nexus_gen_reference_image`): "<image> {instruction}" answered with "Here is the image: <image>", the
  first image the reference (bounded to 262640 pixels with Qwen's smart-resize rounding); the 81 target embeddings
  and the reference image's embeddings go through the editing adapter (`edit_decoder.bin`) -> 81 + N tokens whose
  text ids lie on the latent grid (target index 0, reference index 1: `editing_text_ids`).
- The negative branch is FLUX.1's own (CLIP-L + T5 of the negative prompt), and the positive branch's pooled vector
  is CLIP-L's of the prompt: Nexus-Gen replaces only the positive text tokens and their ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .dit_inputs import PromptEmbeds
from .text_conditioning import ClipT5Encoder
from .vram import compute_place

# DiffSynth's bound on the reference image's pixels (NexusGenAutoregressiveModel.max_pixels).
REFERENCE_MAX_PIXELS = 262640
# qwen_vl_utils.smart_resize's defaults (Qwen2.5-VL): the side multiple (14-pixel patches merged 2x2), the least
# pixel count, the largest side ratio.
SMART_RESIZE_FACTOR = 28
SMART_RESIZE_MIN_PIXELS = 4 * 28 * 28
SMART_RESIZE_MAX_RATIO = 200
IMAGE_PLACEHOLDER = "<image>"
VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


def smart_resize(height: int, width: int, factor: int = SMART_RESIZE_FACTOR, min_pixels: int = SMART_RESIZE_MIN_PIXELS,
                 max_pixels: int = REFERENCE_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) multiples of `factor`, near the given size, with min_pixels <= h * w <= max_pixels and the
    aspect ratio kept: qwen_vl_utils.smart_resize's rounding (nearest multiple; scaled down to the floor multiple
    when too large, up to the ceiling multiple when too small)."""
    if max(height, width) / min(height, width) > SMART_RESIZE_MAX_RATIO:
        raise ValueError(f"nexus_gen_reference_image: its aspect ratio {max(height, width) / min(height, width):.0f} "
                         f"is above {SMART_RESIZE_MAX_RATIO}, which Qwen2.5-VL refuses; crop it.")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def bound_image(image: Image.Image, max_pixels: int = REFERENCE_MAX_PIXELS) -> Image.Image:
    """The reference image resized as DiffSynth's `bound_image` (PIL's default resampling)."""
    height, width = smart_resize(image.height, image.width, max_pixels=max_pixels)
    return image.resize((width, height))


def generation_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": f"Generate an image according to the following description: {prompt}"},
            {"role": "assistant", "content": f"Here is an image based on the description: {IMAGE_PLACEHOLDER}"}]


def editing_messages(instruction: str) -> list[dict]:
    """The instruction refers to the reference image as <image>; without one it is put in front."""
    if IMAGE_PLACEHOLDER not in instruction:
        instruction = f"{IMAGE_PLACEHOLDER} {instruction}"
    return [{"role": "user", "content": instruction},
            {"role": "assistant", "content": f"Here is the image: {IMAGE_PLACEHOLDER}"}]


def placeholder_image(processor, num_tokens: int) -> Image.Image:
    """The white square whose merged tokens stand for the image to generate: sqrt(81) = 9 merged tokens a side,
    each 2x2 patches of 14 pixels: 252 x 252 for Qwen2.5-VL's processor (DiffSynth's size)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"Nexus-Gen's model writes {num_tokens} image embeddings, not a square grid")
    image_processor = processor.image_processor
    return Image.new("RGB", [side * image_processor.merge_size * image_processor.patch_size] * 2, (255, 255, 255))


def model_inputs(processor, prompt: str, reference_image: Image.Image | None, num_image_tokens: int = 81
                 ) -> dict[str, torch.Tensor]:
    """The processor's tensors (input_ids, attention_mask, pixel_values, image_grid_thw) for one prompt: DiffSynth's
    messages with its chat template applied, each <image> written as Qwen's vision tokens, and its images (the
    bounded reference when editing, then the white placeholder)."""
    placeholder = placeholder_image(processor, num_image_tokens)
    if reference_image is None:
        messages, images = generation_messages(prompt), [placeholder]
    else:
        messages, images = editing_messages(prompt), [bound_image(reference_image), placeholder]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    inputs = processor(text=[text.replace(IMAGE_PLACEHOLDER, VISION_TOKENS)], images=images, padding=True,
                       return_tensors="pt")
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def editing_text_ids(latent_height: int, latent_width: int, target_grid: Sequence[int], ref_grid: Sequence[int],
                     batch: int = 1) -> torch.Tensor:
    """(B, 81 + N, 3) float32 text ids of the editing adapter's tokens, as DiffSynth's get_editing_text_ids: the
    target tokens' (h/2 x w/2 grid, h and w the unmerged grid of image_grid_thw) at (0, i * H_lat / h, j * W_lat / w),
    the reference tokens' likewise on theirs with index 1; H_lat, W_lat the latent's size (image / 8)."""
    def grid_ids(grid: Sequence[int], index: float) -> torch.Tensor:
        _, h, w = (int(v) for v in grid)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h // 2)[:, None] * (latent_height / h)
        ids[..., 2] = torch.arange(w // 2)[None, :] * (latent_width / w)
        return ids.reshape(1, -1, 3)
    return torch.cat([grid_ids(target_grid, 0.0), grid_ids(ref_grid, 1.0)], dim=1).repeat(batch, 1, 1)


@dataclass
class NexusGenEncoder:
    """Nexus-Gen's ConditioningEncoder (see the module doc). `reference_image` None: text-to-image."""
    nexus_gen: torch.nn.Module            # flux_core.models.nexus_gen.NexusGenAutoregressiveModel
    processor: object                     # its transformers Qwen2.5-VL processor
    adapter: torch.nn.Module              # NexusGenAdapter (text-to-image) or NexusGenImageEmbeddingMerger (editing)
    clip_t5: ClipT5Encoder
    reference_image: Image.Image | None
    latent_height: int
    latent_width: int
    device: torch.device | str | None = None
    name: str = "Nexus-Gen"
    slots: tuple[str, ...] = ()
    step_slots: tuple[str, ...] = ()

    @property
    def max_tokens(self) -> int:
        """The positive branch's 81 tokens (+ the bounded reference image's merged 28-pixel patches when editing), or
        the negative branch's T5 tokens."""
        tokens = self.nexus_gen.num_image_tokens
        if self.reference_image is not None:
            height, width = smart_resize(self.reference_image.height, self.reference_image.width)
            tokens += (height // SMART_RESIZE_FACTOR) * (width // SMART_RESIZE_FACTOR)
        return max(tokens, self.clip_t5.max_tokens)

    def encode(self, prompts: Sequence[str], branch: str = "positive") -> PromptEmbeds:
        prompts = list(prompts)
        if branch == "negative":
            return self.clip_t5.encode(prompts, "negative")
        pooled = self.clip_t5.pooled(prompts)
        tokens, ids = zip(*(self.encode_one(p) for p in prompts))
        text_ids = None if ids[0] is None else torch.cat(ids)
        return PromptEmbeds(torch.cat(tokens), pooled, text_ids)

    @torch.no_grad()
    def encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(DiT tokens (1, L, 4096), text ids (1, L, 3) or None) of one prompt."""
        device, _ = compute_place(self.nexus_gen)   # where it computes (a VRAM-managed model rests elsewhere)
        inputs = {k: v.to(device) for k, v in model_inputs(self.processor, prompt, self.reference_image,
                                                           self.nexus_gen.num_image_tokens).items()}
        target, reference = self.nexus_gen.target_embeddings(**inputs)
        device, dtype = compute_place(self.adapter)
        target = target[None].to(device, dtype)
        if self.reference_image is None:
            return self.adapter(target).to(self.device), None
        grids = inputs["image_grid_thw"].to(device)
        tokens = self.adapter(target, grids[1:2], reference[None].to(device, dtype), grids[0:1])
        # DiffSynth computes the ids in the latents' dtype (the pipeline's, e.g. bfloat16): rounded the same way.
        ids = editing_text_ids(self.latent_height, self.latent_width, grids[1].tolist(), grids[0].tolist())
        return tokens.to(self.device), ids.to(dtype).float().to(self.device)


def nexus_gen_encoder(nexus_gen, nexus_gen_processor, generation_adapter, editing_adapter, clip_t5: ClipT5Encoder,
                      reference_image: Image.Image | None, latent_height: int, latent_width: int,
                      device: torch.device | str | None = None) -> NexusGenEncoder:
    """Nexus-Gen's conditioning encoder for one request: text-to-image with `generation_adapter` when
    `reference_image` is None, editing with `editing_adapter` otherwise. Raises naming every missing model."""
    editing = reference_image is not None
    adapter_name = "editing_adapter" if editing else "generation_adapter"
    adapter = editing_adapter if editing else generation_adapter
    given = {"nexus_gen": nexus_gen, "nexus_gen_processor": nexus_gen_processor, adapter_name: adapter,
             "clip_t5": clip_t5}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        task = "editing (a reference image is given)" if editing else "text-to-image"
        raise ValueError(f"Nexus-Gen {task} needs {', '.join(missing)}: the autoregressive model with its processor, "
                         f"the {'edit' if editing else 'generation'}_decoder's adapter and the CLIP-L + T5 encoders.")
    adapter_slot = "nexus_gen_editing_adapter" if editing else "nexus_gen_generation_adapter"
    return NexusGenEncoder(nexus_gen, nexus_gen_processor, adapter, clip_t5, reference_image, latent_height,
                           latent_width, device, slots=("nexus_gen", adapter_slot, *clip_t5.slots))
