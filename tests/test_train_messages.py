"""What the trainer says when its models cannot be loaded: the engine's errors in the trainer's own flags (entry N
of --model_paths / --model_id_with_origin_paths, --tokenizer_1_path, $DIFFSYNTH_SKIP_DOWNLOAD), never a Python
name, and never a reworded path; training_args.json written atomically; one definition of the training packages
and their install command, phrased by the node for ComfyUI."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from flux_core.demo import DEMO_COMMAND
from flux_core.messages import python_name, rename_parameters
from flux_core.train.__main__ import main
from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import load_pipeline
from tests.tiny_train import make_train_setup, train_argv

# The engine's Python names that must not reach a trainer user (outside the paths they gave).
PYTHON_NAMES = ("model_configs", "skip_download", "tokenizer_1_config", "tokenizer_2_config", "ModelConfig",
                "from_pretrained", "local_model_path", "origin_file_pattern", "path=", "model_id=", "pipe.")
# A folder whose name holds those names: a message quoting it must keep it exactly.
TRICKY = "skip_download model_configs[1] tokenizer_1_config"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train messages")
    s = make_train_setup(tmp)
    tricky = tmp / TRICKY
    for part in ("vae", "transformer"):  # component folders without tokenizers beside them
        shutil.copytree(s.model / part, tricky / part)
    s.tricky = tricky
    return s


def assert_no_python_names(message: str, *user_paths) -> None:
    for path in sorted(map(str, user_paths), key=len, reverse=True):
        message = message.replace(path, "<user path>")
    message = message.replace("model_id:origin_file_pattern", "<the trainer's notation (--help)>")
    found = [name for name in PYTHON_NAMES if name in message]
    assert not found, f"{found} in: {message}"


def load(setup, *argv, skip_kinds=()):
    args = parse_args(["--dataset_base_path", str(setup.data), "--lora_base_model", "dit", *argv])
    with pytest.raises(TrainError) as e:
        load_pipeline(args, torch.device("cpu"), skip_kinds=skip_kinds)
    return str(e.value)


@pytest.fixture
def offline(monkeypatch, setup, tmp_path):
    """No downloads, and an empty ModelScope folder whose path also holds Python names."""
    base = tmp_path / "skip_download base"
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    return base


# ------------------------------------------------------------------------------------------------ model entries
def test_a_second_vae_names_each_flag_entry_at_the_command_line_boundary(setup, tmp_path, capsys):
    """from_pretrained gets --model_paths' entries first, then --model_id_with_origin_paths': its model_configs[1]
    is the first entry of --model_id_with_origin_paths here, not the second of --model_paths."""
    second = setup.tricky / "vae"
    code = main(train_argv(setup, tmp_path / "out", "--model_id_with_origin_paths", str(second)))
    out, err = capsys.readouterr()
    assert code == 2
    message = json.loads(out.strip().splitlines()[-1])["message"]
    assert f"flux_core.train: error: {message}" in err
    assert message == (f"the 1st entry of --model_id_with_origin_paths {second} is a second FLUX VAE (autoencoder): "
                       f"the VAE is already loaded from the 1st entry of --model_paths {setup.model / 'vae'}. Remove "
                       f"one of the two from --model_paths / --model_id_with_origin_paths.")


def test_entries_skipped_by_validate_full_do_not_shift_the_numbers(setup):
    """validate_full leaves the DiT out (skip_kinds): from_pretrained then numbers the remaining configs, and its
    model_configs[1] is the 3rd entry of --model_paths."""
    paths = [str(setup.model / "transformer"), str(setup.model / "vae"), str(setup.tricky / "vae")]
    message = load(setup, "--model_paths", json.dumps(paths), skip_kinds=("dit",))
    assert message.startswith(f"the 3rd entry of --model_paths {paths[2]} is a second FLUX VAE")
    assert f"already loaded from the 2nd entry of --model_paths {paths[1]}." in message
    assert_no_python_names(message, *paths)


def test_missing_files_name_entries_the_environment_and_keep_every_path(setup, offline):
    missing = str(setup.tricky / "nope.safetensors")
    message = load(setup, "--model_paths", json.dumps([str(setup.tricky / "vae"), missing]),
                   "--model_id_with_origin_paths",
                   "black-forest-labs/FLUX.1-dev:ae.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/")
    lines = message.splitlines()
    assert lines[0].startswith("3 of 4 entries of --model_paths / --model_id_with_origin_paths name files that "
                               "are not there")
    assert f"- the 2nd entry of --model_paths: '{missing}' does not exist. Check the path, or give it as " \
           f"model_id:origin_file_pattern in --model_id_with_origin_paths to download it." in lines
    for number, pattern in ((1, "'ae.safetensors'"), (2, "'text_encoder_2/'")):
        line = next(l for l in lines if l.startswith(f"- the {'1st' if number == 1 else '2nd'} entry of "
                                                     f"--model_id_with_origin_paths: "))
        assert f"ModelScope model 'black-forest-labs/FLUX.1-dev': no file matches the pattern {pattern} in " \
               f"{offline / 'black-forest-labs/FLUX.1-dev'}; $DIFFSYNTH_SKIP_DOWNLOAD is set, so nothing was " \
               f"downloaded." in line
        assert "give local files in --model_paths, or set $DIFFSYNTH_MODEL_BASE_PATH to the folder" in line
    assert lines[-1] == f"To see FluxCore work without any download, try the bundled demo model: `{DEMO_COMMAND}`."
    assert_no_python_names(message, setup.tricky, offline)


def test_missing_tokenizers_name_the_tokenizer_flags_and_the_environment(setup, offline):
    message = load(setup, "--model_paths", json.dumps([str(setup.tricky / "vae")]))
    for flag, folder in (("--tokenizer_1_path", "tokenizer"), ("--tokenizer_2_path", "tokenizer_2")):
        assert f"Fix: pass {flag} .../{folder} naming a {folder}/ folder, or put {folder}/ beside the model " \
               f"files." in message
        assert f"Searched: {setup.tricky / 'vae' / folder}, {setup.tricky / folder}, " in message  # kept as written
    assert message.count("$DIFFSYNTH_SKIP_DOWNLOAD is set, so it was not downloaded") == 2
    assert_no_python_names(message, setup.tricky, offline)


def test_bad_tokenizer_folders_are_named_by_their_flag(setup, tmp_path):
    gone = tmp_path / "skip_download gone"
    message = load(setup, "--model_paths", setup.model_paths, "--tokenizer_2_path", str(gone))
    assert message == (f"--tokenizer_2_path: '{gone}' does not exist. Check the path, or leave --tokenizer_2_path "
                       f"out to use the tokenizer folder beside the model files (or FLUX.1-dev's).")
    # A folder without tokenizer files (the engine's TokenizerFilesError: a traceback and exit 1 before).
    empty = tmp_path / "tokenizer_1_config"
    empty.mkdir()
    message = load(setup, "--model_paths", setup.model_paths, "--tokenizer_1_path", str(empty))
    assert f"{empty} holds no complete set of tokenizer files" in message
    assert "Pass --tokenizer_1_path FOLDER with a folder that holds them" in message
    assert_no_python_names(message, empty)


def test_the_engine_warning_about_empty_slots_speaks_of_flag_entries(setup, caplog):
    paths = [str(setup.model / "vae"), str(setup.model / "transformer")]
    with caplog.at_level(logging.WARNING, logger="flux_core.pipeline"):
        message = load(setup, "--model_paths", json.dumps(paths))
    assert "hold no CLIP-L text encoder, T5 text encoder" in message
    warning = next(r.getMessage() for r in caplog.records if "no model for" in r.getMessage())
    assert "no model for the pipeline's CLIP-L text encoder, the pipeline's T5 text encoder" in warning
    assert f"the 1st entry of --model_paths {paths[0]}: FLUX VAE" in warning
    assert f"the 2nd entry of --model_paths {paths[1]}: FLUX DiT" in warning
    assert_no_python_names(warning, *paths)
    assert not logging.getLogger("flux_core.pipeline").filters  # the rewording ends with the load


# ------------------------------------------------------------------------------------------------ the helper
def test_rename_parameters_never_rewrites_a_protected_value():
    user = "/data/skip_download/model_configs[0] x/ae.safetensors"
    message = (f"model_configs[0] {user}: skip_download is set; pass skip_download=True; see "
               f"'skip_download' and ./skip_download/x and no_skip_download.")
    table = [(r"model_configs\[(\d)\]", lambda m: f"entry {int(m.group(1)) + 1}"),
             (python_name("skip_download") + "(=True)?", "$SKIP")]
    assert rename_parameters(message, table, [user]) == (
        f"entry 1 {user}: $SKIP is set; pass $SKIP; see 'skip_download' and ./skip_download/x and no_skip_download.")
    # Unprotected, the path is rewritten: the protection is what keeps it.
    assert user not in rename_parameters(message, table)


def test_a_rule_matches_around_a_protected_value():
    text = "ModelConfig(model_id='org/skip_download'): no file"
    assert rename_parameters(text, [(r"ModelConfig\(model_id='([^']*)'\)", r"model '\1'"),
                                    (python_name("skip_download"), "$SKIP")],
                             ["org/skip_download"]) == "model 'org/skip_download': no file"


# ------------------------------------------------------------------------------------------------ run folder
def test_training_args_json_is_replaced_atomically(setup, tmp_path, monkeypatch):
    """A write that dies half way (disk full, killed) leaves the previous training_args.json whole."""
    output = tmp_path / "out"
    output.mkdir()
    old = '{"lora_rank": 8}'
    (output / "training_args.json").write_text(old, encoding="utf-8")
    real_write_text = Path.write_text

    def dies_half_way(self, data, *args, **kwargs):
        if "training_args" in self.name:
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device (simulated)")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="simulated"):
        main(train_argv(setup, output, "--max_steps", "1"))
    assert (output / "training_args.json").read_text(encoding="utf-8") == old
    assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ packages
def test_the_node_reports_the_engines_package_list_and_install_command(monkeypatch):
    import flux_core.train.packages as packages
    from nodes.train_nodes import require_training_packages as node_check

    monkeypatch.setattr(packages, "TRAINING_PACKAGES", ("accelerate", "peft", "fluxcore_no_such_package"))
    with pytest.raises(RuntimeError) as node:
        node_check()
    with pytest.raises(TrainError) as engine:
        packages.require_training_packages()
    assert str(node.value) == (f"FluxCoreTrainLoRA: training needs accelerate and peft and fluxcore_no_such_package; "
                               f"not installed in ComfyUI's Python: fluxcore_no_such_package. Install them there: "
                               f"{packages.INSTALL_TRAINING_PACKAGES}. Then restart ComfyUI.")
    assert str(engine.value) == ("training needs accelerate and peft and fluxcore_no_such_package; not installed: "
                                 f"fluxcore_no_such_package. Install them: {packages.INSTALL_TRAINING_PACKAGES}.")


def test_the_install_command_names_only_packages_published_under_their_own_names():
    from flux_core.train.packages import INSTALL_TRAINING_PACKAGES
    assert INSTALL_TRAINING_PACKAGES == ('pip install accelerate peft (or, from a FluxCore checkout, '
                                         'pip install ".[train]")')
    assert not re.search(r"fluxcore\[", INSTALL_TRAINING_PACKAGES, re.I)


def test_fp8_models_entries_take_their_slots_from_what_was_loaded(setup):
    # --fp8_models names a --model_paths entry: its slots are those from_pretrained put it in, counted from the
    # configs actually loaded (validate_full's skipped DiT does not shift them).
    from flux_core.train.trainer import fp8_slots
    parts = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    paths = [str(setup.model / p) for p in parts]
    args = parse_args(["--dataset_base_path", str(setup.data), "--lora_base_model", "dit", "--model_paths",
                       json.dumps(paths), "--tokenizer_1_path", str(setup.model / "tokenizer"),
                       "--tokenizer_2_path", str(setup.model / "tokenizer_2"), "--fp8_models",
                       f"{paths[3]},{paths[1]}"])
    pipe, configs = load_pipeline(args, torch.device("cpu"))
    assert fp8_slots(args, configs, pipe) == ["text_encoder_2", "vae"]
    args.fp8_models = f"clip,{paths[2]}"   # a model name and the same model by its entry: listed once
    assert fp8_slots(args, configs, pipe) == ["text_encoder_1"]
    pipe, configs = load_pipeline(args, torch.device("cpu"), skip_kinds=("dit",))
    args.fp8_models = paths[1]
    assert fp8_slots(args, configs, pipe) == ["vae"]
