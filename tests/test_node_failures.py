"""A sampler run refused or failing on its inputs leaves no DiT layers on the device (flux_core.vram's count
and the simulated device's live bytes both return to zero), and a run that cannot fit is refused before any."""
import dataclasses
import gc
import types

import pytest
import torch

from flux_core.model_state import state_of
from flux_core.vram import SimulatedDevice
from nodes import vram_nodes
from nodes.conditioning import FluxCoreTextEncode
from nodes.loaders import FluxCoreDiTLoader, NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from nodes.vram_nodes import FluxCoreVRAMOptions
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir

H, W = 48, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models_dir, _ = make_models_dir(tmp_path_factory.mktemp("failures"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    yield load_node_models(models_dir)
    mp.undo()


def offloaded_dit(monkeypatch):
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]  # a module of its own: the shared one stays unplaced
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    placed, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=8.0)
    return placed, device


def encode(models, text):
    return FluxCoreTextEncode().encode(models["te"], text, t5_sequence_length=16)[0]


def test_refused_references_leave_no_layers_on_the_device(models, monkeypatch):
    placed, device = offloaded_dit(monkeypatch)
    latent, = FluxCoreEmptyLatent().generate(W, H, 2)
    positive = encode(models, "a cat")
    positive = [[positive[0][0], {**positive[0][1], "reference_latents": [torch.zeros(3, 16, H // 8, W // 8)]}]]
    FluxCoreSampler().sample(placed, encode(models, "a cat"), encode(models, ""), latent, seed=0, steps=1)
    manager = state_of(placed.model.module).vram_placement[1]
    with pytest.raises(NodeInputError, match=r"input 'positive' \(reference_latents\): reference 0 has a batch of 3"):
        FluxCoreSampler().sample(placed, positive, encode(models, ""), latent, seed=0, steps=1)
    gc.collect()
    assert (manager.resident_bytes, device.live_bytes) == (0, 0)


def test_a_lora_that_fails_to_apply_leaves_no_layers_on_the_device(models, monkeypatch, tmp_path):
    from nodes import sampler
    placed, device = offloaded_dit(monkeypatch)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    FluxCoreSampler().sample(placed, encode(models, "a cat"), encode(models, ""), latent, seed=0, steps=1)
    manager = state_of(placed.model.module).vram_placement[1]

    def broken_lora(dit, *args, **kwargs):
        raise RuntimeError("a LoRA that cannot be applied")
    monkeypatch.setattr(sampler, "load_lora", broken_lora)
    with_lora = dataclasses.replace(placed, loras=(types.SimpleNamespace(lora=None, path="x.safetensors", strength=1.0),))
    with pytest.raises(RuntimeError, match="a LoRA that cannot be applied"):
        FluxCoreSampler().sample(with_lora, encode(models, "a cat"), encode(models, ""), latent, seed=0, steps=1)
    gc.collect()
    assert (manager.resident_bytes, device.live_bytes) == (0, 0)


def test_text_encoder_loader_checks_tokenizers_before_reading_the_encoders(models, tmp_path, monkeypatch):
    from nodes import loaders
    from nodes.loaders import FluxCoreTextEncoderLoader
    text_encoders = tmp_path / "te"
    text_encoders.mkdir()
    monkeypatch.setattr(loaders.bridge, "folder_paths_for", lambda folder: [text_encoders])
    monkeypatch.setattr(loaders.bridge, "comfy_tokenizer_dirs", lambda: (None, None))
    (text_encoders / "tokenizer").mkdir()        # a CLIP tokenizer folder without its files
    (text_encoders / "tokenizer_2").mkdir()
    read = []
    monkeypatch.setattr(loaders, "load_kind", lambda *args, **kwargs: read.append(args) or object())
    monkeypatch.setattr(loaders, "model_file", lambda node, name, folder, value: f"{folder}/{value}")
    with pytest.raises(NodeInputError) as info:
        FluxCoreTextEncoderLoader().load("clip_l.safetensors", "t5xxl.safetensors")
    message = str(info.value)
    assert message.startswith(f"FluxCoreTextEncoderLoader: the CLIP-L tokenizer folder {text_encoders / 'tokenizer'} "
                              f"holds no complete set of tokenizer files")
    assert "tokenizer_1_config" not in message and "python -m" not in message
    assert read == []  # neither encoder was read


def test_modelscope_id_failures_are_told_in_node_terms(models, tmp_path, monkeypatch):
    import sys
    import types
    def no_network(model_id, local_dir, allow_file_pattern):
        raise ConnectionError("no network in this test")
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=no_network))
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    with pytest.raises(NodeInputError) as info:
        FluxCoreDiTLoader().load(NAMES["dit"], modelscope_id="black-forest-labs/FLUX.1-dev:flux1-dev.safetensors")
    message = str(info.value)
    assert message.startswith("FluxCoreDiTLoader, input 'modelscope_id': no file matches 'flux1-dev.safetensors' in ")
    assert "no network in this test" in message
    assert "path=" not in message and "local_model_path" not in message


def test_model_lists_follow_linked_folders_once(tmp_path, monkeypatch):
    from nodes import comfy_bridge
    elsewhere = tmp_path / "elsewhere" / "sub"
    elsewhere.mkdir(parents=True)
    (elsewhere / "a.safetensors").write_bytes(b"x")
    (elsewhere / "b.gguf").write_bytes(b"x")
    folder = tmp_path / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (elsewhere / "loop").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a cycle
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(tmp_path / "models"))
    assert comfy_bridge.list_models("diffusion_models") == ["linked/sub/a.safetensors", "linked/sub/b.gguf"]
