"""LoRA-Encoder and LoRA-Fusion nodes (DiffSynth-Studio's models that take LoRAs as their input).

- Load LoRA-Encoder (FluxCore) + Encode LoRA into Conditioning (FluxCore): a LoRA from models/loras is encoded by the
  LoRA-Encoder (flux_core.lora_encoder) into tokens, `scale` times, when the node runs; they go into the list under
  the documented conditioning key `fluxcore_lora_encoder`. The sampler appends the tokens of every LoRA on 'positive',
  in the order chained, to the positive prompt (DiffSynth's lora_encoder_inputs / lora_encoder_scale: the negative
  branch gets none; an Encode LoRA node on 'negative' only is not used, and the sampler says so).
- Load LoRA-Fusion (FluxCore) + Fuse LoRAs (FluxCore): the model's LoRA stack (the Load FLUX LoRA nodes upstream, and
  any added downstream) is combined per layer by the LoRA-Fusion patcher when sampling, instead of summed
  (flux_core.lora.enable_lora_merger; DiffSynth's pipe.enable_lora_merger). Without the node the plain sum stays.

Model folders: models/lora_encoders (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev's model.safetensors) and
models/lora_fusion (DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev's model.safetensors), registered for the pack.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from flux_core.lora_encoder import (LoraEncoderAdapter, LoraEncoderInputError, check_encoder_fits,
                                    check_lora_encoder_inputs, encode_loras)
from flux_core.models.lora_sites import dit_lora_sites, site_mismatch

from . import comfy_bridge as bridge
from .conditioning import payloads_with_branches, with_payload
from .handles import DIT_TYPE
from .loaders import NodeInputError, load_kind, model_file

LORA_ENCODER_FOLDER = "lora_encoders"
LORA_FUSION_FOLDER = "lora_fusion"
LORA_ENCODER_KEY = "fluxcore_lora_encoder"   # CONDITIONING key: list of LoraEncoderPayload, in the order chained
LORA_ENCODER_TYPE = "FLUXCORE_LORA_ENCODER"
LORA_FUSION_TYPE = "FLUXCORE_LORA_FUSION"

bridge.register_model_folder(LORA_ENCODER_FOLDER)
bridge.register_model_folder(LORA_FUSION_FOLDER)
log = logging.getLogger("FluxCore")


@dataclass(frozen=True, eq=False)
class LoraEncoderHandle:
    """A loaded LoRA-Encoder (flux_core.models.lora_encoder.FluxLoraEncoder) and its file."""
    model: bridge.ManagedModel = field(compare=False)
    name: str = ""


@dataclass(frozen=True, eq=False)
class LoraFusionHandle:
    """A loaded LoRA-Fusion patcher (flux_core.models.lora_patcher.FluxLoraPatcher) and its file. Compares by
    identity: the sampler's record of what it applied to a DiT holds it beside the LoRA stack."""
    model: bridge.ManagedModel = field(compare=False)
    name: str = ""


@dataclass(eq=False)
class LoraEncoderPayload:
    """One Encode LoRA into Conditioning (FluxCore): the LoRA's tokens, already scaled."""
    encoder: LoraEncoderHandle
    lora_name: str
    scale: float
    tokens: torch.Tensor        # (1, n, E) on the CPU


# ---------------------------------------------------------------- nodes
class FluxCoreLoraEncoderLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (LORA_ENCODER_TYPE,)
    RETURN_NAMES = ("lora_encoder",)
    FUNCTION = "load"
    DESCRIPTION = "Loads DiffSynth-Studio's LoRA-Encoder (a LoRA turned into conditioning tokens) for Encode LoRA."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_encoder_name": (bridge.list_models(LORA_ENCODER_FOLDER) or ["(none found)"], {
                "tooltip": "From models/lora_encoders: model.safetensors of DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev "
                           "(rename it, e.g. flux_lora_encoder.safetensors)."}),
        }}

    def load(self, lora_encoder_name):
        node = "FluxCoreLoraEncoderLoader"
        path = model_file(node, "lora_encoder_name", LORA_ENCODER_FOLDER, lora_encoder_name)
        module = load_kind(node, "lora_encoder_name", path, "lora_encoder")
        return (LoraEncoderHandle(bridge.ManagedModel(module), lora_encoder_name),)


class FluxCoreEncodeLora:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = ("LoRA-Encoder: encodes a LoRA into tokens appended to the prompt (chain one node per LoRA). Use "
                   "it on 'positive': the negative prompt gets no LoRA tokens (as in DiffSynth-Studio).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "The prompt's conditioning (FluxCore Text Encode or "
                                                         "native)."}),
            "lora_encoder": (LORA_ENCODER_TYPE, {"tooltip": "From Load LoRA-Encoder (FluxCore)."}),
            "lora_name": (bridge.list_models("loras") or ["(none found)"], {
                "tooltip": "A FLUX LoRA from models/loras (kohya, diffusers/PEFT, DiffSynth, ...) on every double- and "
                           "single-block layer, as the LoRA-Encoder reads them all."}),
            "scale": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                "tooltip": "Multiplier of the LoRA's tokens (lora_encoder_scale); 0 leaves it out."}),
        }}

    def encode(self, conditioning, lora_encoder, lora_name, scale=1.0):
        node = "FluxCoreEncodeLora"
        if not conditioning:
            raise NodeInputError(f"{node}, input 'conditioning': empty conditioning; connect a prompt's conditioning.")
        path = model_file(node, "lora_name", "loras", lora_name)
        if scale == 0:
            return (conditioning,)
        encoder = lora_encoder.model.module
        try:
            loras = check_lora_encoder_inputs(path, encoder, None, param="lora_name")
        except LoraEncoderInputError as e:
            raise NodeInputError(f"{node}, input 'lora_name': {e}") from None
        bridge.ready(lora_encoder.model)
        with torch.no_grad():
            tokens = (encode_loras(encoder, loras) * float(scale)).cpu()
        payload = LoraEncoderPayload(lora_encoder, lora_name, float(scale), tokens)
        return (with_payload(conditioning, LORA_ENCODER_KEY, payload),)


class FluxCoreLoraFusionLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (LORA_FUSION_TYPE,)
    RETURN_NAMES = ("lora_fusion",)
    FUNCTION = "load"
    DESCRIPTION = "Loads DiffSynth-Studio's LoRA-Fusion-Preview patcher (merges several LoRAs better than a sum)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_fusion_name": (bridge.list_models(LORA_FUSION_FOLDER) or ["(none found)"], {
                "tooltip": "From models/lora_fusion: model.safetensors of DiffSynth-Studio/"
                           "LoRAFusion-preview-FLUX.1-dev (rename it, e.g. flux_lora_fusion.safetensors)."}),
        }}

    def load(self, lora_fusion_name):
        node = "FluxCoreLoraFusionLoader"
        path = model_file(node, "lora_fusion_name", LORA_FUSION_FOLDER, lora_fusion_name)
        module = load_kind(node, "lora_fusion_name", path, "lora_patcher")
        return (LoraFusionHandle(bridge.ManagedModel(module), lora_fusion_name),)


class FluxCoreFuseLoras:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (DIT_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "fuse"
    DESCRIPTION = ("LoRA-Fusion: the model's LoRAs (Load FLUX LoRA nodes, before or after this one) are combined per "
                   "layer by the LoRA-Fusion patcher instead of summed. Without this node they are summed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "The FLUX DiT with its LoRA stack (Load FLUX LoRA (FluxCore) nodes)."}),
            "lora_fusion": (LORA_FUSION_TYPE, {"tooltip": "From Load LoRA-Fusion (FluxCore)."}),
        }}

    def fuse(self, model, lora_fusion):
        node = "FluxCoreFuseLoras"
        problems = site_mismatch(lora_fusion.model.module.sites, dit_lora_sites(model.model.module), "patcher",
                                 out_only=True)
        if problems:
            raise NodeInputError(f"{node}, input 'lora_fusion': {lora_fusion.name} was made for another model: "
                                 + "; ".join(problems) + f". Use the LoRA-Fusion patcher made for {model.name}.")
        return (replace(model, lora_fusion=lora_fusion),)


# ---------------------------------------------------------------- sampling
def lora_encoder_adapters(node: str, sides: dict, dit) -> list[LoraEncoderAdapter]:
    """The LoRA-Encoder adapter of a run: the tokens of every Encode LoRA on 'positive', in the order chained, each
    encoder checked against the DiT; none without such nodes. One on 'negative' only is left out with a warning."""
    found = payloads_with_branches(node, sides, LORA_ENCODER_KEY, LoraEncoderPayload,
                                   "Encode LoRA into Conditioning (FluxCore)")
    problems = []
    for i, (payload, branches) in enumerate(found):
        try:
            check_encoder_fits(payload.encoder.model.module, dit)
        except LoraEncoderInputError as e:
            side = "positive" if "positive" in branches else "negative"
            problems.append(f"input '{side}' ({LORA_ENCODER_KEY}[{i}], {payload.lora_name}): "
                            f"{payload.encoder.name}: {e}")
    if problems:
        raise NodeInputError(f"{node}, " + "; ".join(problems))
    unused = [p.lora_name for p, branches in found if "positive" not in branches]
    if unused:
        log.warning("%s: Encode LoRA into Conditioning on 'negative' (%s) is not used: LoRA-Encoder tokens join the "
                    "positive prompt only (as in DiffSynth-Studio); chain it onto 'positive'.", node, ", ".join(unused))
    tokens = [p.tokens for p, branches in found if "positive" in branches]
    if not tokens:
        return []
    return [LoraEncoderAdapter(torch.cat(tokens, dim=1), name=LORA_ENCODER_KEY)]


NODE_CLASS_MAPPINGS = {"FluxCoreLoraEncoderLoader": FluxCoreLoraEncoderLoader, "FluxCoreEncodeLora": FluxCoreEncodeLora,
                       "FluxCoreLoraFusionLoader": FluxCoreLoraFusionLoader, "FluxCoreFuseLoras": FluxCoreFuseLoras}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreLoraEncoderLoader": "Load LoRA-Encoder (FluxCore)",
                              "FluxCoreEncodeLora": "Encode LoRA into Conditioning (FluxCore)",
                              "FluxCoreLoraFusionLoader": "Load LoRA-Fusion (FluxCore)",
                              "FluxCoreFuseLoras": "Fuse LoRAs (FluxCore)"}
