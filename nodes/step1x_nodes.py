"""Step1X-Edit nodes: Qwen2.5-VL reads the prompt with the image to edit; the connector turns its states into the
DiT's text at every step (flux_core.step1x).

- Load Qwen2.5-VL (FluxCore): a Qwen2.5-VL-7B-Instruct folder from models/text_encoders (the sharded
  `model-*.safetensors` with config.json and the processor files beside them, as published), or a single file there
  with the processor files in its folder.
- Load Step1X-Edit Connector (FluxCore): the connector inside `step1x-edit-i1258.safetensors` (models/diffusion_models;
  Load FLUX DiT (FluxCore) loads the same file's DiT).
- Step1X-Edit Encode (FluxCore): prompt + image (+ the VAE for the image's latent) -> CONDITIONING. The entry's tensor
  and pooled_output hold the connector's output at sigma 1 (what native nodes can read); FluxCore's sampler uses the
  EncodedText under `fluxcore_text`: the connector runs at each step beside the DiT, and the image's latent joins the
  image tokens at index 0. For true CFG (cfg 6 in Step1X-Edit's example) encode the negative prompt with the same
  image in a second node.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from flux_core.dit_inputs import DiTCall
from flux_core.image import pil_to_tensor, resize_to_multiple, tensor_to_pil
from flux_core.model_config import ModelFileError
from flux_core.pipeline_models import STEP1X_PROCESSOR, load_processor
from flux_core.step1x import step1x_encoder

from . import comfy_bridge as bridge
from .conditioning import DEFAULT_GUIDANCE, TEXT_KEY, EncodedText, image_to_model, with_models_to_load
from .handles import VAE_TYPE
from .loaders import NodeInputError, list_models_and_folders, load_kind, model_file, model_or_folder_path, node_error

QWEN_VL_FOLDER = "text_encoders"      # ComfyUI's own folder for text encoders (Qwen2.5-VL included)
CONNECTOR_FOLDER = "diffusion_models"  # the connector is in the Step1X-Edit DiT file
QWEN_VL_TYPE = "FLUXCORE_QWEN_VL"
STEP1X_CONNECTOR_TYPE = "FLUXCORE_STEP1X_CONNECTOR"


@dataclass(frozen=True, eq=False)
class QwenVLHandle:
    """A loaded Qwen2.5-VL (transformers' Qwen2_5_VLModel) with its processor, and where it came from."""
    model: bridge.ManagedModel = field(compare=False)
    processor: object = field(compare=False)
    name: str = ""


@dataclass(frozen=True, eq=False)
class Step1XConnectorHandle:
    """A loaded Step1X-Edit connector (flux_core.models.step1x_connector); placed beside the DiT when sampling."""
    model: bridge.ManagedModel = field(compare=False)
    name: str = ""


class FluxCoreQwenVLLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (QWEN_VL_TYPE,)
    RETURN_NAMES = ("qwen_vl",)
    FUNCTION = "load"
    DESCRIPTION = "Loads Qwen2.5-VL-7B-Instruct with its processor, Step1X-Edit's prompt encoder."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "qwen_vl_name": (list_models_and_folders(QWEN_VL_FOLDER) or ["(none found)"], {
                "tooltip": "From models/text_encoders: the Qwen2.5-VL-7B-Instruct folder as published "
                           "(model-*.safetensors, config.json, preprocessor_config.json, tokenizer files), or a file "
                           "with those files beside it."}),
        }}

    def load(self, qwen_vl_name):
        node = "FluxCoreQwenVLLoader"
        path = model_or_folder_path(node, "qwen_vl_name", QWEN_VL_FOLDER, qwen_vl_name)
        try:  # the processor first: a folder without it is refused before gigabytes are read
            processor = load_processor(STEP1X_PROCESSOR, None, path, str(bridge.folder_paths_for(QWEN_VL_FOLDER)[0]))
        except (ModelFileError, OSError, ValueError) as e:
            raise node_error(node, "qwen_vl_name", e) from None
        module = load_kind(node, "qwen_vl_name", path, "qwen_vl")
        return (QwenVLHandle(bridge.ManagedModel(module), processor, qwen_vl_name),)


class FluxCoreStep1XConnectorLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (STEP1X_CONNECTOR_TYPE,)
    RETURN_NAMES = ("connector",)
    FUNCTION = "load"
    DESCRIPTION = "Loads the connector of Step1X-Edit's DiT file (step1x-edit-i1258.safetensors)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "connector_name": (bridge.list_models(CONNECTOR_FOLDER) or ["(none found)"], {
                "tooltip": "From models/diffusion_models: step1x-edit-i1258.safetensors (the file Load FLUX DiT "
                           "(FluxCore) takes the DiT from)."}),
        }}

    def load(self, connector_name):
        node = "FluxCoreStep1XConnectorLoader"
        path = model_file(node, "connector_name", CONNECTOR_FOLDER, connector_name)
        module = load_kind(node, "connector_name", path, "step1x_connector")
        # castable: it runs at every step; on a native MODEL ComfyUI loads it with the DiT (additional_models)
        return (Step1XConnectorHandle(bridge.ManagedModel(bridge.make_castable(module)), connector_name),)


class FluxCoreStep1XEncode:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = ("Step1X-Edit: an edit instruction read with the image to edit. Use one node for the positive "
                   "prompt and one (same image) for the negative; Step1X-Edit's example samples with cfg 6.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "qwen_vl": (QWEN_VL_TYPE, {"tooltip": "From Load Qwen2.5-VL (FluxCore)."}),
            "connector": (STEP1X_CONNECTOR_TYPE, {"tooltip": "From Load Step1X-Edit Connector (FluxCore)."}),
            "vae": (VAE_TYPE, {"tooltip": "The FLUX VAE: encodes the image to edit, whose latent joins the DiT's "
                                          "image tokens."}),
            "image": ("IMAGE", {"tooltip": "The image to edit (the first of a batch). Give it at the output size: "
                                           "Step1X-Edit edits in place."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The edit instruction (text in double quotes is spelled out letter by "
                                           "letter, for text to write in the image)."}),
        }}

    def encode(self, qwen_vl, connector, vae, image, text):
        node = "FluxCoreStep1XEncode"
        if not isinstance(text, str):
            raise NodeInputError(f"{node}, input 'text': a string is needed, got {type(text).__name__}.")
        if image.ndim != 4 or image.shape[-1] < 3:
            raise NodeInputError(f"{node}, input 'image': an IMAGE (B, H, W, 3) is needed, got shape "
                                 f"{tuple(image.shape)}.")
        picture = tensor_to_pil(image_to_model(image[:1]))[0]
        bridge.ready(qwen_vl.model)
        encoder = step1x_encoder(qwen_vl.model.module, qwen_vl.processor, connector.model.module, picture, "cpu")
        conditioning = encoder.encode([text], "positive")
        bridge.ready(connector.model)
        with torch.no_grad():
            first = conditioning.at(DiTCall(sigma=1.0))   # the fixed tensors native nodes read
        bridge.ready(vae.model)
        module = vae.model.module
        with torch.no_grad():
            latent = module.encode(pil_to_tensor(resize_to_multiple(picture)).to(module.device, module.dtype))
        encoded = EncodedText(conditioning, step_models=(connector,), reference_latents=(latent.float().cpu(),))
        extra = {"pooled_output": first.pooled.cpu(), "guidance": DEFAULT_GUIDANCE, TEXT_KEY: encoded}
        return ([[first.prompt_emb.cpu(), with_models_to_load(extra, [connector.model])]],)


NODE_CLASS_MAPPINGS = {"FluxCoreQwenVLLoader": FluxCoreQwenVLLoader,
                       "FluxCoreStep1XConnectorLoader": FluxCoreStep1XConnectorLoader,
                       "FluxCoreStep1XEncode": FluxCoreStep1XEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreQwenVLLoader": "Load Qwen2.5-VL (FluxCore)",
                              "FluxCoreStep1XConnectorLoader": "Load Step1X-Edit Connector (FluxCore)",
                              "FluxCoreStep1XEncode": "Step1X-Edit Encode (FluxCore)"}
