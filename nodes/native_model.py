"""FluxCore's DiT as a native ComfyUI MODEL: KSampler, every sampler and scheduler, ModelSamplingFlux, native LoRA
loaders, Apply ControlNet and EasyCache drive our DiT, with FluxCore's adapters riding in the conditioning.

How it is put together (ComfyUI's own wiring: ../shared/reference/comfyui_native_model.md):
- One container per loaded DiT (`native_container`): ComfyUI's `model_base.Flux` (or FluxSchnell / FluxInpaint, by
  the DiT's config: `native_class_name`) built with `disable_unet_model_creation`, whose `diffusion_model` is a
  `DiTView`: our DiT's own modules under the BFL names (no copy), so ComfyUI's LoRA key maps, weight patches and
  memory manager see FLUX's key set. The DiT loader's handle holds that container's ModelPatcher; every MODEL over
  the DiT is a clone of it. ComfyUI patches LoRA weights per clone and gives the originals back when another clone
  (or FluxCore's own sampler, which loads the container itself) loads, and FluxCore's sampler takes its own LoRAs off
  after every run in ComfyUI (nodes/sampler.py), so no LoRA leaks from one path into the other.
- Memory: ComfyUI's loader places the MODEL. The DiT's torch layers are made ComfyUI's castable ones
  (`bridge.make_castable`: same parameters, same forward until ComfyUI asks for more), so a partial "lowvram" load
  casts the weights it left on the CPU per call, with LoRA patches applied at that moment, as for ComfyUI's own FLUX;
  a DiT stored in FP8 gets ComfyUI's manual cast on its MODEL. FluxCore's VRAM / Speed options and TeaCache are
  FluxCore-sampler options: the MODEL node refuses handles that carry them (use ComfyUI's --lowvram /
  --reserve-vram and EasyCache on this path).
- The forward is flux_core.native_forward (ComfyUI's call signature in plain torch), run inside ComfyUI's
  DIFFUSION_MODEL wrappers (EasyCache and other native caches hook there). Guidance also reaches it as the
  conditioning's float (`fluxcore_guidance`): ComfyUI casts the guidance tensor to the model dtype first.
- FluxCore adapters (Apply ControlNet / IP-Adapter / InfiniteYou (FluxCore), EliGen Entity, Encode LoRA into
  Conditioning, FLEX.2 Inputs, the Step1X-Edit / Nexus-Gen encode nodes) put their payloads under `fluxcore_*`
  CONDITIONING keys, the same ones FluxCore's sampler reads, and the models that run at every step under ComfyUI's
  `additional_models` (loaded with the MODEL). The model's `extra_conds` gathers an entry's keys into one `NativeAdapters` (compared by identity,
  so ComfyUI never batches two entries with different adapters), which builds the adapters at the run's first call
  (it needs the run's sigmas and the latent's size) with the FluxCore sampler's own functions and gives them to each
  call with its step, sigma and branch (cond_or_uncond).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from flux_core.compile import is_compiled, uncompile_dit
from flux_core.dtypes import FLOAT8_DTYPES
from flux_core.flex import FILL_CHANNELS, FLEX_CHANNELS
from flux_core.fp8 import is_fp8_compute
from flux_core.models.dit import FluxDiT, FluxParams
from flux_core.model_state import state_of
from flux_core.native_forward import PromptFromEncoder, native_forward
from flux_core.quantized import QuantizedLinear
from flux_core.vram import stored_compute_dtype

from . import comfy_bridge as bridge
from .conditioning import HONOURED_KEYS, TEXT_KEY, EncodedText
from .handles import DIT_TYPE, DiTHandle
from .loaders import NodeInputError

MODEL_NODE = "FluxCore DiT to MODEL"
NATIVE_NODE = "FluxCore MODEL (native sampler)"   # how errors during native sampling name the path
FLUXCORE_KEYS = frozenset(k for k in HONOURED_KEYS if k.startswith("fluxcore_"))
# keys whose adapters cover the image token by token (control latents, region masks, channels): odd sides refused
SPATIAL_KEYS = frozenset({"fluxcore_controlnets", "fluxcore_eligen_entities", "fluxcore_flex"})


def dit_has_flex_channels(handle: DiTHandle) -> bool:
    return handle.model.module.in_channels == FLEX_CHANNELS


def native_class_name(params: FluxParams) -> str:
    """The ComfyUI supported-model class for a DiT config: FluxInpaint for FLUX.1-Fill's 384 input channels (ComfyUI
    joins the image and mask itself), FluxSchnell without a guidance embedder (its shift-1 sampling), else Flux
    (dev, Krea, Kontext, and FLEX.2, whose extra channels FluxCore fills)."""
    if params.in_channels == FILL_CHANNELS:
        return "FluxInpaint"
    if not params.guidance_embed:
        return "FluxSchnell"
    return "Flux"


def unet_config(params: FluxParams) -> dict:
    """ComfyUI's FLUX unet_config for our config (channels counted per latent pixel, as ComfyUI counts them); the
    LoRA key maps read depth, depth_single_blocks and hidden_size from it."""
    return dict(image_model="flux", in_channels=params.in_channels // 4, out_channels=params.out_channels // 4,
                vec_in_dim=params.vec_in_dim, context_in_dim=params.context_in_dim, hidden_size=params.hidden_size,
                mlp_ratio=params.mlp_ratio, num_heads=params.num_heads, depth=params.depth,
                depth_single_blocks=params.depth_single_blocks, axes_dim=list(params.axes_dim), theta=params.theta,
                patch_size=2, qkv_bias=params.qkv_bias, guidance_embed=params.guidance_embed,
                disable_unet_model_creation=True)


class DiTView(nn.Module):
    """Our DiT's modules under their own (BFL) names, as ComfyUI's `diffusion_model`: the same module objects, so
    ComfyUI's patches and placement act on the DiT FluxCore samples with."""
    patch_size = 2   # model_base.Flux sizes attention masks and extra channels with it

    def __init__(self, dit: FluxDiT):
        super().__init__()
        for name, child in dit.named_children():
            self.add_module(name, child)
        self._dit = (dit,)   # a tuple: not registered a second time
        self.params = dit.params

    @property
    def dit(self) -> FluxDiT:
        return self._dit[0]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (ComfyUI casts the inputs to it): FP8-stored weights compute in their biases' dtype."""
        return stored_compute_dtype(self)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        try:  # DIFFUSION_MODEL wrappers (EasyCache's) came with ComfyUI's patcher extensions (late 2024)
            import comfy.patcher_extension as ext
        except ImportError:  # nor is there the pre-run callback native_container registers: check at each call
            prepare_for_native(self.dit)
            return self._forward(x, timestep, context, y, guidance, ref_latents, control, transformer_options,
                                 **kwargs)
        wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, transformer_options)
        return ext.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, fluxcore=None, fluxcore_guidance=None, **kwargs):
        if guidance is not None and fluxcore_guidance is not None:
            guidance = fluxcore_guidance  # the conditioning's value, not its cast to the model dtype
        refuse_block_patches(transformer_options)
        chunks = len(transformer_options.get("cond_or_uncond") or [0])  # native_forward runs each chunk alone
        adapters = fluxcore.adapters_for(x[: x.shape[0] // chunks], transformer_options) if fluxcore else ()
        return native_forward(self.dit, x, timestep, context, y, guidance, ref_latents, control, transformer_options,
                              adapters=adapters, dtype=x.dtype, **kwargs)


BLOCK_PATCHES = ("double_block", "single_block", "post_input")


def refuse_block_patches(transformer_options: dict) -> None:
    """ComfyUI's per-block patches (patches_replace["dit"], patches["double_block" / "single_block" / "post_input"]:
    Skip Layer Guidance, USO's style reference, PuLID-style packs) reach into ComfyUI's own FLUX blocks, which
    FluxCore's DiT does not have: refused by name rather than silently doing nothing."""
    patches = dict(transformer_options.get("patches") or {})
    found = [f"patches[{k!r}]" for k in BLOCK_PATCHES if patches.get(k)]
    replaced = (transformer_options.get("patches_replace") or {}).get("dit") or {}
    found += [f"patches_replace['dit'][{k!r}]" for k in sorted(replaced, key=str)[:3]]
    if found:
        raise NodeInputError(f"{NATIVE_NODE}: a model patch on the MODEL changes ComfyUI's own FLUX blocks "
                             f"({', '.join(found)}; e.g. Skip Layer Guidance DiT, a style-reference patch), which "
                             f"FluxCore's DiT cannot run; remove that node, or load the DiT with ComfyUI's own loader "
                             f"for it.")


def prepare_for_native(dit: FluxDiT) -> None:
    """What FluxCore's own sampler may have left on the shared DiT, for a native run: compiled blocks run eager; FP8-
    compute layers cannot take ComfyUI's patches and a VRAM manager's placement (dropped after every FluxCore run in
    ComfyUI) would fight ComfyUI's: both refused by name. Once per sampling run, before the first step (ComfyUI's
    pre-run callback, registered by native_container), not at each DiT call: it walks every module."""
    if is_fp8_compute(dit):
        raise NodeInputError(f"{NATIVE_NODE}: this DiT was converted to FP8 compute by a FLUX Speed Options "
                             f"(FluxCore) node, which ComfyUI's samplers and LoRA patches cannot run; load it again "
                             f"(change an input of its loader) and use ComfyUI's fp8 options on the MODEL path.")
    if dit.img_in.weight.dtype in FLOAT8_DTYPES and not getattr(dit.img_in, "comfy_cast_weights", False):
        raise NodeInputError(f"{NATIVE_NODE}: the DiT's weights were stored in FP8 after this MODEL was made (FLUX "
                             f"VRAM Options (FluxCore) converts the loaded DiT in place), so ComfyUI does not cast "
                             f"them; load the DiT again (change an input of its loader), with weight_dtype fp8 there "
                             f"if you want FP8 on both paths.")
    if is_compiled(dit):
        uncompile_dit(dit)
    if state_of(dit).vram_placement is not None:
        raise NodeInputError(f"{NATIVE_NODE}: FluxCore's VRAM manager still holds this DiT (a FLUX Sampler (FluxCore) "
                             f"run with VRAM options did not finish); run the workflow again.")


@functools.cache
def _native_model_class():
    import comfy.conds
    import comfy.model_base

    class FluxCoreFlux(comfy.model_base.Flux):
        """ComfyUI's Flux model over a DiTView: guidance also passed as a float, FluxCore's conditioning keys gathered
        into one NativeAdapters per entry, FLEX.2's extra channels left to FluxCore's FLEX.2 Inputs."""
        fluxcore_handle: DiTHandle | None = None

        def concat_cond(self, **kwargs):
            if self.diffusion_model.params.in_channels == FLEX_CHANNELS:
                return None  # ComfyUI would build Fill's image + mask; FLEX.2's channels come from NativeAdapters
            return super().concat_cond(**kwargs)

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            if "guidance" in out:  # the tensor stays for ComfyUI's ControlNets; a float is not cast to the model
                out["fluxcore_guidance"] = comfy.conds.CONDConstant(float(kwargs.get("guidance", 3.5)))  # dtype
            adapters = NativeAdapters.from_entry(self.fluxcore_handle, kwargs)
            if adapters is not None:
                out["fluxcore"] = comfy.conds.CONDConstant(adapters)
            return out

    return FluxCoreFlux


def native_container(dit: FluxDiT):
    """The ModelPatcher of the one ComfyUI model over `dit` (ComfyUI only). Its layers become ComfyUI's castable ones
    in place (see the module docstring)."""
    import comfy.model_patcher
    import comfy.supported_models
    bridge.make_castable(dit)
    config = getattr(comfy.supported_models, native_class_name(dit.params))(unet_config(dit.params))
    config.set_inference_dtype(stored_compute_dtype(dit), None)  # FP8 weights: native_model sets the manual cast
    model = _native_model_class()(config, device=None)
    model.diffusion_model = DiTView(dit)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=bridge.compute_device(),
                                               offload_device=bridge.offload_device())
    try:  # clones copy it: every MODEL over the DiT checks before sampling
        from comfy.patcher_extension import CallbacksMP
    except ImportError:  # older ComfyUI: DiTView.forward checks at each call instead
        return patcher
    patcher.add_callback(CallbacksMP.ON_PRE_RUN, lambda _: prepare_for_native(dit))
    return patcher


def managed_dit(dit: FluxDiT) -> bridge.ManagedModel:
    """The DiT as the loaders hand it out: inside ComfyUI held by its native container (so FluxCore's sampler and
    every MODEL over it share one owner), standalone a plain ManagedModel. A GGUF DiT stays with FluxCore's sampler
    (its quantized layers are not ComfyUI's)."""
    if not bridge.IN_COMFYUI or any(isinstance(m, QuantizedLinear) for m in dit.modules()):
        return bridge.ManagedModel(dit)
    managed = bridge.ManagedModel(dit, native_container(dit))
    managed.patcher.model.fluxcore_handle = DiTHandle(managed, "")
    return managed


def model_refusals(handle: DiTHandle) -> list[str]:
    """What on a DiT handle only FluxCore's sampler honours (each with what to use on the MODEL path)."""
    problems = []
    if handle.loras or handle.lora_fusion is not None:
        problems.append("FluxCore LoRA nodes (Load FLUX LoRA / Fuse LoRAs): load LoRAs on the MODEL with native "
                        "LoraLoaderModelOnly instead")
    if handle.vram is not None:
        problems.append("FLUX VRAM Options (FluxCore): ComfyUI places the MODEL (use --lowvram / --reserve-vram)")
    if handle.tea_cache_l1_thresh is not None:
        problems.append("FLUX TeaCache (FluxCore): use ComfyUI's EasyCache on the MODEL")
    if handle.fp8_compute or handle.compile:
        problems.append("FLUX Speed Options (FluxCore): use ComfyUI's own fp8 / compile nodes on the MODEL")
    dit = handle.model.module
    if handle.model.patcher is None or not hasattr(handle.model.patcher.model, "fluxcore_handle"):
        problems.append("this DiT has no native container (a GGUF file, or loaded outside ComfyUI): load it with "
                        "ComfyUI's own Unet Loader (GGUF) for native samplers")
    elif is_fp8_compute(dit):
        problems.append("the DiT was converted to FP8 compute by a FLUX Speed Options (FluxCore) node: load it again")
    return problems


def native_model(handle: DiTHandle):
    """A MODEL (a clone of the DiT's container) for a DiT handle, or NodeInputError listing what it cannot carry."""
    problems = model_refusals(handle)
    if problems:
        raise NodeInputError(f"{MODEL_NODE}, input 'model': the model carries what only FLUX Sampler (FluxCore) runs: "
                             + "; ".join(problems) + ".")
    model = handle.model.patcher.clone()
    dit = handle.model.module
    if any(p.dtype in FLOAT8_DTYPES for p in dit.parameters()):
        # FP8-stored weights (the loader's or VRAM Options' weight_dtype): ComfyUI's manual cast computes each layer
        # in the DiT's compute dtype, as FluxCore's VRAM manager does, and only on this MODEL
        if not hasattr(model, "set_model_compute_dtype"):
            raise NodeInputError(f"{MODEL_NODE}: the DiT is stored in FP8, and this ComfyUI has no manual-cast "
                                 f"option for a MODEL (set_model_compute_dtype); update ComfyUI, or load the DiT "
                                 f"with weight_dtype default.")
        model.set_model_compute_dtype(stored_compute_dtype(dit))
    return model


@dataclass(eq=False)
class NativeAdapters:
    """One conditioning entry's FluxCore adapter inputs on the native path (compared by identity: ComfyUI batches
    entries only when it is the same object). The adapters are built at the run's first call, for its latent size
    and sigmas, with the FluxCore sampler's functions, and again when either changes."""
    handle: DiTHandle
    entry: dict                      # the entry's fluxcore_* keys
    context: torch.Tensor | None
    _built: dict = field(default_factory=dict)

    @classmethod
    def from_entry(cls, handle: DiTHandle | None, kwargs: dict) -> "NativeAdapters | None":
        if handle is None:
            return None
        entry = {k: kwargs[k] for k in FLUXCORE_KEYS if kwargs.get(k) is not None}
        if not entry and not dit_has_flex_channels(handle):  # FLEX.2's channels always come from FluxCore
            return None
        return cls(handle, entry, kwargs.get("cross_attn"))

    def adapters_for(self, x: torch.Tensor, options: dict) -> list:
        """The adapters for a call on `x` (one cond/uncond chunk): built at the run's first call (the run: its
        `sample_sigmas`, which a sampler evaluates at all but the last of; a lone call without them is a run of
        one step) and again when the run or the latent's shape changes."""
        sigmas = options.get("sample_sigmas")
        levels = tuple(float(s) for s in sigmas[:-1]) if sigmas is not None and len(sigmas) > 1 else None
        key = (x.shape[0], *x.shape[-2:], levels)
        if key not in self._built:
            self._built.clear()
            steps = torch.tensor(levels) if levels else torch.as_tensor(options.get("sigmas", [1.0]))[:1].float()
            self._built[key] = self._build(x, steps)
        return self._built[key]

    def _build(self, x: torch.Tensor, sigmas: torch.Tensor) -> list:
        from .sampler import build_adapters, read_adapter_inputs
        b, _, h, w = x.shape
        spatial = sorted(k for k in self.entry if k in SPATIAL_KEYS)
        if (h % 2 or w % 2) and (spatial or dit_has_flex_channels(self.handle)):
            what = ", ".join(spatial) or "FLEX.2's extra channels"
            raise NodeInputError(f"{NATIVE_NODE}: the latent is {w * 8}x{h * 8}, not a multiple of 16, and {what} "
                                 f"need whole 2x2 patches; use {w // 2 * 16}x{h // 2 * 16} (or "
                                 f"{(w + 1) // 2 * 16}x{(h + 1) // 2 * 16}).")
        conditioning = [[self.context, self.entry]]
        sides = {"positive": conditioning, "negative": conditioning}  # the call's branch comes from cond_or_uncond
        dit = self.handle.model.module
        encoded = self.entry.get(TEXT_KEY)
        if encoded is not None and not isinstance(encoded, EncodedText):
            raise NodeInputError(f"{NATIVE_NODE}: {TEXT_KEY} is a {type(encoded).__name__}; only FluxCore's "
                                 f"Step1X-Edit and Nexus-Gen encode nodes make this entry.")
        wanted = read_adapter_inputs(NATIVE_NODE, sides, dit, h, w)
        # The images are encoded now (VAE, image encoders), during sampling: the models in use are loaded again
        # afterwards, with the ones the adapters compute with at every call (ControlNets, Step1X-Edit's connector;
        # ComfyUI loaded them with the MODEL already: the Apply / encode nodes list them under additional_models).
        with bridge.models_kept_loaded() as step_models:
            adapters, controlnets = build_adapters(NATIVE_NODE, self.handle, wanted, sides, b, h, w, sigmas, {},
                                                   x.device, channels=dit_has_flex_channels(self.handle))
            step_models += [c.model for c in controlnets]
            if encoded is not None:  # Step1X-Edit / Nexus-Gen: their text (per call) before every other adapter
                adapters = [PromptFromEncoder(encoded.conditioning, encoded.reference_latents)] + adapters
                step_models += [h.model for h in encoded.step_models]
        return adapters


class FluxCoreDiTToModel:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("MODEL",)
    FUNCTION = "convert"
    DESCRIPTION = ("FluxCore's DiT as a native MODEL, for KSampler / SamplerCustomAdvanced, ModelSamplingFlux, native "
                   "LoRA loaders, Apply ControlNet and EasyCache. FluxCore adapters still work: apply them to the "
                   "conditioning as for FLUX Sampler (FluxCore). The same DiT serves both samplers without reloading; "
                   "LoRAs loaded on one path never reach the other.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "From Load FLUX DiT (FluxCore) (its MODEL output is the same)."}),
        }}

    def convert(self, model):
        return (native_model(model),)


NODE_CLASS_MAPPINGS = {"FluxCoreDiTToModel": FluxCoreDiTToModel}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreDiTToModel": MODEL_NODE}
