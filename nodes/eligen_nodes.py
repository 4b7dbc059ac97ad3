"""EliGen nodes: EliGen Entity (FluxCore), one prompt for one painted region, and what the sampler does with it.

An Entity node takes a CONDITIONING and gives it back with one more entity: its prompt, encoded right away (CLIP-L and
T5, the pooled vector dropped, as DiffSynth-Studio encodes `eligen_entity_prompts`) to as many T5 tokens as the
conditioning's own prompt has, and its MASK (white = the entity's region: LoadImage's mask painted in the mask
editor, LoadImageMask, any MASK node). The entity goes into the list under the documented conditioning key
`fluxcore_eligen_entities`; chaining Entity nodes adds entities, and native nodes (FluxGuidance,
ConditioningZeroOut, ReferenceLatent, ...) carry the list along. Payloads compare by identity (eq=False).

The sampler encodes nothing more: it stacks the entities of each CFG branch into a flux_core EliGenAdapter
(flux_core.eligen), after the other adapters (ControlNets run on the plain prompt, as in DiffSynth).

- Branches: the entities chained onto `positive` act on the positive branch; entities chained onto `negative` act on
  the negative branch under true CFG (cfg > 1), with their own prompts and masks: regional negative prompts.
  DiffSynth's `eligen_enable_on_negative` (the negative prompt in every entity region) is the special case of
  Entity nodes on `negative` with the negative prompt as their text and the positive entities' masks.
- Inpaint (DiffSynth's `eligen_enable_inpaint`): the sampler's `eligen_inpaint` switch; its latent_image must be a
  VAE-encoded image, which is kept outside the union of the positive entities' masks.
- Masks are checked against the latent when sampling (another aspect ratio, no white pixel at the latent's
  resolution), each error naming the Entity node (its id and text).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_core.adapters import BRANCHES
from flux_core.eligen import EliGenAdapter, eligen_adapter, eligen_mask_bytes, inpaint_region, mask_problems
from flux_core.inputs import T5_MAX_SEQUENCE_LENGTH
from flux_core.models.text_encoders import encode_prompt

from . import comfy_bridge as bridge
from .conditioning import payloads_with_branches, with_payload
from .handles import TEXT_ENCODERS_TYPE
from .loaders import NodeInputError

ENTITIES_KEY = "fluxcore_eligen_entities"   # CONDITIONING key: list of EntityPayload, in the order chained
ENTITY_NODE = "FluxCoreEliGenEntity"
ENTITY_NODE_NAME = "EliGen Entity (FluxCore)"


@dataclass(eq=False)
class EntityPayload:
    """One EliGen Entity (FluxCore): the encoded entity prompt and its mask."""
    text: str
    embeds: torch.Tensor      # (1, L, D) T5 tokens of the entity prompt, on the CPU
    mask: torch.Tensor        # (H, W) float in [0, 1], 1 = the entity's region
    node_id: str | None = None

    @property
    def label(self) -> str:
        """How messages name the Entity node that made this entity: its id in the graph and its text."""
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        where = f" #{self.node_id}" if self.node_id is not None else ""
        return f"{ENTITY_NODE_NAME}{where} ({text!r})"


class FluxCoreEliGenEntity:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "add"
    DESCRIPTION = ("EliGen: adds an entity, a prompt for one painted region, to the conditioning (chain one node per "
                   "entity). On 'positive' it acts on the prompt; on 'negative' on the negative prompt (cfg > 1). "
                   "Load the EliGen LoRA (DiffSynth-Studio/Eligen) with Load FLUX LoRA for the trained effect.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt's conditioning (FluxCore Text Encode or "
                                                             "native), or the output of another Entity node."}),
                "text_encoders": (TEXT_ENCODERS_TYPE, {"tooltip": "From Load FLUX Text Encoders (FluxCore): encodes "
                                                                  "the entity's prompt now, to as many T5 tokens as "
                                                                  "the conditioning's prompt."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "What is in this region, e.g. 'a red apple on a plate'."}),
                "mask": ("MASK", {"tooltip": "The entity's region, 1 (white) inside: LoadImage's mask painted in the "
                                             "mask editor, or LoadImageMask. Any resolution of the output's aspect "
                                             "ratio; one mask."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def add(self, conditioning, text_encoders, text, mask, unique_id=None):
        node = ENTITY_NODE
        where = f"{node}{f' #{unique_id}' if unique_id is not None else ''}"
        problems = []
        if not conditioning:
            problems.append("input 'conditioning': empty conditioning; connect a prompt's conditioning")
        if not isinstance(text, str) or not text.strip():
            problems.append("input 'text': empty; describe what goes into the entity's region")
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[0] != 1):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            problems.append(f"input 'mask': expected one MASK (1, H, W) or (H, W), got {shape}; an entity has one "
                            f"region (use one Entity node per mask)")
        if problems:
            raise NodeInputError(f"{where}, " + "; ".join(problems) + ".")
        # As many T5 tokens as the prompt it joins (DiffSynth encodes entity prompts with the prompt's
        # t5_sequence_length), so the entities of one chain have one length.
        length = min(int(conditioning[0][0].shape[1]), T5_MAX_SEQUENCE_LENGTH)
        bridge.ready(text_encoders.clip, text_encoders.t5)
        with torch.no_grad():
            embeds, _ = encode_prompt([text], text_encoders.clip.module, text_encoders.t5.module,
                                      text_encoders.clip_tokenizer, text_encoders.t5_tokenizer,
                                      t5_sequence_length=length, device=bridge.compute_device())
        payload = EntityPayload(text=text, embeds=embeds.cpu(), mask=mask.reshape(mask.shape[-2:]).float().cpu(),
                                node_id=None if unique_id is None else str(unique_id))
        return (with_payload(conditioning, ENTITIES_KEY, payload),)


# ---------------------------------------------------------------- sampling
def entities_by_branch(node: str, sides: dict) -> dict[str, list[EntityPayload]]:
    """The entities of each CFG branch the run uses ({"positive": [...], "negative": [...]}, branches without
    entities left out), in the order chained. `sides`: the run's conditioning sides, as for the other payloads."""
    found = payloads_with_branches(node, sides, ENTITIES_KEY, EntityPayload, ENTITY_NODE_NAME)
    branches = {b: [p for p, on in found if b in on] for b in BRANCHES}
    return {b: entities for b, entities in branches.items() if entities}


def check_entities(node: str, entities: dict[str, list[EntityPayload]], dit, height: int, width: int) -> None:
    """Every entity against the DiT and an image of height x width pixels, all problems at once, each naming its
    Entity node: a mask of another aspect ratio or without a white pixel at the latent's resolution, a prompt
    encoded for another model, entities of one branch encoded to different lengths."""
    problems = []
    for branch, payloads in entities.items():
        mine = []
        for payload in payloads:
            mine += mask_problems(payload.mask, height, width, f"the mask of {payload.label}")
            if payload.embeds.shape[-1] != dit.params.context_in_dim:
                mine.append(f"{payload.label} was encoded to tokens of width {payload.embeds.shape[-1]}, this FLUX "
                            f"model takes {dit.params.context_in_dim}: use FLUX's text encoders")
        lengths = {p.embeds.shape[1] for p in payloads}
        if len(lengths) > 1:
            mine.append("its entities were encoded to different numbers of T5 tokens ("
                        + ", ".join(f"{p.label}: {p.embeds.shape[1]}" for p in payloads)
                        + "): chain them onto prompts of one t5_sequence_length")
        problems += [f"input '{branch}': {p}" for p in mine]
    if problems:
        raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")


def entity_tokens(entities: dict[str, list[EntityPayload]]) -> dict[str, int]:
    """The text tokens the entities add to each branch's DiT calls."""
    return {b: sum(p.embeds.shape[1] for p in payloads) for b, payloads in entities.items()}


def eligen_held_bytes(entities: dict[str, list[EntityPayload]], text_tokens: dict[str, int], image_tokens: int,
                      dtype: torch.dtype) -> int:
    """The attention masks the run keeps on the device (one per branch with entities), over that branch's text
    (`text_tokens`: its prompt's tokens) plus the entities and the image (and reference) tokens."""
    return sum(eligen_mask_bytes(text_tokens[b] + n + image_tokens, dtype) for b, n in entity_tokens(entities).items())


def eligen_adapters(entities: dict[str, list[EntityPayload]], height: int, width: int,
                    device: torch.device | str) -> list[EliGenAdapter]:
    """One flux_core EliGenAdapter per branch with entities: the branch's entity embeddings stacked (N, L, D) and
    their regions on the latent grid of a height x width image (pixels)."""
    adapters = []
    for branch, payloads in entities.items():
        embeds = torch.cat([p.embeds for p in payloads]).to(device)
        adapter = eligen_adapter(embeds, [p.mask for p in payloads], height, width)
        adapters.append(EliGenAdapter({branch: adapter.prompts["positive"]}, adapter.grids,
                                      name=f"{ENTITIES_KEY} ({branch})"))
    return adapters


def eligen_inpaint_region(node: str, entities: dict[str, list[EntityPayload]], samples: torch.Tensor
                          ) -> torch.Tensor:
    """The latent region inpaint mode lets change (1, 1, h, w) bool: the union of the positive entities' masks,
    as DiffSynth's eligen_enable_inpaint resizes them. Refused without positive entities, or on an empty latent
    (nothing to keep outside the regions)."""
    problems = []
    if "positive" not in entities:
        problems.append(f"input 'eligen_inpaint': no {ENTITY_NODE_NAME} on 'positive'; inpaint mode changes only "
                        f"the regions of the positive entities: chain Entity nodes onto the prompt, or turn it off")
    if not samples.abs().amax().item():
        problems.append("input 'latent_image': all zeros (an empty latent); eligen_inpaint keeps the input image "
                        "outside the entities' regions: connect a VAE-encoded image (VAE Encode), or turn "
                        "eligen_inpaint off")
    if problems:
        raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")
    return inpaint_region([p.mask for p in entities["positive"]], samples.shape[-2], samples.shape[-1])


NODE_CLASS_MAPPINGS = {ENTITY_NODE: FluxCoreEliGenEntity}
NODE_DISPLAY_NAME_MAPPINGS = {ENTITY_NODE: ENTITY_NODE_NAME}
