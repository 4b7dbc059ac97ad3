"""Prompt encoding to native FLUX CONDITIONING, and Kontext reference images.

CONDITIONING is ComfyUI's own list of [T5 tokens (1, L, 4096), {"pooled_output": (1, 768), "guidance": g,
"reference_latents": [raw latents]}] entries, so native nodes (CLIPTextEncodeFlux, FluxGuidance,
ReferenceLatent, ConditioningZeroOut, ...) and ours mix freely.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flux_core.image import pil_to_tensor, resize_to_multiple, tensor_to_pil
from flux_core.inputs import T5_MAX_SEQUENCE_LENGTH
from flux_core.models.text_encoders import encode_prompt
from flux_core.sampling import PromptEmbeds
from flux_core.text_conditioning import Conditioning

from . import comfy_bridge as bridge
from .handles import TEXT_ENCODERS_TYPE, VAE_TYPE
from .loaders import NodeInputError

DEFAULT_GUIDANCE = 3.5
# A conditioning encoder's own output (Step1X-Edit, Nexus-Gen encode nodes), used by the sampler instead of the entry's
# tokens and pooled_output (EncodedText).
TEXT_KEY = "fluxcore_text"
# The CONDITIONING entries FluxCore's sampler honours (`fluxcore_controlnets`: the payloads of Apply ControlNet
# (FluxCore), nodes/controlnet_nodes.py; `fluxcore_eligen_entities`: EliGen Entity (FluxCore)'s, nodes/eligen_nodes.py;
# `fluxcore_lora_encoder`: Encode LoRA into Conditioning (FluxCore)'s, nodes/lora_model_nodes.py; `fluxcore_flex`:
# FLEX.2 Inputs (FluxCore)'s and native InpaintModelConditioning's `concat_latent_image` / `concat_mask` for FLUX.1-Fill,
# nodes/channel_nodes.py; `fluxcore_text`: the Step1X-Edit / Nexus-Gen encode nodes' EncodedText);
# anything else (native ControlNet's "control", "mask", "area", "strength",
# "gligen", "reference_latents_method", ...) it cannot use, and says so (warn_unused_entries).
# ComfyUI's key for models its samplers load with the MODEL: FluxCore's Apply nodes list the models their payloads
# run at every step (for a native MODEL); FluxCore's sampler places those itself, so the key is no loss there.
ADDITIONAL_MODELS = "additional_models"
HONOURED_KEYS = frozenset({"pooled_output", "guidance", "reference_latents", "fluxcore_controlnets",
                           "fluxcore_ipadapters", "fluxcore_eligen_entities", "fluxcore_lora_encoder", TEXT_KEY,
                           "fluxcore_flex", "concat_latent_image", "concat_mask", ADDITIONAL_MODELS})
# Entries that only qualify another one (native Apply ControlNet sets both): warned about under that one.
QUALIFIERS = {"control_apply_to_uncond": "control"}
NATIVE_CONTROLNET_HINT = ("it is a ControlNet from ComfyUI's own Apply ControlNet, which FluxCore's sampler cannot run: "
                          "load the ControlNet with \"Load ControlNet (FluxCore)\" and apply it with \"Apply "
                          "ControlNet (FluxCore)\" instead")
log = logging.getLogger("FluxCore")


def image_to_model(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1], contiguous: a channels-last view runs the
    VAE's convolutions through other kernels, whose rounding differs from the Python pipeline's (the same image
    encoded both ways differed by 1 % on a VAE with one channel per GroupNorm group)."""
    return (image[..., :3].permute(0, 3, 1, 2) * 2 - 1).contiguous()


def model_to_image(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()


@dataclass(frozen=True, eq=False)
class EncodedText:
    """A conditioning encoder's output (flux_core.text_conditioning) carried in a CONDITIONING entry under
    `fluxcore_text`. The entry's own tensor and pooled_output hold fixed embeddings for native nodes to read; the
    sampler uses `conditioning` (which may change per DiT call: Step1X-Edit's connector).
    step_models: handles of the models `conditioning` runs at every DiT call, placed on the device beside the DiT.
    reference_latents: scaled latents (1, 16, h, w) that join the image tokens at their own positions (index 0:
        Step1X-Edit's image to edit)."""
    conditioning: Conditioning
    step_models: tuple = ()
    reference_latents: tuple = ()


def read_conditioning(node: str, input_name: str, conditioning
                      ) -> tuple[Conditioning, float | None, list, EncodedText | None]:
    """(embeds, guidance, raw reference latents, the encoder's EncodedText or None) of a native CONDITIONING; only
    its first entry is used."""
    if not conditioning:
        raise NodeInputError(f"{node}, input '{input_name}': empty conditioning.")
    if len(conditioning) > 1:  # e.g. from ConditioningCombine / area conditioning, which FLUX sampling has no use for
        log.warning("%s, input '%s': %d conditioning entries; only the first is used.", node, input_name,
                    len(conditioning))
    tokens, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise NodeInputError(f"{node}, input '{input_name}': the conditioning has no pooled_output; FLUX needs "
                             f"CLIP-L's pooled output (use FluxCore Text Encode or CLIPTextEncodeFlux).")
    guidance = extra["guidance"] if "guidance" in extra else DEFAULT_GUIDANCE
    encoded = extra.get(TEXT_KEY)
    if encoded is not None and not isinstance(encoded, EncodedText):
        raise NodeInputError(f"{node}, input '{input_name}': {TEXT_KEY} is a {type(encoded).__name__}; only "
                             f"FluxCore's Step1X-Edit and Nexus-Gen encode nodes make this entry.")
    embeds = encoded.conditioning if encoded is not None else PromptEmbeds(tokens, pooled)
    return embeds, guidance, list(extra.get("reference_latents") or []), encoded


# The percent widgets of every Apply node that acts on a range of steps (flux_core.adapters.StepRange).
PERCENT_INPUTS = {
    "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                "First step it acts on, as a fraction of the steps (0 = the first)."}),
    "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                              "Last step it acts on, as a fraction of the steps (1 = the last)."}),
}


def with_payload(conditioning, key: str, payload, models=()) -> list:
    """A copy of the conditioning with `payload` appended to every entry's `key` list (an Apply node's output);
    `models` (ManagedModels the payload computes with at every step) are listed for ComfyUI to load with a native
    MODEL (with_models_to_load)."""
    out = []
    for tokens, extra in conditioning:
        extra = dict(extra)
        extra[key] = list(extra.get(key) or []) + [payload]
        out.append([tokens, with_models_to_load(extra, models)])
    return out


def with_models_to_load(extra: dict, models) -> dict:
    """The entry with the models' ModelPatchers under `additional_models`, which ComfyUI's samplers load with the
    MODEL before sampling (a native MODEL over FluxCore's DiT; FluxCore's own sampler places them itself).
    Standalone (no patchers) the entry is unchanged."""
    patchers = [m.step_patcher() for m in models if m.patcher is not None]
    if patchers:
        extra = {**extra, ADDITIONAL_MODELS: list(extra.get(ADDITIONAL_MODELS) or []) + patchers}
    return extra


def payloads_with_branches(node: str, sides: dict, key: str, payload_type: type, maker: str) -> list[tuple]:
    """Each `payload_type` payload under `key` in the sides' first entries ({"positive": conditioning, "negative":
    ...}: only the sides the run uses) with the branches it was applied to (one object in both sides: both), positive's
    order first, then those only in negative. `maker` names the node that makes such entries, for the error."""
    found: list[tuple[object, set[str]]] = []
    for side, conditioning in sides.items():
        items = conditioning[0][1].get(key) if conditioning else None
        for i, payload in enumerate(items or []):
            if not isinstance(payload, payload_type):
                raise NodeInputError(f"{node}, input '{side}': {key}[{i}] is a {type(payload).__name__}; only "
                                     f"{maker} makes these entries.")
            known = next((branches for p, branches in found if p is payload), None)
            if known is None:
                found.append((payload, {side}))
            else:
                known.add(side)
    return [(p, frozenset(b)) for p, b in found]


def unused_keys(conditioning) -> set[str]:
    """The keys of a CONDITIONING's entries that the sampler does not honour (None values are no setting)."""
    return {QUALIFIERS.get(key, key) for _, extra in conditioning or [] for key, value in extra.items()
            if key not in HONOURED_KEYS and value is not None}


def warn_unused_entries(node: str, sides: dict) -> None:
    """One warning per key the sampler cannot use, naming the inputs that carry it: once per run, so a ControlNet
    or an area mask from native nodes is never dropped silently."""
    carriers: dict[str, list[str]] = {}
    for input_name, conditioning in sides.items():
        for key in sorted(unused_keys(conditioning)):
            carriers.setdefault(key, []).append(input_name)
    for key, inputs in carriers.items():
        on = " and ".join(f"'{i}'" for i in inputs)
        if key == "control":
            log.warning("%s: conditioning entry 'control' (on %s) is ignored; %s.", node, on, NATIVE_CONTROLNET_HINT)
            continue
        log.warning("%s: conditioning entry %r (on %s) is not supported by FluxCore's sampler and is ignored; it "
                    "honours only %s.", node, key, on, ", ".join(sorted(HONOURED_KEYS)))


class FluxCoreTextEncode:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes a prompt with CLIP-L and T5 into native FLUX conditioning (works with FluxGuidance etc.)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoders": (TEXT_ENCODERS_TYPE, {"tooltip": "From Load FLUX Text Encoders (FluxCore)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt."}),
            "guidance": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Embedded (distilled) guidance of FLUX.1-dev; 2.5 is usual for Kontext."}),
            "t5_sequence_length": ("INT", {"default": 0, "min": 0, "max": T5_MAX_SEQUENCE_LENGTH, "step": 16,
                                           "tooltip": "T5 tokens the prompt is padded/truncated to; 0: the T5 "
                                                      "tokenizer's own length, the one its model was trained with "
                                                      "(FLUX.1-dev: 512, the bundled demo: 32)."}),
        }}

    def encode(self, text_encoders, text, guidance=DEFAULT_GUIDANCE, t5_sequence_length=0):
        bridge.ready(text_encoders.clip, text_encoders.t5)
        with torch.no_grad():  # None: encode_prompt takes the tokenizer's length (t5_sequence_length_of)
            prompt_emb, pooled = encode_prompt([text], text_encoders.clip.module, text_encoders.t5.module,
                                               text_encoders.clip_tokenizer, text_encoders.t5_tokenizer,
                                               t5_sequence_length=t5_sequence_length or None,
                                               device=bridge.compute_device())
        return ([[prompt_emb.cpu(), {"pooled_output": pooled.cpu(), "guidance": guidance}]],)


class FluxCoreKontextReference:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    DESCRIPTION = ("Adds a Kontext reference image to the conditioning (chain for several). Same data as native "
                   "ReferenceLatent, so either works with either sampler.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The conditioning to add the reference to."}),
            "vae": (VAE_TYPE, {"tooltip": "The FLUX VAE that encodes the reference."}),
            "image": ("IMAGE", {"tooltip": "Reference image; keeps its own size, shrunk to multiples of 16."}),
        }}

    def append(self, conditioning, vae, image):
        bridge.ready(vae.model)
        module = vae.model.module
        latents = []
        with torch.no_grad():
            for pil in tensor_to_pil(image_to_model(image)):
                x = pil_to_tensor(resize_to_multiple(pil)).to(module.device, module.dtype)
                latents.append(module.encode_raw(x).float().cpu())
        out = []
        for tokens, extra in conditioning:
            extra = dict(extra)
            extra["reference_latents"] = list(extra.get("reference_latents") or []) + latents
            out.append([tokens, extra])
        return (out,)


NODE_CLASS_MAPPINGS = {"FluxCoreTextEncode": FluxCoreTextEncode, "FluxCoreKontextReference": FluxCoreKontextReference}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreTextEncode": "FLUX Text Encode (FluxCore)",
                              "FluxCoreKontextReference": "FLUX Kontext Reference (FluxCore)"}
