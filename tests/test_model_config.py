"""ModelConfig.resolve: local files first, ModelScope download of only the missing patterns, clear errors.
No test touches the network: downloads are replaced by functions that write files."""
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from flux_core import model_config
from flux_core.model_config import ModelConfig, ModelFileError

MODEL = "black-forest-labs/FLUX.1-dev"
REAL_DOWNLOAD = model_config.download_from_modelscope  # tests that stub `modelscope` itself put it back


@pytest.fixture(autouse=True)
def no_env_no_network(monkeypatch):
    monkeypatch.delenv(model_config.ENV_MODEL_BASE_PATH, raising=False)
    monkeypatch.delenv(model_config.ENV_SKIP_DOWNLOAD, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args} {kwargs}")
    monkeypatch.setattr(model_config, "download_from_modelscope", refuse)


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


@pytest.fixture
def repo(tmp_path):
    """A local copy of a FLUX.1-dev-like repository under <tmp>/models/<model_id>/."""
    base = tmp_path / "models"
    touch(base / MODEL, "flux1-dev.safetensors", "ae.safetensors", "model_index.json",
          "tokenizer/vocab.json", "tokenizer/merges.txt",
          "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
          "text_encoder_2/config.json")
    return base


def cfg(base, pattern, **kw) -> ModelConfig:
    return ModelConfig(model_id=MODEL, origin_file_pattern=pattern, local_model_path=str(base), **kw)


def test_single_file_is_a_string(repo):
    assert cfg(repo, "flux1-dev.safetensors").resolve() == os.path.join(str(repo), MODEL, "flux1-dev.safetensors")


def test_shards_are_a_sorted_list(repo):
    got = cfg(repo, "text_encoder_2/*.safetensors").resolve()
    folder = os.path.join(str(repo), MODEL, "text_encoder_2")
    assert got == [os.path.join(folder, "model-00001-of-00002.safetensors"),
                   os.path.join(folder, "model-00002-of-00002.safetensors")]


def test_trailing_slash_is_the_folder(repo):
    assert cfg(repo, "tokenizer/").resolve() == os.path.join(str(repo), MODEL, "tokenizer")


@pytest.mark.parametrize("pattern", [None, "", "./"])
def test_no_pattern_is_the_whole_model_folder(repo, pattern):
    assert cfg(repo, pattern).resolve() == os.path.join(str(repo), MODEL)


def test_list_patterns_union_in_order(repo):
    got = cfg(repo, ["flux1-dev.safetensors", "tokenizer/", "text_encoder_2/*.safetensors"]).resolve()
    root = os.path.join(str(repo), MODEL)
    assert got == [os.path.join(root, "flux1-dev.safetensors"), os.path.join(root, "tokenizer"),
                   os.path.join(root, "text_encoder_2", "model-00001-of-00002.safetensors"),
                   os.path.join(root, "text_encoder_2", "model-00002-of-00002.safetensors")]


def test_one_element_list_collapses(repo):
    assert cfg(repo, ["ae.safetensors"]).resolve() == os.path.join(str(repo), MODEL, "ae.safetensors")


def test_recursive_glob(repo):
    got = cfg(repo, "**/*.json").resolve()
    assert [os.path.basename(p) for p in got] == ["model_index.json", "config.json", "vocab.json"]


def test_explicit_path_wins(repo, tmp_path):
    f = tmp_path / "mine.safetensors"
    f.write_bytes(b"x")
    c = ModelConfig(path=str(f), model_id=MODEL, origin_file_pattern="nothing-here.safetensors",
                    local_model_path=str(repo))
    assert c.resolve() == str(f)
    assert ModelConfig(path=[str(f)]).resolve() == str(f)
    g = tmp_path / "other.safetensors"
    g.write_bytes(b"x")
    assert ModelConfig(path=[str(g), f]).resolve() == [str(g), str(f)]  # given order kept


def test_missing_explicit_path_names_it(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="nope.safetensors"):
        ModelConfig(path=missing).resolve()
    with pytest.raises(FileNotFoundError):  # ModelFileError is a FileNotFoundError
        ModelConfig(path=[str(tmp_path), missing]).resolve()


def test_neither_path_nor_model_id():
    with pytest.raises(ValueError, match="path"):
        ModelConfig().resolve()


def test_skip_download_with_nothing_local_raises_without_network(repo):
    # the autouse fixture makes any download attempt fail the test
    with pytest.raises(ModelFileError) as e:
        cfg(repo, "flux1-schnell.safetensors", skip_download=True).resolve()
    msg = str(e.value)
    assert MODEL in msg and "flux1-schnell.safetensors" in msg and os.path.abspath(os.path.join(str(repo), MODEL)) in msg
    assert "skip_download" in msg


def test_skip_download_with_modelscope_blocked(repo, monkeypatch):
    """Even the real download function is never reached: a modelscope stub that fails if called."""
    monkeypatch.setattr(model_config, "download_from_modelscope", REAL_DOWNLOAD)
    stub = types.ModuleType("modelscope")
    stub.snapshot_download = lambda *a, **k: pytest.fail("network call with skip_download")
    monkeypatch.setitem(sys.modules, "modelscope", stub)
    with pytest.raises(ModelFileError):
        cfg(repo, "missing/", skip_download=True).resolve()


def test_empty_folder_counts_as_missing(repo):
    (repo / MODEL / "vae").mkdir()
    with pytest.raises(ModelFileError, match="vae/"):
        cfg(repo, "vae/", skip_download=True).resolve()


def test_local_files_need_no_download(repo):
    # with downloads refused by the fixture, these succeed only because nothing is fetched
    cfg(repo, ["tokenizer/", "flux1-dev.safetensors"]).resolve()


def test_download_fetches_only_missing_patterns(repo, monkeypatch):
    calls = []

    def fake_download(model_id, local_dir, allow_file_pattern):
        calls.append((model_id, local_dir, allow_file_pattern))
        touch(Path(local_dir), "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
              "flux1-schnell.safetensors")
    monkeypatch.setattr(model_config, "download_from_modelscope", fake_download)

    got = cfg(repo, ["flux1-dev.safetensors", "vae/", "flux1-schnell.safetensors"]).resolve()
    root = os.path.join(str(repo), MODEL)
    assert calls == [(MODEL, root, ["vae/*", "flux1-schnell.safetensors"])]
    assert got == [os.path.join(root, "flux1-dev.safetensors"), os.path.join(root, "vae"),
                   os.path.join(root, "flux1-schnell.safetensors")]
    # now local: a second resolve downloads nothing
    cfg(repo, ["vae/", "flux1-schnell.safetensors"]).resolve()
    assert len(calls) == 1


def test_download_calls_modelscope_snapshot_download(tmp_path, monkeypatch):
    """The real download function, with `modelscope.snapshot_download` replaced: its exact arguments."""
    monkeypatch.setattr(model_config, "download_from_modelscope", REAL_DOWNLOAD)
    calls = []

    def snapshot_download(model_id, **kwargs):
        calls.append((model_id, kwargs))
        touch(Path(kwargs["local_dir"]), "text_encoder_2/model-00001-of-00002.safetensors",
              "text_encoder_2/model-00002-of-00002.safetensors")
        return kwargs["local_dir"]
    stub = types.ModuleType("modelscope")
    stub.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", stub)

    base = tmp_path / "models"
    got = cfg(base, "text_encoder_2/*.safetensors").resolve()
    local_dir = os.path.join(str(base), MODEL)
    assert calls == [(MODEL, {"local_dir": local_dir, "allow_file_pattern": ["text_encoder_2/*.safetensors"]})]
    assert got == sorted(got) and len(got) == 2


def test_download_that_brings_nothing_names_model_pattern_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(model_config, "download_from_modelscope", lambda *a, **k: None)
    with pytest.raises(ModelFileError) as e:
        cfg(tmp_path, "flux1-typo.safetensors").resolve()
    msg = str(e.value)
    assert MODEL in msg and "flux1-typo.safetensors" in msg and str(tmp_path) in msg


def test_download_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(model_config, "download_from_modelscope", REAL_DOWNLOAD)
    stub = types.ModuleType("modelscope")

    def offline(*a, **k):
        raise ConnectionError("no route to host")
    stub.snapshot_download = offline
    monkeypatch.setitem(sys.modules, "modelscope", stub)
    with pytest.raises(ModelFileError, match="no route to host") as e:
        cfg(tmp_path, "ae.safetensors").resolve()
    assert MODEL in str(e.value) and "path=" in str(e.value)



def test_env_vars_apply_only_when_not_given(tmp_path, monkeypatch):
    monkeypatch.setenv(model_config.ENV_MODEL_BASE_PATH, str(tmp_path / "env_models"))
    monkeypatch.setenv(model_config.ENV_SKIP_DOWNLOAD, "True")
    c = ModelConfig(model_id=MODEL)
    assert c.local_model_path == str(tmp_path / "env_models") and c.skip_download is True
    c = ModelConfig(model_id=MODEL, local_model_path="./models", skip_download=False)
    assert c.local_model_path == "./models" and c.skip_download is False
    with pytest.raises(ModelFileError, match=f"skip_download is set \\(by {model_config.ENV_SKIP_DOWNLOAD}\\)"):
        ModelConfig(model_id=MODEL, origin_file_pattern="ae.safetensors", local_model_path=str(tmp_path)).resolve()
    monkeypatch.setenv(model_config.ENV_SKIP_DOWNLOAD, "maybe")
    with pytest.raises(ValueError, match=model_config.ENV_SKIP_DOWNLOAD):
        ModelConfig(model_id=MODEL)


def test_defaults_and_offload_fields():
    c = ModelConfig(model_id=MODEL, offload_device="cpu", offload_dtype=torch.float8_e4m3fn)
    assert c.local_model_path == "./models" and c.skip_download is False and c.origin_file_pattern is None
    assert (c.offload_device, c.offload_dtype) == ("cpu", torch.float8_e4m3fn)


def test_partly_downloaded_folder_counts_as_missing(repo):
    """ModelScope writes `<file>.incomplete` until a file is whole, and an index names every shard: a folder
    with a partial file or without a named shard is not there yet (the download is requested, and resumes)."""
    t5 = repo / MODEL / "text_encoder_2"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (t5 / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cfg(repo, "text_encoder_2/").missing_patterns() == []
    (t5 / "model-00002-of-00002.safetensors").rename(t5 / "model-00002-of-00002.safetensors.incomplete")
    assert cfg(repo, ["text_encoder_2/", "ae.safetensors"]).missing_patterns() == ["text_encoder_2/"]
    (t5 / "model-00002-of-00002.safetensors.incomplete").unlink()   # index names a shard that is absent
    assert cfg(repo, "text_encoder_2/").missing_patterns() == ["text_encoder_2/"]
    with pytest.raises(ModelFileError, match="text_encoder_2/"):
        cfg(repo, "text_encoder_2/", skip_download=True).resolve()
    (t5 / "model.safetensors.index.json").write_text("{trunc")                     # a cut-off index
    assert cfg(repo, "text_encoder_2/").missing_patterns() == ["text_encoder_2/"]
    (repo / MODEL / "tokenizer" / "tokenizer.json.incomplete").write_bytes(b"x")  # a partial file, no index
    assert cfg(repo, "tokenizer/").missing_patterns() == ["tokenizer/"]


def test_partial_single_file_is_not_a_match(repo):
    (repo / MODEL / "flux1-krea.safetensors.incomplete").write_bytes(b"x")
    assert cfg(repo, ["flux1-krea.safetensors", "flux1-dev.safetensors"]).missing_patterns() == ["flux1-krea.safetensors"]
    assert cfg(repo, "flux1-krea*").missing_patterns() == ["flux1-krea*"]   # a glob does not take the partial file
