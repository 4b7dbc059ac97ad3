"""LoRA-Encoder and LoRA-Fusion nodes (nodes/lora_model_nodes.py) and the sampler's use of them, on tiny models: the
same latents as FluxImagePipeline's lora_encoder_inputs / lora_encoder_scale and enable_lora_merger (our library,
which tests/test_lora_encoder.py and tests/test_lora_fusion.py check against DiffSynth-Studio's own code; here the
node layer is checked against it), with EliGen entities, the plain sum without Fuse LoRAs, and the errors."""
import logging

import pytest
import torch

from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from nodes import NODE_CLASS_MAPPINGS
from nodes.conditioning import FluxCoreTextEncode
from nodes.loaders import NodeInputError
from nodes.lora_model_nodes import (LORA_ENCODER_KEY, FluxCoreEncodeLora, FluxCoreFuseLoras,
                                    FluxCoreLoraEncoderLoader, FluxCoreLoraFusionLoader)
from nodes.lora_nodes import FluxCoreLoraLoader
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir

H, W, LT = 48, 64, 16
PROMPT = "a cat"
ENCODER, FUSION = "flux_lora_encoder.safetensors", "flux_lora_fusion.safetensors"
LORAS = {"kohya": "style-kohya.safetensors", "diffusers": "style-peft.safetensors"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.diffsynth_ref import diffsynth_lora_models
    diffsynth_lora_models()   # the tiny encoder and patcher are made with DiffSynth's modules: skips without it
    from tests.tiny_lora_models import diffsynth_encoder, diffsynth_patcher, write_site_lora, write_state_dict
    tmp = tmp_path_factory.mktemp("comfy_lora_models")
    models_dir, _ = make_models_dir(tmp)
    for folder in ("lora_encoders", "lora_fusion", "loras"):
        (models_dir / folder).mkdir()
    encoder = write_state_dict(diffsynth_encoder(seed=0), models_dir / "lora_encoders" / ENCODER)
    patcher = write_state_dict(diffsynth_patcher(seed=0), models_dir / "lora_fusion" / FUSION)
    write_state_dict(diffsynth_encoder(seed=1, embed_dim=16), models_dir / "lora_encoders" / "narrow.safetensors")
    write_state_dict(diffsynth_patcher(seed=1, hidden=16, mlp_hidden=64),
                     models_dir / "lora_fusion" / "small.safetensors")
    paths = {fmt: write_site_lora(models_dir / "loras" / name, fmt, seed=10 + i, alpha=2.0)
             for i, (fmt, name) in enumerate(LORAS.items())}
    write_site_lora(models_dir / "loras" / "partial.safetensors", "kohya", seed=12,
                    drop=("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    loaded["encoder"], = FluxCoreLoraEncoderLoader().load(ENCODER)
    loaded["fusion"], = FluxCoreLoraFusionLoader().load(FUSION)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"])), ModelConfig(path=str(encoder)),
        ModelConfig(path=str(patcher))])
    yield dict(dir=models_dir, pipe=pipe, paths=paths, **loaded)
    mp.undo()


def encode(models, text=PROMPT):
    return FluxCoreTextEncode().encode(models["te"], text, 3.5, t5_sequence_length=LT)[0]


def with_loras(models, conditioning, scale, names=tuple(LORAS.values()), encoder=None):
    for name in names:
        conditioning, = FluxCoreEncodeLora().encode(conditioning, encoder or models["encoder"], name, scale)
    return conditioning


def sample(models, positive, negative=None, model=None, cfg=1.0, steps=3):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    return FluxCoreSampler().sample(model or models["dit"], positive, negative or encode(models, ""), latent, seed=3,
                                    steps=steps, cfg=cfg)[0]["samples"]


def pipeline_latent(models, cfg=1.0, steps=3, **kwargs):
    with torch.no_grad():
        scaled = models["pipe"](prompt=PROMPT, negative_prompt="", cfg_scale=cfg, height=H, width=W, seed=3,
                                num_inference_steps=steps, t5_sequence_length=LT, output_type="latent",
                                progress_bar_cmd=None, **kwargs)
    return models["vae"].model.module.to_comfy_latent(scaled)


# ---------------------------------------------------------------- contract
def test_the_nodes_are_registered_with_tooltips_and_list_their_folders(models):
    for node_id in ("FluxCoreLoraEncoderLoader", "FluxCoreEncodeLora", "FluxCoreLoraFusionLoader", "FluxCoreFuseLoras"):
        cls = NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("FluxCore/")
        for name, (_, options) in cls.INPUT_TYPES()["required"].items():
            assert options.get("tooltip"), f"{node_id}.{name}"
    assert ENCODER in FluxCoreLoraEncoderLoader.INPUT_TYPES()["required"]["lora_encoder_name"][0]
    assert FUSION in FluxCoreLoraFusionLoader.INPUT_TYPES()["required"]["lora_fusion_name"][0]
    assert set(LORAS.values()) <= set(FluxCoreEncodeLora.INPUT_TYPES()["required"]["lora_name"][0])
    assert list(FluxCoreFuseLoras.INPUT_TYPES()["required"]) == ["model", "lora_fusion"]


# ---------------------------------------------------------------- LoRA-Encoder
def test_encode_lora_chain_equals_the_pipelines_lora_encoder_inputs(models):
    got = sample(models, with_loras(models, encode(models), 0.7), cfg=2.0)
    expected = pipeline_latent(models, cfg=2.0, lora_encoder_inputs=list(map(str, models["paths"].values())),
                               lora_encoder_scale=0.7)
    plain = pipeline_latent(models, cfg=2.0)
    # Measured 0 (the same float32 computations, latents up to 15); the LoRA tokens move the latent by 1.1 here.
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-2


def test_lora_tokens_come_before_eligen_entities_as_in_the_pipeline(models):
    """With EliGen, the LoRA tokens belong to the global prompt's segment of the attention mask."""
    from nodes.eligen_nodes import FluxCoreEliGenEntity
    mask = torch.zeros(1, H, W)
    mask[:, :24, 16:48] = 1
    positive = with_loras(models, encode(models), 0.5)
    positive, = FluxCoreEliGenEntity().add(positive, models["te"], "a red cat", mask)
    got = sample(models, positive)
    expected = pipeline_latent(models, lora_encoder_inputs=list(map(str, models["paths"].values())),
                               lora_encoder_scale=0.5, eligen_entity_prompts=["a red cat"], eligen_entity_masks=[mask])
    assert (got - expected).abs().max().item() <= 1e-5   # measured 0


def test_encode_lora_on_the_negative_only_is_not_used_and_said(models, caplog):
    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        got = sample(models, encode(models), with_loras(models, encode(models, ""), 1.0, names=[LORAS["kohya"]]),
                     cfg=2.0)
    assert (got - pipeline_latent(models, cfg=2.0)).abs().max().item() <= 1e-5   # measured 0
    assert any("on 'negative' (style-kohya.safetensors) is not used" in r.getMessage() for r in caplog.records)


def test_scale_zero_adds_nothing_and_the_memory_check_counts_the_tokens(models, monkeypatch):
    conditioning = encode(models)
    assert FluxCoreEncodeLora().encode(conditioning, models["encoder"], LORAS["kohya"], 0.0)[0] is conditioning
    from nodes import sampler as sampler_module
    texts = []
    monkeypatch.setattr(sampler_module, "check_run_cost", lambda *args, **kwargs: texts.append(args[4]))
    positive = with_loras(models, conditioning, 1.0)
    sample(models, positive, steps=1)
    tokens = sum(p.tokens.shape[1] for p in positive[0][1][LORA_ENCODER_KEY])
    assert tokens > 0 and texts == [LT + tokens]


def test_a_lora_the_encoder_cannot_read_is_named(models):
    with pytest.raises(NodeInputError) as e:
        with_loras(models, encode(models), 1.0, names=["partial.safetensors"])
    message = str(e.value)
    assert message.startswith("FluxCoreEncodeLora, input 'lora_name': LoRA-Encoder: lora_name: ")
    assert "2 missing: double_blocks.0.img_attn.qkv, single_blocks.1.linear2" in message


def test_an_encoder_made_for_another_dit_is_refused_at_sampling(models):
    narrow, = FluxCoreLoraEncoderLoader().load("narrow.safetensors")
    positive = with_loras(models, encode(models), 1.0, names=[LORAS["kohya"]], encoder=narrow)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, input 'positive' \(fluxcore_lora_encoder\[0\], "
                                             r"style-kohya.safetensors\): narrow.safetensors: .*16 wide"):
        sample(models, positive)


def test_the_encoder_loader_refuses_another_kind_of_file(models):
    import shutil
    shutil.copy(models["dir"] / "lora_fusion" / FUSION, models["dir"] / "lora_encoders" / "misplaced.safetensors")
    with pytest.raises(NodeInputError, match=r"FluxCoreLoraEncoderLoader, input 'lora_encoder_name': "):
        FluxCoreLoraEncoderLoader().load("misplaced.safetensors")


# ---------------------------------------------------------------- LoRA-Fusion
def stacked(models, strengths=(0.7, -0.4)):
    model = models["dit"]
    for name, strength in zip(LORAS.values(), strengths):
        model, = FluxCoreLoraLoader().apply(model, name, strength)
    return model


def pipeline_with_loras(models, merger: bool, strengths=(0.7, -0.4)):
    from flux_core.lora import clear_lora, disable_lora_merger
    pipe = models["pipe"]
    clear_lora(pipe.dit)
    disable_lora_merger(pipe.dit)
    if merger:
        pipe.enable_lora_merger()
    for path, strength in zip(models["paths"].values(), strengths):
        pipe.load_lora(pipe.dit, str(path), alpha=strength)   # hooked under the merger, fused without: as the nodes
    try:
        return pipeline_latent(models)
    finally:
        clear_lora(pipe.dit)
        disable_lora_merger(pipe.dit)


def test_fuse_loras_equals_the_pipelines_lora_merger_and_without_it_the_sum(models):
    model = stacked(models)
    fused, = FluxCoreFuseLoras().fuse(model, models["fusion"])
    # Alternating on the one DiT module: each run applies its own way (merger on, then off, then on again).
    got_fused = sample(models, encode(models), model=fused)
    got_sum = sample(models, encode(models), model=model)
    again = sample(models, encode(models), model=fused)
    expected_fused, expected_sum = pipeline_with_loras(models, merger=True), pipeline_with_loras(models, merger=False)
    # Measured 0 and 0 (the same float32 computations, latents up to 15); merged and summed differ by 8.2 here.
    assert (got_fused - expected_fused).abs().max().item() <= 1e-5
    assert (got_sum - expected_sum).abs().max().item() <= 1e-5
    assert torch.equal(again, got_fused)
    assert (got_fused - got_sum).abs().max().item() > 1e-2


def test_loras_added_after_fuse_loras_are_fused_too(models):
    first, = FluxCoreLoraLoader().apply(models["dit"], LORAS["kohya"], 0.7)
    fused, = FluxCoreFuseLoras().fuse(first, models["fusion"])
    later, = FluxCoreLoraLoader().apply(fused, LORAS["diffusers"], -0.4)
    got = sample(models, encode(models), model=later)
    assert (got - pipeline_with_loras(models, merger=True)).abs().max().item() <= 1e-5   # measured 0


def test_a_patcher_made_for_another_dit_is_refused(models):
    small, = FluxCoreLoraFusionLoader().load("small.safetensors")
    with pytest.raises(NodeInputError, match=r"FluxCoreFuseLoras, input 'lora_fusion': small.safetensors was made "
                                             r"for another model: "):
        FluxCoreFuseLoras().fuse(stacked(models), small)


def test_fuse_loras_on_an_offloaded_dit_puts_the_patcher_in_its_vram_manager(models, monkeypatch):
    """With FLUX VRAM Options (offload, nothing resident) the patcher joins the DiT's VRAM manager for the run, as
    the DiT's ControlNets do, and leaves it after; the run is the unmanaged one."""
    from flux_core.vram import SimulatedDevice, VRAMManager
    from nodes import vram_nodes
    from nodes.loaders import FluxCoreDiTLoader
    from nodes.vram_nodes import FluxCoreVRAMOptions
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    seen = []
    original = VRAMManager.load_models_to_device

    def load(self, names):
        names = list(names)
        seen.append(sorted(self.models))
        return original(self, names)
    monkeypatch.setattr(VRAMManager, "load_models_to_device", load)
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]  # a module of its own: the shared one stays unmanaged
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=0.0)
    model = offloaded
    for name, strength in zip(LORAS.values(), (0.7, -0.4)):
        model, = FluxCoreLoraLoader().apply(model, name, strength)
    fused, = FluxCoreFuseLoras().fuse(model, models["fusion"])
    got = sample(models, encode(models), model=fused)
    assert any(len(names) == 2 and "dit" in names for names in seen)   # the DiT and the patcher, together
    from flux_core.model_state import state_of
    manager = state_of(dit.model.module).vram_placement[1]
    assert sorted(manager.models) == ["dit"]                            # given back after the run
    # Measured 0 against the pipeline's merger run (the same float32 computations, streamed layer by layer).
    assert (got - pipeline_with_loras(models, merger=True)).abs().max().item() <= 1e-5
