"""Load / Apply IP-Adapter (FluxCore) and the sampler's handling of `fluxcore_ipadapters`, on tiny models: the same
numbers as FluxImagePipeline's ipadapter_images (our own library, which tests/test_ipadapter_parity.py checks
against DiffSynth-Studio and diffusers; here the node layer is checked against it), the negative branch under true
CFG, several reference images, chaining, percents, VRAM placement and the errors."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.ipadapter import IPAdapterAdapter
from flux_core.model_config import ModelConfig
from flux_core.model_state import state_of
from flux_core.pipeline import FluxImagePipeline
from nodes import NODE_CLASS_MAPPINGS, comfy_bridge
from nodes.conditioning import FluxCoreTextEncode
from nodes.handles import IPADAPTER_TYPE
from nodes.ipadapter_nodes import IPADAPTERS_KEY, FluxCoreApplyIPAdapter, FluxCoreIPAdapterLoader
from nodes.loaders import NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir
from tests.tiny_ipadapter import (instantx_state_dict, make_clip_vision, make_siglip, projector_state_dict,
                                  write_instantx, write_projector, write_siglip, write_xlabs, xlabs_state_dict)

H, W = 48, 64
FILES = {"instantx": ("ip-adapter.bin", "siglip"), "xlabs": ("flux-ip-adapter.safetensors", "clip-vit-large")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_ip")
    models_dir, _ = make_models_dir(tmp)
    ipadapters, encoders = models_dir / "ipadapter", models_dir / "clip_vision"
    ipadapters.mkdir()
    write_instantx(instantx_state_dict(seed=7), ipadapters / FILES["instantx"][0])
    write_xlabs(xlabs_state_dict(seed=8), ipadapters / FILES["xlabs"][0])
    write_instantx(instantx_state_dict(seed=9, hidden=64), ipadapters / "other-dit.bin")   # made for a wider DiT
    write_projector(projector_state_dict(seed=10), ipadapters / "image_proj_model.bin")    # InfiniteYou's, misplaced
    write_siglip(make_siglip(seed=5), encoders / FILES["instantx"][1])
    make_clip_vision(seed=6).save_pretrained(encoders / FILES["xlabs"][1])
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded.update({family: FluxCoreIPAdapterLoader().load(*names)[0] for family, names in FILES.items()})
    pipes = {family: FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"])),
        ModelConfig(path=str(ipadapters / names[0])), ModelConfig(path=str(encoders / names[1]))])
        for family, names in FILES.items()}
    yield dict(dir=models_dir, pipes=pipes, **loaded)
    mp.undo()


def encode(models, text):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=16)[0]


def pictures(*seeds, size=(40, 30)):
    """Random 8-bit pictures as PIL images and as one IMAGE batch (as LoadImage gives them)."""
    pils = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            for s in seeds]
    return pils, torch.from_numpy(np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pils]))


def sample(models, positive, negative, steps=3, cfg=1.0, dit=None):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    return FluxCoreSampler().sample(dit or models["dit"], positive, negative, latent, seed=3, steps=steps,
                                    cfg=cfg)[0]["samples"]


def pipeline_latent(models, family, images, scale, steps=3, cfg=1.0):
    """The pipeline's final latent as raw VAE latent (what the sampler's LATENT holds)."""
    with torch.no_grad():
        scaled = models["pipes"][family](
            prompt="a cat", negative_prompt="", cfg_scale=cfg, height=H, width=W, seed=3, num_inference_steps=steps,
            t5_sequence_length=16, output_type="latent", progress_bar_cmd=None, ipadapter_images=images,
            ipadapter_scale=scale)
    return models["vae"].model.module.to_comfy_latent(scaled)


def apply(models, family, image, weight=1.0, start=0.0, end=1.0, positive=None, negative=None):
    positive = positive if positive is not None else encode(models, "a cat")
    negative = negative if negative is not None else encode(models, "")
    return FluxCoreApplyIPAdapter().apply(positive, negative, models[family], image, weight, start, end)


# ---------------------------------------------------------------- contract
def test_the_nodes_are_registered_with_their_inputs_and_outputs():
    loader, applier = NODE_CLASS_MAPPINGS["FluxCoreIPAdapterLoader"], NODE_CLASS_MAPPINGS["FluxCoreApplyIPAdapter"]
    assert loader.RETURN_TYPES == (IPADAPTER_TYPE,)
    assert list(loader.INPUT_TYPES()["required"]) == ["ipadapter_name", "image_encoder_name", "weight_dtype"]
    assert applier.RETURN_TYPES == ("CONDITIONING", "CONDITIONING") and applier.RETURN_NAMES == ("positive", "negative")
    spec = applier.INPUT_TYPES()["required"]
    assert list(spec) == ["positive", "negative", "ipadapter", "image", "weight", "start_percent", "end_percent"]
    assert spec["image"][0] == "IMAGE" and spec["ipadapter"][0] == IPADAPTER_TYPE
    for cls in (loader, applier):
        for name, (_, options) in cls.INPUT_TYPES()["required"].items():
            assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_the_loader_lists_encoder_folders_and_files(models):
    choices = FluxCoreIPAdapterLoader.INPUT_TYPES()["required"]
    assert set(choices["ipadapter_name"][0]) >= {"ip-adapter.bin", "flux-ip-adapter.safetensors"}
    assert set(choices["image_encoder_name"][0]) >= {"siglip", "clip-vit-large"}


# ---------------------------------------------------------------- the same numbers as the pipeline
@pytest.mark.parametrize("family", ["instantx", "xlabs"])
def test_apply_ipadapter_equals_the_pipelines_ipadapter_images(models, family):
    pils, image = pictures(1)
    got = sample(models, *apply(models, family, image, weight=0.8))
    expected = pipeline_latent(models, family, pils, 0.8)
    plain = sample(models, encode(models, "a cat"), encode(models, ""))
    # Measured 0 (the same float32 computations); the adapter moves the latent by 0.69 (InstantX) and 0.89
    # (XLabs) here, so an adapter left out or bound to the wrong images is far outside the bound.
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2


def test_under_true_cfg_the_negative_branch_gets_the_zero_encoding(models):
    pils, image = pictures(2)
    got = sample(models, *apply(models, "instantx", image, weight=0.7), cfg=2.0)
    expected = pipeline_latent(models, "instantx", pils, 0.7, cfg=2.0)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0
    # Without the zero-encoding adapter on the negative side (the payload on positive only) the run differs.
    positive, _ = apply(models, "instantx", image, weight=0.7)
    positive_only = sample(models, positive, encode(models, ""), cfg=2.0)
    assert (positive_only - expected).abs().max().item() > 1e-3


def test_the_negative_adapter_is_bound_to_zeros_at_the_same_weight(models, monkeypatch):
    from nodes import ipadapter_nodes
    bound = []
    original = ipadapter_nodes.bind_ipadapter

    def spy(model, features, *args, **kwargs):
        bound.append((features.clone(), kwargs))
        return original(model, features, *args, **kwargs)
    monkeypatch.setattr(ipadapter_nodes, "bind_ipadapter", spy)
    _, image = pictures(3)
    sample(models, *apply(models, "instantx", image, weight=0.6), steps=1, cfg=2.0)
    (features, kwargs), = bound
    assert kwargs["branches"] == ["positive", "negative"] and kwargs["scale"] == 0.6
    assert features.abs().sum() > 0   # the images' features; bind_ipadapter feeds the negative branch zeros
    sample(models, *apply(models, "instantx", image, weight=0.6), steps=1, cfg=1.0)
    assert bound[1][1]["branches"] == ["positive"]   # cfg 1: no negative branch runs


def test_an_image_batch_is_several_reference_images(models):
    pils, images = pictures(4, 5)
    got = sample(models, *apply(models, "instantx", images))
    expected = pipeline_latent(models, "instantx", pils, 1.0)
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0
    one = pipeline_latent(models, "instantx", pils[:1], 1.0)
    assert (got - one).abs().max().item() > 1e-3


def test_chained_applies_both_act(models):
    _, image = pictures(6)
    whole = sample(models, *apply(models, "instantx", image, weight=1.0))
    halves = apply(models, "instantx", image, weight=0.5)
    positive, negative = apply(models, "instantx", image, weight=0.5, positive=halves[0], negative=halves[1])
    assert len(positive[0][1][IPADAPTERS_KEY]) == 2
    chained = sample(models, positive, negative)
    # Two halves of one image's attention add up to all of it: measured 0 (halving and summing are exact in
    # float32); one half missing would leave half the adapter's effect (0.69 for the whole, above).
    assert (chained - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("start,end,active", [(0.0, 1.0, [0, 1, 2]), (0.0, 0.5, [0, 1]), (0.5, 1.0, [1, 2]),
                                              (0.6, 1.0, [2])])
def test_percents_choose_the_steps_it_acts_on(models, monkeypatch, start, end, active):
    steps = []
    original = IPAdapterAdapter.contribute

    def contribute(self, inputs, call):
        out = original(self, inputs, call)
        if out is not None:
            steps.append(call.step)
        return out
    monkeypatch.setattr(IPAdapterAdapter, "contribute", contribute)
    _, image = pictures(7)
    sample(models, *apply(models, "xlabs", image, start=start, end=end), steps=3)
    assert steps == active


def test_weight_zero_adds_nothing(models):
    _, image = pictures(8)
    positive, negative = encode(models, "a cat"), encode(models, "")
    assert apply(models, "instantx", image, weight=0.0, positive=positive, negative=negative) == (positive, negative)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("ipadapter,encoder,input_name,match", [
    ("image_proj_model.bin", "siglip", "ipadapter_name", "expected a FLUX IP-Adapter, but it looks like a InfiniteYou"),
    ("ip-adapter.bin", "clip-vit-large", "image_encoder_name", "SigLIP"),
    ("flux-ip-adapter.safetensors", "siglip", "image_encoder_name", "CLIP vision encoder"),
    ("ip-adapter.bin", "missing-folder", "image_encoder_name", "not found"),
    ("../ip-adapter.bin", "siglip", "ipadapter_name", "no '..'"),
])
def test_the_loader_refuses_a_wrong_file_in_a_slot_by_input(models, ipadapter, encoder, input_name, match):
    with pytest.raises(NodeInputError, match=f"FluxCoreIPAdapterLoader, input '{input_name}'.*{match}"):
        FluxCoreIPAdapterLoader().load(ipadapter, encoder)


def test_a_controlnet_file_in_the_ipadapter_slot_is_named(models, tmp_path):
    from tests.tiny_controlnet import make_diffusers_controlnet, write_lone_file
    write_lone_file(make_diffusers_controlnet(seed=3), models["dir"] / "ipadapter" / "controlnet.safetensors")
    with pytest.raises(NodeInputError, match="input 'ipadapter_name'.*looks like a FLUX ControlNet"):
        FluxCoreIPAdapterLoader().load("controlnet.safetensors", "siglip")


def test_an_ipadapter_for_another_dit_is_refused_when_sampling(models):
    other, = FluxCoreIPAdapterLoader().load("other-dit.bin", "siglip")
    _, image = pictures(9)
    positive, negative = FluxCoreApplyIPAdapter().apply(encode(models, "a"), encode(models, ""), other, image)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, input 'positive' \(fluxcore_ipadapters\[0\], "
                                             r"other-dit.bin\): .*width 64.*width 32"):
        sample(models, positive, negative, steps=1)


def test_apply_names_every_problem_at_once(models):
    empty = torch.zeros(0, 16, 16, 3)
    with pytest.raises(NodeInputError) as e:
        apply(models, "instantx", empty, start=0.8, end=0.2)
    assert "input 'image'" in str(e.value) and "at least one reference image" in str(e.value)
    assert "input 'end_percent'" in str(e.value)
    with pytest.raises(NodeInputError, match="input 'image'"):
        apply(models, "instantx", torch.zeros(16, 16, 3))


def test_the_sampler_does_not_call_the_ipadapter_entry_unsupported(models, caplog):
    _, image = pictures(10)
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        sample(models, *apply(models, "xlabs", image), steps=1)
    assert not [r for r in caplog.records if IPADAPTERS_KEY in r.getMessage()]


# ---------------------------------------------------------------- memory
def test_ipadapter_and_encoder_join_the_offloaded_dits_vram_manager_while_binding(models, monkeypatch):
    from flux_core.vram import SimulatedDevice, VRAMManager
    from nodes import vram_nodes
    from nodes.loaders import FluxCoreDiTLoader
    from nodes.vram_nodes import FluxCoreVRAMOptions
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]  # modules of their own: the shared ones stay unplaced
    handle, = FluxCoreIPAdapterLoader().load(*FILES["instantx"])
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=8.0)
    seen = []
    original = VRAMManager.load_models_to_device

    def load(self, names):
        names = list(names)
        original(self, names)
        if names and names[0].startswith("ipadapter"):
            seen.append((names, sorted(self.models), self.budget, self.resident_bytes))
    monkeypatch.setattr(VRAMManager, "load_models_to_device", load)
    _, image = pictures(11)
    positive, negative = FluxCoreApplyIPAdapter().apply(encode(models, "a cat"), encode(models, ""), handle, image)
    nbytes = lambda m: sum(t.untyped_storage().nbytes() for t in [*m.parameters(), *m.buffers()])
    encoder, adapter = nbytes(handle.encoder.module), nbytes(handle.adapter.module)
    budget = 8 * 1024 ** 3
    for dit_placed in (False, True):  # the first run places the DiT after binding; the second finds it placed
        seen.clear()
        out = sample(models, positive, negative, steps=2, dit=offloaded)
        dit_slot = ["dit"] if dit_placed else []
        assert seen == [(["ipadapter_image_encoder.0"], sorted(dit_slot + ["ipadapter_image_encoder.0"]), budget,
                         encoder),
                        (["ipadapter.0"], sorted(dit_slot + ["ipadapter.0"]), budget, adapter)]
        manager = state_of(dit.model.module).vram_placement[1]
        assert sorted(manager.models) == ["dit"] and manager.resident_bytes == 0 and device.live_bytes == 0
        assert state_of(handle.adapter.module).compute is None and state_of(handle.encoder.module).compute is None
    same, = FluxCoreIPAdapterLoader().load(*FILES["instantx"])
    expected = sample(models, *FluxCoreApplyIPAdapter().apply(encode(models, "a cat"), encode(models, ""), same,
                                                             image), steps=2)
    assert (out - expected).abs().max().item() <= 1e-5  # measured 0: the same float32 weights


def test_an_fp8_ipadapter_computes_through_a_vram_manager_close_to_full_precision(models):
    fp8, = FluxCoreIPAdapterLoader().load(*FILES["instantx"], weight_dtype="fp8_e4m3fn")
    module = fp8.adapter.module
    assert module.ipadapter_modules[0].to_k_ip.weight.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in fp8.encoder.module.parameters())  # the encoder keeps the default
    _, image = pictures(12)
    runs = [sample(models, *FluxCoreApplyIPAdapter().apply(encode(models, "a cat"), encode(models, ""), h, image))
            for h in (fp8, models["instantx"])]
    none = sample(models, encode(models, "a cat"), encode(models, ""))
    # FP8 weights computed in bf16 against float32: measured 0.029, against 0.85 that the adapter moves the latent
    # (an adapter that ran unscaled FP8 numbers, or not at all, would be off by the order of the latter).
    assert (runs[0] - runs[1]).abs().max().item() < 0.25 * (runs[1] - none).abs().max().item()
    assert module.ipadapter_modules[0].to_k_ip.weight.dtype == torch.float8_e4m3fn   # storage kept
    assert state_of(module).compute is None   # the run's manager let it go


def test_the_sampler_counts_the_ipadapters_keys_and_values_in_its_memory_check(models, monkeypatch):
    """As the pipeline: each Apply IP-Adapter's keys/values (per block k and v of its tokens per reference image, per
    branch it acts in) are counted with the DiT's activations."""
    from nodes import sampler as sampler_module
    held = []
    monkeypatch.setattr(sampler_module, "check_run_cost",
                        lambda *args, held_bytes=0, **kwargs: held.append((args[7], held_bytes)))
    _, images = pictures(1, 2)
    sample(models, *apply(models, "instantx", images), cfg=2.0)
    sample(models, encode(models, "a cat"), encode(models, ""))
    (what, bytes_), (_, none) = held
    p = models["instantx"].adapter.module.params
    element = next(models["instantx"].adapter.module.parameters()).element_size()
    assert bytes_ == 2 * p.num_blocks * p.num_tokens * 2 * p.hidden_size * 2 * element  # 2 images, 2 branches
    assert none == 0 and "GiB of IP-Adapter keys/values (1 Apply IP-Adapter)" in what
