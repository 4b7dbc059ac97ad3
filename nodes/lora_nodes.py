"""The LoRA loader node: chain several for a stack; any FLUX LoRA format (see lora_tools)."""
from __future__ import annotations

import logging

from flux_core.lora import read_lora_for
from lora_tools import LoraError

from . import comfy_bridge as bridge
from .handles import DIT_TYPE
from .loaders import NodeInputError, model_file


class FluxCoreLoraLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (DIT_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Adds a LoRA (kohya, diffusers/PEFT, OneTrainer, XLabs or DiffSynth format) to the model with its "
                   "own strength; chain several to stack them. The upstream model is left unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "The FLUX DiT (or the output of another LoRA loader)."}),
            "lora_name": (bridge.list_models("loras") or ["(none found)"], {"tooltip": "LoRA file from models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Multiplier of the LoRA's delta (its own alpha/rank applies too)."}),
        }}

    def apply(self, model, lora_name, strength=1.0):
        node = "FluxCoreLoraLoader"
        path = model_file(node, "lora_name", "loras", lora_name)
        if strength == 0:
            return (model,)
        try:
            lora = read_lora_for(model.model.module, path)
        except (LoraError, ValueError) as e:
            raise NodeInputError(f"{node}, input 'lora_name': {e}") from None
        if lora.unmatched_keys:  # a partly matching file: say which keys do nothing
            logging.getLogger("FluxCore").warning("%s: %s: %d key(s) match no layer and are ignored: %s", node,
                                                  lora_name, len(lora.unmatched_keys), lora.unmatched_keys[:10])
        return (model.with_lora(path, strength, lora),)


NODE_CLASS_MAPPINGS = {"FluxCoreLoraLoader": FluxCoreLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreLoraLoader": "Load FLUX LoRA (FluxCore)"}
