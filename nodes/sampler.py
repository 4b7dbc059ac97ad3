"""The FluxCore sampler node: flux_core's sampling functions on native LATENT and CONDITIONING.

LATENT `samples` are raw VAE latents (as native VAEEncode/VAEDecode use them); they are scaled into the DiT's
space here and back at the end. `noise_mask` (SetLatentNoiseMask) is honoured: outside the mask the original
latent, noised to the current level, is put back after every step, so it comes out unchanged.

ControlNets come in the conditioning (`fluxcore_controlnets`, from Apply ControlNet (FluxCore) and Apply InfiniteYou
(FluxCore)): one flux_core ControlNetAdapter per payload, in the branches it was applied to (nodes/controlnet_nodes.py;
InfuseNet's with its identity tokens, nodes/infiniteyou_nodes.py). IP-Adapters come under `fluxcore_ipadapters`
(Apply IP-Adapter (FluxCore)): one flux_core IPAdapterAdapter per payload, its keys and values made before the DiT is
placed (nodes/ipadapter_nodes.py). EliGen entities come under `fluxcore_eligen_entities` (EliGen Entity
(FluxCore), already encoded): one flux_core EliGenAdapter per CFG branch with entities, last in the adapter list, as
the pipeline orders them; `eligen_inpaint` is DiffSynth's eligen_enable_inpaint (nodes/eligen_nodes.py). The
denoising loop runs inside flux_core.attention_backend's kernel choice for the device (masked with entities), logged
once per distinct choice. `tiled_dit` runs the DiT (and its ControlNets) tile by tile, as FluxImagePipeline's
`tiled=True` does (flux_core.tiled_dit); control images are then VAE-encoded with the same tiles, as there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from flux_core.attention_backend import attention_backend, log_attention_once
from flux_core.eligen import inpaint_velocity
from flux_core.run_cost import check_run_cost, controlnet_passes, dit_calls_per_step, image_tokens, ipadapter_kv_bytes
from flux_core.inputs import SEED_MAX
from flux_core.lora import clear_lora, disable_lora_merger, enable_lora_merger, load_lora
from flux_core.model_state import state_of
from flux_core.models.vae import AutoEncoderParams
from flux_core.sampling import (denoise as run_denoise, guided_velocity, make_noise, reference_extras, tea_cache_extras,
                                with_references)
from flux_core.dit_inputs import DiTCall
from flux_core.models.dit import DiTExtras
from flux_core.scheduler import add_noise, flux_sigmas, next_sigmas
from flux_core.tiled_dit import DiTTiling
from flux_core.vram import GiB, stored_compute_dtype

from . import comfy_bridge as bridge
from .channel_nodes import channel_adapters
from .conditioning import EncodedText, read_conditioning, warn_unused_entries
from .controlnet_nodes import controlnet_adapters, controlnet_payloads, place_beside_dit
from .eligen_nodes import (check_entities, eligen_adapters, eligen_held_bytes, eligen_inpaint_region,
                           entities_by_branch, entity_tokens)
from .infiniteyou_nodes import with_identities
from .ipadapter_nodes import check_ipadapter_payloads, ipadapter_adapters, ipadapter_payloads
from .lora_model_nodes import lora_encoder_adapters
from .handles import DIT_TYPE, DiTHandle
from .loaders import NodeInputError
from . import vram_nodes
from .vram_nodes import place_dit, release_dit, unload_loras

FLUX_LATENT = AutoEncoderParams()  # FLUX's latent scale/shift (ComfyUI's latent_formats.Flux)
log = logging.getLogger("FluxCore")
_REPORTED_ATTENTION: set[str] = set()   # describe_attention lines logged in this process


def prepare_dit(handle: DiTHandle):
    """The handle's module on the compute device with exactly the handle's LoRAs applied, combined by its
    LoRA-Fusion patcher (Fuse LoRAs) or summed. The record of what was applied holds the patcher beside the stack,
    so a run with another patcher, or none, applies the stack again (the merger needs hooked LoRAs)."""
    dit = place_dit(handle)  # the whole model on the device, or as the VRAM options node says
    fusion = handle.lora_fusion
    wanted = handle.loras + ((fusion,) if fusion is not None else ())
    if state_of(dit).applied_loras != wanted:
        clear_lora(dit)
        disable_lora_merger(dit)  # clear_lora keeps an enabled merger (as DiffSynth's does)
        if fusion is not None:
            enable_lora_merger(dit, fusion.model.module)
        for patch in handle.loras:
            load_lora(dit, patch.lora if patch.lora is not None else patch.path, alpha=patch.strength)
        state_of(dit).applied_loras = wanted
    return dit


def check_sampler_cost(node: str, dit, batch: int, h: int, w: int, text_tokens: int, reference_tokens: int,
                       steps: int, passes: int, tiling: DiTTiling | None = None, controlnets=(),
                       ipadapters=(), entities: dict | None = None, negative_text_tokens: int | None = None,
                       appended_tokens: int = 0) -> None:
    """The pipeline's cost checks for one sampler run (latent sides h, w): refuse what cannot fit the compute
    device, warn when it takes most of it or would take very long on a CPU. With `tiling` one DiT call sees one
    tile (all tiles have one size), and each step makes one call per tile; `controlnets` ((payload, branches) from
    controlnet_payloads) add their own forwards to the compute, counted in DiT passes
    (flux_core.run_cost.controlnet_passes); `ipadapters` ((payload, branches) from ipadapter_payloads) keep their
    keys/values on the device for the whole run (flux_core.run_cost.ipadapter_kv_bytes); `entities` (from
    entities_by_branch) lengthen their branch's text (`text_tokens` the positive prompt's, `negative_text_tokens` the
    negative one's) and keep an attention mask per branch (flux_core.eligen.eligen_mask_bytes), as in the pipeline;
    `appended_tokens` (LoRA-Encoder tokens) lengthen the positive prompt."""
    calls, tile_h, tile_w = dit_calls_per_step(h, w, tiling)
    text_tokens += appended_tokens
    image = image_tokens(tile_h * 8, tile_w * 8) + reference_tokens
    eligen_mask = 0
    if entities:
        prompts = {"positive": text_tokens, "negative": negative_text_tokens or text_tokens}
        eligen_mask = eligen_held_bytes(entities, prompts, image, stored_compute_dtype(dit))
        added = entity_tokens(entities)
        text_tokens = max(prompts[b] + added.get(b, 0) for b in ("positive", "negative")[:passes])
    tiles = f", in {calls} DiT tiles of {tile_w * 8}x{tile_h * 8}" if tiling is not None else ""
    what = (f"a {w * 8}x{h * 8} latent_image with a batch of {batch} and {reference_tokens} reference tokens "
            f"(ReferenceLatent / Kontext reference in 'positive'), {image + text_tokens} tokens in all{tiles}")
    extra = controlnet_passes(dit, [(p.controlnet.model.module, min(len(b), passes)) for p, b in controlnets],
                              image, text_tokens)
    counted = f" + {extra:.2g} DiT pass(es) of ControlNets ({len(controlnets)})" if controlnets else ""
    work = (f"{steps} steps x {calls} tile(s) x ({passes} pass(es){counted}) x {batch} image(s) at "
            f"{w * 8}x{h * 8}" if tiling is not None or controlnets
            else f"{steps} steps x {passes} pass(es) x {batch} image(s) at {w * 8}x{h * 8}")
    held = eligen_mask
    for payload, branches in ipadapters:
        adapter = payload.ipadapter.adapter.module
        p = adapter.params
        held += ipadapter_kv_bytes(p.num_blocks, p.num_tokens, p.hidden_size, payload.images.shape[0],
                                   min(len(branches), passes), stored_compute_dtype(adapter))
    if held - eligen_mask:
        what += f", {(held - eligen_mask) / GiB:.2f} GiB of IP-Adapter keys/values ({len(ipadapters)} Apply IP-Adapter)"
    if entities:
        count = " and ".join(f"{len(p)} on '{b}'" for b, p in entities.items())
        what += f", EliGen entities ({count}: {eligen_mask / GiB:.2f} GiB of attention masks)"
    device = vram_nodes.make_compute_device()  # looked up at call time: tests put a SimulatedDevice there
    try:
        check_run_cost(dit, device, batch, image, text_tokens, steps * calls, passes + extra, what, work,
                       stacklevel=3, held_bytes=held)
    except ValueError as e:
        raise NodeInputError(f"{node}: {e}") from None


def dit_tiling(node: str, model: DiTHandle, tiled_dit: bool, tile_size: int, tile_stride: int) -> DiTTiling | None:
    """The sampler's tiled-DiT inputs as a DiTTiling (None when off); refused with TeaCache, as the pipeline does."""
    if not tiled_dit:
        return None
    if model.tea_cache_l1_thresh is not None:
        raise NodeInputError(f"{node}, input 'tiled_dit': the model has TeaCache (FLUX TeaCache (FluxCore)), which "
                             f"follows one DiT call per step, and the tiled DiT makes one call per tile: remove the "
                             f"TeaCache node (or set its rel_l1_thresh to 0), or turn tiled_dit off.")
    try:
        return DiTTiling(int(tile_size), int(tile_stride))
    except ValueError as e:
        raise NodeInputError(f"{node}, inputs 'tile_size' and 'tile_stride': {e}") from None


def latent_mask(noise_mask: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
    """A SetLatentNoiseMask mask ((H, W), (B, H, W) or (B, 1, H, W), any resolution) as (B, 1, h, w) in [0, 1]."""
    m = noise_mask.float()
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    if m.shape[0] != batch:
        m = m.repeat((batch + m.shape[0] - 1) // m.shape[0], 1, 1, 1)[:batch]
    return m


def encoded_reference_extras(extras: DiTExtras | None, encoded: EncodedText | None, batch: int) -> DiTExtras | None:
    """The reference latents of a conditioning encoder (Step1X-Edit's image to edit, at index 0) after the Kontext
    references."""
    if encoded is None or not encoded.reference_latents:
        return extras
    return with_references(extras, list(encoded.reference_latents), batch, index=0)


def check_conditioning(node: str, dit, batch: int, **sides) -> None:
    """Conditioning that cannot drive this DiT (another model's, or a batch that does not fit) is refused by name.
    Conditioning made per DiT call (Step1X-Edit's) is checked at its first call."""
    params = dit.params
    for name, embeds in sides.items():
        if embeds is None:
            continue
        embeds = embeds.at(DiTCall())
        tokens, pooled = embeds.prompt_emb, embeds.pooled
        if tokens.shape[-1] != params.context_in_dim or pooled.shape[-1] != params.vec_in_dim:
            raise NodeInputError(
                f"{node}, input '{name}': tokens of width {tokens.shape[-1]} and pooled output of width "
                f"{pooled.shape[-1]} are not this FLUX model's ({params.context_in_dim} and {params.vec_in_dim}); "
                f"encode the prompt with FluxCore Text Encode or CLIPTextEncodeFlux and FLUX's text encoders.")
        if batch % tokens.shape[0]:
            raise NodeInputError(f"{node}, input '{name}': {tokens.shape[0]} prompts cannot be spread over a latent "
                                 f"batch of {batch}; use one prompt, or as many as the batch.")


@dataclass
class AdapterInputs:
    """What a run's conditioning asks of FluxCore's adapters, read and checked against the DiT (nothing encoded yet):
    ControlNet / InfiniteYou and IP-Adapter payloads with their branches, LoRA-Encoder adapters, EliGen entities by
    branch."""
    controlnets: list
    ipadapters: list
    lora_tokens: list
    entities: dict


def read_adapter_inputs(node: str, sides: dict, dit, h: int, w: int) -> AdapterInputs:
    """The adapter inputs of `sides` ({"positive": conditioning, "negative": ...}) for a latent of (h, w), every
    check that needs no encoding done (before the cost check and before anything is placed)."""
    controlnets = controlnet_payloads(node, sides)
    ip_payloads = ipadapter_payloads(node, sides)
    check_ipadapter_payloads(node, ip_payloads, dit)  # before any image is encoded
    lora_tokens = lora_encoder_adapters(node, sides, dit)
    entities = entities_by_branch(node, sides)
    check_entities(node, entities, dit, h * 8, w * 8)
    return AdapterInputs(controlnets, ip_payloads, lora_tokens, entities)


def build_adapters(node: str, model: DiTHandle, wanted: AdapterInputs, sides: dict, b: int, h: int, w: int,
                   sigmas: torch.Tensor, vae_tiling: dict, device, channels: bool = True) -> tuple[list, list]:
    """(the run's adapters in the pipeline's order, the ControlNet handles they compute with): images encoded,
    identities and IP-Adapter keys made. The FluxCore sampler and the native MODEL path (nodes/native_model.py) both
    build them here. `channels` False leaves out the DiT's extra input channels (a native FLUX.1-Fill MODEL gets them
    from ComfyUI's own concat_cond)."""
    dit = model.model.module
    adapters, controlnets = controlnet_adapters(node, wanted.controlnets, dit, b, h, w, vae_tiling, device)
    # LoRA-Encoder tokens join the prompt first: ControlNets and EliGen's global segment see them (the pipeline's
    # order).
    adapters = wanted.lora_tokens + with_identities(wanted.controlnets, adapters, model)
    adapters += ipadapter_adapters(node, wanted.ipadapters, model)
    # FLEX.2 / Fill: the DiT's extra input channels (their images VAE-encoded here, before the DiT is placed)
    if channels:
        adapters += channel_adapters(node, sides, dit, b, h, w, sigmas, vae_tiling, device)
    adapters += eligen_adapters(wanted.entities, h * 8, w * 8, device)  # last: ControlNets see the plain prompt
    return adapters, controlnets


class FluxCoreSampler:
    CATEGORY = "FluxCore/sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "Samples a FLUX latent (text-to-image, image-to-image with denoise < 1, inpainting with a noise mask)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (DIT_TYPE, {"tooltip": "From Load FLUX DiT (FluxCore), optionally through LoRA/TeaCache nodes."}),
            "positive": ("CONDITIONING", {"tooltip": "FluxCore Text Encode or native CLIPTextEncodeFlux/FluxGuidance."}),
            "negative": ("CONDITIONING", {"tooltip": "Used only when cfg > 1 (true classifier-free guidance)."}),
            "latent_image": ("LATENT", {"tooltip": "Empty latent, or a VAE-encoded image (denoise < 1); "
                                                   "a noise_mask limits the change to the masked area."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Noise seed (noise drawn on the CPU: the same image on any GPU)."}),
            "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                              "tooltip": "True CFG scale; above 1 runs the negative prompt too (twice the time)."}),
            "embedded_guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "FLUX.1-dev's distilled guidance; -1 takes it from the "
                                                       "conditioning (FluxGuidance / text encode), 3.5 if unset."}),
            "sigma_shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1,
                                      "tooltip": "Schedule shift (DiffSynth-Studio's FLUX default 3)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 starts from pure noise; less keeps more of the input latent."}),
        }, "optional": {
            "tiled_dit": ("BOOLEAN", {"default": False, "tooltip":
                          "Run the DiT (and its ControlNets) in overlapping tiles, blended: for 2048x2048 and "
                          "larger (e.g. the upscaler ControlNet). Control images are then VAE-encoded tiled too. "
                          "Not with TeaCache."}),
            "tile_size": ("INT", {"default": 128, "min": 16, "max": 512, "step": 2, "tooltip":
                          "With tiled_dit: tile side in latent pixels (x8 in image pixels; 128 = 1024 px); even."}),
            "tile_stride": ("INT", {"default": 64, "min": 8, "max": 512, "step": 2, "tooltip":
                            "With tiled_dit: distance between tiles in latent pixels; overlaps are blended."}),
            "eligen_inpaint": ("BOOLEAN", {"default": False, "tooltip":
                               "EliGen inpaint mode (DiffSynth's eligen_enable_inpaint): only the regions of the "
                               "EliGen Entity nodes on 'positive' change; latent_image must be a VAE-encoded image, "
                               "kept as it is outside them (denoise 1 redraws the regions from noise)."}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg=1.0, embedded_guidance=-1.0,
               sigma_shift=3.0, denoise=1.0, tiled_dit=False, tile_size=128, tile_stride=64, eligen_inpaint=False):
        node = "FluxCoreSampler"
        samples = latent_image["samples"]
        if samples.ndim != 4 or samples.shape[1] != 16:
            raise NodeInputError(f"{node}, input 'latent_image': a FLUX latent has 16 channels, got shape "
                                 f"{tuple(samples.shape)}; use a FLUX VAE / an SD3-style empty latent.")
        b, _, h, w = samples.shape
        if h % 2 or w % 2:
            raise NodeInputError(f"{node}, input 'latent_image': image size {w * 8}x{h * 8} is not a multiple of 16 "
                                 f"(FLUX packs 2x2 latent patches); use {w // 2 * 16}x{h // 2 * 16}.")
        positive_embeds, cond_guidance, references, encoded = read_conditioning(node, "positive", positive)
        negative_read = read_conditioning(node, "negative", negative) if cfg != 1.0 else None
        negative_embeds = negative_read[0] if negative_read is not None else None
        encoded_sides = [e for e in (encoded, negative_read and negative_read[3]) if e is not None]
        sides = {"positive": positive, **({"negative": negative} if cfg != 1.0 else {})}
        warn_unused_entries(node, sides)
        tiling = dit_tiling(node, model, tiled_dit, tile_size, tile_stride)
        guidance = embedded_guidance if embedded_guidance >= 0 else cond_guidance

        check_conditioning(node, model.model.module, b, positive=positive_embeds, negative=negative_embeds)
        # Everything that can fail on the inputs is done before the DiT is placed on the device (the references
        # and the mask on the CPU), so a refusal never leaves its layers there.
        try:
            extras = (reference_extras([FLUX_LATENT.raw_to_scaled(r.float()) for r in references], b)
                      if references else None)
            extras = encoded_reference_extras(extras, encoded, b)
        except ValueError as e:
            raise NodeInputError(f"{node}, input 'positive' (reference_latents): {e}") from None
        sigmas = flux_sigmas(steps, denoise, sigma_shift)
        device = bridge.compute_device()
        wanted = read_adapter_inputs(node, sides, model.model.module, h, w)
        region = eligen_inpaint_region(node, wanted.entities, samples) if eligen_inpaint else None
        reference_tokens = extras.ref_tokens.shape[1] if extras is not None else 0  # odd sides padded: exact
        check_sampler_cost(node, model.model.module, b, h, w, positive_embeds.tokens, reference_tokens,
                           len(sigmas), passes=2 if negative_embeds is not None else 1, tiling=tiling,
                           controlnets=wanted.controlnets, ipadapters=wanted.ipadapters, entities=wanted.entities,
                           negative_text_tokens=(None if negative_embeds is None
                                                 else negative_embeds.tokens),
                           appended_tokens=sum(a.tokens.shape[1] for a in wanted.lora_tokens))
        vae_tiling = ({} if tiling is None else
                      dict(tiled=True, tile_size=tiling.tile_size, tile_stride=tiling.tile_stride))
        adapters, controlnets = build_adapters(node, model, wanted, sides, b, h, w, sigmas, vae_tiling, device)
        mask = latent_mask(latent_image["noise_mask"], b, h, w) if "noise_mask" in latent_image else None
        x0 = FLUX_LATENT.raw_to_scaled(samples.float()).to(device)
        noise = make_noise(b, h * 8, w * 8, seed, "cpu", device)
        start = noise if denoise >= 1.0 else add_noise(x0, noise, float(sigmas[0]))
        if mask is not None:
            mask = mask.to(device)
            start = mask * start + (1 - mask) * add_noise(x0, noise, float(sigmas[0]))
        if extras is not None:
            extras = replace(extras, ref_tokens=extras.ref_tokens.to(device), ref_ids=extras.ref_ids.to(device))
        extras, negative_extras, tea_stats = tea_cache_extras(extras, len(sigmas), model.tea_cache_l1_thresh,
                                                              cfg=negative_embeds is not None)

        last = {}

        if region is not None:
            region = region.to(device)

        def velocity(x: torch.Tensor, call) -> torch.Tensor:
            v = guided_velocity(dit, x, call, positive_embeds, negative_embeds, cfg, guidance, extras,
                                negative_extras, adapters, tiling)
            last["v"] = v if region is None else inpaint_velocity(v, x, x0, region, call.sigma)
            return last["v"]

        progress, previewer, nexts = bridge.Progress(steps), bridge.latent_previewer(), next_sigmas(sigmas)

        def after_step(i: int, total: int, x: torch.Tensor):
            if mask is not None:
                x = mask * x + (1 - mask) * add_noise(x0, noise, float(nexts[i]))
            # The preview shows the predicted clean image, x0 = x - sigma * v (as ComfyUI's samplers do).
            progress.update(i + 1, previewer(x - float(nexts[i]) * last["v"]) if previewer else None)
            bridge.check_interrupt()
            return x

        release_controlnets = None
        try:
            dit = prepare_dit(model)
            fusion = model.lora_fusion  # the patcher computes beside the DiT, placed as its ControlNets are
            step_models = [h for e in encoded_sides for h in e.step_models]  # e.g. Step1X-Edit's connector
            release_controlnets = place_beside_dit(model, controlnets + ([fusion] if fusion is not None else [])
                                                   + step_models)
            masked = bool(wanted.entities)  # EliGen's attention masks: flash attention takes none
            compute_dtype = stored_compute_dtype(dit)
            log_attention_once(log, "FluxCoreSampler", device, compute_dtype, masked, _REPORTED_ATTENTION)
            # The kernels are fixed when a compiled block is traced: its first call happens inside (the first step).
            with torch.no_grad(), attention_backend(device, compute_dtype, masked):
                final = run_denoise(start, sigmas, velocity, None, after_step)
        finally:  # also after Cancel (raised from after_step), a LoRA that fails to apply, or an error: an
            if release_controlnets is not None:  # offloaded DiT and its ControlNets give their VRAM back
                release_controlnets()
            release_dit(model)
            if bridge.IN_COMFYUI:  # the DiT's container also serves native MODELs: FluxCore's LoRAs and its VRAM
                unload_loras(model.model.module)  # manager's placement go with the run, so ComfyUI finds the DiT
                vram_nodes.drop_placement(model.model.module)  # as loaded

        for stats in tea_stats.values():
            log.info("%s: %s", node, stats)
        out = dict(latent_image)
        out["samples"] = FLUX_LATENT.scaled_to_raw(final).cpu()
        return (out,)


class FluxCoreEmptyLatent:
    CATEGORY = "FluxCore/latent"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = "An empty 16-channel FLUX latent (same as native EmptySD3LatentImage)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16, "tooltip": "Multiple of 16."}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16, "tooltip": "Multiple of 16."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    def generate(self, width, height, batch_size=1):
        for name, value in (("width", width), ("height", height)):
            if value % 16:
                raise NodeInputError(f"FluxCoreEmptyLatent, input '{name}': {value} is not a multiple of 16; use "
                                     f"{value // 16 * 16} or {value // 16 * 16 + 16}.")
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


class FluxCoreSigmas:
    CATEGORY = "FluxCore/sampling"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "schedule"
    DESCRIPTION = ("FluxCore's (DiffSynth-Studio's) FLUX schedule as native SIGMAS, for SamplerCustom / "
                   "SamplerCustomAdvanced on a FluxCore MODEL: with the euler sampler they give FLUX Sampler "
                   "(FluxCore)'s result for the same seed, steps, denoise and sigma_shift.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Denoising steps."}),
            "sigma_shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1,
                                      "tooltip": "Schedule shift, as in FLUX Sampler (FluxCore) (DiffSynth's 3)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 starts from pure noise; less keeps more of the input latent."}),
        }}

    def schedule(self, steps, sigma_shift=3.0, denoise=1.0):
        return (torch.cat((flux_sigmas(int(steps), float(denoise), float(sigma_shift)), torch.zeros(1))),)


NODE_CLASS_MAPPINGS = {"FluxCoreSampler": FluxCoreSampler, "FluxCoreEmptyLatent": FluxCoreEmptyLatent,
                       "FluxCoreSigmas": FluxCoreSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreSampler": "FLUX Sampler (FluxCore)",
                              "FluxCoreEmptyLatent": "Empty FLUX Latent (FluxCore)",
                              "FluxCoreSigmas": "FLUX Sigmas (FluxCore)"}
