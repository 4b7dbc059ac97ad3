"""`python -m flux_core generate` on a tiny local model folder, and its ModelScope default without network."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flux_core.__main__ import build_parser, main, model_configs_for
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    make_diffusers_pipeline(tmp)
    return tmp / FOLDER_NAME


def test_generate_from_a_local_folder_writes_the_image(model_dir, tmp_path, capsys):
    out = tmp_path / "out" / "cat.png"
    main(["generate", "--prompt", "a cat", "--model-dir", str(model_dir), "--output", str(out), "--height", "48",
          "--width", "64", "--steps", "2", "--seed", "3", "--t5-sequence-length", "16", "--device", "cpu",
          "--dtype", "float32"])
    image = Image.open(out)
    assert image.size == (64, 48)
    assert "seed 3" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind
    # Same seed, same image.
    out2 = tmp_path / "again.png"
    main(["generate", "--prompt", "a cat", "--model-dir", str(model_dir), "--output", str(out2), "--height", "48",
          "--width", "64", "--steps", "2", "--seed", "3", "--t5-sequence-length", "16", "--device", "cpu",
          "--dtype", "float32"])
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out2)))


def test_default_models_are_flux_dev_from_modelscope(tmp_path):
    args = build_parser().parse_args(["generate", "--prompt", "a cat", "--local-model-path", str(tmp_path)])
    configs, tok1, tok2 = model_configs_for(args)
    assert [(c.model_id, c.origin_file_pattern) for c in configs] == [
        ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors"),
        ("black-forest-labs/FLUX.1-dev", "text_encoder/model.safetensors"),
        ("black-forest-labs/FLUX.1-dev", "text_encoder_2/"),
        ("black-forest-labs/FLUX.1-dev", "ae.safetensors"),
    ]
    assert (tok1.origin_file_pattern, tok2.origin_file_pattern) == ("tokenizer/", "tokenizer_2/")
    kontext = model_configs_for(build_parser().parse_args(
        ["generate", "--prompt", "x", "--model-id", "black-forest-labs/FLUX.1-Kontext-dev"]))[0]
    assert kontext[0].origin_file_pattern == "flux1-kontext-dev.safetensors"


def test_skip_download_without_local_files_names_the_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_core", "generate", "--prompt", "a cat", "--skip-download",
         "--local-model-path", str(tmp_path), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "black-forest-labs/FLUX.1-dev" in result.stderr and "flux1-dev.safetensors" in result.stderr


def test_bad_output_extension_fails_before_any_model_loads(tmp_path, capsys):
    # No models exist at all: the error must come from the output check, not from loading.
    rc = main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "cat.tiff2"), "--skip-download",
               "--local-model-path", str(tmp_path)])
    assert rc == 2
    assert "--output" in capsys.readouterr().err


def test_sigmas_option_is_parsed():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--sigmas", "1,0.75,0.5"])
    assert args.sigmas == [1.0, 0.75, 0.5]
