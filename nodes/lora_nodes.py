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
        }, "optional": {
            # A STRING output cannot feed a file list (ComfyUI refuses the link), hence an input of its own.
            "trained_lora": ("STRING", {"forceInput": True, "tooltip": "The lora_name output of Train FLUX LoRA "
                                        "(FluxCore): when connected, that LoRA (just trained, in models/loras) is "
                                        "loaded instead of lora_name."}),
        }}

    def apply(self, model, lora_name, strength=1.0, trained_lora=None):
        node = "FluxCoreLoraLoader"
        input_name, name = ("trained_lora", trained_lora) if trained_lora else ("lora_name", lora_name)
        path = model_file(node, input_name, "loras", name)
        if strength == 0:
            return (model,)
        try:
            lora = read_lora_for(model.model.module, path)
        except (LoraError, ValueError) as e:
            raise NodeInputError(f"{node}, input '{input_name}': {e}") from None
        if lora.unmatched_keys:  # a partly matching file: say which keys do nothing
            logging.getLogger("FluxCore").warning("%s: %s: %d key(s) match no layer and are ignored: %s", node,
                                                  name, len(lora.unmatched_keys), lora.unmatched_keys[:10])
        return (model.with_lora(path, strength, lora),)


NODE_CLASS_MAPPINGS = {"FluxCoreLoraLoader": FluxCoreLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreLoraLoader": "Load FLUX LoRA (FluxCore)"}
