"""The values FluxCore's own node types carry between nodes.

Handles are frozen: a node that changes a model (a LoRA, a cache, memory options) returns a new handle with
one more patch, and the cached upstream handle stays as it was, so re-running a graph never stacks a LoRA
twice. The sampler applies a handle's patches to the shared module right before sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .comfy_bridge import ManagedModel

DIT_TYPE = "FLUXCORE_DIT"
TEXT_ENCODERS_TYPE = "FLUXCORE_TEXT_ENCODERS"
VAE_TYPE = "FLUXCORE_VAE"


@dataclass(frozen=True)
class LoraPatch:
    path: str
    strength: float
    lora: object = field(default=None, compare=False)  # the parsed lora_tools.LoraFile, read once by the node


@dataclass(frozen=True)
class DiTHandle:
    model: ManagedModel = field(compare=False)
    name: str
    loras: tuple[LoraPatch, ...] = ()
    vram: object = None                        # nodes.vram_nodes.VRAMOptions (FP8 storage, offload), or None
    tea_cache_l1_thresh: float | None = None   # TeaCache threshold from FluxCoreTeaCache, None: off
    lora_fusion: object = field(default=None, compare=False)  # Fuse LoRAs' patcher handle: LoRAs merged, not summed
    fp8_compute: bool = False                  # FluxCoreSpeedOptions: the blocks compute in FP8 (flux_core.fp8)
    compile: bool = False                      # FluxCoreSpeedOptions: the blocks run torch.compile'd (flux_core.compile)

    def with_lora(self, path: str, strength: float, lora=None) -> "DiTHandle":
        return replace(self, loras=self.loras + (LoraPatch(path, strength, lora),))


@dataclass(frozen=True)
class TextEncodersHandle:
    clip: ManagedModel = field(compare=False)
    t5: ManagedModel = field(compare=False)
    clip_tokenizer: object = field(compare=False)
    t5_tokenizer: object = field(compare=False)
    name: str = ""


@dataclass(frozen=True)
class VAEHandle:
    model: ManagedModel = field(compare=False)
    name: str = ""


CONTROLNET_TYPE = "FLUXCORE_CONTROLNET"


@dataclass(frozen=True)
class ControlNetHandle:
    """A loaded FLUX ControlNet (flux_core.models.controlnet.FluxControlNet) and the file it came from."""
    model: ManagedModel = field(compare=False)
    name: str = ""


IPADAPTER_TYPE = "FLUXCORE_IPADAPTER"


@dataclass(frozen=True)
class IPAdapterHandle:
    """A loaded FLUX IP-Adapter (flux_core.models.ipadapter.FluxIPAdapter) with the image encoder it was trained
    with (SigLIP for InstantX, CLIP ViT-L for XLabs), and the files they came from."""
    adapter: ManagedModel = field(compare=False)
    encoder: ManagedModel = field(compare=False)
    name: str = ""
    encoder_name: str = ""


INFINITEYOU_TYPE = "FLUXCORE_INFINITEYOU"


@dataclass(frozen=True)
class InfiniteYouHandle:
    """InfiniteYou's image projector (flux_core.models.infiniteyou) and InfuseNet, a FLUX ControlNet."""
    projector: ManagedModel = field(compare=False)
    infusenet: ControlNetHandle
    name: str = ""


FACE_EMBEDDING_TYPE = "FLUXCORE_FACE_EMBEDDING"


@dataclass(frozen=True, eq=False)
class FaceEmbedding:
    """One face's 512-d ArcFace embedding, (1, 1, 512) float32 (flux_core.infiniteyou.check_face_embedding), and
    where it came from."""
    vector: object   # torch.Tensor
    source: str = ""
