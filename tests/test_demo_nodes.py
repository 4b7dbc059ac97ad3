"""The node pack and the bundled demo model (flux_core.demo): its folders registered as extra model folders, the
tokenizers beside each text encoder first (the demo's never for another model's files), T5's length from the
tokenizer (t5_sequence_length 0), and the trainer node's dataset_path found in the input folder or among the demo
datasets. Tiny files in temporary folders stand in for the demo's, so these run before (and without) its build."""
from pathlib import Path

import pytest
import torch

from flux_core import demo
from flux_core.demo.tokenizers import write_clip_tokenizer, write_t5_tokenizer
from nodes import comfy_bridge as bridge
from nodes import train_nodes
from nodes.loaders import NodeInputError, find_tokenizers, tokenizer_dirs
from nodes.train_nodes import FluxCoreTrainLoRA, dataset_folder

PROMPT = "a red circle on the left, blue background"
CORPUS = PROMPT + " a green square at the top, white background"


def tokenizers(folder: Path, t5_length: int = 512) -> Path:
    """tokenizer/ (CLIP BPE) and tokenizer_2/ (T5 Unigram, `t5_length` tokens) in `folder`."""
    from flux_core.demo.tokenizers import t5_pieces
    write_clip_tokenizer(folder / "tokenizer", CORPUS)
    write_t5_tokenizer(folder / "tokenizer_2", t5_pieces(CORPUS), model_max_length=t5_length)
    return folder


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A user's models folder and a stand-in for the demo's (flux_core.demo.MODELS_DIR), registered the way
    ComfyUI registers the demo's: after the user's."""
    user, fake_demo = tmp_path / "models", tmp_path / "pack" / "demo_models"
    for root in (user, fake_demo):
        for name in bridge.DEMO_FOLDERS:
            (root / name).mkdir(parents=True)
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(user))
    monkeypatch.setattr(demo, "MODELS_DIR", fake_demo)
    monkeypatch.setattr(bridge, "standalone_extra_folders", {k: [v] for k, v in bridge.demo_folders().items()})
    monkeypatch.setattr(bridge, "comfy_tokenizer_dirs", lambda: (None, None))
    return user, fake_demo


# ---------------------------------------------------------------- the demo folders as extra model folders
def test_the_demo_folders_are_registered_after_the_users_not_as_default(monkeypatch, tmp_path):
    calls = []

    class FolderPaths:  # ComfyUI's folder_paths: what register_demo_folders calls
        def add_model_folder_path(self, folder_name, full_folder_path, is_default=False):
            calls.append((folder_name, full_folder_path, is_default))
    monkeypatch.setattr(bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(bridge, "_folder_paths", FolderPaths())
    bridge.register_demo_folders()
    assert calls == [(name, str(demo.MODELS_DIR / name), False)
                     for name in ("diffusion_models", "vae", "text_encoders", "loras")]
    # The demo's files sit in those folders under these names (flux_core.demo.FILES).
    assert {Path(f).parts[0] for f in (*demo.FILES.values(), demo.LORA_FILE)} == set(bridge.DEMO_FOLDERS)


def test_files_of_an_extra_folder_are_listed_and_found_after_the_users(folders):
    user, fake_demo = folders
    (fake_demo / "diffusion_models" / "fluxcore_demo_dit.safetensors").write_bytes(b"x")
    (user / "diffusion_models" / "flux1-dev.safetensors").write_bytes(b"x")
    assert bridge.list_models("diffusion_models") == ["flux1-dev.safetensors", "fluxcore_demo_dit.safetensors"]
    assert bridge.model_path("diffusion_models", "fluxcore_demo_dit.safetensors") == str(
        fake_demo / "diffusion_models" / "fluxcore_demo_dit.safetensors")
    assert bridge.folder_paths_for("loras")[0] == user / "loras"  # trained LoRAs go to the user's folder
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors not found in .*models/vae, .*demo_models/vae"):
        bridge.model_path("vae", "missing.safetensors")


# ---------------------------------------------------------------- tokenizers
def test_tokenizers_beside_the_chosen_files_come_first(folders):
    user, _ = folders
    text = user / "text_encoders"
    tokenizers(text)                                  # FLUX.1-dev's, where README puts them
    tokenizers(text / "mine", t5_length=64)           # a model's own, beside its files
    clip, t5 = text / "mine" / "clip.safetensors", text / "mine" / "t5.safetensors"
    assert tokenizer_dirs(clip, t5) == (text / "mine" / "tokenizer", text / "mine" / "tokenizer_2")
    assert tokenizer_dirs(text / "clip_l.safetensors", t5) == (text / "tokenizer", text / "mine" / "tokenizer_2")
    assert tokenizer_dirs(text / "other" / "clip.safetensors", text / "other" / "t5.safetensors") == (
        text / "tokenizer", text / "tokenizer_2")
    _, t5_tok = find_tokenizers("FluxCoreTextEncoderLoader", clip, t5)
    assert t5_tok.model_max_length == 64


def test_the_demo_tokenizers_serve_only_the_demo_encoders(folders, monkeypatch):
    user, fake_demo = folders
    tokenizers(fake_demo / "text_encoders", t5_length=32)
    demo_clip, demo_t5 = (fake_demo / "text_encoders" / name for name in ("clip.safetensors", "t5.safetensors"))
    users_clip, users_t5 = (user / "text_encoders" / name for name in ("clip_l.safetensors", "t5xxl.safetensors"))
    assert tokenizer_dirs(demo_clip, demo_t5) == (fake_demo / "text_encoders" / "tokenizer",
                                                  fake_demo / "text_encoders" / "tokenizer_2")
    # FLUX.1-dev's encoders with no tokenizers of their own: never the demo's (a 32-token T5 tokenizer with the
    # demo's vocabulary), but ComfyUI's bundled ones or FLUX.1-dev's download.
    assert tokenizer_dirs(users_clip, users_t5) == (None, None)
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    with pytest.raises(NodeInputError) as info:
        find_tokenizers("FluxCoreTextEncoderLoader", users_clip, users_t5)
    message = str(info.value)
    assert message.startswith("FluxCoreTextEncoderLoader: FLUX tokenizers not found: tokenizer/ is neither beside the "
                              f"file ({user / 'text_encoders'}) nor in any of ")
    assert "tokenizer_2/ is neither beside" in message
    tokenizers(user / "text_encoders")
    assert tokenizer_dirs(demo_clip, users_t5) == (fake_demo / "text_encoders" / "tokenizer",
                                                   user / "text_encoders" / "tokenizer_2")


def test_the_trainer_node_takes_the_tokenizers_by_the_same_rule(folders, tmp_path):
    user, fake_demo = folders
    tokenizers(fake_demo / "text_encoders", t5_length=32)
    tokenizers(user / "text_encoders")
    for folder, name in (("diffusion_models", "dit.safetensors"), ("vae", "ae.safetensors")):
        (user / folder / name).write_bytes(b"x")
    for name in ("clip.safetensors", "t5.safetensors"):
        (fake_demo / "text_encoders" / name).write_bytes(b"x")
        (user / "text_encoders" / name).write_bytes(b"x")
    (user / "text_encoders" / "sub").mkdir()
    (user / "text_encoders" / "sub" / "t5.safetensors").write_bytes(b"x")

    def tokenizer_args(clip_name, t5_name):
        command, _ = FluxCoreTrainLoRA().command(
            "dit.safetensors", clip_name, t5_name, "ae.safetensors", str(tmp_path), "x", 4, 1e-4, 1, 1, 65536, 0, "",
            0, False, False, True, 0)
        return command[command.index("--tokenizer_1_path") + 1], command[command.index("--tokenizer_2_path") + 1]
    # clip.safetensors is the user's (the user's folder comes first): the user's tokenizers, as for the T5 in sub/
    # (none beside it: the text_encoders folder's, not the demo's).
    assert tokenizer_args("clip.safetensors", "sub/t5.safetensors") == (
        str(user / "text_encoders" / "tokenizer"), str(user / "text_encoders" / "tokenizer_2"))
    (user / "text_encoders" / "clip.safetensors").unlink()   # now clip.safetensors is the demo's
    assert tokenizer_args("clip.safetensors", "sub/t5.safetensors") == (
        str(fake_demo / "text_encoders" / "tokenizer"), str(user / "text_encoders" / "tokenizer_2"))


# ---------------------------------------------------------------- T5's length from the tokenizer
@pytest.mark.parametrize("t5_length", [32, 512])
def test_t5_sequence_length_0_is_the_tokenizers_length(tmp_path, t5_length):
    from flux_core.models.text_encoders import load_clip_tokenizer, load_t5_tokenizer
    from nodes.conditioning import FluxCoreTextEncode
    from nodes.handles import TextEncodersHandle
    from tests.tiny_flux_files import T5_DIM, make_flux_shaped_clip, make_flux_shaped_t5
    folder = tokenizers(tmp_path, t5_length)
    te = TextEncodersHandle(bridge.ManagedModel(make_flux_shaped_clip(seed=1)),
                            bridge.ManagedModel(make_flux_shaped_t5(seed=2)),
                            load_clip_tokenizer(folder / "tokenizer"), load_t5_tokenizer(folder / "tokenizer_2"))
    spec = FluxCoreTextEncode.INPUT_TYPES()["required"]["t5_sequence_length"][1]
    assert spec["default"] == 0 and spec["min"] == 0
    (tokens, extra), = FluxCoreTextEncode().encode(te, PROMPT, 3.5, 0)[0]
    (explicit, _), = FluxCoreTextEncode().encode(te, PROMPT, 3.5, t5_length)[0]
    assert tokens.shape == (1, t5_length, T5_DIM) and torch.equal(tokens, explicit)
    (shorter, _), = FluxCoreTextEncode().encode(te, PROMPT, 3.5, 16)[0]
    assert shorter.shape == (1, 16, T5_DIM)


# ---------------------------------------------------------------- the trainer node's dataset_path
def test_a_relative_dataset_path_is_looked_up_in_the_input_folder_then_among_the_demo_datasets(tmp_path,
                                                                                               monkeypatch):
    node = "FluxCoreTrainLoRA"
    inputs, datasets = tmp_path / "input", tmp_path / "datasets"
    (inputs / "mine").mkdir(parents=True)
    (inputs / "both").mkdir()
    for name in ("fluxcore_demo_stripes", "both"):
        (datasets / name).mkdir(parents=True)
    monkeypatch.setenv("FLUXCORE_INPUT_DIR", str(inputs))
    monkeypatch.setattr(train_nodes, "DATASETS_DIR", datasets)
    monkeypatch.chdir(tmp_path)  # a folder of that name beside the process's working folder is not looked at
    (tmp_path / "cwd_only").mkdir()
    assert dataset_folder(node, "mine") == inputs / "mine"
    assert dataset_folder(node, " fluxcore_demo_stripes ") == datasets / "fluxcore_demo_stripes"
    assert dataset_folder(node, "both") == inputs / "both"                       # the input folder first
    assert dataset_folder(node, str(datasets / "both")) == datasets / "both"     # a full path as given
    with pytest.raises(NodeInputError) as info:
        dataset_folder(node, "cwd_only")
    message = str(info.value)
    assert message.startswith("FluxCoreTrainLoRA, input 'dataset_path': 'cwd_only' is not a folder (a relative path "
                              f"is looked up in ComfyUI's input folder, {inputs}, then among FluxCore's demo "
                              f"datasets in {datasets}: both, fluxcore_demo_stripes)")
    with pytest.raises(NodeInputError, match=r"'  ' is not a folder; give the folder"):
        dataset_folder(node, "  ")
    tooltip = FluxCoreTrainLoRA.INPUT_TYPES()["required"]["dataset_path"][1]["tooltip"]
    assert "input folder" in tooltip and "fluxcore_demo_stripes" in tooltip


def test_the_demo_dataset_is_found_by_its_name():
    if not demo.stripes_dataset().is_dir():
        pytest.skip(f"the demo build has not written {demo.stripes_dataset()} yet")
    assert dataset_folder("FluxCoreTrainLoRA", demo.STRIPES_DATASET) == demo.stripes_dataset()
    assert (demo.stripes_dataset() / "metadata.csv").is_file()


# ---------------------------------------------------------------- the trained LoRA into the loader
def test_the_lora_loader_takes_the_trainers_output_over_lora_name(folders):
    from nodes.lora_nodes import FluxCoreLoraLoader
    from nodes.train_nodes import FluxCoreTrainLoRA as Trainer
    spec = FluxCoreLoraLoader.INPUT_TYPES()["optional"]["trained_lora"]
    assert spec[0] == Trainer.RETURN_TYPES[0] == "STRING" and spec[1]["forceInput"]  # a socket, linkable from it
    with pytest.raises(NodeInputError, match=r"^FluxCoreLoraLoader, input 'trained_lora': gone\.safetensors not "
                                             r"found in "):
        FluxCoreLoraLoader().apply(None, "(none found)", 1.0, trained_lora="gone.safetensors")
    with pytest.raises(NodeInputError, match=r"^FluxCoreLoraLoader, input 'lora_name': \(none found\) not found"):
        FluxCoreLoraLoader().apply(None, "(none found)", 1.0)
