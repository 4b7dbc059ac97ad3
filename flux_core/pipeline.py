"""`FluxImagePipeline`: DiffSynth-Studio's FLUX pipeline API over FluxCore's models and sampling functions.

A script written for DiffSynth-Studio changes only its import line:

    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder/model.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/"),
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="ae.safetensors"),
    ])
    image = pipe(prompt="a cat", seed=0)
"""
from __future__ import annotations

import logging
import warnings
from operator import attrgetter
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .run_cost import check_run_cost, controlnet_passes, dit_calls_per_step, image_tokens, ipadapter_kv_bytes
from .image import pil_to_tensor, resize_to_multiple, tensor_to_pil
from .inputs import (DEFAULT_SIZE, check_callable, check_real, check_device, check_dit_tiling, check_cfg_scale, check_denoising_strength, check_embedded_guidance, check_image,
                     check_images, check_negative_prompts, check_output_type, check_prompts,
                     check_rand_device, check_seed, check_sigma_shift, check_size, check_steps,
                     check_t5_sequence_length, check_tea_cache_threshold, check_tiling)
from .adapters import StepRange
from .controlnet import (ControlNetAdapter, ControlNetInput, ControlNets, check_controlnet_input, control_latent,
                         is_inpainting, no_mode)
from .infiniteyou import (IdentityOnOtherControlNetWarning, IdentityTokens, InfiniteYouWithoutControlNetWarning,
                          check_face_embedding, identity_tokens)
from .flex import channel_adapter, check_channel_inputs
from .eligen import check_entities, eligen_adapter, eligen_mask_bytes, inpaint_region, inpaint_velocity
from .ipadapter import IPAdapterAdapter, bind_ipadapter, check_ipadapter_models
from .models.image_encoders import encode_images
from .lora import LoraReport, clear_lora, disable_lora_merger, enable_lora_merger, load_lora
from .lora_encoder import check_lora_encoder_inputs, lora_encoder_adapter
from .nexus_gen import nexus_gen_encoder
from .loading.loader import load_model
from .model_config import ModelConfig, ModelFileError
from .models.controlnet import union_mode_id
from .models.dit import DiTExtras
from .models.text_encoders import load_clip_tokenizer, load_t5_tokenizer, t5_sequence_length_of
from .pipeline_models import (NEXUS_GEN_PROCESSOR, STEP1X_PROCESSOR, LoadedModel, empty_slots, load_processor,
                              plan_models)
# Re-exported: nodes and the trainer import these names from flux_core.pipeline.
from .pipeline_models import DIFFUSERS_COMPONENTS, MODEL_SLOTS, TokenizerNotFoundError, tokenizer_folder  # noqa: F401
from .text_conditioning import ClipT5Encoder, Conditioning, ConditioningEncoder
from .sampling import (PromptEmbeds, denoise, guided_velocity, make_noise, reference_extras, resolve_seed,
                       tea_cache_extras, with_references)
from .scheduler import add_noise, explicit_sigmas, flux_sigmas
from .step1x import step1x_encoder
from .math import unpack_latents
from .teacache import TeaCacheStats
from .tiled_dit import DiTTiling
from .attention_backend import attention_backend, log_attention_once
from .compile import compile_dit
from .fp8 import enable_fp8_compute
from .vram import GiB, ComputeDevice, VRAMManager, compute_place, store_model

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder_1", "text_encoder_2")
# The models of the Step1X-Edit and Nexus-Gen conditioning encoders (flux_core.text_conditioning).
VL_SLOTS = ("qwenvl", "step1x_connector", "nexus_gen", "nexus_gen_generation_adapter", "nexus_gen_editing_adapter")
# The image inputs of the DiT's extra input channels (FLEX.2, FLUX.1-Fill; flux_core.flex).
CHANNEL_IMAGES = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image", "flux_fill_image", "flux_fill_mask")


class KontextWithoutImageWarning(UserWarning):
    """A FLUX.1 Kontext DiT called without kontext_images (it then generates from the text alone)."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class FluxImagePipeline:
    def __init__(self, device: str | torch.device | None = None, torch_dtype: torch.dtype = torch.bfloat16):
        self.device = torch.device(device or default_device())
        self.torch_dtype = torch_dtype
        self.dit = None
        self.vae = None
        self.text_encoder_1 = None   # CLIP-L
        self.text_encoder_2 = None   # T5-XXL encoder
        self.tokenizer_1 = None
        self.tokenizer_2 = None
        self.controlnet = ControlNets()  # pipe.controlnet.models[i]: ControlNets in model_configs order
        self.ipadapter = None                 # FluxIPAdapter (InstantX or XLabs)
        self.ipadapter_image_encoder = None   # its SigLIP / CLIP vision encoder
        self.image_proj_model = None          # InfiniteYou's image projector (InfuseNet is a ControlNet)
        # InfiniteYou's face detector + ArcFace (flux_core.face_embedding.FaceEmbedder), made on first use of
        # infinityou_id_image; set it yourself to use another weights folder.
        self.infinityou_processor = None
        self.lora_encoder = None              # LoRA-Encoder: LoRA files -> conditioning tokens
        self.lora_patcher = None              # LoRA-Fusion: merges several hooked LoRAs per layer (enable_lora_merger)
        # Conditioning encoders other than CLIP-L + T5 (flux_core.text_conditioning):
        self.qwenvl = None                    # Step1X-Edit: Qwen2.5-VL (transformers' model)
        self.qwenvl_processor = None          # its processor (tokenizer + image processor)
        self.step1x_connector = None          # Step1X-Edit: Qwen2.5-VL states -> DiT tokens, at every step
        self.nexus_gen = None                 # Nexus-Gen: the autoregressive Qwen2.5-VL with its image-embedding head
        self.nexus_gen_processor = None       # its processor
        self.nexus_gen_generation_adapter = None  # Nexus-Gen: 81 image embeddings -> DiT tokens (text-to-image)
        self.nexus_gen_editing_adapter = None     # Nexus-Gen: target + reference embeddings -> DiT tokens (editing)
        self.last_seed: int | None = None      # the seed of the last call (drawn there when seed=None)
        # (height, width) of a call without them: FLUX.1's 1024x1024; from_demo sets the demo model's trained size.
        self.default_size: tuple[int, int] = DEFAULT_SIZE
        # What from_pretrained put in each slot, and from which file: {"dit": LoadedModel, ...}.
        self.loaded_from: dict[str, LoadedModel] = {}
        self.vram: VRAMManager | None = None   # set when a model has an offload place or VRAM management is on
        # TeaCache of the last call: {"positive": TeaCacheStats, "negative": ... (under true CFG)}; None if off.
        self.last_tea_cache_stats: dict[str, TeaCacheStats] | None = None
        self.reported_attention: set[str] = set()   # the attention lines logged (once each)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                        model_configs: Sequence[ModelConfig] = (), tokenizer_1_config: ModelConfig | None = None,
                        tokenizer_2_config: ModelConfig | None = None,
                        nexus_gen_processor_config: ModelConfig | None = None,
                        step1x_processor_config: ModelConfig | None = None, fp8_compute: bool = False
                        ) -> "FluxImagePipeline":
        """Load every model the configs name; each file's kind (DiT, VAE, CLIP-L, T5) is detected from its keys
        (a config's `kind` states it, and a file of another kind is refused). A config may also name a whole
        diffusers FLUX folder. Tokenizers come from the configs given, else from `tokenizer/` and `tokenizer_2/`
        beside the loaded models, else from FLUX.1-dev through ModelScope. The processors of the vision-language
        models (Step1X-Edit's Qwen2.5-VL, Nexus-Gen's) come from step1x_processor_config / nexus_gen_processor_config,
        else from beside the model files, else from their ModelScope repositories (DiffSynth-Studio's defaults).

        Before any weights are read, every config is resolved and every file's kind detected; all missing files,
        missing tokenizers, files of the wrong kind and second models for a filled slot are reported at once.
        What each file was detected as is logged (INFO) and kept in `pipe.loaded_from` ({slot: LoadedModel});
        a slot generation needs that stays empty is logged as a warning.

        A config's `offload_device` / `offload_dtype` is where that model's weights are stored: it is loaded
        there (offload_dtype applies to the weight matrices, e.g. torch.float8_e4m3fn; biases and norms keep
        torch_dtype) and computes on `device` in `torch_dtype`, moved in only for the stages that need it.

        fp8_compute: the DiT's blocks compute in FP8 (`enable_fp8_compute`)."""
        check_device("device", device)  # before anything is resolved, downloaded or read
        pipe = cls(device=device, torch_dtype=torch_dtype)
        local_model_path = (model_configs[0] if model_configs else ModelConfig()).local_model_path  # env-aware
        plan = plan_models(model_configs, {"tokenizer": tokenizer_1_config, "tokenizer_2": tokenizer_2_config},
                           local_model_path)
        # Tokenizers first: a folder without the tokenizer's files is refused before minutes of loading.
        # (A plan without CLIP-L / T5 models, e.g. Step1X-Edit's, may come without their tokenizers.)
        if "tokenizer" in plan.tokenizers:
            pipe.tokenizer_1 = load_clip_tokenizer(plan.tokenizers["tokenizer"])
        if "tokenizer_2" in plan.tokenizers:
            pipe.tokenizer_2 = load_t5_tokenizer(plan.tokenizers["tokenizer_2"])
        for slot, spec, config in (("qwenvl", STEP1X_PROCESSOR, step1x_processor_config),
                                   ("nexus_gen", NEXUS_GEN_PROCESSOR, nexus_gen_processor_config)):
            source = next((source for _, source, entry in plan.entries if entry.slot == slot), None)
            if source is not None:  # also before any weights are read
                setattr(pipe, f"{slot}_processor", load_processor(spec, config, source, local_model_path))
        dit_through_cpu = False
        for config, source, entry in plan.entries:
            offloaded = config.offload_device is not None or config.offload_dtype is not None
            place = pipe.device if config.offload_device is None else torch.device(config.offload_device)
            # FP8 compute: the DiT reaches the device converted (its bf16 weights need not fit there first)
            if fp8_compute and entry.slot == "dit" and not offloaded and place.type != "cpu":
                dit_through_cpu, place = True, torch.device("cpu")
            module = load_model(source, torch_dtype=torch_dtype, device=place, kind=entry.kind,
                                weight_dtype=config.offload_dtype)
            if entry.kind == "controlnet":
                pipe.controlnet.models.append(module)
            else:
                setattr(pipe, entry.slot, module)
            pipe.loaded_from[entry.slot] = entry
            logger.info("FluxImagePipeline: %s", entry.describe())
            if offloaded:
                if pipe.device.type == "cuda" and entry.kind in ("dit", "controlnet"):  # as enable_vram_management
                    store_model(module, pin_memory=True)
                pipe.vram = pipe.vram or VRAMManager(ComputeDevice(pipe.device))
                pipe.vram.add(entry.slot, module, torch_dtype)
        empty = empty_slots(pipe.loaded_from)
        if empty:
            logger.warning("FluxImagePipeline: no model for %s; generation needs every slot filled. Loaded: %s",
                           ", ".join(f"pipe.{slot}" for slot in empty), plan.describe())
        if fp8_compute:
            pipe.enable_fp8_compute()
            if dit_through_cpu:
                store_model(pipe.dit, pipe.device)
        return pipe

    @classmethod
    def from_demo(cls, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                  fp8_compute: bool = False) -> "FluxImagePipeline":
        """The bundled demo model (flux_core.demo): FLUX.1's architecture at tiny widths, trained on coloured shapes
        ("a red circle on the left on a blue background"), shipped inside the package, so it runs offline in seconds on a
        CPU. It loads through from_pretrained like any model (its tokenizers sit beside its text encoders); calls
        without height/width make its trained size (`pipe.default_size`: flux_core.demo.HEIGHT x WIDTH), and its
        T5 tokenizer says how many T5 tokens it was trained with (32). fp8_compute: as in from_pretrained."""
        from . import demo
        missing = demo.missing_files()
        if missing:
            raise ModelFileError(demo.missing_files_message(missing))
        pipe = cls.from_pretrained(torch_dtype=torch_dtype, device=device, model_configs=demo.model_configs(),
                                   fp8_compute=fp8_compute)
        pipe.default_size = (demo.HEIGHT, demo.WIDTH)
        return pipe

    # ---------------------------------------------------------------- memory and speed
    def enable_fp8_compute(self) -> str:
        """The DiT's double and single blocks compute in FP8 (flux_core.fp8): weights float8_e4m3fn with a scale per
        output row, activations quantized per token, multiplied by torch._scaled_mm where the device has it
        (CUDA compute capability 8.9+: Ada, Hopper, Blackwell; the CPU), else stored in FP8 and computed in
        torch_dtype. Lossy and in place (reload to go back); works with VRAM management before or after it, LoRAs in
        hook mode and TeaCache. Returns the path taken on the pipeline's device ("scaled_mm" or "storage-only
        (reason)"), which is also logged."""
        self._require("dit", "compute in FP8")
        managed = self.vram.models.get("dit") if self.vram is not None else None
        if managed is not None:  # the manager records each tensor's storage: convert between remove and add
            self.vram.remove("dit")
        path = enable_fp8_compute(self.dit, self.device)
        if managed is not None:
            self.vram.add("dit", self.dit, managed.compute_dtype, managed.persistent_params)
        logger.info("FluxImagePipeline: the DiT computes in FP8: %s on %s", path, self.device)
        return path

    def compile_pipeline(self, mode: str | None = None) -> None:
        """Compile the DiT's blocks with torch.compile (flux_core.compile: each double and single block fullgraph with
        static shapes, one graph per block kind, compiled at the first call; the rest of the forward stays eager).
        DiffSynth-Studio's method name; unlike its default, regional and fullgraph always. Works with LoRAs (hook
        or fused), TeaCache, FP8 compute, ControlNets and EliGen; IP-Adapter's attention hooks run those blocks
        eager. Refused while VRAM management streams or offloads the DiT (its per-call weight swaps cannot be
        compiled). mode: None / "default" or "max-autotune-no-cudagraphs"."""
        self._require("dit", "compile the DiT")
        compile_dit(self.dit, mode)

    def enable_vram_management(self, num_persistent_param_in_dit: int | None = None, vram_limit: float | None = None,
                               vram_buffer: float = 0.5, *, device: ComputeDevice | None = None) -> VRAMManager:
        """Low-VRAM running (DiffSynth-Studio v1 names and meaning). Every model's weights rest off the compute
        device (models loaded onto it move to the CPU, keeping their dtype; an fp8 storage dtype stays), and each
        stage moves in only its models: the text encoders to encode, the DiT to denoise, the VAE to encode or
        decode. Within a stage, layers stay resident on the device in module order while the budget lasts; the
        rest stream in for each call.

        vram_limit: GB (GiB) for weights on the device, default the device's total; the budget is
            `vram_limit - vram_buffer`. 0 is the minimum-memory mode: every layer streams. Unlike DiffSynth (which
            compares the process's used memory, activations included), the budget counts weight bytes exactly,
            so leave room for activations (FLUX.1 at 1024x1024: a few GB).
        num_persistent_param_in_dit: instead of a budget, keep this many DiT parameters resident (module
            order) and stream the rest; the other models are then fully resident in their stage.
        device: the compute device as a `flux_core.vram.ComputeDevice` (tests pass a SimulatedDevice);
            default the pipeline's device."""
        device = device or ComputeDevice(self.device)
        if num_persistent_param_in_dit is not None:
            budget = None
        else:
            limit = device.total_memory() / GiB if vram_limit is None else float(vram_limit)
            budget = int(max(0.0, limit - vram_buffer) * GiB)
        if self.vram is not None:
            self.vram.remove_all()
        self.vram = VRAMManager(device, budget)
        per_step = {"dit", *self.controlnet_slots()}
        for slot in ("text_encoder_1", "text_encoder_2", *VL_SLOTS, "ipadapter_image_encoder", "ipadapter",
                     "image_proj_model", "lora_encoder", "dit", "lora_patcher", *self.controlnet_slots(), "vae"):
            model = attrgetter(slot)(self)
            if model is None:
                continue
            # The models streamed at every step (DiT, ControlNets) are page-locked on the host when computing on a
            # GPU: their copies then run asynchronously and the manager's prefetch overlaps them with the compute.
            # Not the others (T5 alone is 9.5 GB): they move once per stage, and pinned memory is taken from RAM.
            store_model(model, "cpu", pin_memory=device.torch_device.type == "cuda" and slot in per_step)
            self.vram.add(slot, model, self.torch_dtype,
                          persistent_params=num_persistent_param_in_dit if slot == "dit" else None)
        return self.vram

    def controlnet_slots(self) -> list[str]:
        return [f"controlnet.models.{i}" for i in range(len(self.controlnet))]

    def load_models_to_device(self, names: Sequence[str]) -> None:
        """Start a stage: managed models not named move out, the named ones move in (as the budget allows).
        Models without VRAM management stay where they are."""
        if self.vram is not None:
            self.vram.load_models_to_device(names)

    # ---------------------------------------------------------------- stages
    def encode_prompt(self, prompt: str | list[str], t5_sequence_length: int | None = None) -> PromptEmbeds:
        """CLIP-L + T5 embeddings of prompt(s) (the entity prompts of EliGen, the trainer's captions, ...);
        t5_sequence_length None: the T5 tokenizer's (`t5_sequence_length`)."""
        self._require_models(TEXT_ENCODERS + ("tokenizer_1", "tokenizer_2"), "encode a prompt")
        prompts = check_prompts(prompt, "prompt")
        check_t5_sequence_length(t5_sequence_length)
        return self.encode_with(self.clip_t5_encoder(t5_sequence_length), prompts, "positive")

    def t5_sequence_length(self, t5_sequence_length: int | None = None) -> int:
        """The T5 tokens of a prompt: `t5_sequence_length` when given, else pipe.tokenizer_2's model_max_length
        capped at 512 (FLUX.1-dev: 512, the demo model: 32; flux_core.models.text_encoders.t5_sequence_length_of)."""
        return t5_sequence_length_of(self.tokenizer_2, t5_sequence_length)

    def clip_t5_encoder(self, t5_sequence_length: int | None = None) -> ClipT5Encoder:
        return ClipT5Encoder(self.text_encoder_1, self.text_encoder_2, self.tokenizer_1, self.tokenizer_2,
                             t5_sequence_length, self.device)

    def conditioning_encoder(self, t5_sequence_length: int | None = None,
                             step1x_reference_image: Image.Image | None = None,
                             nexus_gen_reference_image: Image.Image | None = None, height: int | None = None,
                             width: int | None = None) -> ConditioningEncoder:
        """What turns this request's prompts into the DiT's conditioning (flux_core.text_conditioning): Step1X-Edit's
        Qwen2.5-VL + connector when a step1x_reference_image is given, Nexus-Gen's model when one is loaded (its
        negative branch from T5), else CLIP-L + T5. Raises when a model it needs is missing. None:
        t5_sequence_length the T5 tokenizer's, height/width pipe.default_size's."""
        height, width = self.image_size(height, width)
        self._require_models(self.encoder_slots(step1x_reference_image, nexus_gen_reference_image), "encode a prompt")
        kind = self._encoder_kind(step1x_reference_image, nexus_gen_reference_image)
        if kind == "step1x":
            return step1x_encoder(self.qwenvl, self.qwenvl_processor, self.step1x_connector, step1x_reference_image,
                                  self.device)
        if kind == "nexus_gen":
            return nexus_gen_encoder(self.nexus_gen, self.nexus_gen_processor, self.nexus_gen_generation_adapter,
                                     self.nexus_gen_editing_adapter, self.clip_t5_encoder(t5_sequence_length),
                                     nexus_gen_reference_image, height // 8, width // 8, self.device)
        return self.clip_t5_encoder(t5_sequence_length)

    def encoder_slots(self, step1x_reference_image=None, nexus_gen_reference_image=None) -> tuple[str, ...]:
        """The slots (models, tokenizers, processors) the conditioning encoder of a request needs."""
        clip_t5 = TEXT_ENCODERS + ("tokenizer_1", "tokenizer_2")
        kind = self._encoder_kind(step1x_reference_image, nexus_gen_reference_image)
        if kind == "step1x":
            return ("qwenvl", "qwenvl_processor", "step1x_connector")
        if kind == "nexus_gen":  # the negative branch from T5, the pooled vector from CLIP-L
            adapter = ("nexus_gen_editing_adapter" if nexus_gen_reference_image is not None
                       else "nexus_gen_generation_adapter")
            return ("nexus_gen", "nexus_gen_processor", adapter) + clip_t5
        return clip_t5

    def _encoder_kind(self, step1x_reference_image, nexus_gen_reference_image) -> str:
        """Which encoder a request uses: "step1x" with an image for Step1X-Edit, "nexus_gen" with Nexus-Gen's model
        loaded or its image given (then its models are required), else "clip_t5"."""
        if step1x_reference_image is not None:
            return "step1x"
        if self.nexus_gen is not None or nexus_gen_reference_image is not None:
            return "nexus_gen"
        return "clip_t5"

    def encode_with(self, encoder: ConditioningEncoder, prompts: list[str], branch: str) -> Conditioning:
        """One branch's conditioning by `encoder`, its models moved onto the device for the encoding."""
        self.load_models_to_device(encoder.slots)
        return encoder.encode(prompts, branch)

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(height, width) of a request: each given one, else pipe.default_size's."""
        return (self.default_size[0] if height is None else height,
                self.default_size[1] if width is None else width)

    def _require_models(self, slots: Sequence[str], what: str) -> None:
        """Raise one error naming every empty slot of `slots` (models, tokenizers, processors)."""
        missing = [slot for slot in slots if getattr(self, slot) is None]
        if missing:
            raise RuntimeError(f"cannot {what}: the pipeline has no {', '.join(missing)}. Add the missing model "
                               f"files to model_configs (see README, 'Supported models').")

    def encode_image(self, image: torch.Tensor, tiled: bool = False, tile_size: int = 128,
                     tile_stride: int = 64) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latent (B, 16, H/8, W/8) float32."""
        self._require("vae", "encode an image")
        self.load_models_to_device(["vae"])
        vae_dtype = compute_place(self.vae)[1]
        latent = self.vae.encode(image.to(self.device, vae_dtype), tiled=tiled, tile_size=tile_size,
                                 tile_stride=tile_stride)
        return latent.float()

    def decode_latents(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128,
                       tile_stride: int = 64) -> torch.Tensor:
        """Scaled latent -> image (B, 3, H, W) in [-1, 1] float32."""
        self._require("vae", "decode latents")
        self.load_models_to_device(["vae"])
        vae_dtype = compute_place(self.vae)[1]
        return self.vae.decode(latents.to(self.device, vae_dtype), tiled=tiled, tile_size=tile_size,
                               tile_stride=tile_stride).float()

    def load_lora(self, module, lora_config, alpha: float = 1.0, hotload: bool | None = None,
                  state_dict: dict | None = None) -> LoraReport:
        """DiffSynth-Studio's `pipe.load_lora(pipe.dit, path_or_ModelConfig, alpha)`: any LoRA format, stacked
        with earlier ones; fused into the weights, or hooked (hotload=True, automatic for FP8/offloaded models)."""
        if state_dict is not None:
            source = state_dict
        elif isinstance(lora_config, ModelConfig):
            source = lora_config.resolve()
        else:
            source = lora_config
        return load_lora(module, source, alpha=alpha, hotload=hotload)

    def enable_lora_merger(self) -> None:
        """LoRA-Fusion (DiffSynth-Studio's `pipe.enable_lora_merger()`): from now on, the LoRAs hooked into the DiT
        (those already loaded with hotload=True, and every later load_lora, which then hooks by default) are combined
        per layer by the loaded `lora_patcher` (LoRA-Fusion-Preview) instead of summed; fused LoRAs cannot be merged.
        It stays on through clear_lora (as in DiffSynth) until disable_lora_merger."""
        self._require("lora_patcher", "enable the LoRA merger")
        self._require("dit", "enable the LoRA merger")
        enable_lora_merger(self.dit, self.lora_patcher)

    def disable_lora_merger(self) -> None:
        """Back to the plain sum of hooked LoRAs."""
        if self.dit is not None:
            disable_lora_merger(self.dit)

    def clear_lora(self) -> None:
        """Remove every LoRA from the DiT (fused weights are restored bit for bit)."""
        if self.dit is not None:
            clear_lora(self.dit)

    def _require(self, slot: str, what: str) -> None:
        self._require_models((slot,), what)

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] = "",
        cfg_scale: float = 1.0,
        embedded_guidance: float = 3.5,
        t5_sequence_length: int | None = None,
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        sigma_shift: float | None = None,
        num_inference_steps: int = 30,
        kontext_images: Image.Image | list[Image.Image] | None = None,
        controlnet_inputs: Sequence[ControlNetInput] | None = None,
        ipadapter_images: Image.Image | list[Image.Image] | None = None,
        ipadapter_scale: float = 1.0,
        infinityou_id_image: Image.Image | None = None,
        infinityou_guidance: float = 1.0,
        eligen_entity_prompts: Sequence[str] | None = None,
        eligen_entity_masks: Sequence[Image.Image] | None = None,
        eligen_enable_on_negative: bool = False,
        eligen_enable_inpaint: bool = False,
        lora_encoder_inputs=None,
        lora_encoder_scale: float = 1.0,
        flex_inpaint_image: Image.Image | None = None,
        flex_inpaint_mask: Image.Image | None = None,
        flex_control_image: Image.Image | None = None,
        flex_control_strength: float = 0.5,
        flex_control_stop: float = 0.5,
        step1x_reference_image: Image.Image | None = None,
        nexus_gen_reference_image: Image.Image | None = None,
        flux_fill_image: Image.Image | None = None,
        flux_fill_mask: Image.Image | None = None,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        progress_bar_cmd: Callable[[Iterable], Iterable] | None = tqdm,
        latents: torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        output_type: str = "pil",
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        tea_cache_l1_thresh: float | None = None,
        infinityou_id_embedding: torch.Tensor | None = None,
    ):
        """Generate image(s). Parameters and defaults are DiffSynth-Studio's, except two defaults that follow the
        loaded models: height/width None is `pipe.default_size` (1024x1024; the demo model's 128x128 after
        from_demo), t5_sequence_length None the T5 tokenizer's model_max_length capped at 512 (FLUX.1-dev: 512,
        DiffSynth's default; the demo model: 32). In addition:
        latents: the initial noise, (B, 16, H/8, W/8) or packed (B, H*W/256, 64), instead of drawing it from seed;
        sigmas: an explicit decreasing schedule in (0, 1] instead of num_inference_steps/sigma_shift/strength;
        output_type: "pil" (one image for a prompt string, a list for a list of prompts), "np" ((B, H, W, 3) float in [0, 1]),
            "pt" ((B, 3, H, W) in [0, 1]) or "latent" (the final scaled latent);
        callback(step, total, latents): called after each step.
        tea_cache_l1_thresh: TeaCache (flux_core.teacache): skip the DiT's blocks on steps whose input barely
            changed. None: off; 0: on but never skips (same result); 0.25 / 0.4 / 0.6 / 0.8 skip more and more.
            The positive and negative (true CFG) passes keep separate caches; what was skipped is reported in
            `pipe.last_tea_cache_stats` ({"positive": TeaCacheStats, "negative": ...}).
        controlnet_inputs: a list of ControlNetInput (flux_core.controlnet), each naming a loaded ControlNet by
            `controlnet_id` (model_configs order) with its control image, scale, start/end and union mode
            (`processor_id`); several inputs may share one ControlNet.
        ipadapter_images, ipadapter_scale: reference image(s) for the loaded IP-Adapter (flux_core.ipadapter;
            InstantX with its SigLIP encoder, or XLabs with its CLIP ViT-L encoder); several images act together.
            Under true CFG the negative branch gets the adapter with an all-zero image encoding, at the same scale.
        infinityou_id_image / infinityou_id_embedding, infinityou_guidance: InfiniteYou (flux_core.infiniteyou):
            a face photo (needs insightface, flux_core.face_embedding) or its precomputed 512-d ArcFace embedding;
            the identity tokens become the text of every ControlNet input, so InfuseNet must be loaded and given
            through controlnet_inputs (DiffSynth's example: an all-black control image, processor_id="None").
        eligen_entity_prompts, eligen_entity_masks: EliGen (flux_core.eligen): one prompt per region, each mask a PIL
            image (white = the entity) of the output's aspect ratio; load the EliGen LoRA with pipe.load_lora for
            the trained effect. eligen_enable_on_negative: under true CFG the negative pass gets the entities too,
            with the negative prompt in each. eligen_enable_inpaint: with input_image, only the entities' regions
            change (outside them each step heads straight to the input image).
        lora_encoder_inputs, lora_encoder_scale: LoRA-Encoder (flux_core.lora_encoder): LoRA file(s) (path,
            ModelConfig or a list) encoded by pipe.lora_encoder into tokens appended to the positive prompt,
            times lora_encoder_scale.
        flex_inpaint_image, flex_inpaint_mask, flex_control_image, flex_control_strength, flex_control_stop: FLEX.2
            (a DiT with 196 input channels, flux_core.flex): the image to keep outside the mask (white = redraw), a
            control image (its latent times the strength), used until the step at fraction flex_control_stop.
            Without them a FLEX.2 DiT gets zeros and an all-ones mask (as in DiffSynth-Studio).
        flux_fill_image, flux_fill_mask: FLUX.1-Fill (a DiT with 384 input channels, flux_core.flex): the image and
            the mask (white = redraw) of the inpainting; without them the DiT gets zeros and an all-ones mask.
        step1x_reference_image: Step1X-Edit (flux_core.step1x): the image to edit; the prompts are encoded with it
            by pipe.qwenvl and the connector, and its latent joins the image tokens (as DiffSynth-Studio does).
        nexus_gen_reference_image: Nexus-Gen (flux_core.nexus_gen): the image to edit. With Nexus-Gen loaded, the
            positive prompt goes through its autoregressive model (text-to-image without a reference image), the
            negative one through T5.
        `tiled` tiles the VAE and, as in DiffSynth-Studio, the DiT (flux_core.tiled_dit: tile sizes in latent
        pixels; a latent no larger than tile_size is one tile, the same result as untiled). It cannot be combined
        with TeaCache, which follows one call per step.

        Every argument is checked (flux_core.inputs) before any model runs: prompts are strings, cfg_scale >= 1,
        seed in 0..2**64-1 or None (random over that range, kept in `pipe.last_seed`), t5_sequence_length
        None or 1..512, 1 <= tile_stride <= tile_size, ... . The DiT's activation memory is estimated
        (flux_core.run_cost) and the run refused if it exceeds the compute device's memory."""
        prompts = check_prompts(prompt, "prompt")
        batch = len(prompts)
        negatives = check_negative_prompts(negative_prompt, batch)
        check_cfg_scale(cfg_scale)
        check_embedded_guidance(embedded_guidance)
        check_t5_sequence_length(t5_sequence_length)
        t5_sequence_length = self.t5_sequence_length(t5_sequence_length)
        check_image(input_image, "input_image")
        check_denoising_strength(denoising_strength)
        if denoising_strength < 1.0 and input_image is None:
            raise ValueError("denoising_strength < 1 needs an input_image to start from; pass input_image=... "
                             "or leave denoising_strength at 1.0.")
        height, width = self.image_size(height, width)
        check_size(height, width)
        check_seed(seed)
        check_rand_device(rand_device)
        check_sigma_shift(sigma_shift)
        check_steps(num_inference_steps)
        references = [resize_to_multiple(image) for image in check_images(kontext_images, "kontext_images")]
        check_tiling(tiled, tile_size, tile_stride)
        check_callable("progress_bar_cmd", progress_bar_cmd)
        check_callable("callback", callback)
        check_tea_cache_threshold(tea_cache_l1_thresh)
        dit_tiling = self._dit_tiling(tiled, tile_size, tile_stride, tea_cache_l1_thresh)
        controlnet_items = self._check_controlnet_inputs(controlnet_inputs)
        reference_images = check_images(ipadapter_images, "ipadapter_images")
        check_real("ipadapter_scale", ipadapter_scale)
        self._check_ipadapter(reference_images)
        self._check_identity(infinityou_id_image, infinityou_id_embedding, infinityou_guidance, controlnet_items)
        entity_prompts, entity_masks = check_entities(eligen_entity_prompts, eligen_entity_masks, height, width)
        self._check_eligen_flags(eligen_enable_on_negative, eligen_enable_inpaint, entity_prompts, input_image)
        encoded_loras = ([] if lora_encoder_inputs is None
                         else self._check_lora_encoder(lora_encoder_inputs, lora_encoder_scale))
        check_output_type(output_type)
        check_image(step1x_reference_image, "step1x_reference_image")
        check_image(nexus_gen_reference_image, "nexus_gen_reference_image")
        channel_inputs = dict(flex_inpaint_image=flex_inpaint_image, flex_inpaint_mask=flex_inpaint_mask,
                              flex_control_image=flex_control_image, flex_control_strength=flex_control_strength,
                              flex_control_stop=flex_control_stop, flux_fill_image=flux_fill_image,
                              flux_fill_mask=flux_fill_mask)
        self._check_channel_inputs(height, width, **channel_inputs)
        needs_vae = (output_type != "latent" or input_image is not None or bool(references) or bool(controlnet_items)
                     or step1x_reference_image is not None
                     or any(channel_inputs[k] is not None for k in CHANNEL_IMAGES))
        if step1x_reference_image is None and self.qwenvl is not None and self.text_encoder_2 is None:
            raise ValueError("The pipeline holds Step1X-Edit's Qwen2.5-VL and no T5: Step1X-Edit edits an image; pass "
                             "step1x_reference_image=<the image to edit> (its prompts are read with it).")
        self._require_generation_models(needs_vae, self.encoder_slots(step1x_reference_image,
                                                                      nexus_gen_reference_image))
        encoder = self.conditioning_encoder(t5_sequence_length, step1x_reference_image, nexus_gen_reference_image,
                                            height, width)
        schedule = (explicit_sigmas(sigmas) if sigmas is not None
                    else flux_sigmas(num_inference_steps, denoising_strength, sigma_shift))
        # Step1X-Edit's image to edit joins the image tokens as the Kontext references do
        cost_references = references + ([resize_to_multiple(step1x_reference_image)] if step1x_reference_image
                                         is not None else [])
        self._check_cost(batch, height, width, encoder.max_tokens, cost_references, len(schedule),
                         passes=2 if cfg_scale != 1.0 else 1, tiling=dit_tiling, controlnet_items=controlnet_items,
                         reference_images=len(reference_images), entities=len(entity_prompts))
        self._warn_kontext_without_image(references)

        self.last_seed = resolve_seed(seed)
        noise = self._initial_noise(latents, batch, height, width, rand_device)

        positive = self.encode_with(encoder, prompts, "positive")
        negative = self.encode_with(encoder, negatives, "negative") if cfg_scale != 1.0 else None
        vae_tiling = dict(tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)

        if input_image is not None:
            image = input_image.resize((width, height), Image.LANCZOS) if input_image.size != (width, height) \
                else input_image
            x0 = self.encode_image(pil_to_tensor(image, "input_image"), **vae_tiling)
            start = add_noise(x0.expand(batch, -1, -1, -1), noise, float(schedule[0]))
        else:
            start = noise

        extras = self.kontext_extras(references, batch, **vae_tiling) if references else None
        if step1x_reference_image is not None:  # the image to edit joins the image tokens at its own positions
            extras = self.step1x_extras(step1x_reference_image, batch, extras, **vae_tiling)
        identity = self.identity(infinityou_id_image, infinityou_id_embedding, infinityou_guidance)
        # LoRA-Encoder tokens join the prompt first: ControlNets and EliGen's global segment see them (DiffSynth's order).
        adapters = []
        if encoded_loras:
            self.load_models_to_device(["lora_encoder"])
            adapters.append(lora_encoder_adapter(self.lora_encoder, encoded_loras, lora_encoder_scale, self.dit))
        adapters += self.controlnet_adapters(controlnet_items, height, width, identity=identity, **vae_tiling)
        if reference_images:
            adapters.append(self.ipadapter_adapter(reference_images, ipadapter_scale, cfg=negative is not None))
        adapters += self.channel_adapters(height, width, batch, schedule, vae_tiling, **channel_inputs)
        if entity_prompts:  # last: ControlNets run on the plain prompt, as in DiffSynth
            entity_embeds = self.encode_prompt(entity_prompts, t5_sequence_length).prompt_emb
            on_negative = eligen_enable_on_negative and negative is not None
            adapters.append(eligen_adapter(entity_embeds, entity_masks, height, width,
                                           negative.prompt_emb if on_negative else None))

        guidance = embedded_guidance if self.dit.params.guidance_embed else None
        extras, negative_extras, tea_stats = tea_cache_extras(extras, len(schedule), tea_cache_l1_thresh,
                                                              cfg=negative is not None)
        self.last_tea_cache_stats = tea_stats or None

        region = inpaint_region(entity_masks, height // 8, width // 8) if eligen_enable_inpaint else None

        def velocity(x: torch.Tensor, call) -> torch.Tensor:
            v = guided_velocity(self.dit, x, call, positive, negative, cfg_scale, guidance, extras, negative_extras,
                                adapters, dit_tiling)
            return v if region is None else inpaint_velocity(v, x, x0, region, call.sigma)

        self.load_models_to_device(["dit", "lora_patcher", *self.controlnet_slots(), *encoder.step_slots])
        masked = bool(entity_prompts)   # EliGen's attention mask: flash attention takes none
        log_attention_once(logger, "FluxImagePipeline", self.device, self.torch_dtype, masked, self.reported_attention)
        with attention_backend(self.device, self.torch_dtype, masked):
            final = denoise(start, schedule, velocity, progress_bar_cmd, callback)
        if output_type == "latent":
            self.load_models_to_device([])
            return final
        images = self.decode_latents(final, **vae_tiling)
        self.load_models_to_device([])
        if output_type == "pt":
            return (images / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        pil = tensor_to_pil(images)
        return pil[0] if isinstance(prompt, str) else pil

    def kontext_extras(self, kontext_images, batch: int, **vae_tiling) -> DiTExtras:
        """Kontext reference images -> extra tokens. Each keeps its own resolution (shrunk to multiples of 16)."""
        latents = [self.encode_image(pil_to_tensor(resize_to_multiple(image), f"kontext_images[{i}]"), **vae_tiling)
                   for i, image in enumerate(check_images(kontext_images, "kontext_images"))]
        return reference_extras(latents, batch)

    def step1x_extras(self, image: Image.Image, batch: int, extras: DiTExtras | None = None, **vae_tiling
                      ) -> DiTExtras:
        """Step1X-Edit's reference image as extra image tokens with index 0 (its own positions: DiffSynth-Studio's
        plain image ids), at its own resolution (shrunk to multiples of 16), after any Kontext references."""
        latent = self.encode_image(pil_to_tensor(resize_to_multiple(image), "step1x_reference_image"), **vae_tiling)
        return with_references(extras, [latent], batch, index=0)

    def channel_adapters(self, height: int, width: int, batch: int, sigmas: torch.Tensor, vae_tiling: dict,
                         **channel_inputs) -> list:
        """The adapter that fills the extra input channels of a FLEX.2 (196) or FLUX.1-Fill (384) DiT from its
        inputs (zeros and an all-ones mask when none are given, as DiffSynth-Studio does); none for a 64-channel DiT."""
        if self.dit.in_channels == 64:
            return []

        def encode(x: torch.Tensor) -> torch.Tensor:
            return self.encode_image(x, **vae_tiling)
        return [channel_adapter(self.dit, encode, height, width, batch, sigmas, **channel_inputs)]

    def _check_channel_inputs(self, height: int, width: int, **channel_inputs) -> None:
        """FLEX.2 / Fill inputs checked before any model runs: each image, the DiT they need, a mask without image."""
        images = [k for k in CHANNEL_IMAGES if channel_inputs[k] is not None]
        if self.dit is None or (self.dit.in_channels == 64 and not images):
            return
        check_channel_inputs(self.dit, height, width, **channel_inputs)

    def controlnet_adapters(self, items: list[ControlNetInput], height: int, width: int,
                            identity: IdentityTokens | None = None, **vae_tiling) -> list[ControlNetAdapter]:
        """One adapter per control input: its control latent (encoded once for the whole run) bound to its
        ControlNet, scale, step range and union mode, and InfiniteYou's identity tokens when given."""
        def encode(x: torch.Tensor) -> torch.Tensor:
            return self.encode_image(x, **vae_tiling)

        adapters = []
        for i, item in enumerate(items):
            adapters.append(ControlNetAdapter(
                name=f"controlnet_inputs[{i}]", model=self.controlnet.models[item.controlnet_id],
                control=control_latent(item, width, height, encode, f"controlnet_inputs[{i}]").to(self.device),
                dit_depth=(self.dit.params.depth, self.dit.params.depth_single_blocks), scale=float(item.scale),
                steps=StepRange(float(item.start), float(item.end)),
                mode=None if no_mode(item.processor_id) is None else union_mode_id(item.processor_id),
                identity=identity))
        return adapters

    def ipadapter_adapter(self, images: list[Image.Image], scale: float = 1.0, cfg: bool = False) -> IPAdapterAdapter:
        """The IP-Adapter bound to reference images: encoded by the image encoder (its own stage), keys and values
        made by the IP-Adapter (its own stage) for the positive branch, and from a zero encoding for the negative
        one under true CFG."""
        self.load_models_to_device(["ipadapter_image_encoder"])
        features = encode_images(self.ipadapter_image_encoder, images)
        self.load_models_to_device(["ipadapter"])
        return bind_ipadapter(self.ipadapter, features, self.dit.num_heads,
                              (self.dit.params.depth, self.dit.params.depth_single_blocks), scale=float(scale),
                              branches=("positive", "negative") if cfg else ("positive",))

    def identity(self, id_image: Image.Image | None, id_embedding, guidance: float = 1.0) -> IdentityTokens | None:
        """InfiniteYou's identity tokens from a face photo (through `pipe.infinityou_processor`) or a precomputed
        ArcFace embedding; None when neither is given."""
        if id_image is None and id_embedding is None:
            return None
        if id_embedding is None:
            if self.infinityou_processor is None:
                from .face_embedding import FaceEmbedder
                self.infinityou_processor = FaceEmbedder()
            id_embedding = self.infinityou_processor.embed(id_image)
        self.load_models_to_device(["image_proj_model"])
        return identity_tokens(self.image_proj_model, id_embedding, guidance)

    @staticmethod
    def _check_eligen_flags(on_negative, inpaint, entity_prompts: list[str], input_image) -> None:
        for name, value in (("eligen_enable_on_negative", on_negative), ("eligen_enable_inpaint", inpaint)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r}: pass True or False.")
        if inpaint and not entity_prompts:
            raise ValueError("eligen_enable_inpaint=True needs eligen_entity_prompts and eligen_entity_masks: the "
                             "entities' masks are the regions that change.")
        if inpaint and input_image is None:
            raise ValueError("eligen_enable_inpaint=True needs input_image: outside the entity masks the result is "
                             "the input image.")

    def _check_lora_encoder(self, lora_encoder_inputs, scale) -> list:
        check_real("lora_encoder_scale", scale)
        if self.lora_encoder is None:
            raise RuntimeError("lora_encoder_inputs need a LoRA-Encoder, but the pipeline has none: add "
                               "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev's model.safetensors to model_configs.")
        return check_lora_encoder_inputs(lora_encoder_inputs, self.lora_encoder, self.dit)

    def _check_controlnet_inputs(self, controlnet_inputs) -> list[ControlNetInput]:
        if controlnet_inputs is None:
            return []
        items = list(controlnet_inputs) if isinstance(controlnet_inputs, (list, tuple)) else [controlnet_inputs]
        for i, item in enumerate(items):
            check_controlnet_input(i, item, self.controlnet)
        return items

    def _check_ipadapter(self, images: list[Image.Image]) -> None:
        if not images:
            return
        missing = [slot for slot in ("ipadapter", "ipadapter_image_encoder") if getattr(self, slot) is None]
        if missing:
            raise RuntimeError(f"ipadapter_images need an IP-Adapter and its image encoder, but the pipeline has no "
                               f"{' and no '.join(missing)}. Add to model_configs the IP-Adapter file (InstantX "
                               f"ip-adapter.bin, or XLabs flux-ip-adapter.safetensors) and its encoder (InstantX: "
                               f"google/siglip-so400m-patch14-384; XLabs: openai/clip-vit-large-patch14).")
        if self.dit is not None:
            check_ipadapter_models(self.ipadapter, self.ipadapter_image_encoder,
                                   (self.dit.params.depth, self.dit.params.depth_single_blocks),
                                   self.dit.hidden_size, "ipadapter_images")

    def _check_identity(self, id_image, id_embedding, guidance, controlnet_items: list[ControlNetInput]) -> None:
        """InfiniteYou's inputs, checked before any model runs; warns when the identity cannot act."""
        check_image(id_image, "infinityou_id_image")
        check_real("infinityou_guidance", guidance)
        if id_image is None and id_embedding is None:
            return
        if id_image is not None and id_embedding is not None:
            raise ValueError("infinityou_id_image and infinityou_id_embedding are both given; pass one (the embedding "
                             "is what the face photo is turned into).")
        if id_embedding is not None:
            check_face_embedding(id_embedding)
        if self.image_proj_model is None:
            raise RuntimeError("InfiniteYou needs its image projector, but the pipeline has none: add "
                               "ByteDance/InfiniteYou's image_proj_model.bin (and InfuseNetModel/ as a ControlNet) "
                               "to model_configs.")
        if not controlnet_items:
            warnings.warn("An InfiniteYou identity was given but no controlnet_inputs: the identity reaches the DiT "
                          "only through InfuseNet, a ControlNet, so it has no effect. Load InfuseNetModel/ and pass "
                          "controlnet_inputs=[ControlNetInput(image=<black or pose image>, processor_id=\"None\")].",
                          InfiniteYouWithoutControlNetWarning, stacklevel=4)
        for i, item in enumerate(controlnet_items):
            model = self.controlnet.models[item.controlnet_id]
            if model.params.num_modes or is_inpainting(model):
                warnings.warn(f"controlnet_inputs[{i}]: ControlNet {item.controlnet_id} is a union or inpainting "
                              f"ControlNet, but with an InfiniteYou identity every ControlNet takes the identity "
                              f"tokens as its text (as in DiffSynth-Studio), so it is not conditioned on the prompt.",
                              IdentityOnOtherControlNetWarning, stacklevel=4)

    @staticmethod
    def _dit_tiling(tiled: bool, tile_size: int, tile_stride: int, tea_cache_l1_thresh) -> DiTTiling | None:
        check_dit_tiling(tiled, tile_size, tea_cache_l1_thresh)
        return DiTTiling(tile_size, tile_stride) if tiled else None

    def _require_generation_models(self, needs_vae: bool, encoder_slots: Sequence[str]) -> None:
        """Every model and tokenizer a generation uses (`encoder_slots`: its conditioning encoder's), checked before
        any of them runs: the message names each empty slot and what each file given to from_pretrained was
        detected as."""
        slots = ["dit", *encoder_slots] + (["vae"] if needs_vae else [])
        missing = [slot for slot in slots if getattr(self, slot) is None]
        if not missing:
            return
        loaded = "; ".join(entry.describe() for entry in self.loaded_from.values()) or "nothing"
        raise RuntimeError(f"cannot generate: the pipeline has no {', '.join(missing)}. from_pretrained loaded: "
                           f"{loaded}. Add the missing model files to model_configs (a FLUX DiT, the ae VAE, the "
                           f"CLIP-L text_encoder/ and the T5 text_encoder_2/; README's 'Supported models' lists what "
                           f"Step1X-Edit and Nexus-Gen need instead).")

    def _check_cost(self, batch: int, height: int, width: int, text_tokens: int, references: list[Image.Image],
                    steps: int, passes: int, tiling: DiTTiling | None = None,
                    controlnet_items: Sequence[ControlNetInput] = (), reference_images: int = 0,
                    entities: int = 0) -> None:
        """Refuse a run whose DiT activations cannot fit the compute device, warn when they take most of it, and
        warn before a run that would take very long on a CPU (steps x tiles x CFG passes x batch DiT forwards, the
        ControlNets' forwards counted in DiT forwards)."""
        calls, tile_h, tile_w = dit_calls_per_step(height // 8, width // 8, tiling)
        reference_tokens = sum(image_tokens(image.size[1], image.size[0]) for image in references)
        image = image_tokens(tile_h * 8, tile_w * 8) + reference_tokens
        device = self.vram.device if self.vram is not None else ComputeDevice(self.device)
        tiles = f", in {calls} DiT tiles of {tile_w * 8}x{tile_h * 8} (tiled=True)" if tiling is not None else ""
        what = (f"height={height}, width={width}, a batch of {batch} image(s) and {reference_tokens} Kontext "
                f"reference tokens (kontext_images), {image + text_tokens} tokens in all{tiles}")
        extra = controlnet_passes(self.dit, [(self.controlnet.models[i.controlnet_id], passes) for i in controlnet_items],
                                  image, text_tokens)
        counted = f" + {extra:.2g} DiT pass(es) of controlnet_inputs" if controlnet_items else ""
        work = (f"{steps} steps x {calls} tile(s) x ({passes} pass(es){counted}) x {batch} image(s) at {width}x{height}"
                if tiling is not None or controlnet_items
                else f"{steps} steps x {passes} pass(es) x {batch} image(s) at {width}x{height}")
        held = 0
        if reference_images and self.ipadapter is not None:  # its keys/values stay on the device for the whole run
            p = self.ipadapter.params
            held = ipadapter_kv_bytes(p.num_blocks, p.num_tokens, p.hidden_size, reference_images, passes,
                                      compute_place(self.ipadapter)[1])
            what += f", {reference_images} ipadapter_images ({held / GiB:.2f} GiB of IP-Adapter keys/values)"
        if entities:  # EliGen: the entity prompts lengthen the text; its attention mask stays for the whole run
            text_tokens *= entities + 1
            mask = eligen_mask_bytes(text_tokens + image, compute_place(self.dit)[1])
            held += mask
            what += f", {entities} EliGen entities ({mask / GiB:.2f} GiB attention mask)"
        # stacklevel 4: the user's line (above __call__ and torch.no_grad's wrapper)
        check_run_cost(self.dit, device, batch, image, text_tokens, steps * calls, passes + extra, what, work,
                       stacklevel=4, held_bytes=held)

    def _warn_kontext_without_image(self, references: list[Image.Image]) -> None:
        source = self.loaded_from.get("dit")
        if references or source is None or not source.is_kontext:
            return
        warnings.warn(f"The DiT was loaded from {source.model_id or source.source}, a FLUX.1 Kontext model, but no "
                      f"kontext_images were given: Kontext edits a reference image, and without one it generates "
                      f"from the text alone. Pass kontext_images=PIL.Image.open(path).convert('RGB').",
                      KontextWithoutImageWarning, stacklevel=4)   # the user's line (above torch.no_grad's wrapper)

    def _initial_noise(self, latents, batch: int, height: int, width: int, rand_device: str) -> torch.Tensor:
        h, w = height // 8, width // 8
        if latents is None:
            return make_noise(batch, height, width, self.last_seed, rand_device, self.device)
        latents = torch.as_tensor(latents).float().to(self.device)
        if latents.dim() == 3:  # packed tokens, as diffusers' FluxPipeline takes them
            latents = unpack_latents(latents, h, w)
        if tuple(latents.shape[1:]) != (16, h, w) or latents.shape[0] not in (1, batch):
            raise ValueError(f"latents= has shape {tuple(latents.shape)}; for {height}x{width} it must be "
                             f"({batch}, 16, {h}, {w}) or packed ({batch}, {h * w // 4}, 64).")
        return latents.expand(batch, -1, -1, -1)
