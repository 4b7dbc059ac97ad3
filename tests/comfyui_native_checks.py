"""Checks of FluxCore's DiT as a native MODEL, run inside a real ComfyUI's Python (not collected by pytest: ComfyUI's
own top-level `nodes` and `tests` would clash with this repository's). tests/test_comfyui_native.py runs it as

    python tests/comfyui_native_checks.py COMFYUI_DIR FILES_DIR CHECK

where FILES_DIR holds what that test wrote with this repository's tiny-model helpers (dit.safetensors: BFL names;
lora.safetensors: kohya), and CHECK names one function below. Each check raises on a failure and prints one line of
numbers. ComfyUI's own Flux is built from its classes with the tiny sizes spelled out (its checkpoint detection
assumes FLUX.1's widths) and loaded from the same file.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

COMFYUI_DIR, FILES, CHECK = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(COMFYUI_DIR))
sys.path.append(str(REPO))  # flux_core, lora_tools (appended: ComfyUI's `nodes` and `tests` stay ComfyUI's)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

spec = importlib.util.spec_from_file_location("FluxCore", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(spec)
sys.modules["FluxCore"] = pack
spec.loader.exec_module(pack)  # as ComfyUI imports a custom node pack: `from .nodes import ...`

from FluxCore.nodes import comfy_bridge as bridge  # noqa: E402
from FluxCore.nodes.handles import DiTHandle  # noqa: E402
from FluxCore.nodes.native_model import managed_dit, native_model, unet_config  # noqa: E402
from flux_core.loading.loader import load_model  # noqa: E402

assert bridge.IN_COMFYUI
TINY = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=32,
            mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
            patch_size=2, qkv_bias=True, guidance_embed=True)


def comfy_flux(weight_dtype=torch.float32, manual_cast=None):
    """ComfyUI's own Flux (comfy.ldm.flux.model.Flux) with the tiny sizes, weights from dit.safetensors (cast to
    `weight_dtype`; with `manual_cast` its layers compute in that dtype, as for ComfyUI's fp8 weight options)."""
    config = comfy.supported_models.Flux(dict(TINY))
    config.set_inference_dtype(weight_dtype, manual_cast)
    model = config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(load_file(str(FILES / "dit.safetensors")),
                                                                strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def fluxcore_handle(torch_dtype=torch.float32, weight_dtype=None) -> DiTHandle:
    dit = load_model(FILES / "dit.safetensors", config={"axes_dim": (4, 6, 6)}, torch_dtype=torch_dtype, kind="dit",
                     weight_dtype=weight_dtype)
    return DiTHandle(managed_dit(dit), "dit.safetensors")


def conditioning(seed: int, guidance: float = 3.5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                  "guidance": guidance}]]


def call_inputs(seed: int, batch: int = 1, h: int = 8, w: int = 10):
    """x, context, pooled vector of one apply_model call."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, h, w, generator=g), torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 32,
                                                                                                         generator=g)


def sample(model, sampler: str, scheduler: str, cfg: float, steps: int = 4, negative_guidance: float = 2.0):
    latent = torch.zeros(1, 16, 8, 10)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, conditioning(1),
                               conditioning(2, negative_guidance), latent, denoise=1.0, seed=7)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_config():
    handle = fluxcore_handle()
    ours = {k: v for k, v in unet_config(handle.model.module.params).items() if k != "disable_unet_model_creation"}
    assert ours == TINY, (ours, TINY)
    keys = set(native_model(handle).model.state_dict())
    theirs = set(comfy_flux().model.state_dict())
    assert {k for k in keys if k.startswith("diffusion_model.")} == {k for k in theirs
                                                                       if k.startswith("diffusion_model.")}
    print("config and key set equal ComfyUI's")


def check_apply_model():
    ours, theirs = native_model(fluxcore_handle()), comfy_flux()
    x, ctx, y = call_inputs(3, batch=2, h=9, w=11)
    g = torch.Generator().manual_seed(3)
    refs = [torch.randn(2, 16, 6, 4, generator=g), torch.randn(2, 16, 4, 8, generator=g)]  # the batch's, as ComfyUI's
    worst = 0.0
    for kwargs in ({}, {"ref_latents": refs[:1]}, *({"ref_latents": refs, "ref_latents_method": method}
                                                      for method in ("offset", "index", "uxo"))):
        out = [m.model.apply_model(x, torch.tensor([0.7, 0.7]), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5, 3.5]),
                                   **kwargs) for m in (ours, theirs)]
        worst = max(worst, rel(*out))
        assert rel(*out) <= 1e-5, (kwargs.keys(), rel(*out))
    print(f"apply_model equals ComfyUI's Flux: worst relative difference {worst:.2e}")


def check_guidance():
    """Through the MODEL's extra_conds a bf16 DiT embeds the conditioning's guidance as given (3.2), not its bf16
    cast (3.203125, what _apply_model makes of the guidance tensor)."""
    from flux_core.native_forward import native_forward
    handle = fluxcore_handle(torch.bfloat16)
    model = native_model(handle)
    x, ctx, y = call_inputs(8)
    conds = model.model.extra_conds(pooled_output=y, guidance=3.2, cross_attn=ctx, noise=x, device=torch.device("cpu"),
                                    latent_image=x)
    kwargs = {k: c.process_cond(batch_size=1, area=None).cond for k, c in conds.items()}
    sigma = torch.tensor([0.6])
    got = model.model.apply_model(x, sigma, **kwargs)
    with torch.no_grad():
        v = {g: native_forward(handle.model.module, x.to(torch.bfloat16), sigma, ctx, y, g) for g in (3.2, 3.203125)}
    assert torch.equal(got, x - 0.6 * v[3.2]), rel(got, x - 0.6 * v[3.2])
    assert not torch.equal(got, x - 0.6 * v[3.203125])
    print("guidance reaches a bf16 DiT as the conditioning's float")


def check_sample():
    import comfy.patcher_extension as ext
    ours, theirs = native_model(fluxcore_handle()), comfy_flux()
    chunks = []

    def probe(executor, *args, **kwargs):  # what the MODEL's calls batch: one entry per call
        chunks.append(len(args[7]["cond_or_uncond"]))
        return executor(*args, **kwargs)
    ours.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "probe", probe)
    # the negative's guidance 2.0 keeps cond and uncond in two model calls; 3.5 lets ComfyUI batch them in one
    for sampler, scheduler, cfg, negative in (("euler", "simple", 2.0, 2.0), ("dpmpp_2m", "beta", 2.5, 2.0),
                                              ("euler", "simple", 2.0, 3.5)):
        chunks.clear()
        a, b = (sample(m, sampler, scheduler, cfg, negative_guidance=negative) for m in (ours, theirs))
        assert set(chunks) == {2 if negative == 3.5 else 1}, chunks
        assert rel(a, b) <= 1e-5, (sampler, rel(a, b))
        print(f"comfy.sample {sampler}/{scheduler} cfg {cfg} (negative guidance {negative}): relative difference "
              f"{rel(a, b):.2e}")


def check_lora_and_leaks():
    """Native LoRA (LoraLoaderModelOnly's call) equals FluxCore's LoRA on the same DiT; neither leaks into the other."""
    from flux_core.lora import clear_lora, load_lora
    from flux_core.native_forward import native_forward
    from FluxCore.nodes.sampler import FluxCoreSampler
    handle = fluxcore_handle()
    dit = handle.model.module
    original = {k: v.clone() for k, v in dit.state_dict().items()}
    plain_model = native_model(handle)
    plain = sample(plain_model, "euler", "simple", 1.0)
    lora_sd = comfy.utils.load_torch_file(str(FILES / "lora.safetensors"), safe_load=True)
    with_lora, _ = comfy.sd.load_lora_for_models(native_model(handle), None, lora_sd, 0.8, 0)
    native_lora = sample(with_lora, "euler", "simple", 1.0)
    # FluxCore's own LoRA on a separate copy of the DiT, same forward: the reference for the native LoRA
    copy = load_model(FILES / "dit.safetensors", config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")
    load_lora(copy, str(FILES / "lora.safetensors"), alpha=0.8)
    x, ctx, y = call_inputs(5)
    mm.load_models_gpu([with_lora])
    theirs = with_lora.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx, y=y, guidance=torch.tensor([3.5]))
    with torch.no_grad():
        ours = x - 0.6 * native_forward(copy, x, torch.tensor([0.6]), ctx, y, 3.5)
    assert rel(theirs, ours) <= 1e-5, rel(theirs, ours)
    assert rel(native_lora, plain) > 1e-3  # the LoRA changed the picture
    # FluxCore's sampler after the native LoRA run: it loads the container, which takes the native patches off
    latent = {"samples": torch.zeros(1, 16, 8, 10)}
    FluxCoreSampler().sample(handle, conditioning(1), conditioning(2), latent, seed=3, steps=2)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, original[k]), f"native LoRA left in {k}"
    # ... also when FluxCore's VRAM manager places the DiT (offload: it stores the weights itself)
    from FluxCore.nodes.vram_nodes import VRAMOptions
    sample(with_lora, "euler", "simple", 1.0)
    offloaded = dataclasses.replace(handle, vram=VRAMOptions(offload=True, vram_limit=0.0))
    FluxCoreSampler().sample(offloaded, conditioning(1), conditioning(2), latent, seed=3, steps=2)
    for k, v in dit.state_dict().items():
        assert torch.equal(v, original[k]), f"native LoRA left in {k} (VRAM manager)"
    # ... and FluxCore's own LoRA (fused by its sampler) is gone again for a native run
    FluxCoreSampler().sample(handle.with_lora(str(FILES / "lora.safetensors"), 1.0), conditioning(1), conditioning(2),
                             latent, seed=3, steps=2)
    again = sample(native_model(handle), "euler", "simple", 1.0)
    assert torch.equal(again, plain), rel(again, plain)
    clear_lora(copy)
    print(f"native LoRA vs FluxCore LoRA: {rel(theirs, ours):.2e}; no leak either way")


def check_handover():
    """KSampler, then FLUX Sampler (FluxCore) with VRAM options, then KSampler on the same MODEL: FluxCore's VRAM
    manager takes the DiT out of ComfyUI's record first (ComfyUI loads it again for the next native run, with the same
    result); a DiT converted to FP8 in place by VRAM Options under a MODEL made before is refused by name."""
    from FluxCore.nodes.sampler import FluxCoreSampler
    from FluxCore.nodes.vram_nodes import VRAMOptions
    handle = fluxcore_handle()
    model = native_model(handle)
    first = sample(model, "euler", "simple", 1.0)
    latent = {"samples": torch.zeros(1, 16, 8, 10)}
    FluxCoreSampler().sample(dataclasses.replace(handle, vram=VRAMOptions(offload=True)), conditioning(1),
                             conditioning(2), latent, seed=3, steps=2)
    assert not any(m.model.is_clone(handle.model.patcher) for m in mm.current_loaded_models)
    again = sample(model, "euler", "simple", 1.0)
    assert torch.equal(again, first), rel(again, first)
    FluxCoreSampler().sample(dataclasses.replace(handle, vram=VRAMOptions(weight_dtype="fp8_e4m3fn")),
                             conditioning(1), conditioning(2), latent, seed=3, steps=2)
    try:
        sample(model, "euler", "simple", 1.0)
    except Exception as e:  # ComfyUI's sampler passes the node's error on
        assert "stored in FP8 after this MODEL was made" in str(e), e
    else:
        raise AssertionError("an FP8-converted DiT ran under a MODEL without manual cast")
    print("KSampler -> FluxCore with VRAM options -> KSampler: equal; FP8 converted in place: refused by name")


def check_model_nodes():
    """ModelSamplingFlux and EasyCache (ComfyUI's own nodes) on the MODEL equal them on ComfyUI's own Flux; EasyCache
    at a threshold that skips steps changes the result (its DIFFUSION_MODEL wrapper runs around our forward)."""
    from comfy_extras.nodes_easycache import EasyCacheNode
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    runs = {}
    for name, model in (("ours", native_model(fluxcore_handle())), ("theirs", comfy_flux())):
        shifted, = ModelSamplingFlux().patch(model, 1.15, 0.5, 80, 64)
        cached = EasyCacheNode.execute(shifted, 3.0, 0.0, 1.0, False)[0]
        runs[name] = (sample(shifted, "euler", "simple", 1.0, steps=8), sample(cached, "euler", "simple", 1.0, steps=8))
    (plain, fast), (plain_c, fast_c) = runs["ours"], runs["theirs"]
    assert rel(plain, plain_c) <= 1e-5 and rel(fast, fast_c) <= 1e-5, (rel(plain, plain_c), rel(fast, fast_c))
    assert rel(fast, plain) > 1e-2, rel(fast, plain)
    print(f"ModelSamplingFlux: {rel(plain, plain_c):.2e}, + EasyCache: {rel(fast, fast_c):.2e} from ComfyUI's Flux")


def comfy_controlnet():
    """ComfyUI's own FLUX ControlNet (InstantX's layout, as comfy.controlnet.load_controlnet_flux_instantx builds it)
    at the tiny sizes, from controlnet.safetensors (diffusers names); it takes its control as a latent."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.ops
    sd = load_file(str(FILES / "controlnet.safetensors"))
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    converted.update(sd)
    model = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, control_latent_channels=16,
                                                     operations=comfy.ops.disable_weight_init, device="cpu",
                                                     dtype=torch.float32, **TINY)
    missing, _ = model.load_state_dict(converted, strict=False)
    assert not missing, missing
    return comfy.controlnet.ControlNet(model, compression_ratio=1, load_device=mm.get_torch_device(),
                                       extra_conds=["y", "guidance"])


def check_native_controlnet():
    """ComfyUI's Apply ControlNet (Advanced) with ComfyUI's own ControlNet on the MODEL equals it on ComfyUI's Flux."""
    from nodes import ControlNetApplyAdvanced  # ComfyUI's nodes.py
    hint = torch.randn(1, 8, 10, 16, generator=torch.Generator().manual_seed(6))  # (B, H, W, C) as IMAGE is
    runs = []
    for model in (native_model(fluxcore_handle()), comfy_flux()):
        positive, negative = ControlNetApplyAdvanced().apply_controlnet(conditioning(1), conditioning(2, 2.0),
                                                                        comfy_controlnet(), hint, 0.8, 0.0, 1.0)
        latent = torch.zeros(1, 16, 8, 10)
        runs.append(comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 7), 4, 2.0, "euler", "simple",
                                        positive, negative, latent, seed=7))
        runs.append(sample(model, "euler", "simple", 2.0))
    (ours, ours_plain), (theirs, _) = runs[:2], runs[2:]
    assert rel(ours, theirs) <= 1e-5, rel(ours, theirs)
    assert rel(ours, ours_plain) > 1e-2, rel(ours, ours_plain)
    print(f"ComfyUI's ControlNet on the MODEL: {rel(ours, theirs):.2e} from ComfyUI's Flux "
          f"(the ControlNet moves the result by {rel(ours, ours_plain):.2e})")


def check_fp8():
    """A DiT stored in FP8 (Load FLUX DiT (FluxCore)'s weight_dtype) computes through ComfyUI's manual cast in bf16 on
    the MODEL path: equal to ComfyUI's own Flux with fp8_e4m3fn weights and a bf16 manual cast."""
    fp8 = torch.float8_e4m3fn
    ours = native_model(fluxcore_handle(torch.bfloat16, fp8))
    theirs = comfy_flux(fp8, torch.bfloat16)
    x, ctx, y = call_inputs(4)
    outs = []
    for model in (ours, theirs):  # no guidance: ComfyUI's own Flux embeds a bf16 guidance (3.5 x 1000 -> 3504)
        mm.load_models_gpu([model])
        outs.append(model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=y).float())
    exact = comfy_flux(fp8, torch.float32)  # the same FP8 weights computed in float32: bf16's own rounding
    mm.load_models_gpu([exact])
    reference = exact.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=y).float()
    ours_error, theirs_error = rel(outs[0], reference), rel(outs[1], reference)
    # two bf16 implementations round differently: each is as close to the float32 result as the other
    assert ours_error <= 1.5 * theirs_error and rel(*outs) <= 1e-2, (ours_error, theirs_error, rel(*outs))
    assert all(p.dtype == fp8 for n, p in ours.model.named_parameters() if n.endswith("qkv.weight"))
    print(f"fp8 weights, bf16 manual cast: {rel(*outs):.2e} from ComfyUI's Flux; from float32 compute: ours "
          f"{ours_error:.2e}, ComfyUI's {theirs_error:.2e}")


def check_partial_load():
    """A lowvram load at 40 % of the weights: every Linear it leaves behind casts per call (ComfyUI's own rule for its
    FLUX layers); the other modules with weights are our RMSNorms, whose scale follows the input's device."""
    from flux_core.models.layers import RMSNorm
    model = native_model(fluxcore_handle())
    size = model.model_size()
    model.load(torch.device("cpu"), lowvram_model_memory=int(size * 0.4))
    linears = [m for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    cast = [m for m in linears if getattr(m, "comfy_cast_weights", False)]
    assert all(hasattr(m, "comfy_cast_weights") for m in linears)
    assert 0 < len(cast) < len(linears), (len(cast), len(linears))
    others = {type(m) for m in model.model.diffusion_model.modules()
              if list(m.parameters(recurse=False)) and not isinstance(m, torch.nn.Linear)}
    assert others <= {RMSNorm}, others
    out = sample(model, "euler", "simple", 1.0, steps=2)
    assert torch.isfinite(out).all()
    model.detach()
    print(f"partial load: {len(cast)} of {len(linears)} Linear layers cast per call")


if __name__ == "__main__":
    globals()[f"check_{CHECK}"]()
