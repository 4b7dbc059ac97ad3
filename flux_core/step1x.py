"""Step1X-Edit's conditioning: the prompt read by Qwen2.5-VL together with the image to edit, refined at every DiT
call by the connector (flux_core.models.step1x_connector).

As DiffSynth-Studio's Step1xEditEmbedder computes it, for each prompt:
1. one user turn of the chat template: the fixed instruction `STEP1X_INSTRUCTION`, the reference image, the prompt
   (`apply_chat_template(add_generation_prompt=True, add_vision_id=True)`), run through the processor;
2. the text after the image is tokenized again piece by piece (`quoted_pieces`): characters inside double quotes
   (curly quotes and apostrophes count as double quotes) become one token each, so quoted text to draw is spelled
   out; quotes before character `QUOTES_FROM` (those of the instruction) are plain text;
3. Qwen2.5-VL's last hidden state (after its final norm), with the first `PREFIX_TOKENS` dropped, up to
   `MAX_LENGTH` tokens, zero-padded, with a 0/1 mask of the real ones.
At each DiT call the connector turns (states, mask) into the DiT's text tokens and pooled vector at that call's sigma;
text ids are zero. The image's latent joins the image tokens (the pipeline's `step1x_extras`).

The prompts of a batch (and the positive and negative branch) are encoded one by one, as DiffSynth's loop does, so a
prompt's embedding does not depend on what else is encoded. DiffSynth-Studio stores the states in bfloat16 whatever
the pipeline's dtype; here they keep the model's dtype (the same in a bfloat16 pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from .dit_inputs import DiTCall, PromptEmbeds
from .vram import compute_place

# The instruction Step1X-Edit was trained with (the model's input format; DiffSynth-Studio's and Step1X-Edit's
# Qwen25VL_7b_PREFIX), placed before the image.
STEP1X_INSTRUCTION = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:\n'
    '- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial '
    'relationships to create vivid and concrete scenes.\n'
    '- If the prompt is already detailed, refine and enhance the existing details slightly without '
    'overcomplicating.\n\n'
    'Here are examples of how to transform or refine prompts:\n'
    '- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping '
    'peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n'
    '- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street '
    'lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass '
    'skyscrapers.\n\n'
    'Please generate only the enhanced description for the prompt below and avoid including any additional '
    'commentary or evaluations:\n'
    'User Prompt:')
# Hidden states dropped from the front: DiffSynth-Studio's (and Step1X-Edit's) literal. Counted with Qwen2.5's
# tokenizer, the system turn and the instruction up to "User Prompt" are 217 tokens, so the states kept start at the
# instruction's final ":" and include "Picture 1: ", the image tokens and the prompt.
PREFIX_TOKENS = 217
MAX_LENGTH = 640          # states kept (zero-padded, masked)
QUOTES_FROM = 155         # a double quote at this character index of the templated text or before is plain text
VISION_END = "<|vision_end|>"


def quoted_pieces(text: str) -> list[str]:
    """The templated text in the pieces DiffSynth-Studio tokenizes one by one: plain runs (an opening quote ends its
    run, a closing quote starts the next) and, for each character inside quotes, "“c”"."""
    text = text.replace("“", '"').replace("”", '"').replace("'", '"')
    pieces, run, inside = [], "", False
    for i, char in enumerate(text):
        if char == '"' and i > QUOTES_FROM:
            run += char
            if not inside:
                pieces.append(run)
                run = ""
            inside = not inside
        elif inside:
            pieces.append("“" + char + "”")
        else:
            run += char
    if run:
        pieces.append(run)
    return pieces


def _single_token(processor, text: str) -> int | None:
    ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def step1x_input_ids(processor, templated: str, image_ids: torch.Tensor) -> torch.Tensor:
    """(1, L) token ids: the processor's ids (`image_ids`, image tokens expanded) up to the image's end, then the
    pieces of `quoted_pieces` from the image's end on, each tokenized alone (a quoted character's surrounding “ ”
    tokens removed when the tokenizer kept them apart)."""
    open_quote, close_quote = _single_token(processor, "“"), _single_token(processor, "”")
    vision_end = processor.tokenizer.convert_tokens_to_ids(VISION_END)
    tokens = []
    for piece in quoted_pieces(templated):
        # The tokenizer alone, as the processor's text-only call was in transformers 4 (5 refuses the image
        # token without an image).
        ids = processor.tokenizer(piece, return_tensors="pt").input_ids[0]
        if len(ids) >= 2 and int(ids[0]) == open_quote and int(ids[-1]) == close_quote:
            ids = ids[1:-1]
        tokens.append(ids)
    retokenized = torch.cat(tokens)
    head = int((image_ids[0] == vision_end).nonzero()[0, 0])
    tail = int((retokenized == vision_end).nonzero()[0, 0])
    return torch.cat([image_ids[0, :head], retokenized[tail:]])[None]


@torch.no_grad()
def step1x_embedding(model: nn.Module, processor, prompts: Sequence[str], image: Image.Image,
                     max_length: int = MAX_LENGTH, prefix_tokens: int = PREFIX_TOKENS,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, max_length, hidden) in the model's dtype, mask (B, max_length) long) of each prompt with the
    reference image (module docstring). `model`: transformers' Qwen2_5_VLModel (a Qwen2_5_VLForConditionalGeneration's
    `.model` is taken); it runs where it computes (flux_core.vram), the results go to `device`."""
    if hasattr(model, "lm_head"):   # a Qwen2_5_VLForConditionalGeneration: its base model gives the states
        model = model.model
    run_device, dtype = compute_place(model)
    hidden = model.config.text_config.hidden_size
    states = torch.zeros(len(prompts), max_length, hidden, dtype=dtype)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": [{"type": "text", "text": STEP1X_INSTRUCTION},
                                                 {"type": "image", "image": image},
                                                 {"type": "text", "text": prompt}]}]
        templated = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  add_vision_id=True)
        inputs = processor(text=[templated], images=[image], padding=True, return_tensors="pt")
        ids = step1x_input_ids(processor, templated, inputs.input_ids)
        # DiffSynth-Studio's attention mask: every id above 0 (the token with id 0 is masked out as padding would be).
        out = model(input_ids=ids.to(run_device), attention_mask=(ids > 0).long().to(run_device),
                    pixel_values=inputs.pixel_values.to(run_device, dtype),
                    image_grid_thw=inputs.image_grid_thw.to(run_device)).last_hidden_state
        n = max(0, min(max_length, out.shape[1] - prefix_tokens))
        states[i, :n] = out[0, prefix_tokens:prefix_tokens + n].to("cpu", dtype)
        mask[i, :n] = 1
    target = device if device is not None else run_device
    return states.to(target), mask.to(target)


@dataclass
class Step1XConditioning:
    """One branch's Step1X-Edit conditioning: Qwen2.5-VL states and mask, through the connector at each call's sigma
    (the last sigma's result is kept: the tiles of a tiled DiT and repeated calls reuse it)."""
    connector: nn.Module
    states: torch.Tensor     # (B, L, hidden)
    mask: torch.Tensor       # (B, L)
    _last: tuple[float, PromptEmbeds] | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return self.states.shape[1]

    def at(self, call: DiTCall) -> PromptEmbeds:
        sigma = float(call.sigma)
        if self._last is None or self._last[0] != sigma:
            device, dtype = compute_place(self.connector)
            prompt_emb, pooled = self.connector(self.states.to(device, dtype), sigma, self.mask.to(device))
            self._last = (sigma, PromptEmbeds(prompt_emb, pooled))   # text ids None: all zero
        return self._last[1]


@dataclass
class Step1XEncoder:
    """Step1X-Edit's conditioning encoder (flux_core.text_conditioning.ConditioningEncoder)."""
    qwenvl: nn.Module
    processor: object
    connector: nn.Module
    reference_image: Image.Image
    device: torch.device | str | None = None
    max_length: int = MAX_LENGTH
    prefix_tokens: int = PREFIX_TOKENS
    name: str = "Step1X-Edit (Qwen2.5-VL + connector)"
    slots: tuple[str, ...] = ("qwenvl",)
    step_slots: tuple[str, ...] = ("step1x_connector",)

    @property
    def max_tokens(self) -> int:
        return self.max_length

    def encode(self, prompts: Sequence[str], branch: str = "positive") -> Step1XConditioning:
        states, mask = step1x_embedding(self.qwenvl, self.processor, list(prompts), self.reference_image,
                                        self.max_length, self.prefix_tokens, self.device)
        return Step1XConditioning(self.connector, states, mask)


def step1x_encoder(qwenvl: nn.Module, qwenvl_processor, step1x_connector: nn.Module, reference_image: Image.Image,
                   device: torch.device | str | None = None) -> Step1XEncoder:
    """The encoder `FluxImagePipeline.conditioning_encoder` uses when a step1x_reference_image is given."""
    return Step1XEncoder(qwenvl, qwenvl_processor, step1x_connector, reference_image, device)
