"""flux_core.train end to end on the tiny FLUX model and 8 solid-colour images: the LoRA learns (loss and
pipeline output), its file loads in our pipeline and in diffusers, full fine-tuning, validate_lora/_full,
resume after SIGKILL and resume past an epoch boundary (skipping a corrupt checkpoint) equal an uninterrupted
run, 2-process data parallel equals 1 process with accumulation, the plain-launch warning, the progress bar on
a terminal, Kontext inputs with FP8 storage (equal to a run on float8-rounded weights) and gradient
checkpointing, clean stop on SIGINT."""
import contextlib
import io
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux_core.image import pil_to_tensor
from flux_core.lora import clear_lora, load_lora
from flux_core.math import image_ids, text_ids
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.train.__main__ import main
from flux_core.train.args import parse_args
from flux_core.train.loss import flow_matching_loss, sample_generator, training_schedule
from flux_core.train.trainer import Trainer, train
from tests.tiny_train import SIZE, make_kontext_data, make_train_setup, python, read_log, subprocess_env, train_argv

from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
pytestmark = pytest.mark.slow
DOUBLE_AND_SINGLE_NO_LINEAR1 = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,norm1_a.linear,"
                                "norm1_b.linear,proj_out,norm.linear")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_train_setup(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def pipe(setup):
    return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(setup.model))])


def run_in_process(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train(parse_args(argv))
    return result, [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora run") / "öut put"
    argv = train_argv(setup, output, "--num_epochs", "6", "--lora_rank", "8", "--save_steps", "16",
                      "--validation_prompts", setup.captions["red é.png"], "--validation_steps", "24",
                      "--validation_height", "32", "--validation_width", "32",
                      "--validation_num_inference_steps", "4")
    result, events = run_in_process(argv)
    return output, result, events


def training_images(setup):
    return {caption: Image.open(setup.data / file).convert("RGB") for file, caption in setup.captions.items()}


def fixed_loss(pipe, setup) -> float:
    """The objective on fixed draws (4 per image): the training loss without its sampling noise."""
    schedule, total = training_schedule(), 0.0
    with torch.no_grad():
        for i, (caption, image) in enumerate(training_images(setup).items()):
            x0 = pipe.encode_image(pil_to_tensor(image))
            prompt = pipe.encode_prompt(caption, 16)
            for k in range(4):
                loss, _ = flow_matching_loss(pipe.dit, x0, prompt, schedule, sample_generator(99, k, i), 1.0,
                                             torch.float32)
                total += loss.item()
    return total / (4 * len(setup.captions))


def output_distance(pipe, setup) -> tuple[float, float]:
    """Mean distance of the pipeline's output for each training caption to its training image: in the latent
    space (to the image's VAE latent) and in pixels (to the image's VAE reconstruction)."""
    latent_d, pixel_d = [], []
    for caption, image in training_images(setup).items():
        target = pipe.encode_image(pil_to_tensor(image))
        out = pipe(prompt=caption, height=SIZE, width=SIZE, seed=0, num_inference_steps=8, t5_sequence_length=16,
                   embedded_guidance=1.0, output_type="latent", progress_bar_cmd=None)
        latent_d.append(((out - target) ** 2).mean().item())
        pixel_d.append(((pipe.decode_latents(out) - pipe.decode_latents(target)) ** 2).mean().item())
    return float(np.mean(latent_d)), float(np.mean(pixel_d))


# ------------------------------------------------------------------------------------------------ LoRA learns
def test_lora_training_lowers_the_loss_and_moves_outputs_towards_the_training_images(lora_run, pipe, setup):
    output, result, events = lora_run
    assert result["path"] == output / "step-48.safetensors" and not result["stopped"]
    clear_lora(pipe.dit)
    loss_before, (latent_before, pixel_before) = fixed_loss(pipe, setup), output_distance(pipe, setup)
    report = load_lora(pipe.dit, result["path"])
    assert report.loras[0].format == "kohya" and len(report.layers) == 26   # 2 x 10 double + 2 x 3 single
    loss_after, (latent_after, pixel_after) = fixed_loss(pipe, setup), output_distance(pipe, setup)
    clear_lora(pipe.dit)
    print(f"loss {loss_before:.3f} -> {loss_after:.3f}; latent distance {latent_before:.3f} -> {latent_after:.3f}; "
          f"pixel distance {pixel_before:.4f} -> {pixel_after:.4f}")
    # Measured ratios 0.516 (loss) and 0.504 (latent distance); an untrained LoRA gives 1. The same LoRA at a
    # quarter of its strength gives 0.590 and 0.631: the latent bound catches that, the loss bound (tightened from
    # 0.8) only says that training learned.
    assert loss_after < 0.65 * loss_before
    assert latent_after < 0.58 * latent_before
    # The tiny VAE has random weights, so its decoder blurs every latent alike: pixels move less than latents.
    assert pixel_after < pixel_before
    steps = [e["loss"] for e in events if e["event"] == "step"]
    assert np.mean(steps[-16:]) < np.mean(steps[:16])  # the logged (noisy) loss falls too


def test_progress_log_checkpoints_and_validation_images(lora_run):
    output, result, events = lora_run
    assert events == read_log(output)  # stdout and train_log.jsonl say the same
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 48
    start = events[0]
    assert start["total_steps"] == 48 and start["steps_per_epoch"] == 8 and start["mode"] == "lora"
    step = next(e for e in events if e["event"] == "step")
    assert set(step) >= {"step", "epoch", "loss", "lr", "images_per_s", "eta_s", "total_steps"}
    assert step["lr"] == pytest.approx(1e-2 / 3)  # DiffSynth's ConstantLR: lr/3 for the first 5 steps
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [16, 32, 48]
    validations = [e for e in events if e["event"] == "validation"]
    assert [v["step"] for v in validations] == [24, 48]
    assert Image.open(validations[-1]["images"][0]).size == (SIZE, SIZE)
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-48"
    assert json.loads((output / "training_args.json").read_text(encoding="utf-8"))["lora_rank"] == 8


def test_lora_checkpoint_starts_from_a_saved_lora(setup, lora_run, tmp_path):
    from lora_tools import read_lora
    from flux_core.train.args import TrainError
    from flux_core.train.trainable import export_lora

    saved = read_lora(lora_run[1]["path"])
    trainer = Trainer(parse_args(train_argv(setup, tmp_path / "out", "--lora_rank", "8", "--lora_checkpoint",
                                            str(lora_run[1]["path"]))))
    trainer.setup()
    start = export_lora(trainer.pipe.dit)
    assert start.layers.keys() == saved.layers.keys()
    for name, layer in saved.layers.items():
        # Measured 0 (the saved tensors, loaded back); a delta put into another layer or at another scale is off
        # by a sizeable part of its own size (deltas up to 0.31).
        assert torch.allclose(start.layers[name].delta(), layer.delta(), atol=1e-6, rtol=0), name
    with pytest.raises(TrainError, match="has rank 8, but --lora_rank is 4"):
        Trainer(parse_args(train_argv(setup, tmp_path / "out2", "--lora_checkpoint", str(lora_run[1]["path"])))).setup()


# ------------------------------------------------------------------------------------------------ file formats
def diffusers_forward(transformer, x):
    with torch.no_grad():
        return transformer(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                           timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                           guidance=x["guidance"]).sample


@pytest.mark.parametrize("fmt, targets", [("kohya", DOUBLE_AND_SINGLE_NO_LINEAR1), ("diffusers", None)])
def test_saved_lora_loads_in_diffusers_with_the_trained_effect(setup, pipe, tmp_path, fmt, targets):
    """kohya: diffusers' kohya reader splits a single block's linear1 with FLUX.1's hard-coded sizes (3072 x 3
    + 12288), so on the tiny model the kohya check leaves linear1 out; the diffusers-format file has it all."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    extra = ["--num_epochs", "1", "--lora_format", fmt] + (["--lora_target_modules", targets] if targets else [])
    result, _ = run_in_process(train_argv(setup, tmp_path / "out", *extra))
    g = torch.Generator().manual_seed(0)
    x = dict(img=torch.randn(1, 16, 64, generator=g), img_ids=image_ids(1, 8, 8), txt=torch.randn(1, 7, 32, generator=g),
             txt_ids=text_ids(1, 7), timesteps=torch.tensor([0.6]), y=torch.randn(1, 32, generator=g),
             guidance=torch.tensor([1.0]))
    diffusers_logging.set_verbosity_error()
    reference = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                             tokenizer_2=None, transformer=FluxTransformer2DModel.from_pretrained(setup.model / "transformer"))
    base = diffusers_forward(reference.transformer, x)
    reference.load_lora_weights(str(result["path"]))
    theirs = diffusers_forward(reference.transformer, x)
    clear_lora(pipe.dit)
    load_lora(pipe.dit, result["path"])
    with torch.no_grad():
        ours = pipe.dit(**x)
    clear_lora(pipe.dit)
    assert (theirs - base).abs().max() > 1e-3        # the LoRA does something in diffusers (measured 0.53, 0.69) ...
    # ... the same thing as in FluxCore: measured 2.7e-6; one LoRA layer missing moved a tiny DiT's output by
    # >= 1.2e-2, a strength 1% off by 0.1 (test_lora.py).
    assert (theirs - ours).abs().max() < 1e-4


def test_full_fine_tune_loads_with_load_model_and_validate_scripts_render(setup, lora_run, tmp_path):
    from flux_core.loading.loader import load_model
    from flux_core.train.validate import saved_dit_config

    result, events = run_in_process(train_argv(setup, tmp_path / "full", "--num_epochs", "1", "--lora_base_model", "",
                                               "--trainable_models", "dit", "--learning_rate", "1e-3"))
    assert result["path"].name == "epoch-0.safetensors" and events[0]["mode"] == "full"
    tuned = load_model(result["path"], config=saved_dit_config(result["path"]), torch_dtype=torch.float32, kind="dit")
    base = load_model(setup.model / "transformer", torch_dtype=torch.float32, kind="dit")
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > 0.9 * len(base.state_dict())
    common = ["--model_paths", setup.model_paths, "--height", "32", "--width", "48", "--num_inference_steps", "2",
              "--t5_sequence_length", "16", "--torch_dtype", "float32", "--device", "cpu", "--prompt",
              setup.captions["red é.png"]]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate_full", "--checkpoint", str(result["path"]), "--output", str(tmp_path / "fü ll.png"),
                     *common]) == 0
        assert main(["validate_lora", "--lora_path", str(lora_run[1]["path"]), "--output", str(tmp_path / "lö ra.png"),
                     *common]) == 0
    assert Image.open(tmp_path / "fü ll.png").size == Image.open(tmp_path / "lö ra.png").size == (48, 32)


def kontext_argv(setup, data, output, *extra):
    return ["--dataset_base_path", str(data), "--model_paths", setup.model_paths, "--torch_dtype", "float32",
            "--t5_sequence_length", "16", "--lora_base_model", "dit", "--lora_rank", "4", "--output_path",
            str(output), "--extra_inputs", "kontext_images", "--use_gradient_checkpointing", "--num_epochs", "2",
            "--learning_rate", "1e-2", *extra]


def frozen_matrices(model):
    """The tensors FP8 storage is for: frozen floating weights of 2+ dims (Linear, Embedding, Conv)."""
    return [p for p in model.parameters() if p.is_floating_point() and p.dim() >= 2 and not p.requires_grad]


def test_kontext_fp8_and_gradient_checkpointing(setup, tmp_path):
    data = make_kontext_data(tmp_path / "kontext data")
    slots = ("dit", "text_encoder_1", "text_encoder_2")

    fp8 = Trainer(parse_args(kontext_argv(setup, data, tmp_path / "fp8", "--fp8_models", "t5,clip,dit")))
    fp8.setup()
    for slot in slots:  # every frozen weight matrix rests in float8; biases, norms and the LoRA do not
        model = getattr(fp8.pipe, slot)
        assert frozen_matrices(model) and all(p.dtype == torch.float8_e4m3fn for p in frozen_matrices(model)), slot
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.dim() < 2 or p.requires_grad), slot
    assert all(p.dtype == torch.float32 for p in fp8.pipe.vae.parameters())
    assert all(p.dtype == torch.float32 for _, p in fp8.params) and fp8.pipe.dit.gradient_checkpointing
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = fp8._run()
    assert result["step"] == 4
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 4 and all(np.isfinite(losses))

    # References: the same run without --fp8_models, on weights rounded to float8 and back by torch itself
    # (what FP8 storage with float32 compute must compute), and on the original weights.
    def reference(name, rounded):
        trainer = Trainer(parse_args(kontext_argv(setup, data, tmp_path / name)))
        trainer.setup()
        if rounded:
            with torch.no_grad():
                for slot in slots:
                    for p in frozen_matrices(getattr(trainer.pipe, slot)):
                        p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
        with contextlib.redirect_stdout(io.StringIO()):
            return load_file(trainer._run()["path"])
    trained, rounded, plain = load_file(result["path"]), reference("rounded", True), reference("plain", False)
    assert trained.keys() == rounded.keys() and any(v.abs().max() > 1e-3 for k, v in trained.items() if "lora_up" in k)
    fp8_error = max((trained[k] - rounded[k]).abs().max().item() for k in trained)
    storage_effect = max((trained[k] - plain[k]).abs().max().item() for k in trained)
    print(f"fp8 run vs rounded-weights run: {fp8_error:.2e}; vs original weights: {storage_effect:.2e}")
    # Measured: 0 (the same float32 values reach the same kernels). The smallest real mistake, computing on
    # the unrounded weights (the storage having no effect), moves the LoRA by `storage_effect` (measured
    # 2e-2): the bound is far below it, and the storage effect must be real.
    assert fp8_error <= 1e-6
    assert storage_effect > 1e-4


def test_resume_past_an_epoch_boundary_from_the_newest_complete_checkpoint(setup, tmp_path, capsys):
    """8 steps per epoch. A run stopped at step 12 left states at steps 5, 10 (epoch 1, 2 steps in) and 12;
    step 12's optimizer file is then damaged. --resume must skip it with a warning, restore step 10 with its
    epoch and place, and end with the weights of an uninterrupted run."""
    argv = lambda out, *x: train_argv(setup, out, "--num_epochs", "2", "--save_steps", "5",  # noqa: E731
                                      "--keep_checkpoints", "3", *x)
    run_in_process(argv(tmp_path / "whole"))
    cut = tmp_path / "cut"
    run_in_process(argv(cut, "--max_steps", "12"))
    root = cut / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-10", "step-12", "step-5"]
    state = json.loads((root / "step-10" / "state.json").read_text(encoding="utf-8"))
    assert (state["epoch"], state["position"]) == (1, 2)
    (root / "step-12" / "optimizer.pt").write_bytes(b"\x80garbage" * 64)
    capsys.readouterr()
    _, events = run_in_process(argv(cut, "--resume"))
    err = capsys.readouterr().err
    assert f"skipping the corrupt checkpoint {root / 'step-12'}" in err and "optimizer.pt" in err
    assert "starting a new run" not in err
    start = events[0]
    assert start["start_step"] == 10 and start["resumed_from"] == str(root / "step-10")
    assert start["skipped_checkpoints"] == [str(root / "step-12")]
    assert [e["epoch"] for e in events if e["event"] == "step"] == [1] * 6
    for name in ("step-16.safetensors", "checkpoints/step-16/trainable.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(cut / name)
        assert a.keys() == b.keys()
        for k in a:
            # Measured 0 (the same computation on one thread); a resume into the wrong epoch's data order
            # changes the weights by ~1e-2.
            assert torch.allclose(a[k], b[k], atol=1e-6), (name, k)


# ------------------------------------------------------------------------------------------------ processes
def start(argv, **kw):
    return subprocess.Popen([python(), "-m", "flux_core.train", *argv], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", **kw)


def test_resume_after_sigkill_ends_with_the_same_weights(setup, tmp_path):
    argv = lambda out, *x: train_argv(setup, out, "--num_epochs", "3", "--save_steps", "3",  # noqa: E731
                                      "--gradient_accumulation_steps", "2", *x)
    whole = start(argv(tmp_path / "whole"))
    killed = start(argv(tmp_path / "killed"))
    for line in killed.stdout:  # kill -9 in the middle of step 5 of 12 (a checkpoint was saved at step 3)
        if json.loads(line).get("step") == 5:
            killed.kill()
            break
    assert killed.wait() == -signal.SIGKILL
    assert whole.wait() == 0, whole.stderr.read()
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-3"
    resumed = subprocess.run([python(), "-m", "flux_core.train", *argv(tmp_path / "killed", "--resume")],
                             env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    assert resumed.returncode == 0, resumed.stderr
    start_event = json.loads(resumed.stdout.splitlines()[0])
    assert start_event["start_step"] == 3 and start_event["resumed_from"].endswith("step-3")
    for name in ("step-12.safetensors", "checkpoints/step-12/trainable.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for k in a:
            # Measured 0 (the same computation on one thread); a resume into the wrong epoch's data order changes
            # the weights by ~1e-2 (above), a lost optimizer state by the size of a step (lr 1e-2).
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it did train


def test_two_processes_equal_one_process_with_accumulation(setup, tmp_path):
    common = ("--num_epochs", "2", "--fp8_models", "dit,t5,clip")   # DDP leaves the frozen float8 weights alone
    launch = [python(), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux_core.train",
              *train_argv(setup, tmp_path / "two", *common)]
    two = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           encoding="utf-8")
    one = subprocess.run([python(), "-m", "flux_core.train",
                          *train_argv(setup, tmp_path / "one", *common, "--gradient_accumulation_steps", "2")],
                         env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr
    log = read_log(tmp_path / "two")
    assert log[0]["num_processes"] == 2 and log[0]["total_steps"] == 8 and log[0]["effective_batch"] == 2
    assert "2 processes, effective batch 2 (1 per process x 2 processes x 1 gradient accumulation step)" in err
    assert "asked for more than one process" not in err
    assert sum(e["event"] == "step" for e in log) == 8           # one log line per step, from the main process
    a, b = load_file(tmp_path / "one" / "epoch-1.safetensors"), load_file(tmp_path / "two" / "epoch-1.safetensors")
    # Measured 0 (two processes of batch 1 sum to the same gradient as two accumulated steps). A gradient that is
    # summed where it should be averaged doubles every update, moving the weights by the size of a step (lr 1e-2).
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with several GPUs accelerate turns --multi_gpu on itself")
def test_plain_accelerate_launch_of_two_processes_on_a_cpu_warns_that_it_runs_one(setup, tmp_path):
    launch = [python(), "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux_core.train",
              *train_argv(setup, tmp_path / "out", "--max_steps", "1")]
    run = subprocess.run(launch, env=subprocess_env(), capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "was asked for more than one process" in run.stderr and "--multi_gpu" in run.stderr
    assert "1 process, effective batch 1 (1 per process x 1 process x 1 gradient accumulation step)" in run.stderr
    assert read_log(tmp_path / "out")[0]["num_processes"] == 1


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_progress_bar_on_a_terminal_beside_an_intact_json_stream(setup, tmp_path):
    """stderr on a pseudo-terminal (as in a shell), stdout piped (as to the trainer node)."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # a new pty is 0 columns wide
    run = subprocess.Popen([python(), "-m", "flux_core.train", *train_argv(setup, tmp_path / "out", "--num_epochs", "1",
                                                                           "--gradient_accumulation_steps", "2")],
                           env=subprocess_env(), stdout=subprocess.PIPE, stderr=slave,
                           text=True, encoding="utf-8")
    os.close(slave)
    chunks = []

    def read_terminal():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    out, _ = run.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert run.returncode == 0, terminal[-3000:]
    events = [json.loads(line) for line in out.splitlines()]      # every stdout line is one JSON event
    assert [e["event"] for e in events] == ["start"] + ["step"] * 4 + ["checkpoint", "done"]
    assert events[0]["effective_batch"] == 2 and events[0]["num_processes"] == 1
    assert "training: 100%" in terminal and "4/4" in terminal      # the bar: steps done / total
    assert "loss=" in terminal and "images_per_s=" in terminal and "<00:00" in terminal   # loss, speed, time left
    assert "step/s" in terminal or "s/step" in terminal                                   # tqdm's rate
    assert '"event"' not in terminal                               # no JSON on the terminal's stderr
    assert "effective batch 2 (1 per process x 1 process x 2 gradient accumulation steps)" in terminal
    piped = subprocess.run([python(), "-m", "flux_core.train", *train_argv(setup, tmp_path / "piped", "--max_steps",
                                                                           "1")],
                           env=subprocess_env(), capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert piped.returncode == 0 and "training:" not in piped.stderr   # not a terminal: no bar


def test_sigint_stops_after_the_step_with_a_resumable_checkpoint(setup, tmp_path):
    run = start(train_argv(setup, tmp_path / "out", "--num_epochs", "50"))
    for line in run.stdout:
        if json.loads(line).get("step") == 3:
            run.send_signal(signal.SIGINT)
            break
    rest = [json.loads(line) for line in run.stdout]
    assert run.wait(timeout=60) == 0, run.stderr.read()
    stopped = rest[-1]
    assert stopped["event"] == "stopped" and stopped["step"] >= 3
    resumed = subprocess.run([python(), "-m", "flux_core.train",
                              *train_argv(setup, tmp_path / "out", "--num_epochs", "50", "--resume", "--max_steps",
                                          str(stopped["step"] + 1))],
                             env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert events[0]["start_step"] == stopped["step"] and events[-1]["step"] == stopped["step"] + 1
    assert sys.platform != "win32"  # SIGINT delivery as tested is POSIX; Windows uses the STOP file / CTRL_BREAK
