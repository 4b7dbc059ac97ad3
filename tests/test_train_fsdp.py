"""FSDP through accelerate on a CPU: 2 processes launched with the shipped FSDP config (FSDP2 full shard over gloo)
train the LoRA (and the full DiT) to the weights one process reaches with the same global batch (1 process with
--gradient_accumulation_steps 2: accelerate's single-process run is the reference), and a run resumed under FSDP
ends where the uninterrupted one does."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from accelerate.utils import DistributedType

import flux_core.train
from flux_core.train import distributed
from tests.tiny_train import make_train_setup, python, read_log, subprocess_env, train_argv

CONFIGS = Path(flux_core.train.__file__).parent / "accelerate_configs"


def fake_accelerator(kind: DistributedType, processes: int = 2, stage: int = 2) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin),
                           no_sync=lambda model: "ddp no_sync")


def test_what_fsdp_and_deepspeed_refuse_is_named_by_flag_all_at_once():
    fsdp, ds = fake_accelerator(DistributedType.FSDP), fake_accelerator(DistributedType.DEEPSPEED)
    assert distributed.run_problems(fake_accelerator(DistributedType.MULTI_CPU), ["dit"], 4) == []   # DDP: both fine
    (fp8,) = distributed.run_problems(fsdp, ["dit"], 4)   # FSDP accumulates as DDP does
    assert fp8.startswith("--fp8_models with FSDP") and "leave --fp8_models out" in fp8
    fp8, accumulation, resume = distributed.run_problems(ds, ["t5"], 2, "latest")
    assert fp8.startswith("--fp8_models with DEEPSPEED")
    assert accumulation.startswith("--gradient_accumulation_steps 2 with DeepSpeed") and "use 1" in accumulation
    assert resume.startswith("--resume with DeepSpeed") and "resumes only under the strategy that saved it" in resume
    assert "under DDP or FSDP" not in resume   # no invitation to resume across strategies
    assert distributed.run_problems(fsdp, [], 4, "latest") == []   # FSDP resumes (test below)


def test_strategies_and_their_needs():
    ddp, fsdp = fake_accelerator(DistributedType.MULTI_GPU), fake_accelerator(DistributedType.FSDP)
    zero2, zero3 = (fake_accelerator(DistributedType.DEEPSPEED, stage=s) for s in (2, 3))
    single = fake_accelerator(DistributedType.NO, processes=1)
    assert [distributed.strategy(a) for a in (single, ddp, fsdp, zero2)] == ["single", "ddp", "fsdp", "deepspeed"]
    assert [distributed.zero_stage(a) for a in (ddp, zero2, zero3)] == [0, 2, 3]
    # only DDP skips the all-reduce inside an accumulation window; at its last micro-step every strategy syncs
    assert distributed.no_sync(ddp, None, boundary=False) == "ddp no_sync"
    for acc in (ddp, fsdp, zero2, single):
        assert distributed.no_sync(acc, None, boundary=True).__class__.__name__ == "nullcontext"
    assert distributed.no_sync(fsdp, None, boundary=False).__class__.__name__ == "nullcontext"
    # sharded weights: validation runs the model on every process
    assert [distributed.model_runs_on_every_process(a) for a in (single, ddp, fsdp, zero2, zero3)] == \
        [False, False, True, False, True]
    assert distributed.cpu_processes({"WORLD_SIZE": "2"}) is (not torch.cuda.is_available())
    assert distributed.cpu_processes({}) is False


def test_process_groups_wait_a_day_at_barriers(monkeypatch):
    """A resumed data_process or generate --prompts-file may leave one process with nothing to do, waiting at the
    last barrier for hours: every group we create (PartialState for both, the trainer's Accelerator) gets a 24 h
    timeout, not torch's 10 min (NCCL) / 30 min (gloo)."""
    import accelerate
    from datetime import timedelta
    made = {}
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: made.setdefault("state", kwargs))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: made.setdefault("accelerator", kwargs)
                        and SimpleNamespace(distributed_type=DistributedType.NO))
    distributed.process_state()
    assert made["state"]["timeout"] == timedelta(hours=24)
    distributed.make_accelerator(kwargs_handlers=["ddp kwargs"])
    handlers = made["accelerator"]["kwargs_handlers"]
    assert handlers[0] == "ddp kwargs" and handlers[1].timeout == timedelta(hours=24)
    assert handlers[1].to_kwargs() == {"timeout": timedelta(hours=24)}   # the backend stays accelerate's choice


def test_full_parameters_leaves_buffers_alone():
    """The gathered state dict holds buffers as well as the trained parameters: only parameters are swapped in."""
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.linear.weight.requires_grad_(False)
            self.register_buffer("scale", torch.full((2,), 3.0))
            self.linear.register_buffer("shift", torch.zeros(2))

    model, acc = WithBuffer(), fake_accelerator(DistributedType.FSDP)
    acc.is_main_process = True
    bias, buffers = model.linear.bias, (model.scale, model.linear.shift)
    with distributed.full_parameters(acc, model):   # a plain module: FSDP2's gather gives the same full tensors
        assert model.linear.bias is not bias and torch.equal(model.linear.bias, bias)
        assert model.linear.bias.requires_grad and model.scale is buffers[0] and model.linear.shift is buffers[1]
    assert model.linear.bias is bias


def test_deepspeed_checkpoints_resume_nowhere():
    from flux_core.train.args import TrainError
    torch_layout = {"state": {}, "param_groups": [{"params": [0, 1]}]}
    with pytest.raises(TrainError) as refused:   # its optimizer.pt is one partition: not a DDP optimizer state
        distributed.check_resume(fake_accelerator(DistributedType.MULTI_CPU), Path("run/checkpoints/step-2"),
                                 {"strategy": "deepspeed"}, torch_layout, Path("run/step-2.safetensors"))
    assert "saved under DeepSpeed, this run is a single process or DDP" in str(refused.value)
    assert "Start a new run from its weights run/step-2.safetensors" in str(refused.value)
    # a DeepSpeed run: run_problems refuses --resume whatever saved the checkpoint, with the other problems
    distributed.check_resume(fake_accelerator(DistributedType.DEEPSPEED), Path("c"), {"strategy": "ddp"},
                             torch_layout, Path("w"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_train_setup(tmp_path_factory.mktemp("fsdp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_launch(config: str, *argv: str) -> subprocess.Popen:
    """`accelerate launch --config_file <shipped config> --num_processes 2 -m flux_core.train ...` (the config's
    distributed_type FSDP starts 2 processes on a machine without GPUs too)."""
    command = [python(), "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "flux_core.train", *argv]
    return subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8")


def one_process(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([python(), "-m", "flux_core.train", *argv], env=subprocess_env(), capture_output=True,
                          text=True, encoding="utf-8")


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


def fsdp_and_one(setup, tmp_path, config: str, *extra: str, steps: int = 3) -> tuple[dict, dict, dict]:
    """(one process's, 2 FSDP processes' step-<steps> weights, the FSDP run's start log event)."""
    two = fsdp_launch(config, *train_argv(setup, tmp_path / "two", "--max_steps", str(steps), "--save_steps",
                                          str(steps), *extra))
    one = one_process(*train_argv(setup, tmp_path / "one", "--max_steps", str(steps), "--save_steps", str(steps),
                                  "--gradient_accumulation_steps", "2", *extra))
    _, err = two.communicate(timeout=900)
    assert two.returncode == 0, err[-12000:]
    assert one.returncode == 0, one.stderr[-4000:]
    start = read_log(tmp_path / "two")[0]
    return weights(tmp_path / "one" / f"step-{steps}.safetensors"), \
        weights(tmp_path / "two" / f"step-{steps}.safetensors"), start


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_lora_equals_one_process_with_the_same_global_batch(setup, tmp_path):
    """With a validation image at the end: under FSDP every process runs the sharded DiT, the main one saves it."""
    validation = ("--validation_prompts", next(iter(setup.captions.values())), "--validation_num_inference_steps", "2",
                  "--validation_height", "32", "--validation_width", "32")
    one, two, start = fsdp_and_one(setup, tmp_path, "fsdp_lora.yaml", *validation)
    assert start["num_processes"] == 2 and start["effective_batch"] == 2 and start["distributed"].startswith("fsdp2 ("), start
    diff = largest_difference(one, two)
    print(f"FSDP LoRA, 2 processes vs 1 with accumulation: {diff:.2e}")
    assert diff <= 1e-6, diff
    assert any(v.abs().max() > 0 for k, v in two.items() if "lora_B" in k or "lora_up" in k)   # it trained
    images = {run: sorted((tmp_path / run / "validation").iterdir()) for run in ("one", "two")}
    assert [p.name for p in images["two"]] == [p.name for p in images["one"]] == ["step-3-0.png"]
    a, b = (np.asarray(Image.open(images[run][0]), dtype=np.int16) for run in ("one", "two"))
    assert np.abs(a - b).max() <= 1   # the same weights, the same image (rounding to 8 bits aside)


@pytest.mark.slow
def test_fsdp_full_dit_equals_one_process_with_the_same_global_batch(setup, tmp_path):
    full = ("--lora_base_model", "", "--trainable_models", "dit", "--learning_rate", "1e-3")
    one, two, start = fsdp_and_one(setup, tmp_path, "fsdp_full.yaml", *full, steps=2)
    assert start["mode"] == "full" and start["distributed"].startswith("fsdp2 ("), start
    diff = largest_difference(one, two)
    print(f"FSDP full DiT, 2 processes vs 1 with accumulation: {diff:.2e}")
    assert diff <= 1e-6, diff


@pytest.mark.slow
def test_fsdp_resumed_run_ends_where_one_process_does(setup, tmp_path):
    """2 FSDP steps, stopped; --resume to step 4 (the sharded optimizer state saved whole, loaded back into
    shards) ends at one uninterrupted process's step 4 (same global batch)."""
    first = fsdp_launch("fsdp_lora.yaml", *train_argv(setup, tmp_path / "two", "--max_steps", "2", "--save_steps", "2"))
    one = one_process(*train_argv(setup, tmp_path / "one", "--max_steps", "4", "--save_steps", "4",
                                  "--gradient_accumulation_steps", "2"))
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0 and one.returncode == 0, err[-4000:] + one.stderr[-4000:]
    resumed = fsdp_launch("fsdp_lora.yaml", *train_argv(setup, tmp_path / "two", "--max_steps", "4", "--save_steps",
                                                        "2", "--resume"))
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-12000:]
    starts = [e for e in read_log(tmp_path / "two") if e["event"] == "start"]
    assert starts[-1]["start_step"] == 2 and starts[-1]["resumed_from"], starts
    diff = largest_difference(weights(tmp_path / "one" / "step-4.safetensors"),
                              weights(tmp_path / "two" / "step-4.safetensors"))
    print(f"FSDP resumed at step 2 vs 1 process, step 4: {diff:.2e}")
    assert diff <= 1e-6, diff
