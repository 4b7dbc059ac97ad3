"""`python -m flux_core generate`: what is checked before any model loads (--output, --device, --sigmas), and what
the command prints in its own words (the user's paths kept as given, warnings and log lines in flags, --quiet)."""
import logging
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import flux_core.pipeline_models
from flux_core import model_config, run_cost
from flux_core.__main__ import build_parser, cli_message, main, model_configs_for
from flux_core.image import save_image
from flux_core.inputs import check_device
from flux_core.pipeline import FluxImagePipeline
from flux_core.scheduler import explicit_sigmas
from tests.offline import no_network  # noqa: F401 (autouse: no download in these tests)

SMALL = ["--height", "32", "--width", "32", "--steps", "1", "--t5-sequence-length", "8", "--device", "cpu",
         "--dtype", "float32"]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model fails the test: every problem below must be found before from_pretrained."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called: the command line was not checked before loading")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", classmethod(refuse))


def errors_of(capsys, *args) -> str:
    rc = main(["generate", "--prompt", "x", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


# ---------------------------------------------------------------------------------------------- the user's paths

def test_paths_that_look_like_option_names_are_printed_as_given(tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.chdir(tmp_path)
    err = errors_of(capsys, "--model-dir", "model_dir", "--input-image", "input_image", "--tokenizer-2", "tokenizer_2",
                    "--tokenizer", "tokenizer_1_config", "--lora", "skip_download:0.5")
    assert "--model-dir model_dir: does not exist." in err, err
    assert "--input-image input_image: cannot be read as an image" in err and "'input_image'" in err, err
    assert "--tokenizer-2 tokenizer_2: does not exist." in err, err
    assert "--tokenizer tokenizer_1_config: does not exist." in err, err
    assert "--lora skip_download: does not exist." in err, err
    assert "--model-dir --model-dir" not in err and "--input-image --input-image" not in err, err


def test_protected_values_leave_the_python_names_around_them_translated():
    # `--dit dit` and `--t5 model`: the same words inside pipe.dit, kind='dit', model_configs[0] are still translated.
    options = vars(build_parser().parse_args(["generate", "--prompt", "x", "--dit", "dit", "--t5", "model",
                                              "--model-dir", "cfg_scale"]))
    text = ("model_configs[0] dit: kind='dit' (the model for pipe.dit), but it holds FLUX VAE. Pick the right file, "
            "or change kind=.; seed=3 in cfg_scale/x and cfg_scale; model_configs")
    assert cli_message(text, options) == (
        "--dit dit: that flag takes a dit, but it holds FLUX VAE. Give that flag the right file.; --seed 3 in "
        "cfg_scale/x and cfg_scale; the model flags (--dit/--vae/--clip/--t5 or --model-dir)")


# ---------------------------------------------------------------------------------------------- --output

@pytest.mark.parametrize("suffix", [".psd", ".pcd", ".xpm", ".fits"])
def test_output_extensions_pil_only_reads_are_refused_before_loading(tmp_path, capsys, no_loading, suffix):
    assert suffix in Image.registered_extensions()          # PIL knows (reads) them: the old check let them through
    err = errors_of(capsys, "--output", str(tmp_path / f"o{suffix}"))
    assert f"--output {tmp_path / f'o{suffix}'}: PIL cannot write '{suffix}' files; use .png" in err, err
    with pytest.raises(ValueError, match=f"PIL cannot write '{suffix}'"):   # was a KeyError after the whole run
        save_image(Image.new("RGB", (8, 8)), tmp_path / f"o{suffix}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".xbm", ".wmf"])
def test_output_formats_that_cannot_hold_an_rgb_image_are_refused(tmp_path, capsys, no_loading, suffix):
    # PIL lists writers for these, but XBM takes only 1-bit images and WMF's writer is a stub.
    err = errors_of(capsys, "--output", str(tmp_path / f"o{suffix}"))
    assert f"--output {tmp_path / f'o{suffix}'}: PIL cannot write the image as" in err, err


def test_output_folder_that_cannot_be_written_is_refused_by_flag(tmp_path, capsys, no_loading):
    (tmp_path / "file").write_text("")
    err = errors_of(capsys, "--output", "/proc/nope/o.png", "--output", str(tmp_path / "file" / "o.png"))
    assert f"--output {tmp_path / 'file' / 'o.png'}: cannot write into {tmp_path / 'file'}" in err, err
    err = errors_of(capsys, "--output", "/proc/nope/o.png")
    assert "--output /proc/nope/o.png: cannot write into /proc/nope" in err, err
    err = errors_of(capsys, "--output", "/proc/o.png")     # a folder that exists, where no file can be made
    assert "--output /proc/o.png: cannot write into /proc" in err, err


def test_output_folder_that_can_be_created_passes_and_is_not_left_behind(tmp_path, capsys, no_loading):
    out = tmp_path / "new" / "deeper" / "o.jpg"
    err = errors_of(capsys, "--output", str(out), "--height", "50")   # another problem stops it after the checks
    assert "--height 50" in err and "--output" not in err, err
    assert not (tmp_path / "new").exists()
    for suffix in (".png", ".jpg", ".webp", ".tif", ".bmp"):
        assert save_image(Image.new("RGB", (8, 8)), tmp_path / f"o{suffix}").is_file()


# ---------------------------------------------------------------------------------------------- --device

def test_check_device_parses_and_requires_the_backend(monkeypatch):
    assert check_device("device", None) is None and check_device("device", "cpu") == torch.device("cpu")
    for bad, message in (("foo", "device='foo' is not a device name"), ("cuda:x", "not a device name"),
                         ("meta", "FluxCore runs on 'cuda', 'cpu' or 'mps', not 'meta'")):
        with pytest.raises(ValueError, match=message):
            check_device("device", bad)
    with pytest.raises(TypeError, match="device=3 is a int"):
        check_device("device", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
        check_device("device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("device", "cuda:1") == torch.device("cuda", 1)
    assert check_device("device", torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:2': this machine has 2 CUDA device\(s\), 'cuda:0'..'cuda:1'"):
        check_device("device", "cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available"):
        check_device("device", "mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("device", "mps") == torch.device("mps")
    with pytest.raises(ValueError, match="MPS has one device"):
        check_device("device", "mps:1")


def test_bad_device_is_refused_before_loading_by_flag(tmp_path, monkeypatch, capsys, no_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # the same on a GPU machine
    out = ["--output", str(tmp_path / "o.png")]
    err = errors_of(capsys, *out, "--device", "cuda")
    assert "--device cuda: CUDA is not available here" in err and "device=" not in err, err
    err = errors_of(capsys, *out, "--device", "foo")
    assert "--device foo is not a device name" in err, err


# ---------------------------------------------------------------------------------------------- --sigmas

@pytest.mark.parametrize("sigmas", [[1.0, float("nan")], [float("nan")], [float("inf"), 0.5], [1.0, 0.5, float("nan")]])
def test_explicit_sigmas_refuse_values_that_are_not_finite(sigmas):
    with pytest.raises(ValueError, match="finite"):
        explicit_sigmas(sigmas)


def test_sigmas_are_checked_before_loading_by_flag(tmp_path, capsys, no_loading):
    out = ["--output", str(tmp_path / "o.png")]
    err = errors_of(capsys, *out, "--sigmas", "0.5,0.9")
    assert "--sigmas [0.5, 0.9] must be a non-empty, strictly decreasing" in err, err
    assert "--sigmas [1, nan] must be" in errors_of(capsys, *out, "--sigmas", "1,nan")


# ---------------------------------------------------------------------------------------------- warnings

def test_warning_and_estimate_advice_is_translated_to_flags():
    with pytest.warns(run_cost.SlowRunWarning) as slow:
        run_cost.check_run_time(1e18, torch.device("cpu"), "30 steps")
    with pytest.warns(run_cost.ActivationMemoryWarning) as memory:
        run_cost.check_activation_memory(9, 10, "cpu", "height=32, width=32")
    with pytest.raises(ValueError) as too_big:
        run_cost.check_activation_memory(11, 10, "cpu", "height=32, width=32")
    kontext = ("The DiT was loaded from x, a FLUX.1 Kontext model, but no kontext_images were given: Kontext edits a "
               "reference image, and without one it generates from the text alone. Pass "
               "kontext_images=PIL.Image.open(path).convert('RGB').")
    translated = [cli_message(str(w.message)) for w in (*slow, *memory)] + [cli_message(str(too_big.value)),
                                                                             cli_message(kontext)]
    for text in translated:
        assert not any(p in text for p in ("kontext_images", "PIL.Image", "device=", " height/", "batch")), text
    assert "Run on a GPU (--device cuda), or lower --height/--width or --steps." in translated[0]
    assert "Lower --height/--width or the --kontext-image sizes" in translated[1]
    assert "Lower --height/--width, or pass smaller --kontext-image images." in translated[2]
    assert "no --kontext-image was given" in translated[3] and translated[3].endswith("Pass --kontext-image PATH.")


def fake_loading(monkeypatch):
    """from_pretrained stand-in: logs one detection line and warns as the real one can, then fails (a
    ValueError, which main() prints as an error)."""
    def load(cls, **kwargs):
        logging.getLogger("flux_core.pipeline").info("FluxImagePipeline: model_configs[0] /m/dit.sft: FLUX DiT "
                                                     "(bfl layout) -> pipe.dit")
        warnings.warn("Run on a GPU (device='cuda'). Pass kontext_images=PIL.Image.open(path).convert('RGB').",
                      run_cost.SlowRunWarning)
        raise ValueError("stop here")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", classmethod(load))


LOCAL_FILES = ["--dit", __file__, "--vae", __file__, "--clip", __file__, "--t5", __file__]


def test_main_prints_warnings_and_info_lines_in_flags_and_restores_both(tmp_path, monkeypatch, capsys):
    fake_loading(monkeypatch)
    logger = logging.getLogger("flux_core")
    before = (warnings.showwarning, list(logger.handlers), logger.level)
    err = errors_of(capsys, "--output", str(tmp_path / "o.png"), *LOCAL_FILES, "--tokenizer", str(tmp_path),
                    "--tokenizer-2", str(tmp_path))
    assert "--dit /m/dit.sft: detected FLUX DiT (bfl layout)" in err, err
    assert "warning (SlowRunWarning): Run on a GPU (--device cuda). Pass --kontext-image PATH." in err, err
    assert "error: stop here" in err
    assert (warnings.showwarning, list(logger.handlers), logger.level) == before


def test_quiet_hides_the_info_lines_but_not_warnings(tmp_path, monkeypatch, capsys):
    fake_loading(monkeypatch)
    logger = logging.getLogger("flux_core")
    monkeypatch.setattr(logger, "level", logging.INFO)   # even where the program calling main() logs at INFO
    err = errors_of(capsys, "--output", str(tmp_path / "o.png"), *LOCAL_FILES, "--tokenizer", str(tmp_path),
                    "--tokenizer-2", str(tmp_path), "--quiet")
    assert "detected" not in err and "warning (SlowRunWarning)" in err, err


# ---------------------------------------------------------------------------------------------- --skip-download

def test_skipping_set_by_the_environment_names_flag_and_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(model_config.ENV_SKIP_DOWNLOAD, "true")
    err = errors_of(capsys, "--output", str(tmp_path / "o.png"), "--local-model-path", str(tmp_path / "models"))
    assert "--skip-download (or $DIFFSYNTH_SKIP_DOWNLOAD) is set, so nothing was downloaded" in err, err
    assert "(by DIFFSYNTH_SKIP_DOWNLOAD)" not in err
    err = errors_of(capsys, "--output", str(tmp_path / "o.png"), "--local-model-path", str(tmp_path / "models"),
                    "--skip-download")
    assert "--skip-download is set, so nothing was downloaded" in err and "$DIFFSYNTH" not in err, err
    given = vars(build_parser().parse_args(["generate", "--prompt", "x", "--skip-download"]))
    assert cli_message("skip_download is set, so it was not downloaded", given) == \
        "--skip-download is set, so it was not downloaded"
    assert cli_message("skip_download is set, so it was not downloaded") == \
        "--skip-download (or $DIFFSYNTH_SKIP_DOWNLOAD) is set, so it was not downloaded"
    assert cli_message("skip_download is set by $DIFFSYNTH_SKIP_DOWNLOAD, so it was not downloaded") == \
        "--skip-download (or $DIFFSYNTH_SKIP_DOWNLOAD) is set, so it was not downloaded"


# ---------------------------------------------------------------------------------------------- tokenizers

def test_tokenizers_beside_the_files_are_searched_where_the_python_api_searches(tmp_path, monkeypatch):
    """The command line asks flux_core.pipeline_models.search_roots (one definition of "beside")."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tokenizer").mkdir(parents=True)
    (elsewhere / "tokenizer_2").mkdir()
    asked = []
    monkeypatch.setattr(flux_core.pipeline_models, "search_roots",
                        lambda paths: asked.append(paths) or [elsewhere])
    configs, tok1, tok2 = model_configs_for(build_parser().parse_args(
        ["generate", "--prompt", "x", "--dit", __file__, "--skip-download"]))
    assert (tok1.path, tok2.path) == (str(elsewhere / "tokenizer"), str(elsewhere / "tokenizer_2"))
    assert [Path(p) for p in asked] == [Path(__file__)] * len(asked) and asked


# ---------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_a_run_prints_detections_estimates_and_the_kontext_warning_in_flags(tmp_path, capsys):
    from tests.tiny_flux_files import write_model_files

    files = write_model_files(tmp_path / "models")
    common = ["--prompt", "x", *SMALL, "--dit", str(files["kontext_dit"]), "--clip", str(files["clip"]), "--t5",
              str(files["t5"]), "--vae", str(files["vae"]), "--skip-download", "--seed", "1"]
    assert main(["generate", *common, "--output", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    for kind, title in (("dit", "FLUX DiT"), ("clip", "CLIP-L text encoder"), ("t5", "T5-XXL text encoder"),
                        ("vae", "FLUX VAE")):
        assert f"--{kind} {files['kontext_dit' if kind == 'dit' else kind]}: detected {title}" in err, err
    assert "the DiT's activations for --height 32, --width 32" in err and "GiB" in err, err
    assert "TFLOP of DiT compute" in err, err
    assert ("warning (KontextWithoutImageWarning): " in err and "no --kontext-image was given" in err
            and "Pass --kontext-image PATH." in err), err
    assert main(["generate", *common, "--output", str(tmp_path / "q.png"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "detected" not in err and "activations" not in err and "KontextWithoutImageWarning" in err, err
    assert Image.open(tmp_path / "q.png").size == (32, 32)
