"""Split training: `--task data_process` writes the rows' encodings, `--task sft:train` trains from them without the
VAE and the text encoders. On the CPU in float32 a cached run's losses and weights are bit-equal to the `--task sft`
run over the same data (issue 15's acceptance); the refusals name every unsupported input, and a cache that does not
fit the run is refused with the command that builds one."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_core.train.__main__ import main
from flux_core.train.args import TrainError, parse_args
from flux_core.train.cache import LOG, MANIFEST, ROWS
from flux_core.train.trainer import Trainer, train
from tests.tiny_train import (cached_argv, data_process_argv, make_kontext_data, make_train_setup, resumed_and_whole,
                              step_losses, train_argv)
from tests.tiny_train import one_thread  # noqa: F401 (module-wide autouse: tiny models run faster on one thread)

ENCODERS = ("vae", "text_encoder_1", "text_encoder_2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny setup and its cache (written once: data_process with the whole diffusers folder as --model_paths)."""
    tmp = tmp_path_factory.mktemp("cache world")
    setup = make_train_setup(tmp)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(parse_args(data_process_argv(setup, tmp / "cäche")))
    return setup, tmp / "cäche", result


def quietly(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    for k in x:
        assert torch.equal(x[k], y[k]), k


# ------------------------------------------------------------------------------------------------ equality
def test_data_process_loads_no_dit_and_writes_one_file_per_row(world):
    setup, cache, result = world
    # The diffusers folder holds all four models; data_process reads only the encoders' (the DiT is never loaded).
    assert result["models"] == sorted(ENCODERS) and (result["rows"], result["encoded"]) == (8, 8)
    manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["torch_dtype"] == "float32" and manifest["t5_sequence_length"] == 16
    assert (manifest["rows"], manifest["latent_sizes"], manifest["image_sizes"]) == (8, {"4x4": 8}, {"32x32": 8})
    assert sorted(manifest["encoders"]) == sorted(ENCODERS) and manifest["version"] == 1
    row = load_file(cache / ROWS / "000003.safetensors")
    assert {k: tuple(v.shape) for k, v in row.items()} == {"x0": (1, 16, 4, 4), "prompt_emb": (1, 16, 32),
                                                            "pooled": (1, 32)}
    assert all(v.dtype == torch.float32 for v in row.values())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_cached_run_is_bit_equal_to_sft(world, tmp_path, mode):
    """Repeats, accumulation and two epochs' orders: the same samples, timesteps, noise, losses and weights."""
    setup, cache, _ = world
    extra = ["--dataset_repeat", "2", "--gradient_accumulation_steps", "2", "--max_steps", "5", "--save_steps", "4"]
    if mode == "full":
        extra = ["--lora_base_model", "", "--trainable_models", "dit", "--learning_rate", "1e-3", *extra]
    quietly(train, parse_args(train_argv(setup, tmp_path / "sft", *extra)))
    cached = Trainer(parse_args(cached_argv(setup, cache, tmp_path / "cached", *extra)))
    quietly(cached.run)
    assert all(getattr(cached.pipe, slot) is None for slot in ENCODERS) and cached.pipe.dit is not None
    losses = step_losses(tmp_path / "sft")
    assert len(losses) == 5 and step_losses(tmp_path / "cached") == losses   # equal floats, not close ones
    for name in ("step-4.safetensors", "step-5.safetensors", "checkpoints/step-5/trainable.safetensors"):
        assert_same_weights(tmp_path / "sft" / name, tmp_path / "cached" / name)


def test_sft_train_with_the_dit_file_alone_and_resume(world, tmp_path):
    """No encoder file at all in --model_paths, and a cached run stopped and resumed ends where it would have."""
    setup, cache, _ = world

    def argv(output, *extra):
        argv = cached_argv(setup, cache, output, "--max_steps", "4", *extra)
        argv[argv.index("--model_paths") + 1] = json.dumps([str(setup.model / "transformer")])
        return argv
    start, whole = resumed_and_whole(argv, tmp_path, cut=2)
    assert start["resumed_from"] and start["start_step"] == 2
    quietly(train, parse_args(train_argv(setup, tmp_path / "sft", "--max_steps", "4")))
    assert_same_weights(tmp_path / "sft" / "step-4.safetensors", whole["path"])


def test_kontext_references_are_cached(world, tmp_path):
    setup = world[0]
    data = make_kontext_data(tmp_path / "kontext data")
    kontext = ["--extra_inputs", "kontext_images", "--num_epochs", "2"]

    def argv(*extra):
        argv = train_argv(setup, *extra, *kontext)
        at = argv.index("--dataset_metadata_path")
        del argv[at:at + 2]
        argv[argv.index("--dataset_base_path") + 1] = str(data)
        return argv
    quietly(train, parse_args(argv(tmp_path / "cache", "--task", "data_process")))
    row = load_file(tmp_path / "cache" / ROWS / "000000.safetensors")
    assert row["ref_tokens"].shape == (1, 6 + 4, 64) and row["ref_ids"].shape == (1, 10, 3)   # 48x32 + 32x32 refs
    quietly(train, parse_args(argv(tmp_path / "sft")))
    quietly(train, parse_args(cached_argv(setup, tmp_path / "cache", tmp_path / "cached", *kontext)))
    assert len(step_losses(tmp_path / "sft")) == 4 and step_losses(tmp_path / "cached") == step_losses(tmp_path / "sft")
    assert_same_weights(tmp_path / "sft" / "epoch-1.safetensors", tmp_path / "cached" / "epoch-1.safetensors")


# ------------------------------------------------------------------------------------------------ resume
def test_data_process_resumes_and_refuses_other_settings(world, tmp_path):
    setup, cache, _ = world
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    (folder / ROWS / "000002.safetensors").unlink()                # an interrupted run
    (folder / MANIFEST).write_text((folder / MANIFEST).read_text(encoding="utf-8").replace('"complete": true',
                                                                                           '"complete": false'))
    metadata = setup.data / "metadata.csv"
    original = metadata.read_text(encoding="utf-8")
    try:
        metadata.write_text(original.replace("a castle yellow", "a castle white"), encoding="utf-8")  # row 3 changed
        result = quietly(train, parse_args(data_process_argv(setup, folder)))
    finally:
        metadata.write_text(original, encoding="utf-8")
    assert (result["encoded"], result["skipped"]) == (2, 6)
    log = [json.loads(line) for line in (folder / LOG).read_text(encoding="utf-8").splitlines()]
    assert [e["row"] for e in log if e["event"] == "encoded"][-2:] == [2, 3]
    assert json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["complete"]
    assert torch.equal(load_file(folder / ROWS / "000002.safetensors")["x0"],
                       load_file(cache / ROWS / "000002.safetensors")["x0"])
    assert not torch.equal(load_file(folder / ROWS / "000003.safetensors")["prompt_emb"],
                           load_file(cache / ROWS / "000003.safetensors")["prompt_emb"])

    # settings that change every row's encoding: the rows made with the others are refused, not mixed in
    for flags, changed in ((["--height", "16", "--width", "16"],
                            "image_size: '--max_pixels 1048576' there, '--height 16 --width 16' now"),
                           (["--fp8_models", "t5"], "fp8_encoders: [] there, ['text_encoder_2'] now")):
        with pytest.raises(TrainError, match=re.escape(f"holds a cache made with other settings ({changed})")):
            quietly(train, parse_args(data_process_argv(setup, folder, *flags)))
    with pytest.raises(TrainError, match=r"holds a cache made with other settings \(t5_sequence_length: 16 there, "
                                         r"8 now\).*--overwrite"):
        quietly(train, parse_args(data_process_argv(setup, folder, "--t5_sequence_length", "8")))
    result = quietly(train, parse_args(data_process_argv(setup, folder, "--t5_sequence_length", "8", "--overwrite")))
    assert (result["encoded"], result["skipped"]) == (8, 0)
    assert load_file(folder / ROWS / "000000.safetensors")["prompt_emb"].shape == (1, 8, 32)


# ------------------------------------------------------------------------------------------------ refusals
def error_of(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 2
    return json.loads(out.getvalue().splitlines()[-1])["message"]


def test_uncacheable_inputs_are_refused_at_once(world, tmp_path):
    setup, cache, _ = world
    message = error_of(cached_argv(setup, cache, tmp_path / "run", "--extra_inputs",
                                   "kontext_images,controlnet_image,ipadapter_images,eligen_entity_masks,"
                                   "eligen_entity_prompts,flux_fill_image", "--validation_prompts", "a cat",
                                   "--dataset_metadata_path", str(setup.data / "metadata.csv")))
    assert message.startswith("--task sft:train: --extra_inputs controlnet_image,ipadapter_images,eligen_entity_masks,"
                              "eligen_entity_prompts,flux_fill_image: ")
    for part in ("--dataset_metadata_path", "--validation_prompts", "python -m flux_core generate", "--lora",
                 "Use --task sft"):
        assert part in message, part
    message = error_of(data_process_argv(setup, tmp_path / "c", "--extra_inputs",
                                         "step1x_reference_image,lora_encoder_inputs", "--lora_base_model", "",
                                         "--trainable_models", "lora_encoder"))
    assert message.startswith("--task data_process: --extra_inputs step1x_reference_image,lora_encoder_inputs: ")
    assert "--trainable_models lora_encoder" in message and "Use --task sft" in message
    assert not (tmp_path / "c").exists()   # refused before anything was written


def test_caches_that_do_not_fit_are_refused(world, tmp_path):
    setup, cache, _ = world
    # No manifest: the dataset folder itself.
    message = error_of(cached_argv(setup, setup.data, tmp_path / "a"))
    assert f"--dataset_base_path {setup.data}: no {MANIFEST} there" in message and "--task data_process" in message
    # Another dtype and T5 length: both named, and the command that builds a matching cache.
    message = error_of(cached_argv(setup, cache, tmp_path / "b", "--torch_dtype", "bfloat16",
                                   "--t5_sequence_length", "8"))
    assert f"--dataset_base_path {cache}: the cache does not fit this run" in message
    assert "encoded in float32, this run has --torch_dtype bfloat16" in message
    assert "its captions have 16 T5 tokens, this run has --t5_sequence_length 8" in message
    command = message.split("Build a matching cache: ")[1]
    assert command.startswith("python -m flux_core.train --task data_process --dataset_base_path ")
    assert "--torch_dtype bfloat16 --t5_sequence_length 8" in command and "--model_paths" in command
    message = error_of(cached_argv(setup, cache, tmp_path / "k", "--extra_inputs", "kontext_images"))
    assert "its rows hold no Kontext reference tokens, this run has --extra_inputs kontext_images" in message
    # A cache of other text and latent widths than the DiT's (edited manifest), and an unfinished one.
    for field, value, expected in (("text_width", 48, "its text tokens are 48 wide, the DiT's context_in_dim is 32"),
                                   ("latent_channels", 4, "its latents have 4 channels, the DiT reads 16"),
                                   ("complete", False, "its data_process run did not finish")):
        other = tmp_path / f"cache {field}"
        shutil.copytree(cache, other)
        manifest = json.loads((other / MANIFEST).read_text(encoding="utf-8"))
        (other / MANIFEST).write_text(json.dumps({**manifest, field: value}), encoding="utf-8")
        message = error_of(cached_argv(setup, other, tmp_path / field))
        assert f"--dataset_base_path {other}" in message and expected in message, message
        assert "--task data_process" in message
    # A FLEX.2 DiT: its extra input channels are VAE encodings of the step's inputs, which no cache holds.
    from tests.tiny_dit import make_diffusers_dit
    flex = setup.model / "transformer flex"   # beside the folder's tokenizers
    make_diffusers_dit(seed=5, in_channels=196, out_channels=64).save_pretrained(flex)
    argv = cached_argv(setup, cache, tmp_path / "flex")
    argv[argv.index("--model_paths") + 1] = json.dumps([str(flex)])
    message = error_of(argv)
    assert "the DiT has 196 input channels for 64 output channels (FLEX.2 / FLUX.1-Fill)" in message
    assert "train it with --task sft" in message


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes(world, tmp_path):
    """data_process over 2 processes (gloo on the CPU) writes the 1-process cache: each row once, by the process whose
    share it is; sft:train over 2 processes equals one process with 2 accumulation steps, as sft does."""
    import subprocess

    from tests.tiny_train import python, subprocess_env, two_processes_and_one
    setup, cache, _ = world
    launch = [python(), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux_core.train",
              *data_process_argv(setup, tmp_path / "cache")]
    run = subprocess.run(launch, env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "cache" / LOG).read_text(encoding="utf-8").splitlines()]
    assert log[0]["processes"] == 2 and log[-1]["event"] == "data_process_done" and log[-1]["encoded"] == 8
    assert [e["row"] for e in log if e["event"] == "encoded"] == [0, 2, 4, 6]   # the main process's share
    manifest = json.loads((tmp_path / "cache" / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["rows"] == 8
    for i in range(8):
        one = load_file(cache / ROWS / f"{i:06d}.safetensors")
        two = load_file(tmp_path / "cache" / ROWS / f"{i:06d}.safetensors")
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), i

    a, b = two_processes_and_one(lambda out, *extra: cached_argv(setup, cache, out, *extra), tmp_path)
    assert a.keys() == b.keys()
    print(f"2 processes vs 1 with accumulation: {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    for k in a:   # measured 0 (as for sft: the same sums on one thread each)
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
