"""The native MODEL path's `fluxcore_*` key translation (nodes/native_model.py), without ComfyUI: for each FluxCore
adapter (ControlNet, IP-Adapter, EliGen, LoRA-Encoder, InfiniteYou, FLEX.2), a CONDITIONING entry made by the real
Apply node, gathered by NativeAdapters.from_entry and run through flux_core.native_forward as one ComfyUI-style DiT
call, gives the same output as FluxCore's own sampler's DiT call (read_adapter_inputs / build_adapters /
predict_velocity) for that entry, on both CFG branches (cond_or_uncond); and the adapter changes the output, so no
case passes with the adapter left out. Also: entries without FluxCore keys, Step1X / Nexus-Gen text refused by name,
adapters built once per run, and the ComfyUI model class / unet_config chosen for a DiT config."""
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux_core.dit_inputs import DiTCall, PromptEmbeds
from flux_core.flex import FILL_CHANNELS, FLEX_CHANNELS
from flux_core.models.dit import FluxParams
from flux_core.models.lora_encoder import FluxLoraEncoder, LoraEncoderParams
from flux_core.native_forward import native_forward
from flux_core.sampling import predict_velocity
from flux_core.scheduler import flux_sigmas
from nodes.channel_nodes import FluxCoreFlexInputs
from nodes.conditioning import TEXT_KEY, FluxCoreTextEncode
from nodes.controlnet_nodes import CONTROLNETS_KEY, FluxCoreApplyControlNet, FluxCoreControlNetLoader
from nodes.eligen_nodes import ENTITIES_KEY, FluxCoreEliGenEntity
from nodes.handles import FaceEmbedding
from nodes.infiniteyou_nodes import FluxCoreApplyInfiniteYou, FluxCoreInfiniteYouLoader
from nodes.ipadapter_nodes import IPADAPTERS_KEY, FluxCoreApplyIPAdapter, FluxCoreIPAdapterLoader
from nodes.loaders import FluxCoreDiTLoader, NodeInputError
from nodes.lora_model_nodes import LORA_ENCODER_KEY, FluxCoreEncodeLora, FluxCoreLoraEncoderLoader
from nodes.native_model import NATIVE_NODE, NativeAdapters, native_class_name, unet_config
from nodes.sampler import build_adapters, read_adapter_inputs
from tests.tiny_comfy import load_node_models, make_models_dir
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_ipadapter import (face_embedding, instantx_state_dict, make_siglip, projector_state_dict,
                                  write_instantx, write_projector, write_siglip)
from tests.tiny_lora_models import randomize, write_site_lora
from tests.tiny_train import one_thread  # noqa: F401 (module-wide autouse: tiny models run faster on one thread)

H, W = 48, 64                      # pixels; latent 6 x 8
STEPS = 4
SIGMAS = flux_sigmas(STEPS, 1.0, 3.0)
NODE = "FluxCoreSampler"
INFUSENET, PROJECTOR = "infu/InfuseNetModel", "infu/image_proj_model.bin"
LORA = "style-kohya.safetensors"
# What the tiny FLUX DiT's LoRA-Encoder looks like (tests/tiny_lora_models.py's sizes, made with FluxCore's own module:
# DiffSynth is not needed): 2 double + 2 single blocks of width 32, tokens 32 wide, 2 heads of DiffSynth's 128.
TINY_ENCODER = LoraEncoderParams(depth=2, depth_single=2, hidden=32, mlp_hidden=128, embeds_per_lora=4, embed_dim=32,
                                 intermediate=64, num_layers=1, num_heads=2, head_dim=128, special_embeds=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native_adapters")
    models_dir, _ = make_models_dir(tmp)
    write_diffusers_controlnet(make_diffusers_controlnet(seed=22, num_layers=1, num_single_layers=0),
                               models_dir / "controlnet" / "tiny-plain")
    (models_dir / "ipadapter").mkdir()
    write_instantx(instantx_state_dict(seed=7), models_dir / "ipadapter" / "ip-adapter.bin")
    write_siglip(make_siglip(seed=5), models_dir / "clip_vision" / "siglip")
    infu = models_dir / "infinite_you"
    (infu / PROJECTOR).parent.mkdir(parents=True)
    write_projector(projector_state_dict(seed=9), infu / PROJECTOR)
    write_diffusers_controlnet(make_diffusers_controlnet(seed=10, num_layers=1, num_single_layers=1), infu / INFUSENET)
    for folder in ("lora_encoders", "loras"):
        (models_dir / folder).mkdir()
    encoder = randomize(FluxLoraEncoder(TINY_ENCODER), seed=0)
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()},
              str(models_dir / "lora_encoders" / "tiny-encoder.safetensors"))
    write_site_lora(models_dir / "loras" / LORA, "kohya", seed=10, alpha=2.0)
    make_diffusers_dit(seed=5, in_channels=FLEX_CHANNELS, out_channels=64, num_layers=8).save_pretrained(
        models_dir / "diffusion_models" / "tiny-flex")
    make_diffusers_dit(seed=6, in_channels=FILL_CHANNELS, out_channels=64).save_pretrained(
        models_dir / "diffusion_models" / "tiny-fill")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded["controlnet"], = FluxCoreControlNetLoader().load("tiny-plain")
    loaded["ipadapter"], = FluxCoreIPAdapterLoader().load("ip-adapter.bin", "siglip")
    loaded["infu"], = FluxCoreInfiniteYouLoader().load(PROJECTOR, INFUSENET)
    loaded["encoder"], = FluxCoreLoraEncoderLoader().load("tiny-encoder.safetensors")
    loaded["flex"] = FluxCoreDiTLoader().load("tiny-flex")[0]
    loaded["fill"] = FluxCoreDiTLoader().load("tiny-fill")[0]
    yield loaded
    mp.undo()


def encode(models, text):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=16)[0]


def picture(seed, size=(40, 30)):
    """A random 8-bit picture as the IMAGE LoadImage gives (another size than the latent's)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return torch.from_numpy(pixels.astype(np.float32) / 255)[None]


def box_mask(top, bottom, left, right):
    mask = torch.zeros(1, H, W)
    mask[:, top:bottom, left:right] = 1.0
    return mask


def latent(seed=0, batch=1):
    return torch.randn(batch, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def options(branch: int, sigmas=SIGMAS) -> dict:
    """A native sampler's transformer_options for one call: the run's sigmas (with the final 0), the call's branch."""
    return {"sample_sigmas": torch.cat((sigmas, torch.zeros(1))), "cond_or_uncond": [branch]}


def native_call(handle, conditioning, x, step, branch=0):
    """One ComfyUI-style DiT call for the entry conditioning[0] (branch: cond_or_uncond's 0 or 1), its adapters
    gathered and built as the native MODEL's extra_conds and DiTView do."""
    tokens, entry = conditioning[0]
    opts = options(branch)
    native = NativeAdapters.from_entry(handle, {**entry, "cross_attn": tokens})
    adapters = native.adapters_for(x, opts) if native is not None else ()
    with torch.no_grad():
        return native_forward(handle.model.module, x, SIGMAS[step].reshape(1), tokens, entry["pooled_output"],
                              entry.get("guidance", 3.5), transformer_options=opts, adapters=adapters)


def fluxcore_call(handle, sides, x, step, branch="positive"):
    """FluxCore's sampler's DiT call for `branch` of a run with `sides`, its adapters built by its own functions."""
    dit = handle.model.module
    b, _, h, w = x.shape
    wanted = read_adapter_inputs(NODE, sides, dit, h, w)
    built, _ = build_adapters(NODE, handle, wanted, sides, b, h, w, SIGMAS, {}, "cpu")
    tokens, entry = sides[branch][0]
    call = DiTCall(step=step, num_steps=STEPS, sigma=float(SIGMAS[step]), branch=branch)
    with torch.no_grad():
        return predict_velocity(dit, x, call, PromptEmbeds(tokens, entry["pooled_output"]), entry.get("guidance", 3.5),
                                adapters=built)


def plain_call(handle, conditioning, x, step, branch="positive"):
    """FluxCore's call for the entry with its FluxCore keys taken off: no adapter, except a FLEX.2 DiT's default
    channels (text-to-image), which it always needs."""
    tokens, entry = conditioning[0]
    stripped = [[tokens, {k: v for k, v in entry.items() if not k.startswith("fluxcore_")}]]
    return fluxcore_call(handle, {branch: stripped}, x, step, branch)


def assert_native_equals_fluxcore(handle, positive, negative, step, branch, x=None, changes=1e-2):
    """The entry of `branch`'s side through the native path equals FluxCore's sampler's call of that branch in a
    run with both sides, and differs from the call without adapters by more than `changes`."""
    x = latent() if x is None else x
    sides = {"positive": positive, "negative": negative}
    got = native_call(handle, sides[branch], x, step, branch={"positive": 0, "negative": 1}[branch])
    want = fluxcore_call(handle, sides, x, step, branch)
    assert got.shape == x.shape[:1] + (16,) + x.shape[2:] and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # measured 0 for every case (the same float32 ops)
    # The adapters' effect here: ControlNet ~3.1, InfiniteYou ~5, IP-Adapter ~0.7, EliGen ~0.7, FLEX.2 ~1,
    # LoRA-Encoder ~0.1 (measured max abs differences).
    plain = plain_call(handle, sides[branch], x, step, branch)
    assert (got - plain).abs().max().item() > changes
    return got, plain


# ---------------------------------------------------------------- the Apply nodes' payloads
def controlnet(models, end=1.0):
    return FluxCoreApplyControlNet().apply(encode(models, "a cat"), encode(models, "blurry"), models["controlnet"],
                                           picture(1), models["vae"], strength=0.8, start_percent=0.0,
                                           end_percent=end)


def ipadapter(models):
    return FluxCoreApplyIPAdapter().apply(encode(models, "a cat"), encode(models, "blurry"), models["ipadapter"],
                                          picture(2), 0.9, 0.0, 1.0)


def infiniteyou(models):
    return FluxCoreApplyInfiniteYou().apply(encode(models, "a cat"), encode(models, "blurry"), models["infu"],
                                            models["vae"], guidance=1.0, strength=1.0,
                                            face_embedding=FaceEmbedding(face_embedding(1).reshape(1, 1, 512), "f1"),
                                            control_image=picture(3))


def entities(models, conditioning):
    conditioning, = FluxCoreEliGenEntity().add(conditioning, models["te"], "a red cat", box_mask(0, 24, 8, 40))
    conditioning, = FluxCoreEliGenEntity().add(conditioning, models["te"], "a blue dog", box_mask(20, 48, 30, 64))
    return conditioning


def with_lora(models, conditioning, scale=1.0):
    return FluxCoreEncodeLora().encode(conditioning, models["encoder"], LORA, scale)[0]


def flex(models):
    mask = box_mask(8, 40, 16, 56)
    return FluxCoreFlexInputs().apply(encode(models, "a cat"), encode(models, "blurry"), models["vae"], 0.7, 0.5,
                                      picture(4, (W, H)), mask, picture(5))


# ---------------------------------------------------------------- one native call = FluxCore's call, per adapter
@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_controlnet(models, branch):
    """Apply ControlNet (FluxCore) puts one payload on both sides: the native path runs it on either branch."""
    positive, negative = controlnet(models)
    assert CONTROLNETS_KEY in positive[0][1]
    assert_native_equals_fluxcore(models["dit"], positive, negative, 1, branch)


def test_controlnet_step_range_follows_sample_sigmas(models):
    """end_percent 0.5 of 4 steps: active at step 1, not at step 3; the native call's step comes from the run's
    sample_sigmas, as FluxCore's sampler counts it."""
    positive, negative = controlnet(models, end=0.5)
    assert_native_equals_fluxcore(models["dit"], positive, negative, 1, "positive")
    x = latent()
    got = native_call(models["dit"], positive, x, 3)
    torch.testing.assert_close(got, fluxcore_call(models["dit"], {"positive": positive}, x, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, plain_call(models["dit"], positive, x, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_ipadapter(models, branch):
    """The positive branch gets the image's keys and values, the negative the zero encoding's (as under FluxCore's
    true CFG)."""
    positive, negative = ipadapter(models)
    assert IPADAPTERS_KEY in positive[0][1]
    assert_native_equals_fluxcore(models["dit"], positive, negative, 1, branch)


def test_ipadapter_branches_differ(models):
    """The native negative call of the positive entry is not the positive call: the branch reaches the adapter."""
    positive, _ = ipadapter(models)
    x = latent()
    pos = native_call(models["dit"], positive, x, 1, branch=0)
    neg = native_call(models["dit"], positive, x, 1, branch=1)
    assert (pos - neg).abs().max().item() > 1e-3


@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_infiniteyou(models, branch):
    positive, negative = infiniteyou(models)
    assert CONTROLNETS_KEY in positive[0][1]
    assert_native_equals_fluxcore(models["dit"], positive, negative, 1, branch)


@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_eligen(models, branch):
    """Entities chained onto one side only: that side's branch runs them, in FluxCore's sampler and natively."""
    positive, negative = encode(models, "a cat and a dog"), encode(models, "blurry")
    if branch == "positive":
        positive = entities(models, positive)
    else:
        negative = entities(models, negative)
    assert ENTITIES_KEY in {"positive": positive, "negative": negative}[branch][0][1]
    assert_native_equals_fluxcore(models["dit"], positive, negative, 1, branch)


def test_lora_encoder_positive(models):
    positive = with_lora(models, encode(models, "a cat"))
    assert LORA_ENCODER_KEY in positive[0][1]
    assert_native_equals_fluxcore(models["dit"], positive, encode(models, "blurry"), 1, "positive")


def test_lora_encoder_on_negative_is_not_used(models, caplog):
    """LoRA-Encoder tokens join the positive prompt only (nodes/lora_model_nodes.py, as in DiffSynth-Studio): an
    Encode LoRA on 'negative' changes nothing in FluxCore's sampler (which says so), and nothing on the native
    uncond call either."""
    positive, negative = encode(models, "a cat"), with_lora(models, encode(models, "blurry"))
    x = latent()
    native = NativeAdapters.from_entry(models["dit"], {**negative[0][1], "cross_attn": negative[0][0]})
    assert native is not None and native.entry.keys() == {LORA_ENCODER_KEY}
    got = native_call(models["dit"], negative, x, 1, branch=1)
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        want = fluxcore_call(models["dit"], {"positive": positive, "negative": negative}, x, 1, "negative")
    assert any("is not used" in r.getMessage() for r in caplog.records)
    plain = plain_call(models["dit"], negative, x, 1, "negative")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)


@pytest.mark.parametrize("step", [1, 3], ids=["control on", "control stopped"])
@pytest.mark.parametrize("branch", ["positive", "negative"])
def test_flex(models, branch, step):
    """FLEX.2 Inputs on both sides: the inpaint and control channels, the control part stopped (control_stop 0.5)
    at the sigma where FluxCore's sampler stops it."""
    positive, negative = flex(models)
    assert_native_equals_fluxcore(models["flex"], positive, negative, step, branch)


def test_flex_dit_without_inputs_gets_the_default_channels(models):
    """A FLEX.2 DiT always takes its extra channels from FluxCore: an entry without keys still gets NativeAdapters,
    whose call equals FluxCore's sampler's text-to-image default."""
    positive = encode(models, "a cat")
    native = NativeAdapters.from_entry(models["flex"], {**positive[0][1], "cross_attn": positive[0][0]})
    assert native is not None and native.entry == {}
    x = latent()
    got = native_call(models["flex"], positive, x, 1)
    torch.testing.assert_close(got, fluxcore_call(models["flex"], {"positive": positive}, x, 1), rtol=1e-5,
                               atol=1e-5)


def test_several_adapters_in_one_entry(models):
    """ControlNet, IP-Adapter, LoRA-Encoder and EliGen on one entry: the sampler's order, the same call."""
    positive, negative = controlnet(models)
    positive, negative = FluxCoreApplyIPAdapter().apply(positive, negative, models["ipadapter"], picture(2), 0.9,
                                                        0.0, 1.0)
    positive = entities(models, with_lora(models, positive))
    native = NativeAdapters.from_entry(models["dit"], {**positive[0][1], "cross_attn": positive[0][0]})
    assert native.entry.keys() == {CONTROLNETS_KEY, IPADAPTERS_KEY, LORA_ENCODER_KEY, ENTITIES_KEY}
    assert_native_equals_fluxcore(models["dit"], positive, negative, 2, "positive")


# ---------------------------------------------------------------- from_entry, adapters_for
def test_an_entry_without_fluxcore_keys_has_no_adapters(models):
    positive = encode(models, "a cat")
    assert NativeAdapters.from_entry(models["dit"], {**positive[0][1], "cross_attn": positive[0][0]}) is None
    assert NativeAdapters.from_entry(None, {**controlnet(models)[0][0][1]}) is None   # no handle: no FluxCore DiT
    # keys set to None (ComfyUI passes every key it knows) count as absent
    assert NativeAdapters.from_entry(models["dit"], {CONTROLNETS_KEY: None, "cross_attn": positive[0][0]}) is None


class SigmaScaledPrompt:
    """A conditioning made per DiT call (as Step1X-Edit's connector makes it): tokens scaled by the call's sigma."""

    def __init__(self, embeds):
        self.embeds = embeds

    def at(self, call):
        return PromptEmbeds(self.embeds.prompt_emb * (1 + call.sigma), self.embeds.pooled, self.embeds.text_ids)


def test_encoder_text_and_reference_give_fluxcore_sampler_call(models):
    """`fluxcore_text` (Step1X-Edit / Nexus-Gen Encode's EncodedText): the encoder's text per call and its reference
    latent at index 0, after the call's own references: FluxCore's sampler's call (its conditioning at the call and
    encoded_reference_extras), with a LoRA-Encoder on top that sees the encoder's text."""
    from nodes.conditioning import EncodedText
    from nodes.sampler import encoded_reference_extras
    base = encode(models, "make it blue")
    tokens, entry = base[0]
    reference = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(3))
    encoded = EncodedText(SigmaScaledPrompt(PromptEmbeds(tokens, entry["pooled_output"])),
                          reference_latents=(reference,))
    conditioning = with_lora(models, [[tokens, {**entry, TEXT_KEY: encoded}]])
    x, handle, step = latent(), models["dit"], 2
    got = native_call(handle, conditioning, x, step)
    dit = handle.model.module
    sides = {"positive": conditioning}
    wanted = read_adapter_inputs(NODE, sides, dit, x.shape[-2], x.shape[-1])
    adapters, _ = build_adapters(NODE, handle, wanted, sides, 1, x.shape[-2], x.shape[-1], SIGMAS, {}, "cpu")
    call = DiTCall(step=step, num_steps=STEPS, sigma=float(SIGMAS[step]))
    with torch.no_grad():
        want = predict_velocity(dit, x, call, encoded.conditioning, 3.5, encoded_reference_extras(None, encoded, 1),
                                adapters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = native_call(handle, base, x, step)
    assert (got - plain).abs().max() > 1e-2
    with pytest.raises(NodeInputError) as e:
        NativeAdapters.from_entry(handle, {TEXT_KEY: object(), "cross_attn": tokens}).adapters_for(x, options(0))
    assert TEXT_KEY in str(e.value) and NATIVE_NODE in str(e.value)


def test_adapters_are_built_once_per_run(models, monkeypatch):
    positive, _ = controlnet(models)
    native = NativeAdapters.from_entry(models["dit"], {**positive[0][1], "cross_attn": positive[0][0]})
    x = latent()
    first = native.adapters_for(x, options(0))
    assert first and native.adapters_for(x, options(1)) is first           # the other branch, same run
    assert native.adapters_for(x.clone(), options(0)) is first             # another latent of the same shape
    other_run = native.adapters_for(x, options(0, flux_sigmas(STEPS + 1, 1.0, 3.0)))
    assert other_run is not first and native.adapters_for(x, options(0)) is not first   # sigmas changed: rebuilt
    bigger = native.adapters_for(latent(batch=2), options(0))
    assert bigger is not first
    # The ControlNet's control latent is made for the latent's size: a batch of 2 runs natively as FluxCore does.
    x2 = latent(seed=1, batch=2)
    got = native_call(models["dit"], positive, x2, 1)
    torch.testing.assert_close(got, fluxcore_call(models["dit"], {"positive": positive}, x2, 1), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- ComfyUI's model class and unet_config
def tiny_params(**overrides) -> FluxParams:
    return FluxParams(**{**dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=32,
                                num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6)), **overrides})


@pytest.mark.parametrize("overrides, name", [
    ({}, "Flux"),                                         # dev / Krea / Kontext
    ({"guidance_embed": False}, "FluxSchnell"),
    ({"in_channels": FILL_CHANNELS}, "FluxInpaint"),      # FLUX.1-Fill: ComfyUI joins image and mask itself
    ({"in_channels": FILL_CHANNELS, "guidance_embed": False}, "FluxInpaint"),
    ({"in_channels": FLEX_CHANNELS}, "Flux"),             # FLEX.2: FluxCore fills the extra channels
])
def test_native_class_name(overrides, name):
    assert native_class_name(tiny_params(**overrides)) == name


@pytest.mark.parametrize("in_channels", [64, FLEX_CHANNELS, FILL_CHANNELS])
def test_unet_config_counts_channels_per_latent_pixel(in_channels):
    params = tiny_params(in_channels=in_channels, guidance_embed=False)
    config = unet_config(params)
    assert config["in_channels"] == in_channels // 4 and config["out_channels"] == 16
    assert config["image_model"] == "flux" and config["patch_size"] == 2
    assert (config["depth"], config["depth_single_blocks"], config["hidden_size"]) == (2, 3, 32)
    assert (config["vec_in_dim"], config["context_in_dim"], config["num_heads"]) == (32, 32, 2)
    assert config["axes_dim"] == [4, 6, 6] and config["guidance_embed"] is False
    assert config["disable_unet_model_creation"] is True


def test_odd_latent_sides_are_refused_for_spatial_adapters(models):
    """ComfyUI may hand an odd-sided latent (an image side a multiple of 8, not 16): native_forward pads it, but a
    ControlNet's control latent and EliGen's masks are made per 2x2 patch, so the run is refused naming the size."""
    positive, _ = controlnet(models)
    tokens, entry = positive[0]
    native = NativeAdapters.from_entry(models["dit"], {**entry, "cross_attn": tokens})
    odd = torch.zeros(1, 16, H // 8 - 1, W // 8)
    with pytest.raises(NodeInputError, match=rf"{W}x{H - 8}, not a multiple of 16.*fluxcore_controlnets"):
        native.adapters_for(odd, options(0))
    ip, _ = ipadapter(models)  # keys and values for every token: any size works
    tokens, entry = ip[0]
    assert NativeAdapters.from_entry(models["dit"], {**entry, "cross_attn": tokens}).adapters_for(odd, options(0))


def test_flux_sigmas_node_is_the_sampler_schedule_ending_at_zero():
    """FLUX Sigmas (FluxCore): FLUX Sampler (FluxCore)'s schedule for SamplerCustom, the final 0 a native sampler
    steps to included (FluxCore's loop steps to 0 after the last sigma)."""
    from flux_core.scheduler import flux_sigmas
    from nodes.sampler import FluxCoreSigmas
    sigmas, = FluxCoreSigmas().schedule(6, 2.5, 0.75)
    torch.testing.assert_close(sigmas, torch.cat((flux_sigmas(6, 0.75, 2.5), torch.zeros(1))), rtol=0, atol=0)
    assert sigmas.dtype == torch.float32 and len(sigmas) == 7 and sigmas[0] < 0.9  # denoise 0.75: below 1


def test_fill_channels_come_from_comfyui_on_a_native_model(models):
    """A FLUX.1-Fill MODEL (ComfyUI's FluxInpaint) gets its 80 extra channels joined to x by ComfyUI's own
    concat_cond: FluxCore's adapters on the conditioning add none (an IP-Adapter here), where FLUX Sampler (FluxCore)
    would add its default Fill channels."""
    from flux_core.flex import ChannelAdapter
    positive, _ = ipadapter(models)
    tokens, entry = positive[0]
    handle = models["fill"]
    adapters = NativeAdapters.from_entry(handle, {**entry, "cross_attn": tokens}).adapters_for(latent(), options(0))
    assert adapters and not any(isinstance(a, ChannelAdapter) for a in adapters)
    x = torch.cat((latent(), torch.randn(1, FILL_CHANNELS // 4 - 16, H // 8, W // 8,
                                         generator=torch.Generator().manual_seed(4))), dim=1)
    with torch.no_grad():
        got = native_forward(handle.model.module, x, SIGMAS[1].reshape(1), tokens, entry["pooled_output"], 3.5,
                             transformer_options=options(0), adapters=adapters)
        plain = native_forward(handle.model.module, x, SIGMAS[1].reshape(1), tokens, entry["pooled_output"], 3.5)
    assert got.shape == (1, 16, H // 8, W // 8) and (got - plain).abs().max() > 1e-2
