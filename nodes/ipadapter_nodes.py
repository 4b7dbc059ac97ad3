"""IP-Adapter nodes: Load IP-Adapter (FluxCore) and Apply IP-Adapter (FluxCore), and what the sampler does with them.

Apply IP-Adapter has the shape of Apply ControlNet (FluxCore): positive and negative CONDITIONING in and out,
chainable. It adds one payload (`IPAdapterPayload`) to the list under the documented conditioning key
`fluxcore_ipadapters` of every entry; the same object goes into positive and negative, and payloads compare by
identity (eq=False), as ControlNet payloads do.

The reference images are encoded when sampling, not when Apply runs: the image encoder and the IP-Adapter then
compute on the device in the VRAM arrangement the sampler makes for the DiT (nodes/adapter_models.py: counted in the
same budget, FP8 storage), and only once per run; the keys and values of every block are made there for the
branches the payload was applied to (flux_core.ipadapter.bind_ipadapter): the positive prompt gets the images'
encoding, the negative one (under true CFG, cfg > 1) an all-zero encoding, as FluxImagePipeline and DiffSynth-Studio
do, at the same weight. Apply stays instant and holds no device memory. An IMAGE batch is several reference images:
their tokens are joined into one sequence, as DiffSynth-Studio joins a list of `ipadapter_images`.
start_percent/end_percent count steps, as for ControlNets (nodes/controlnet_nodes.percent_range).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_core.adapters import BRANCHES, StepRange
from flux_core.dtypes import WEIGHT_DTYPES
from flux_core.image import tensor_to_pil
from flux_core.ipadapter import IPAdapterAdapter, bind_ipadapter, check_ipadapter_models
from flux_core.models.image_encoders import encode_images

from . import comfy_bridge as bridge
from .adapter_models import computing
from .conditioning import PERCENT_INPUTS, image_to_model, payloads_with_branches, with_payload
from .controlnet_nodes import percent_range
from .handles import IPADAPTER_TYPE, DiTHandle, IPAdapterHandle
from .loaders import (NodeInputError, list_models_and_folders, load_kind, model_file, model_or_folder_path, node_error,
                      validate_weight_dtype, weight_dtype_choice)

IPADAPTERS_KEY = "fluxcore_ipadapters"   # CONDITIONING key: list of IPAdapterPayload, in the order applied
IPADAPTER_FOLDER = "ipadapter"           # models/ipadapter (the folder ComfyUI_IPAdapter_plus uses too)
ENCODER_FOLDER = "clip_vision"           # ComfyUI's folder for image encoders

bridge.register_model_folder(IPADAPTER_FOLDER)


@dataclass(eq=False)
class IPAdapterPayload:
    """One Apply IP-Adapter (FluxCore): what the sampler binds into a flux_core IPAdapterAdapter."""
    ipadapter: IPAdapterHandle
    images: torch.Tensor            # IMAGE (N, H, W, C) in [0, 1]: N reference images
    weight: float = 1.0             # ipadapter_scale
    steps: StepRange = StepRange()  # active range in DiffSynth's progress (from start/end_percent)


# ---------------------------------------------------------------- nodes
class FluxCoreIPAdapterLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (IPADAPTER_TYPE,)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a FLUX.1 IP-Adapter (InstantX's ip-adapter.bin, XLabs' flux-ip-adapter.safetensors) with "
                   "its image encoder (SigLIP so400m for InstantX, CLIP ViT-L for XLabs), for Apply IP-Adapter "
                   "(FluxCore).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ipadapter_name": (bridge.list_models(IPADAPTER_FOLDER) or ["(none found)"], {
                "tooltip": "From models/ipadapter: InstantX/FLUX.1-dev-IP-Adapter's ip-adapter.bin (or a "
                           ".safetensors conversion), XLabs-AI/flux-ip-adapter's flux-ip-adapter.safetensors, or a "
                           "DiffSynth-Studio-trained IP-Adapter."}),
            "image_encoder_name": (list_models_and_folders(ENCODER_FOLDER) or ["(none found)"], {
                "tooltip": "From models/clip_vision. InstantX: SigLIP so400m-patch14-384 (ComfyUI's "
                           "sigclip_vision_patch14_384.safetensors, or the google/siglip-so400m-patch14-384 "
                           "folder). XLabs: CLIP ViT-L/14 (clip_vision_l.safetensors, or the "
                           "openai/clip-vit-large-patch14 folder)."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "tooltip": "The IP-Adapter's storage (InstantX's is 5 GB in bf16): default bf16 on GPU, float32 on "
                           "CPU; fp8_*: its weight matrices in FP8 (half the memory), computed in bf16. The image "
                           "encoder keeps the default."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_dtype="default"):
        return validate_weight_dtype(weight_dtype)

    def load(self, ipadapter_name, image_encoder_name, weight_dtype="default"):
        node = "FluxCoreIPAdapterLoader"
        weight_dtype = weight_dtype_choice(node, weight_dtype)
        path = model_file(node, "ipadapter_name", IPADAPTER_FOLDER, ipadapter_name)
        encoder_path = model_or_folder_path(node, "image_encoder_name", ENCODER_FOLDER, image_encoder_name)
        adapter = load_kind(node, "ipadapter_name", path, "ipadapter", WEIGHT_DTYPES[weight_dtype])
        encoder = load_kind(node, "image_encoder_name", encoder_path, "image_encoder")
        params = adapter.params
        try:  # only the encoder is checked here (the DiT comes at sampling): the adapter's own depth and width
            check_ipadapter_models(adapter, encoder, (params.num_blocks, 0), params.hidden_size, ipadapter_name)
        except ValueError as e:
            raise node_error(node, "image_encoder_name", e) from None
        return (IPAdapterHandle(bridge.ManagedModel(adapter), bridge.ManagedModel(encoder), ipadapter_name,
                                image_encoder_name),)


class FluxCoreApplyIPAdapter:
    CATEGORY = "FluxCore/ipadapter"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    DESCRIPTION = ("Adds an IP-Adapter with its reference image(s) to positive and negative (chain several). FLUX "
                   "Sampler (FluxCore) runs it: the images are encoded when sampling; the negative prompt (cfg > 1) "
                   "gets the adapter fed an empty encoding.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning (used when cfg > 1: it "
                                                     "gets the adapter with an all-zero image encoding)."}),
            "ipadapter": (IPADAPTER_TYPE, {"tooltip": "From Load IP-Adapter (FluxCore)."}),
            "image": ("IMAGE", {"tooltip": "The reference image; a batch of several images acts as one reference "
                                           "(their image tokens are joined). Any size: the encoder resizes it "
                                           "(SigLIP: 384x384; CLIP: shortest side 224, centre crop)."}),
            "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip":
                                 "Scale of the image attention (ipadapter_scale); 0 leaves it out."}),
            **PERCENT_INPUTS,
        }}

    def apply(self, positive, negative, ipadapter, image, weight=1.0, start_percent=0.0, end_percent=1.0):
        node = "FluxCoreApplyIPAdapter"
        problems = []
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[0] == 0 or image.shape[-1] < 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            problems.append(f"input 'image': expected an IMAGE (B, H, W, 3) holding at least one reference image, "
                            f"got {shape}")
        if end_percent < start_percent:
            problems.append(f"input 'end_percent': {end_percent} is before start_percent {start_percent}; the "
                            f"IP-Adapter acts from start_percent to end_percent of the steps")
        if problems:
            raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")
        if weight == 0:  # nothing to add
            return (positive, negative)
        payload = IPAdapterPayload(ipadapter=ipadapter, images=image, weight=float(weight),
                                   steps=percent_range(start_percent, end_percent))
        return (with_payload(positive, IPADAPTERS_KEY, payload), with_payload(negative, IPADAPTERS_KEY, payload))


# ---------------------------------------------------------------- sampling
def ipadapter_payloads(node: str, sides: dict) -> list[tuple[IPAdapterPayload, frozenset[str]]]:
    """The IP-Adapter payloads of the run's sides with the branches each was applied to."""
    return payloads_with_branches(node, sides, IPADAPTERS_KEY, IPAdapterPayload, "Apply IP-Adapter (FluxCore)")


def _where(i: int, payload: IPAdapterPayload, branches: frozenset[str]) -> str:
    side = "positive" if "positive" in branches else "negative"
    return f"input '{side}' ({IPADAPTERS_KEY}[{i}], {payload.ipadapter.name})"


def check_ipadapter_payloads(node: str, payloads: list[tuple[IPAdapterPayload, frozenset[str]]], dit) -> None:
    """Every payload's IP-Adapter and encoder against this DiT, before anything is encoded."""
    depth = (dit.params.depth, dit.params.depth_single_blocks)
    for i, (payload, branches) in enumerate(payloads):
        handle = payload.ipadapter
        try:
            check_ipadapter_models(handle.adapter.module, handle.encoder.module, depth, dit.params.hidden_size,
                                   handle.name)
        except ValueError as e:
            raise NodeInputError(f"{node}, {_where(i, payload, branches)}: {e}") from None


def ipadapter_adapters(node: str, payloads: list[tuple[IPAdapterPayload, frozenset[str]]], dit_handle: DiTHandle
                       ) -> list[IPAdapterAdapter]:
    """One flux_core IPAdapterAdapter per (payload, branches): the reference images encoded (the encoder on the
    device for that moment), then the keys and values of every block made by the IP-Adapter (likewise), for the
    branches the payload was applied to. Runs before the DiT is placed, after the sampler's check_ipadapter_payloads
    (which runs before the cost check and any encoding)."""
    dit = dit_handle.model.module
    adapters = []
    for i, (payload, branches) in enumerate(payloads):
        handle = payload.ipadapter
        images = tensor_to_pil(image_to_model(payload.images))
        with torch.no_grad():
            with computing(dit_handle, {"ipadapter_image_encoder.0": handle.encoder}):
                features = encode_images(handle.encoder.module, images)
            with computing(dit_handle, {"ipadapter.0": handle.adapter}):
                adapters.append(bind_ipadapter(
                    handle.adapter.module, features, dit.num_heads, (dit.params.depth, dit.params.depth_single_blocks),
                    scale=payload.weight, steps=payload.steps, branches=[b for b in BRANCHES if b in branches],
                    name=f"{IPADAPTERS_KEY}[{i}] {handle.name}"))
    return adapters


NODE_CLASS_MAPPINGS = {"FluxCoreIPAdapterLoader": FluxCoreIPAdapterLoader,
                       "FluxCoreApplyIPAdapter": FluxCoreApplyIPAdapter}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreIPAdapterLoader": "Load IP-Adapter (FluxCore)",
                              "FluxCoreApplyIPAdapter": "Apply IP-Adapter (FluxCore)"}
