"""Nexus-Gen nodes: its autoregressive Qwen2.5-VL (with its processor), a decoder's adapter, and the encode node that
turns a prompt (and, for editing, an image) into CONDITIONING for FluxCore's sampler.

A Nexus-Gen decoder file (`generation_decoder.bin` / `edit_decoder.bin`, in models/diffusion_models) holds the DiT
and an adapter: "Load FLUX DiT (FluxCore)" loads the DiT from it, "Load Nexus-Gen Adapter (FluxCore)" the adapter
(the generation adapter or the editing merger, as the file holds). As in DiffSynth-Studio, Nexus-Gen replaces the
positive prompt only: give the sampler's negative a "FLUX Text Encode (FluxCore)" (T5 of the negative prompt) and a
cfg above 1 (the example's 2.0).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flux_core.image import tensor_to_pil
from flux_core.nexus_gen import nexus_gen_encoder
from flux_core.pipeline_models import NEXUS_GEN_PROCESSOR, ProcessorNotFoundError, detect_components, processor_folder
from flux_core.text_conditioning import ClipT5Encoder
from flux_core.vl_processor import load_vl_processor

from . import comfy_bridge as bridge
from .comfy_bridge import ManagedModel
from .conditioning import DEFAULT_GUIDANCE, TEXT_KEY, EncodedText, image_to_model
from .handles import TEXT_ENCODERS_TYPE
from .loaders import NodeInputError, list_models_and_folders, load_kind, model_file, model_or_folder_path

NEXUS_GEN_TYPE = "FLUXCORE_NEXUS_GEN"
NEXUS_GEN_ADAPTER_TYPE = "FLUXCORE_NEXUS_GEN_ADAPTER"
ADAPTER_KINDS = {"nexus_gen_adapter": "generation", "nexus_gen_merger": "editing"}


@dataclass(frozen=True)
class NexusGenHandle:
    """Nexus-Gen's autoregressive model (flux_core.models.nexus_gen.NexusGenAutoregressiveModel) and its processor."""
    model: ManagedModel = field(compare=False)
    processor: object = field(compare=False)
    name: str = ""


@dataclass(frozen=True)
class NexusGenAdapterHandle:
    """A decoder's adapter: the generation adapter (text-to-image) or the embedding merger (editing)."""
    model: ManagedModel = field(compare=False)
    task: str = "generation"   # "generation" or "editing"
    name: str = ""


class FluxCoreNexusGenLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (NEXUS_GEN_TYPE,)
    RETURN_NAMES = ("nexus_gen",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads Nexus-Gen's autoregressive model (DiffSynth-Studio/Nexus-GenV2: Qwen2.5-VL-7B with an "
                   "image-embedding head) and its processor (processor/ beside it).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (list_models_and_folders("text_encoders") or ["(none found)"], {"tooltip":
                           "The Nexus-GenV2 folder in models/text_encoders (model-*.safetensors with their index and "
                           "config.json; its processor/ folder beside them, else downloaded through ModelScope)."}),
        }}

    def load(self, model_name):
        node = "FluxCoreNexusGenLoader"
        path = model_or_folder_path(node, "model_name", "text_encoders", model_name)
        try:
            folder = processor_folder(NEXUS_GEN_PROCESSOR, None, path, str(bridge.folder_paths_for("text_encoders")[0]))
        except ProcessorNotFoundError as e:
            raise NodeInputError(f"{node}, input 'model_name': {e}") from None
        module = load_kind(node, "model_name", path, "nexus_gen")
        return (NexusGenHandle(ManagedModel(module), load_vl_processor(folder), model_name),)


class FluxCoreNexusGenAdapterLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (NEXUS_GEN_ADAPTER_TYPE,)
    RETURN_NAMES = ("adapter",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads the adapter of a Nexus-Gen decoder file: generation_decoder.bin's (text-to-image) or "
                   "edit_decoder.bin's (editing). Load the same file's DiT with Load FLUX DiT (FluxCore).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "decoder_name": (bridge.list_models("diffusion_models") or ["(none found)"], {"tooltip":
                             "generation_decoder.bin or edit_decoder.bin from models/diffusion_models."}),
        }}

    def load(self, decoder_name):
        node = "FluxCoreNexusGenAdapterLoader"
        path = model_file(node, "decoder_name", "diffusion_models", decoder_name)
        try:
            found = {kind: title for _, kind, title, _ in detect_components(path)}
        except ValueError as e:
            raise NodeInputError(f"{node}, input 'decoder_name': {e}") from None
        kinds = [k for k in ADAPTER_KINDS if k in found]
        if not kinds:
            raise NodeInputError(f"{node}, input 'decoder_name': {decoder_name} holds no Nexus-Gen adapter (it holds "
                                 f"{' + '.join(found.values())}); pick Nexus-GenV2's generation_decoder.bin or "
                                 f"edit_decoder.bin.")
        module = load_kind(node, "decoder_name", path, kinds[0])
        return (NexusGenAdapterHandle(ManagedModel(module), ADAPTER_KINDS[kinds[0]], decoder_name),)


class FluxCoreNexusGenEncode:
    CATEGORY = "FluxCore/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = ("Nexus-Gen: the prompt (with an image: the editing instruction) through the autoregressive model "
                   "and the decoder's adapter -> positive CONDITIONING for FluxCore's sampler (pooled vector from "
                   "CLIP-L). Use FLUX Text Encode (FluxCore) for the negative.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "nexus_gen": (NEXUS_GEN_TYPE, {"tooltip": "From Load Nexus-Gen (FluxCore)."}),
            "adapter": (NEXUS_GEN_ADAPTER_TYPE, {"tooltip": "From Load Nexus-Gen Adapter (FluxCore): "
                                                            "generation_decoder.bin's without an image, "
                                                            "edit_decoder.bin's with one."}),
            "text_encoders": (TEXT_ENCODERS_TYPE, {"tooltip": "From Load FLUX Text Encoders (FluxCore): CLIP-L gives "
                                                              "the pooled vector."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                                  "The description (text-to-image) or the editing instruction (with an image)."}),
            "guidance": ("FLOAT", {"default": DEFAULT_GUIDANCE, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Embedded guidance of the decoder's DiT."}),
            "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 16, "tooltip":
                              "With an image: the width of the latent you sample (the editing tokens' positions "
                              "spread over its grid, as DiffSynth does). Set it to the Empty Latent's width."}),
            "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 16, "tooltip":
                               "With an image: the height of the latent you sample."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The image to edit (the first of a batch); leave empty for text-to-image."}),
        }}

    def encode(self, nexus_gen, adapter, text_encoders, prompt, guidance=DEFAULT_GUIDANCE, width=512, height=512,
               image=None):
        node = "FluxCoreNexusGenEncode"
        task = "editing" if image is not None else "generation"
        if adapter.task != task:
            wanted = "edit_decoder.bin" if image is not None else "generation_decoder.bin"
            raise NodeInputError(f"{node}, input 'adapter': {adapter.name} holds the {adapter.task} adapter, but "
                                 f"{'an image is' if image is not None else 'no image is'} given ({task}): load "
                                 f"{wanted}'s adapter (and sample with its DiT).")
        if width % 16 or height % 16:
            raise NodeInputError(f"{node}, inputs 'width'/'height': {width}x{height} must be multiples of 16.")
        reference = tensor_to_pil(image_to_model(image[:1]))[0] if image is not None else None
        bridge.ready(nexus_gen.model, adapter.model, text_encoders.clip)   # CLIP-L only: T5 is the negative's
        device = bridge.compute_device()
        clip_t5 = ClipT5Encoder(text_encoders.clip.module, text_encoders.t5.module, text_encoders.clip_tokenizer,
                                text_encoders.t5_tokenizer, device=device)
        encoder = nexus_gen_encoder(nexus_gen.model.module, nexus_gen.processor,
                                    adapter.model.module if task == "generation" else None,
                                    adapter.model.module if task == "editing" else None, clip_t5, reference,
                                    height // 8, width // 8, device)
        with torch.no_grad():
            embeds = encoder.encode([prompt], "positive")
        embeds = type(embeds)(embeds.prompt_emb.cpu(), embeds.pooled.cpu(),
                              None if embeds.text_ids is None else embeds.text_ids.cpu())
        return ([[embeds.prompt_emb, {"pooled_output": embeds.pooled, "guidance": guidance,
                                      TEXT_KEY: EncodedText(embeds)}]],)


NODE_CLASS_MAPPINGS = {"FluxCoreNexusGenLoader": FluxCoreNexusGenLoader,
                       "FluxCoreNexusGenAdapterLoader": FluxCoreNexusGenAdapterLoader,
                       "FluxCoreNexusGenEncode": FluxCoreNexusGenEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreNexusGenLoader": "Load Nexus-Gen (FluxCore)",
                              "FluxCoreNexusGenAdapterLoader": "Load Nexus-Gen Adapter (FluxCore)",
                              "FluxCoreNexusGenEncode": "Nexus-Gen Encode (FluxCore)"}
