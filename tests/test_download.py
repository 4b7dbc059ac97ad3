"""`python -m flux_core download`: exactly the files `generate` loads, requested once, resumable, and the layout
printed. No network: `model_config.download_from_modelscope` is replaced by a fake that writes small files the
way ModelScope lays them out (FLUX.1-dev's repository listing, shards and all)."""
import fnmatch
import json
import os
from pathlib import Path

import pytest

from flux_core import model_config
from flux_core.__main__ import build_parser, main, model_configs_for
from flux_core.download import DIT_FILES, needed_files

DEV = "black-forest-labs/FLUX.1-dev"
# What the ModelScope repositories hold (file -> bytes), enough to see which patterns take what.
SHARED_REPO = {
    "ae.safetensors": 300, "flux1-dev.safetensors": 2000, "model_index.json": 10, "README.md": 5,
    "text_encoder/config.json": 7, "text_encoder/model.safetensors": 200,
    "text_encoder_2/config.json": 7, "text_encoder_2/model-00001-of-00002.safetensors": 500,
    "text_encoder_2/model-00002-of-00002.safetensors": 400, "text_encoder_2/model.safetensors.index.json": None,
    "tokenizer/merges.txt": 30, "tokenizer/vocab.json": 40, "tokenizer_2/spiece.model": 20,
    "tokenizer_2/tokenizer.json": 50, "transformer/diffusion_pytorch_model.safetensors": 2000, "vae/config.json": 7,
}
REPOS = {DEV: SHARED_REPO,
         "black-forest-labs/FLUX.1-Krea-dev": {"flux1-krea-dev.safetensors": 2000, "ae.safetensors": 300},
         "black-forest-labs/FLUX.1-Kontext-dev": {"flux1-kontext-dev.safetensors": 2000, "ae.safetensors": 300}}
INDEX = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}


def write_repo_file(local_dir: Path, name: str, size: int | None) -> None:
    path = local_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is None:
        path.write_text(json.dumps(INDEX))
    else:
        path.write_bytes(b"x" * size)


@pytest.fixture
def fake_modelscope(monkeypatch):
    """Replaces the ModelScope download: writes the repository files matching the allow patterns (fnmatch, as
    ModelScope matches them) and records each call."""
    calls = []

    def download(model_id, local_dir, allow_file_pattern):
        calls.append((model_id, allow_file_pattern))
        for name, size in REPOS[model_id].items():
            if any(fnmatch.fnmatch(name, p) for p in allow_file_pattern):
                write_repo_file(Path(local_dir), name, size)
    monkeypatch.setattr(model_config, "download_from_modelscope", download)
    monkeypatch.delenv(model_config.ENV_MODEL_BASE_PATH, raising=False)
    monkeypatch.delenv(model_config.ENV_SKIP_DOWNLOAD, raising=False)
    return calls


SHARED_PATTERNS = ["text_encoder/model.safetensors", "text_encoder_2/*", "ae.safetensors", "tokenizer/*",
                   "tokenizer_2/*"]


@pytest.mark.parametrize("model_id", list(DIT_FILES))
def test_download_requests_exactly_the_needed_files_then_nothing(model_id, fake_modelscope, tmp_path, capsys):
    base = tmp_path / "models"
    assert main(["download", "--model-id", model_id, "--local-model-path", str(base)]) == 0
    if model_id == DEV:
        assert fake_modelscope == [(DEV, ["flux1-dev.safetensors", *SHARED_PATTERNS])]
    else:
        assert fake_modelscope == [(model_id, [DIT_FILES[model_id]]), (DEV, SHARED_PATTERNS)]
    out = capsys.readouterr().out
    dev = base / DEV
    # Only the needed files are there: no transformer/, vae/, README, model_index.json.
    got = sorted(p.relative_to(dev).as_posix() for p in dev.rglob("*") if p.is_file())
    assert got == ["ae.safetensors", *(["flux1-dev.safetensors"] if model_id == DEV else []),
                   "text_encoder/model.safetensors", "text_encoder_2/config.json",
                   "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
                   "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
                   "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json"]
    # The printed layout: each repository folder with its total, folders, files and sizes.
    shared = 300 + 200 + (7 + 500 + 400 + len(json.dumps(INDEX))) + (30 + 40) + (20 + 50)
    dev_total = shared + (2000 if model_id == DEV else 0)
    lines = out.splitlines()
    assert f"{os.path.abspath(dev)}/  ({dev_total / 1024:.1f} KiB)" in lines
    if model_id != DEV:
        assert f"{os.path.abspath(base / model_id)}/  ({2000 / 1024:.1f} KiB)" in lines
    assert any(line.startswith("  text_encoder_2/") for line in lines)
    assert any(line.strip().startswith("model-00001-of-00002.safetensors") and line.endswith("500 B")
               for line in lines if line.startswith("    "))
    assert any(line.strip().startswith(DIT_FILES[model_id]) and line.endswith("2.0 KiB") for line in lines)

    # A second run finds every file complete and requests nothing.
    assert main(["download", "--model-id", model_id, "--local-model-path", str(base)]) == 0
    assert len(fake_modelscope) == (1 if model_id == DEV else 2)
    assert "already complete, skipped" in capsys.readouterr().out


def test_generate_loads_what_download_fetched(fake_modelscope, tmp_path):
    """`generate`'s configs resolve to the downloaded files with downloads forbidden: the two use one list."""
    base = tmp_path / "models"
    for model_id in DIT_FILES:
        main(["download", "--model-id", model_id, "--local-model-path", str(base)])
        args = build_parser().parse_args(["generate", "--prompt", "x", "--model-id", model_id, "--skip-download",
                                          "--local-model-path", str(base)])
        configs, tok1, tok2 = model_configs_for(args)
        resolved = [c.resolve() for c in configs + [tok1, tok2]]   # raises if anything is missing
        assert resolved[0].endswith(DIT_FILES[model_id]) and resolved[4].endswith("tokenizer")
    assert [f.pattern for f in needed_files(DEV)] == ["flux1-dev.safetensors", "text_encoder/model.safetensors",
                                                      "text_encoder_2/", "ae.safetensors", "tokenizer/", "tokenizer_2/"]


def test_interrupted_download_is_requested_again(fake_modelscope, tmp_path, capsys):
    """A partial file (ModelScope's `.incomplete`) or a shard the index names but the folder lacks makes that
    pattern incomplete: the next run requests it (ModelScope resumes the partial file), and only it."""
    base = tmp_path / "models"
    main(["download", "--local-model-path", str(base)])
    t5 = base / DEV / "text_encoder_2"
    (t5 / "model-00002-of-00002.safetensors").rename(t5 / "model-00002-of-00002.safetensors.incomplete")
    main(["download", "--local-model-path", str(base)])
    assert fake_modelscope[-1] == (DEV, ["text_encoder_2/*"])
    (t5 / "model-00002-of-00002.safetensors.incomplete").unlink()
    (t5 / "model-00001-of-00002.safetensors").unlink()
    capsys.readouterr()
    main(["download", "--local-model-path", str(base)])
    assert fake_modelscope[-1] == (DEV, ["text_encoder_2/*"]) and len(fake_modelscope) == 3
    assert "fetched text_encoder_2/" in capsys.readouterr().out


def test_failed_download_is_reported_by_flag(monkeypatch, tmp_path, capsys):
    def offline(model_id, local_dir, allow_file_pattern):
        raise model_config.ModelFileError(
            f"Downloading {allow_file_pattern!r} of '{model_id}' failed (ConnectionError: down). Check the model id "
            f"and your network, or download the files yourself into that folder (then skip_download=True), or pass "
            f"path= to local files.")
    monkeypatch.setattr(model_config, "download_from_modelscope", offline)
    assert main(["download", "--local-model-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ConnectionError: down" in err and "--skip-download" in err and "path=" not in err


def test_unknown_model_id_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["download", "--model-id", "black-forest-labs/FLUX.1-schnell"])
    assert "--model-id" in capsys.readouterr().err
