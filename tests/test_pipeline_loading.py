"""FluxImagePipeline.from_pretrained says what each file is, refuses a file of the wrong kind or a second model for
a filled slot, reports every missing file and tokenizer at once, and warns about a Kontext model run without a
reference image."""
import logging
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.loading.files import CheckpointError
from flux_core.model_config import ModelConfig, ModelFileError
from flux_core.pipeline import FluxImagePipeline, KontextWithoutImageWarning, TokenizerNotFoundError
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

H, W = 48, 64
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe_loading")
    make_diffusers_pipeline(tmp)
    return tmp / FOLDER_NAME


def load(*configs, **kwargs):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=list(configs),
                                             **kwargs)


def part(folder, name, **kwargs):
    return ModelConfig(path=str(folder / name), **kwargs)


def run(pipe, **kwargs):
    return pipe(prompt="a cat", height=H, width=W, num_inference_steps=1, t5_sequence_length=16, seed=0,
                progress_bar_cmd=None, output_type="latent", **kwargs)


def test_what_each_file_was_detected_as_is_logged_and_kept(folder, caplog):
    with caplog.at_level(logging.INFO, logger="flux_core.pipeline"):
        pipe = load(*(part(folder, p) for p in PARTS))
    got = {slot: (e.kind, e.config_index, e.source) for slot, e in pipe.loaded_from.items()}
    assert got == {"dit": ("dit", 0, str(folder / "transformer")), "vae": ("vae", 1, str(folder / "vae")),
                   "text_encoder_1": ("clip", 2, str(folder / "text_encoder")),
                   "text_encoder_2": ("t5", 3, str(folder / "text_encoder_2"))}
    assert pipe.loaded_from["dit"].layout == "diffusers"
    log = caplog.text
    assert f"model_configs[1] {folder / 'vae'}: " in log and "-> pipe.vae" in log
    assert f"model_configs[3] {folder / 'text_encoder_2'}: " in log and "-> pipe.text_encoder_2" in log


def test_kind_refuses_a_vae_given_as_the_dit_before_loading(folder, monkeypatch):
    monkeypatch.setattr("flux_core.pipeline.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(CheckpointError, match=r"model_configs\[0\] .*vae: kind='dit' \(the model for pipe\.dit\), "
                                              r"but it holds .*VAE"):
        load(part(folder, "vae", kind="dit"), *(part(folder, p) for p in PARTS[1:]))


def test_kind_picks_one_component_of_a_diffusers_folder(folder):
    pipe = load(ModelConfig(path=str(folder), kind="vae"))
    assert list(pipe.loaded_from) == ["vae"] and pipe.dit is None and pipe.vae is not None


def test_second_model_of_a_kind_is_refused_naming_both_files(folder):
    # A VAE passed where the DiT was meant, beside the real VAE: today the second silently replaced the first.
    with pytest.raises(CheckpointError, match=rf"model_configs\[1\] {folder / 'vae'} is a second .*VAE.*: pipe\.vae "
                                              rf"is already filled by model_configs\[0\] {folder / 'vae'}"):
        load(part(folder, "vae"), part(folder, "vae"), part(folder, "text_encoder"))


def test_empty_slot_is_named_at_load_and_at_call_with_what_each_file_was(folder, caplog):
    # The VAE passed as "the DiT" and no kind= given: the dit slot stays empty.
    with caplog.at_level(logging.WARNING, logger="flux_core.pipeline"):
        pipe = load(part(folder, "vae"), part(folder, "text_encoder"), part(folder, "text_encoder_2"))
    assert "no model for pipe.dit;" in caplog.text
    assert f"model_configs[0] {folder / 'vae'}: " in caplog.text
    with pytest.raises(RuntimeError, match=rf"the pipeline has no dit\. from_pretrained loaded: model_configs\[0\] "
                                           rf"{folder / 'vae'}: .*VAE.* -> pipe\.vae; "):
        run(pipe)


def test_every_missing_modelscope_file_is_listed_in_one_error(folder, tmp_path, monkeypatch):
    def no_network(model_id, local_dir, allow_file_pattern):
        raise ConnectionError("no network in this test")
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=no_network))
    dev = "black-forest-labs/FLUX.1-dev"
    configs = [ModelConfig(model_id=dev, origin_file_pattern="flux1-dev.safetensors", local_model_path=str(tmp_path),
                           skip_download=True),
               part(folder, "vae"),
               ModelConfig(model_id=dev, origin_file_pattern="text_encoder_2/", local_model_path=str(tmp_path)),
               ModelConfig(model_id=dev, origin_file_pattern="ae.safetensors", local_model_path=str(tmp_path),
                           skip_download=True)]
    with pytest.raises(ModelFileError) as info:
        load(*configs)
    message = str(info.value)
    # The local problems (skip_download) are reported before anything is fetched; the download is named.
    assert message.startswith("2 of 4 model_configs name files that are not there")
    for index, pattern in ((0, "'flux1-dev.safetensors'"), (3, "'ae.safetensors'")):
        line = next(line for line in message.splitlines() if line.startswith(f"- model_configs[{index}]: "))
        assert pattern in line and "skip_download is set" in line
    assert "- model_configs[2] were not downloaded: fix the files above first" in message
    # With every local file there, every failed download is listed in one error.
    configs = [part(folder, "vae"),
               ModelConfig(model_id=dev, origin_file_pattern="flux1-dev.safetensors", local_model_path=str(tmp_path)),
               ModelConfig(model_id=dev, origin_file_pattern="text_encoder_2/", local_model_path=str(tmp_path))]
    with pytest.raises(ModelFileError) as info:
        load(*configs)
    message = str(info.value)
    assert message.startswith("2 of 3 model_configs name files that are not there")
    for index, pattern in ((1, "'flux1-dev.safetensors'"), (2, "'text_encoder_2/*'")):
        line = next(line for line in message.splitlines() if line.startswith(f"- model_configs[{index}]: "))
        assert pattern in line and "ConnectionError: no network in this test" in line


def test_missing_model_files_and_tokenizers_are_listed_together(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    with pytest.raises(ModelFileError) as info:
        load(ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors",
                         local_model_path=str(tmp_path)))
    lines = str(info.value).splitlines()
    assert lines[0] == "1 of 1 model_configs name files that are not there, and 2 tokenizer(s) were not found:"
    assert lines[1].startswith("- model_configs[0]: ") and "'flux1-dev.safetensors'" in lines[1]
    assert lines[2].startswith("- the CLIP-L tokenizer (tokenizer/) was not found")
    assert lines[3].startswith("- the T5 tokenizer (tokenizer_2/) was not found") and len(lines) == 5
    # a ModelScope model neither here nor downloadable: the demo model needs no download
    assert lines[4] == "To see FluxCore work without any download, try the bundled demo model: FluxImagePipeline.from_demo()."


def test_missing_tokenizers_name_the_tokenizer_every_place_searched_and_the_fix(folder, tmp_path, monkeypatch):
    alone = tmp_path / "alone"
    shutil.copytree(folder / "transformer", alone / "transformer")
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    monkeypatch.setattr("flux_core.pipeline.load_model", lambda *a, **k: pytest.fail("loaded before the tokenizers"))
    models = tmp_path / "models"
    with pytest.raises(TokenizerNotFoundError) as info:
        load(ModelConfig(path=str(alone / "transformer"), local_model_path=str(models)))
    message = str(info.value)
    for folder_name, title, parameter in (("tokenizer", "CLIP-L tokenizer", "tokenizer_1_config"),
                                          ("tokenizer_2", "T5 tokenizer", "tokenizer_2_config")):
        assert f"the {title} ({folder_name}/) was not found" in message
        for place in (alone / "transformer", alone, tmp_path):
            assert str(place.resolve() / folder_name) in message
        assert str((models / "black-forest-labs/FLUX.1-dev" / folder_name).resolve()) in message
        assert f"pass {parameter}=ModelConfig(path='.../{folder_name}')" in message
    assert [m[:2] for m in info.value.missing] == [("tokenizer", "tokenizer_1_config"),
                                                   ("tokenizer_2", "tokenizer_2_config")]


def test_tokenizers_found_beside_the_files(folder):
    pipe = load(part(folder, "transformer"))
    assert pipe.tokenizer_1 is not None and pipe.tokenizer_2 is not None


def test_kontext_model_without_a_reference_image_warns(folder, tmp_path):
    kontext = "black-forest-labs/FLUX.1-Kontext-dev"
    shutil.copytree(folder / "transformer", tmp_path / kontext / "transformer")
    pipe = load(ModelConfig(model_id=kontext, origin_file_pattern="transformer/", local_model_path=str(tmp_path)),
                *(part(folder, p) for p in PARTS[1:]))
    assert pipe.loaded_from["dit"].is_kontext
    with pytest.warns(KontextWithoutImageWarning, match=rf"loaded from {kontext}, a FLUX\.1 Kontext model, but no "
                                                        r"kontext_images were given") as caught:
        run(pipe)
    assert caught[0].filename == __file__
    reference = Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8))
    plain = load(*(part(folder, p) for p in PARTS))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KontextWithoutImageWarning)
        run(pipe, kontext_images=reference)
        run(plain)   # not a Kontext model


def test_a_tokenizer_config_naming_nothing_is_reported_by_its_parameter(folder, tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=rf"tokenizer_2_config: ModelConfig\(path=\.\.\.\): "
                                                     rf"'{tmp_path / 'gone'}' does not exist") as info:
        load(part(folder, "transformer"), tokenizer_2_config=ModelConfig(path=str(tmp_path / "gone")))
    assert [m[:2] for m in info.value.missing] == [("tokenizer_2", "tokenizer_2_config")]


def test_kontext_is_told_by_model_id_or_file_name_not_the_folders_above():
    from flux_core.pipeline_models import LoadedModel
    def entry(source, model_id=None):
        return LoadedModel("dit", "dit", "FLUX DiT", "bfl", source, 0, model_id)
    assert entry("/m/flux1-kontext-dev.safetensors").is_kontext
    assert entry("/m/flux1-dev.safetensors", "black-forest-labs/FLUX.1-Kontext-dev").is_kontext
    assert not entry("/home/me/kontext-tests/flux1-dev.safetensors").is_kontext


def test_from_pretrained_checks_the_device_before_anything_is_read(monkeypatch):
    monkeypatch.setattr("flux_core.pipeline.plan_models",
                        lambda *a, **k: pytest.fail("models were looked for before the device"))
    with pytest.raises(ValueError, match=r"device='foo' is not a device name"):
        FluxImagePipeline.from_pretrained(device="foo", model_configs=[ModelConfig(path="x.safetensors")])
