"""InfiniteYou nodes: Load InfiniteYou (FluxCore), Apply InfiniteYou (FluxCore) and Load Face Embedding (FluxCore).

InfiniteYou conditions the DiT through InfuseNet, a FLUX ControlNet whose text input is the face's identity tokens
(flux_core.infiniteyou). So Apply InfiniteYou adds a ControlNet payload, the one Apply ControlNet (FluxCore) adds
(`fluxcore_controlnets`, nodes/controlnet_nodes.py), carrying the identity as well (`InfiniteYouPayload`): the sampler
runs it with every other ControlNet (control image encoded at the latent's size, cost check, VRAM placement, step
range, branches), and gives its adapter the identity tokens, which replace InfuseNet's text, text ids and guidance.
Other ControlNets of the run keep the prompt (FluxImagePipeline, like DiffSynth-Studio, gives the identity to every
ControlNet input of a run; in a graph each InfuseNet carries its own face).

The face embedding is made when Apply runs (insightface, on the CPU through onnxruntime: a missing package, weight
file or face is reported at this node), or comes in precomputed (Load Face Embedding (FluxCore)); the projector turns
it into identity tokens when sampling, on the device in the sampler's VRAM arrangement (nodes/adapter_models.py).
Without a control image InfuseNet gets an all-black one at the latent's size, as DiffSynth-Studio's example does.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flux_core.controlnet import ControlNetAdapter, is_inpainting
from flux_core.dtypes import WEIGHT_DTYPES
from flux_core.image import tensor_to_pil
from flux_core.infiniteyou import EMBEDDING_EXTENSIONS, check_face_embedding, identity_tokens, read_face_embedding

from . import comfy_bridge as bridge
from .adapter_models import computing
from .comfy_bridge import ManagedModel
from .conditioning import PERCENT_INPUTS, image_to_model, with_payload
from .controlnet_nodes import CONTROLNETS_KEY, ControlNetPayload, percent_range
from .handles import (FACE_EMBEDDING_TYPE, INFINITEYOU_TYPE, VAE_TYPE, ControlNetHandle, DiTHandle,
                      FaceEmbedding, InfiniteYouHandle)
from .loaders import (NodeInputError, list_models_and_folders, load_kind, model_or_folder_path, node_error,
                      validate_weight_dtype, weight_dtype_choice)

INFINITEYOU_FOLDER = "infinite_you"        # models/infinite_you: ByteDance's infu_flux_v1.0/<variant>/ as published
FACE_EMBEDDINGS_FOLDER = "face_embeddings" # models/face_embeddings: precomputed embeddings (.npy, .safetensors)
INSIGHTFACE_FOLDER = "insightface"         # models/insightface/models/antelopev2/ (as other ComfyUI face nodes)
BLACK = torch.zeros(1, 8, 8, 3)   # InfuseNet's default control image: resized to the latent's size, still black

bridge.register_model_folder(INFINITEYOU_FOLDER)
bridge.register_model_folder(FACE_EMBEDDINGS_FOLDER, EMBEDDING_EXTENSIONS)
bridge.register_model_folder(INSIGHTFACE_FOLDER)


@dataclass(eq=False)
class InfiniteYouPayload(ControlNetPayload):
    """Apply InfiniteYou (FluxCore): InfuseNet as a ControlNet payload, plus the face whose identity tokens replace
    its text input."""
    projector: ManagedModel | None = None
    embedding: torch.Tensor | None = None   # (1, 1, 512) ArcFace embedding
    guidance: float = 1.0                   # infinityou_guidance: InfuseNet's embedded guidance


# ---------------------------------------------------------------- nodes
class FluxCoreInfiniteYouLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (INFINITEYOU_TYPE,)
    RETURN_NAMES = ("infiniteyou",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads ByteDance's InfiniteYou for FLUX.1-dev: the image projector (image_proj_model.bin) and "
                   "InfuseNet (InfuseNetModel/, a ControlNet), for Apply InfiniteYou (FluxCore).")

    @classmethod
    def INPUT_TYPES(cls):
        choices = list_models_and_folders(INFINITEYOU_FOLDER) or ["(none found)"]
        return {"required": {
            "projector_name": (choices, {
                "tooltip": "From models/infinite_you: image_proj_model.bin of the variant (infu_flux_v1.0/"
                           "aes_stage2/ or sim_stage1/ of ByteDance/InfiniteYou), or its .safetensors conversion."}),
            "infusenet_name": (choices, {
                "tooltip": "From models/infinite_you: the same variant's InfuseNetModel folder (config.json and "
                           "its shards), or a single-file InfuseNet."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "tooltip": "InfuseNet's storage: default bf16 on GPU, float32 on CPU; fp8_*: its weight matrices "
                           "in FP8 (half the memory), computed in bf16. The small projector keeps the default."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, weight_dtype="default"):
        return validate_weight_dtype(weight_dtype)

    def load(self, projector_name, infusenet_name, weight_dtype="default"):
        node = "FluxCoreInfiniteYouLoader"
        weight_dtype = weight_dtype_choice(node, weight_dtype)
        projector_path = model_or_folder_path(node, "projector_name", INFINITEYOU_FOLDER, projector_name)
        infusenet_path = model_or_folder_path(node, "infusenet_name", INFINITEYOU_FOLDER, infusenet_name)
        projector = load_kind(node, "projector_name", projector_path, "infiniteyou")
        infusenet = load_kind(node, "infusenet_name", infusenet_path, "controlnet", WEIGHT_DTYPES[weight_dtype])
        p = infusenet.params
        if p.num_modes or is_inpainting(infusenet):
            kind = "union ControlNet (it has modes)" if p.num_modes else "inpainting ControlNet"
            raise NodeInputError(f"{node}, input 'infusenet_name': {infusenet_name} is a {kind}, not InfiniteYou's "
                                 f"InfuseNet; pick the InfuseNetModel folder of the same variant as the projector.")
        if projector.params.output_dim != p.context_in_dim:
            raise NodeInputError(f"{node}, inputs 'projector_name' and 'infusenet_name': the projector makes "
                                 f"{projector.params.output_dim}-wide identity tokens, but {infusenet_name} takes "
                                 f"{p.context_in_dim}-wide text; use the projector and InfuseNet of one InfiniteYou "
                                 f"release.")
        infusenet = bridge.make_castable(infusenet)  # it runs at every step: see Load ControlNet (FluxCore)
        return (InfiniteYouHandle(bridge.ManagedModel(projector),
                                  ControlNetHandle(bridge.ManagedModel(infusenet), infusenet_name),
                                  f"{projector_name} + {infusenet_name}"),)


class FluxCoreLoadFaceEmbedding:
    CATEGORY = "FluxCore/infiniteyou"
    RETURN_TYPES = (FACE_EMBEDDING_TYPE,)
    RETURN_NAMES = ("face_embedding",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads a precomputed 512-d ArcFace face embedding (.npy or .safetensors, never unpickled) for "
                   "Apply InfiniteYou (FluxCore): InfiniteYou without insightface on this machine.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embedding_name": (bridge.list_models(FACE_EMBEDDINGS_FOLDER) or ["(none found)"], {
            "tooltip": "From models/face_embeddings: a .npy array (numpy.save) or a .safetensors file with one "
                       "tensor, holding the 512 values of one face's ArcFace embedding (what "
                       "flux_core.face_embedding.FaceEmbedder().embed(photo) gives)."})}}

    def load(self, embedding_name):
        node = "FluxCoreLoadFaceEmbedding"
        try:
            path = bridge.model_path(FACE_EMBEDDINGS_FOLDER, embedding_name)
            return (FaceEmbedding(read_face_embedding(Path(path)), embedding_name),)
        except (FileNotFoundError, ValueError) as e:
            raise node_error(node, "embedding_name", e) from None


class FluxCoreApplyInfiniteYou:
    CATEGORY = "FluxCore/infiniteyou"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    DESCRIPTION = ("Adds InfiniteYou (InfuseNet with a face's identity) to positive and negative. Give a face photo "
                   "(needs insightface, onnxruntime, facexlib and their weights) or a face embedding. FLUX Sampler "
                   "(FluxCore) runs it as a ControlNet.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning (used when cfg > 1)."}),
                "infiniteyou": (INFINITEYOU_TYPE, {"tooltip": "From Load InfiniteYou (FluxCore)."}),
                "vae": (VAE_TYPE, {"tooltip": "The FLUX VAE that encodes InfuseNet's control image."}),
                "guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip":
                                       "infinityou_guidance: the embedded guidance InfuseNet gets (the DiT keeps the "
                                       "sampler's)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of InfuseNet's residuals; 0 leaves it out."}),
                **PERCENT_INPUTS,
            },
            "optional": {
                "face_image": ("IMAGE", {"tooltip": "A photo of the person (one image; its largest face is used). "
                                                    "Needs insightface; or connect face_embedding instead."}),
                "face_embedding": (FACE_EMBEDDING_TYPE, {"tooltip": "Instead of face_image: a precomputed "
                                                                    "embedding (Load Face Embedding (FluxCore))."}),
                "control_image": ("IMAGE", {"tooltip": "InfuseNet's control image, e.g. face pose keypoints; "
                                                       "resized to the latent's size. Default: all black."}),
            },
        }

    def apply(self, positive, negative, infiniteyou, vae, guidance=1.0, strength=1.0, start_percent=0.0,
              end_percent=1.0, face_image=None, face_embedding=None, control_image=None):
        node = "FluxCoreApplyInfiniteYou"
        problems = []
        if (face_image is None) == (face_embedding is None):
            problems.append("inputs 'face_image' and 'face_embedding': connect exactly one (a photo of the face, or "
                            "its embedding from Load Face Embedding (FluxCore))"
                            + ("" if face_image is None else ", not both"))
        if face_image is not None and not _is_image(face_image, count=1):
            problems.append(f"input 'face_image': expected one IMAGE (1, H, W, 3), got {_shape(face_image)}; "
                            f"InfiniteYou takes one face per Apply InfiniteYou")
        if face_embedding is not None and not isinstance(face_embedding, FaceEmbedding):
            problems.append(f"input 'face_embedding': expected a face embedding from Load Face Embedding (FluxCore), "
                            f"got {type(face_embedding).__name__}")
        if control_image is not None and not _is_image(control_image):
            problems.append(f"input 'control_image': expected an IMAGE (B, H, W, 3), got {_shape(control_image)}")
        if end_percent < start_percent:
            problems.append(f"input 'end_percent': {end_percent} is before start_percent {start_percent}; InfiniteYou "
                            f"acts from start_percent to end_percent of the steps")
        if problems:
            raise NodeInputError(f"{node}, " + "; ".join(problems) + ".")
        if strength == 0:  # nothing to add
            return (positive, negative)
        embedding = (face_embedding.vector if face_embedding is not None
                     else embed_face(node, face_image))
        payload = InfiniteYouPayload(
            controlnet=infiniteyou.infusenet, image=BLACK if control_image is None else control_image, vae=vae,
            strength=float(strength), steps=percent_range(start_percent, end_percent), mode=None,
            projector=infiniteyou.projector, embedding=embedding, guidance=float(guidance))
        models = (payload.controlnet.model,)
        return (with_payload(positive, CONTROLNETS_KEY, payload, models),
                with_payload(negative, CONTROLNETS_KEY, payload, models))


def _is_image(image, count: int | None = None) -> bool:
    return (isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] >= 1 and image.shape[-1] >= 3
            and (count is None or image.shape[0] == count))


def _shape(value) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


_embedders: dict[type, object] = {}   # one FaceEmbedder per class: its detectors and ArcFace load once


def embed_face(node: str, face_image: torch.Tensor) -> torch.Tensor:
    """The (1, 1, 512) ArcFace embedding of the photo's largest face (flux_core.face_embedding, insightface under
    models/insightface); a missing package, weight file or face is this node's error."""
    from flux_core import face_embedding
    photo, = tensor_to_pil(image_to_model(face_image))
    try:
        cls = face_embedding.FaceEmbedder
        if cls not in _embedders:
            _embedders[cls] = cls(root=str(bridge.folder_paths_for(INSIGHTFACE_FOLDER)[0]))
        vector = _embedders[cls].embed(photo)
    except face_embedding.NoFaceFoundError as e:
        raise node_error(node, "face_image", e) from None
    except (ImportError, RuntimeError, ValueError, FileNotFoundError) as e:  # a package or weight file missing
        raise NodeInputError(f"{node}, input 'face_image': {e}\nWithout these, connect a precomputed embedding "
                             f"(Load Face Embedding (FluxCore), from models/{FACE_EMBEDDINGS_FOLDER}) to "
                             f"'face_embedding' instead of 'face_image'.") from None
    return check_face_embedding(vector)


# ---------------------------------------------------------------- sampling
def with_identities(payloads: list[tuple[ControlNetPayload, frozenset[str]]], adapters: list[ControlNetAdapter],
                    dit_handle: DiTHandle) -> list[ControlNetAdapter]:
    """The ControlNet adapters (made from `payloads`, in their order, by nodes/controlnet_nodes.controlnet_adapters)
    with each InfiniteYou payload's identity tokens given to its adapter: the projector runs on the device once per
    payload. Runs before the DiT is placed."""
    out = []
    for (payload, _), adapter in zip(payloads, adapters, strict=True):
        if isinstance(payload, InfiniteYouPayload):
            with torch.no_grad(), computing(dit_handle, {"image_proj_model.0": payload.projector}):
                identity = identity_tokens(payload.projector.module, payload.embedding, payload.guidance)
            adapter = replace(adapter, identity=identity)
        out.append(adapter)
    return out


NODE_CLASS_MAPPINGS = {"FluxCoreInfiniteYouLoader": FluxCoreInfiniteYouLoader,
                       "FluxCoreApplyInfiniteYou": FluxCoreApplyInfiniteYou,
                       "FluxCoreLoadFaceEmbedding": FluxCoreLoadFaceEmbedding}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreInfiniteYouLoader": "Load InfiniteYou (FluxCore)",
                              "FluxCoreApplyInfiniteYou": "Apply InfiniteYou (FluxCore)",
                              "FluxCoreLoadFaceEmbedding": "Load Face Embedding (FluxCore)"}
