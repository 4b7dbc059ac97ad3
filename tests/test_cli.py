"""`python -m flux_core generate` on tiny local models: every flag checked by its effect on the image or the
pipeline, against the Python API (FluxImagePipeline) called with the same arguments, and its messages in flags."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline
from PIL import Image

from flux_core.__main__ import build_parser, build_pipeline, cli_message, main, model_configs_for, parse_lora
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.vram import GiB
from tests.offline import no_network  # noqa: F401 (autouse: no download in these tests)
from tests.tiny_dit import make_diffusers_dit, write_bfl_dit
from tests.tiny_lora import bfl_shapes, random_pairs, write_kohya
from tests.tiny_pipeline import make_components
from tests.tiny_vae import write_bfl_file

SMALL = ["--height", "48", "--width", "64", "--steps", "2", "--t5-sequence-length", "16", "--device", "cpu",
         "--dtype", "float32"]
PY_SMALL = dict(height=48, width=64, num_inference_steps=2, t5_sequence_length=16)
# Python-API names a CLI message must never show (it shows the flags instead).
PYTHON_NAMES = re.compile(r"skip_download|path=|tokenizer_[12]_config|model_configs|local_model_path|ModelConfig|"
                          r"origin_file_pattern")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The diffusers folder (reference) and the same weights in the layout `download` makes:
    <tmp>/models/black-forest-labs/FLUX.1-dev/{flux1-dev.safetensors, ae.safetensors, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/}, the DiT and VAE in the BFL single-file layout."""
    tmp = tmp_path_factory.mktemp("cli")
    # Head dim 128, FLUX's: a BFL single file has no config, and only FLUX's head dim gives known RoPE axes.
    # Likewise the VAE: 32 GroupNorm groups, FLUX's, on widths of 32.
    dit = make_diffusers_dit(seed=1, attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56))
    torch.manual_seed(2)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                        force_upcast=False).eval()
    ref = FluxPipeline(**{**make_components(tmp), "transformer": dit, "vae": vae})
    folder = tmp / "flux-tiny"
    ref.save_pretrained(folder)
    repo = tmp / "models" / "black-forest-labs" / "FLUX.1-dev"
    repo.mkdir(parents=True)
    write_bfl_dit(ref.transformer, repo / "flux1-dev.safetensors")
    write_bfl_file(ref.vae, repo / "ae.safetensors")
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(folder / sub, repo / sub)
    lora = write_kohya(tmp / "style.safetensors", random_pairs(bfl_shapes(ref.transformer), seed=5))
    return dict(folder=folder, base=tmp / "models", repo=repo, lora=lora, dit_model=ref.transformer)


@pytest.fixture(scope="module")
def python_pipe(tiny):
    """The Python API on the diffusers folder: the reference every CLI image is compared with."""
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(tiny["folder"]))])


def run(tmp_path, *args, name="out.png") -> tuple[int, np.ndarray | None]:
    out = tmp_path / name
    rc = main(["generate", "--prompt", "a cat", "--output", str(out), *SMALL, *args])
    return rc, (np.asarray(Image.open(out)) if out.exists() else None)


def py_image(pipe, **kwargs) -> np.ndarray:
    return np.asarray(pipe(prompt="a cat", progress_bar_cmd=lambda x: x, **{**PY_SMALL, **kwargs}))


# ---------------------------------------------------------------------------------------------- images

@pytest.mark.slow
def test_generate_equals_the_python_api_and_follows_the_seed(tiny, python_pipe, tmp_path, capsys):
    rc, image = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "3")
    assert rc == 0 and image.shape == (48, 64, 3)
    assert "seed 3" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind
    assert np.array_equal(image, py_image(python_pipe, seed=3))
    _, other = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "4", name="seed4.png")
    # Measured mean difference 6.3 (of 255); ignoring --seed (the mistake) gives 0.
    assert np.abs(image.astype(int) - other.astype(int)).mean() > 1


@pytest.mark.slow
def test_download_layout_and_separate_files_give_the_diffusers_folders_image(tiny, python_pipe, tmp_path):
    """The same weights in the BFL single-file layout (`download`'s) through --model-dir and through
    --dit/--vae/--clip/--t5 (tokenizers found beside them, no ModelScope: --skip-download, empty model path)."""
    expected = py_image(python_pipe, seed=7)
    repo = tiny["repo"]
    _, from_dir = run(tmp_path, "--model-dir", str(repo), "--seed", "7", name="dir.png")
    _, from_files = run(tmp_path, "--dit", str(repo / "flux1-dev.safetensors"), "--vae", str(repo / "ae.safetensors"),
                        "--clip", str(repo / "text_encoder"), "--t5", str(repo / "text_encoder_2"), "--seed", "7",
                        "--skip-download", "--local-model-path", str(tmp_path / "empty"), name="files.png")
    # float32 everywhere and the layouts hold the same numbers: measured max difference 0. A real mistake is far
    # larger: swapping the prompt ("a dog") changes pixels by up to 39 (mean 7).
    for got in (from_dir, from_files):
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.slow
def test_lora_scale_is_the_python_alpha(tiny, python_pipe, tmp_path):
    lora = str(tiny["lora"])
    _, none = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "1", name="none.png")
    _, zero = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "1", "--lora", f"{lora}:0", name="zero.png")
    _, half = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "1", "--lora", f"{lora}:0.5", name="half.png")
    assert np.array_equal(zero, none)
    # Measured mean difference 23 (a LoRA not applied: 0); scale 0.45 instead of 0.5 already differs by 2.4 on
    # average, and the exact comparison with the Python API below catches any other scale.
    assert np.abs(half.astype(int) - none.astype(int)).mean() > 2
    python_pipe.load_lora(python_pipe.dit, lora, alpha=0.5)
    try:
        assert np.array_equal(half, py_image(python_pipe, seed=1))
    finally:
        python_pipe.clear_lora()


def test_lora_spec_parsing():
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.7") == ("style.safetensors", 0.7)
    assert parse_lora(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)
    assert parse_lora(r"C:\loras\style.safetensors:-0.5") == (r"C:\loras\style.safetensors", -0.5)
    assert parse_lora("weird:name.safetensors") == ("weird:name.safetensors", 1.0)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--lora", "a.safetensors:2", "--lora", "b"])
    assert args.lora == [("a.safetensors", 2.0), ("b", 1.0)]


@pytest.mark.slow
def test_tea_cache_skips_steps_and_reports_them(tiny, tmp_path, capsys):
    common = ["--model-dir", str(tiny["folder"]), "--seed", "2", "--steps", "5"]
    _, plain = run(tmp_path, *common, name="plain.png")
    _, exact = run(tmp_path, *common, "--tea-cache-l1-thresh", "0", name="t0.png")
    assert "TeaCache positive: 5 of 5 steps computed, 0 skipped" in capsys.readouterr().out
    _, cached = run(tmp_path, *common, "--tea-cache-l1-thresh", "1e9", name="t1e9.png")
    # A huge threshold skips every step but the first and last (TeaCache never skips those). The tiny random
    # model's input changes a lot per step (its accumulated estimate passes 100 within 3 steps), hence 1e9.
    assert "TeaCache positive: 2 of 5 steps computed, 3 skipped" in capsys.readouterr().out
    assert np.array_equal(exact, plain)
    assert not np.array_equal(cached, plain)


@pytest.mark.parametrize("flags, stored", [(["--fp8"], torch.float8_e4m3fn),
                                           (["--weight-dtype", "fp8_e5m2"], torch.float8_e5m2),
                                           ([], torch.float32)])
def test_weight_dtype_stores_only_the_dit_weights(tiny, flags, stored):
    args = build_parser().parse_args(["generate", "--prompt", "x", "--model-dir", str(tiny["repo"]), *SMALL, *flags])
    pipe = build_pipeline(args)
    assert pipe.dit.img_in.weight.dtype == stored
    assert pipe.dit.img_in.bias.dtype == torch.float32                     # biases keep the compute dtype
    assert pipe.text_encoder_2.shared.weight.dtype == torch.float32          # only the DiT is stored in fp8


def test_fp8_and_weight_dtype_together_are_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--fp8", "--weight-dtype", "fp8_e5m2"])
    assert "--fp8" in capsys.readouterr().err


@pytest.mark.slow
def test_vram_limit_turns_on_offload_with_that_budget(tiny, python_pipe, tmp_path, capsys):
    args = build_parser().parse_args(["generate", "--prompt", "x", "--model-dir", str(tiny["folder"]), *SMALL,
                                      "--vram-limit", "2"])
    pipe = build_pipeline(args)
    assert pipe.vram.budget == int(1.5 * GiB)   # 2 GB minus enable_vram_management's 0.5 GB buffer
    assert set(pipe.vram.models) == {"dit", "vae", "text_encoder_1", "text_encoder_2"}
    assert "budget 1.50 GiB" in capsys.readouterr().out
    _, image = run(tmp_path, "--model-dir", str(tiny["folder"]), "--seed", "5", "--vram-limit", "0")
    assert np.array_equal(image, py_image(python_pipe, seed=5))   # streaming every layer changes nothing


# ---------------------------------------------------------------------------------------------- models

def test_default_models_are_the_download_list_with_their_kinds(tmp_path):
    args = build_parser().parse_args(["generate", "--prompt", "a cat", "--local-model-path", str(tmp_path)])
    configs, tok1, tok2 = model_configs_for(args)
    assert [(c.model_id, c.origin_file_pattern, c.kind) for c in configs] == [
        ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", "dit"),
        ("black-forest-labs/FLUX.1-dev", "text_encoder/model.safetensors", "clip"),
        ("black-forest-labs/FLUX.1-dev", "text_encoder_2/", "t5"),
        ("black-forest-labs/FLUX.1-dev", "ae.safetensors", "vae"),
    ]
    assert all(c.local_model_path == str(tmp_path) for c in configs + [tok1, tok2])
    assert (tok1.origin_file_pattern, tok2.origin_file_pattern) == ("tokenizer/", "tokenizer_2/")
    kontext = model_configs_for(build_parser().parse_args(
        ["generate", "--prompt", "x", "--model-id", "black-forest-labs/FLUX.1-Kontext-dev"]))[0]
    assert (kontext[0].model_id, kontext[0].origin_file_pattern) == ("black-forest-labs/FLUX.1-Kontext-dev",
                                                                      "flux1-kontext-dev.safetensors")


def test_separate_files_state_their_kind_and_find_tokenizers_beside_them(tiny):
    repo = tiny["repo"]
    args = build_parser().parse_args(["generate", "--prompt", "x", "--dit", str(repo / "flux1-dev.safetensors"),
                                      "--t5", str(repo / "text_encoder_2")])
    configs, tok1, tok2 = model_configs_for(args)
    assert [(c.kind, c.path is not None) for c in configs] == [("dit", True), ("clip", False), ("t5", True),
                                                              ("vae", False)]
    assert (tok1.path, tok2.path) == (str(repo.absolute() / "tokenizer"), str(repo.absolute() / "tokenizer_2"))


def test_a_vae_given_as_dit_is_refused_by_flag(tiny, tmp_path, capsys):
    repo = tiny["repo"]
    rc, _ = run(tmp_path, "--dit", str(repo / "ae.safetensors"), "--vae", str(repo / "ae.safetensors"),
                "--clip", str(repo / "text_encoder"), "--t5", str(repo / "text_encoder_2"))
    err = capsys.readouterr().err
    assert rc == 2 and f"--dit {repo / 'ae.safetensors'}: that flag takes a dit, but it holds FLUX VAE" in err, err
    assert not PYTHON_NAMES.search(err), err


# ---------------------------------------------------------------------------------------------- messages

def test_missing_files_are_named_by_flag_all_at_once(tmp_path, capsys):
    rc = main(["generate", "--prompt", "x", "--dit", str(tmp_path / "nope.safetensors"), "--lora",
               str(tmp_path / "gone.safetensors:0.5"), "--tokenizer", str(tmp_path / "tok"),
               "--output", str(tmp_path / "x.tiff2")])
    err = capsys.readouterr().err
    assert rc == 2
    for expected in ("--dit", "nope.safetensors", "--lora", "gone.safetensors", "--tokenizer", "--output"):
        assert expected in err, err


def test_missing_modelscope_file_message_uses_flags(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_core", "generate", "--prompt", "a cat", "--skip-download",
         "--local-model-path", str(tmp_path), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    err = result.stderr
    assert "black-forest-labs/FLUX.1-dev" in err and "flux1-dev.safetensors" in err
    assert "--skip-download" in err and "--local-model-path" in err and "python -m flux_core download" in err
    # All four models are listed at once, each under its flag (from_pretrained lists every missing file).
    assert all(f"- --{kind}: " in err for kind in ("dit", "clip", "t5", "vae")), err
    assert not PYTHON_NAMES.search(err), err


def test_missing_tokenizer_message_names_it_the_places_and_the_flag(tiny, tmp_path, capsys):
    empty = tmp_path / "tok"
    empty.mkdir()
    rc, _ = run(tmp_path, "--model-dir", str(tiny["repo"]), "--tokenizer", str(empty))
    err = capsys.readouterr().err
    assert rc == 2
    assert "CLIP-L tokenizer" in err and str(empty) in err and str(empty / "tokenizer") in err
    assert "--tokenizer FOLDER" in err and not PYTHON_NAMES.search(err), err


def test_tokenizers_not_beside_the_files_fall_back_to_modelscope_and_say_where_they_looked(tiny, tmp_path, capsys):
    """Separate files in a folder without tokenizers: each place searched is printed, then FLUX.1-dev's
    tokenizer/ under --local-model-path is used (here absent, with --skip-download: a flag-named error)."""
    alone = tmp_path / "a" / "b" / "c"
    alone.mkdir(parents=True)
    shutil.copy(tiny["repo"] / "flux1-dev.safetensors", alone)
    configs, tok1, tok2 = model_configs_for(build_parser().parse_args(
        ["generate", "--prompt", "x", "--dit", str(alone / "flux1-dev.safetensors"), "--skip-download",
         "--local-model-path", str(tmp_path / "models")]))
    err = capsys.readouterr().err
    for folder in (alone, alone.parent, alone.parent.parent):
        assert str(folder.absolute() / "tokenizer") in err
    assert "--tokenizer FOLDER" in err
    assert (tok1.model_id, tok1.origin_file_pattern, tok1.skip_download) == ("black-forest-labs/FLUX.1-dev",
                                                                             "tokenizer/", True)
    assert tok1.local_model_path == str(tmp_path / "models")


def test_cli_message_translates_the_python_api_messages():
    from flux_core.models.text_encoders import load_t5_tokenizer
    with pytest.raises(FileNotFoundError) as e:
        load_t5_tokenizer("/nowhere/tokenizer_2")
    python = str(e.value)
    assert "T5 tokenizer" in python and "tokenizer_2_config" in python    # the Python API speaks Python
    cli = cli_message(python)
    assert "--tokenizer-2 FOLDER" in cli and "tokenizer_2/ folder" in cli and not PYTHON_NAMES.search(cli)
    assert cli_message("height=50 is not a multiple of 16") == "--height 50 is not a multiple of 16"
    url = "failed: /api/v1/models/x/repo/files?Revision=master&Root=tokenizer_2 (cause)"
    assert cli_message(url) == url                                        # names inside a URL stay as they are
    assert cli_message("pass skip_download=True, or set local_model_path= (or X)") == \
        "pass --skip-download, or set --local-model-path (or X)"
    assert cli_message("denoising_strength < 1 needs an input_image") == "--denoising-strength < 1 needs an --input-image"
    assert cli_message("kontext_images[0] is a str; the seed and the prompt") == \
        "--kontext-image[0] is a str; the seed and the prompt"


def test_pipeline_inputs_are_checked_before_any_model_loads_and_named_by_flag(tmp_path, capsys):
    # No models exist at all (downloads refused): every problem must come from the checks, all in one message.
    rc = main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), "--height", "50", "--seed", "-1",
               "--cfg-scale", "0.5", "--tea-cache-l1-thresh", "-1", "--tile-stride", "300", "--vram-limit", "-2",
               "--denoising-strength", "0.5", "--local-model-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    for flag in ("--height 50", "--seed -1", "--cfg-scale 0.5", "--tea-cache-l1-thresh -1", "--tile-stride 300",
                 "--vram-limit -2", "--denoising-strength", "--input-image", "--negative-prompt"):
        assert flag in err, (flag, err)
    assert not PYTHON_NAMES.search(err) and "negative_prompt" not in err and "None" not in err, err


def test_bad_output_extension_fails_before_any_model_loads(tmp_path, capsys):
    # No models exist at all: the error must come from the output check, not from loading.
    rc = main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "cat.tiff2"), "--skip-download",
               "--local-model-path", str(tmp_path)])
    assert rc == 2
    assert "--output" in capsys.readouterr().err


def test_sigmas_option_is_parsed():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--sigmas", "1,0.75,0.5"])
    assert args.sigmas == [1.0, 0.75, 0.5]


def test_model_dir_components_and_what_the_flags_replace(tiny, tmp_path):
    repo = tmp_path / "copy"
    shutil.copytree(tiny["repo"], repo)
    shutil.copy(repo / "flux1-dev.safetensors", repo / "flux1-krea-dev.safetensors")
    parse = lambda *a: build_parser().parse_args(["generate", "--prompt", "x", "--model-dir", str(repo), *a])  # noqa: E731
    with pytest.raises(ValueError, match="several DiTs.*flux1-dev.safetensors, flux1-krea-dev.safetensors.*--dit"):
        model_configs_for(parse())
    configs, tok1, _ = model_configs_for(parse("--dit", str(repo / "flux1-krea-dev.safetensors")))
    assert [(c.kind, Path(c.path).name) for c in configs] == [
        ("dit", "flux1-krea-dev.safetensors"), ("clip", "text_encoder"), ("t5", "text_encoder_2"),
        ("vae", "ae.safetensors")]
    assert tok1.path == str(repo.absolute() / "tokenizer")
    (repo / "ae.safetensors").unlink()
    shutil.rmtree(repo / "text_encoder")
    with pytest.raises(ValueError, match=r"has no clip, vae; .*--clip PATH --vae PATH"):
        model_configs_for(parse("--dit", str(repo / "flux1-krea-dev.safetensors")))


def test_tiled_dit_with_teacache_is_refused_before_any_model_loads(tmp_path, capsys):
    # --tiled tiles the DiT too (as DiffSynth-Studio); TeaCache follows one DiT call per step: both flags named.
    rc = main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), "--tiled", "--tea-cache-l1-thresh",
               "0.3", "--local-model-path", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--tiled runs the DiT once per tile" in err and "--tea-cache-l1-thresh" in err, err
    assert not PYTHON_NAMES.search(err), err
