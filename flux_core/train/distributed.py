"""Several processes through accelerate: which backend a launch gets, and what DDP, FSDP and DeepSpeed each need from
the trainer (how the trained model is prepared, how its full weights and optimizer state are read and restored,
which processes run the model for validation).

`accelerate launch --multi_gpu --num_processes N` on a machine without GPUs starts N processes that set WORLD_SIZE,
but accelerate only joins them into one gloo group when told it runs on the CPU (`cpu=True`); without it every
process runs alone (checked with accelerate 1.15: DistributedType.NO, num_processes 1). accelerate 1.15 also keeps
FSDP off on the CPU (MULTI_CPU is not among the types it turns into FSDP) although PyTorch's FSDP2 (`fully_shard`)
runs over gloo; `make_accelerator` switches it on there, so the FSDP path a GPU run takes is the one CPU tests run.

The strategies, as the trainer sees them:
- "single", "ddp": the model's parameters are whole on every process (DDP averages the gradients).
- "fsdp": each process holds a shard of every parameter (DTensors), frozen ones too; reading the full weights and
  running the model are collectives, so every process must take part.
- "deepspeed": ZeRO-2 shards the optimizer state and gradients, ZeRO-3 the weights as well; DeepSpeed's engine
  does the accumulation and the optimizer step.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# How long a collective (a barrier, a reduce) waits for the slowest process before the group aborts. Processes get
# uneven shares: on a resumed data_process or `generate --prompts-file` one process may find its rows or prompts done
# and wait at the final barrier while the others encode or generate for hours (a FLUX.1-dev image is ~30 s on a GPU,
# a cache of 100k rows far longer), and torch's defaults (NCCL 10 min, gloo 30 min) would abort that wait. 24 h is
# longer than any share we expect, yet still ends a run whose peer really died.
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)


def cpu_processes(env: dict | None = None) -> bool:
    """True when several processes were launched (WORLD_SIZE > 1) and there is no GPU: they then work together
    over gloo, which accelerate sets up only with cpu=True."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_group_kwargs():
    """accelerate's InitProcessGroupKwargs for every process group we create: PROCESS_GROUP_TIMEOUT (NCCL, gloo and
    DeepSpeed's init_distributed all take it)."""
    from accelerate.utils import InitProcessGroupKwargs
    return InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)


@dataclass(frozen=True)
class SingleProcess:
    """What process_state gives when this process runs alone and accelerate is not installed (it comes with the
    `train` extra; a plain install generates too): the fields and the barrier `generate --prompts-file` uses."""
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True
    device: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's PartialState for this process: its index, the process count and its device (cuda:LOCAL_RANK
    with GPUs); one process when not launched by `accelerate launch`. Its group waits PROCESS_GROUP_TIMEOUT.
    Without accelerate (a plain install) a lone process gets a SingleProcess."""
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        return SingleProcess()
    return PartialState(cpu=cpu_processes(), **process_group_kwargs().to_kwargs())


def fsdp_requested(env: dict | None = None) -> bool:
    """`accelerate launch --use_fsdp` (or a config file with distributed_type: FSDP) launched this process."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(**kwargs):
    """The trainer's Accelerator: gloo between CPU processes (cpu_processes), and FSDP also on the CPU when it was
    asked for (FSDP2 only: FSDP1 needs CUDA); its group waits PROCESS_GROUP_TIMEOUT. `kwargs` go to Accelerator
    (kwargs_handlers are added to)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from .args import TrainError

    handlers = [*kwargs.pop("kwargs_handlers", []), process_group_kwargs()]
    acc = Accelerator(cpu=cpu_processes(), kwargs_handlers=handlers, **kwargs)
    if fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()   # from the FSDP_* variables the launcher set
        if plugin.fsdp_version != 2:
            raise TrainError("FSDP on a machine without GPUs needs FSDP2 (fully_shard, gloo): launch with "
                             "--fsdp_version 2 (or fsdp_version: 2 in the config file; the shipped "
                             "flux_core/train/accelerate_configs/fsdp_*.yaml have it).")
        state = AcceleratorState()
        state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
        # every AcceleratorState() copies PartialState's type over its own (accelerate mirrors them the same way)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def strategy(acc) -> str:
    """"single", "ddp", "fsdp" or "deepspeed": what holds the trained weights (see the module docstring)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if acc.num_processes > 1 else "single"


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The trained model inside a DDP wrapper or a DeepSpeed engine (their `.module`); FSDP2 shards in place."""
    return getattr(model, "module", model)


def describe(acc, model: torch.nn.Module) -> str:
    """The strategy for the run log, with what it did to the model: "fsdp2 (27 modules sharded)", "ddp", ..."""
    kind = strategy(acc)
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule
        inner = unwrapped(model)
        sharded = sum(isinstance(m, FSDPModule) for m in inner.modules())
        return f"fsdp{acc.state.fsdp_plugin.fsdp_version} ({sharded} modules sharded)"
    if kind == "deepspeed":
        return f"deepspeed zero-{zero_stage(acc)}"
    return kind


def zero_stage(acc) -> int:
    """DeepSpeed's ZeRO stage (0 when not DeepSpeed)."""
    if strategy(acc) != "deepspeed":
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def run_problems(acc, fp8_slots: list[str], accumulation: int, resume: str | None = None) -> list[str]:
    """What a launch with FSDP or DeepSpeed cannot train, each with its fix (the trainer raises them at once)."""
    kind, problems = strategy(acc), []
    if kind in ("fsdp", "deepspeed") and fp8_slots:
        problems.append(f"--fp8_models with {kind.upper()}: FP8 storage wraps the frozen weights that {kind.upper()} "
                        f"shards (and gathers through collectives that have no float8 on gloo); leave "
                        f"--fp8_models out (sharding already divides their memory across the GPUs) or launch with "
                        f"DDP.")
    if kind == "deepspeed" and accumulation > 1:
        problems.append(f"--gradient_accumulation_steps {accumulation} with DeepSpeed: its engine accumulates on its "
                        f"own schedule; use 1 (and more GPUs for a larger batch), or FSDP, which accumulates as DDP "
                        f"does.")
    if kind == "deepspeed" and resume is not None:
        problems.append("--resume with DeepSpeed: its optimizer state is partitioned across the processes and the "
                        "checkpoints hold the main process's part only, so a DeepSpeed run cannot continue from one "
                        "(and a checkpoint resumes only under the strategy that saved it); start a new run from the "
                        "saved weights (--lora_checkpoint for a LoRA) with a new --output_path.")
    return problems


# How each strategy's checkpoints hold the optimizer state: a single process and DDP save torch's own
# optimizer.state_dict() alike (so they resume each other), FSDP saves it gathered whole and keyed by parameter name,
# DeepSpeed only the main process's partition. torch loads none of them as another.
CHECKPOINT_LAYOUTS = {"ddp": ("a single process or DDP", "keyed by parameter position"),
                      "fsdp": ("FSDP", "keyed by parameter name"),
                      "deepspeed": ("DeepSpeed", "the main process's partition only")}


def checkpoint_strategy(acc) -> str:
    """The strategy a checkpoint records (the trainer's settings): strategy(acc), with "single" as "ddp"."""
    kind = strategy(acc)
    return "ddp" if kind == "single" else kind


def check_resume(acc, folder, saved: dict, optimizer: dict, weights) -> None:
    """Refuse to resume, under this run's strategy, a checkpoint whose optimizer state another strategy saved
    (`saved`: its settings; `optimizer`: its optimizer state, whose keys tell the strategy of a checkpoint that
    does not record it; `weights`: its weights file, to start a new run from). A DeepSpeed run is left to
    run_problems, which refuses --resume with it whatever saved the checkpoint."""
    from .args import TrainError

    now = checkpoint_strategy(acc)
    params = [p for group in optimizer.get("param_groups", []) for p in group.get("params", [])]
    was = saved.get("strategy") or ("fsdp" if params and isinstance(params[0], str) else "ddp")
    if now == "deepspeed" or was == now:
        return
    (was_name, was_layout), (now_name, now_layout) = CHECKPOINT_LAYOUTS[was], CHECKPOINT_LAYOUTS[now]
    relaunch = {"ddp": "python -m flux_core.train, or accelerate launch with ddp.yaml",
                "fsdp": "accelerate launch with the fsdp_*.yaml config it used"}.get(was)
    way = f"Resume it the way it was launched ({relaunch}), or start" if relaunch else "Start"
    raise TrainError(f"--resume {folder}: the checkpoint was saved under {was_name}, this run is {now_name}; its "
                     f"optimizer state ({was_layout}) cannot be loaded under {now_name} ({now_layout}). {way} a new "
                     f"run from its weights {weights} (--lora_checkpoint for a LoRA) with a new --output_path.")


def prepare(acc, trained: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int):
    """(model, optimizer) through accelerate.prepare, after what each strategy needs first:
    DDP: the frozen weights are not broadcast from process 0 (every process loaded the same files; gloo cannot
    broadcast float8 at all). FSDP: nothing (accelerate applies fully_shard to every DoubleStreamBlock /
    SingleStreamBlock the config names, then the whole model). DeepSpeed: its micro batch per GPU, which
    accelerate otherwise reads from a DataLoader the trainer does not pass."""
    kind = strategy(acc)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            trained, [n for n, p in trained.named_parameters() if not p.requires_grad])
    elif kind == "deepspeed":
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    return acc.prepare(trained, optimizer)


def trained_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what trains, named as in the unwrapped model: after prepare() under FSDP these are the
    sharded parameters that replaced the module's own (so the list made before prepare() is stale)."""
    inner = unwrapped(model)
    return [(n, p) for n, p in inner.named_parameters() if p.requires_grad]


def no_sync(acc, model, boundary: bool):
    """The context of one micro-step of an accumulation window: DDP skips the gradient all-reduce before the
    window's last one (accelerate's no_sync); FSDP reduce-scatters every micro-step into its sharded gradients
    (FSDP2 modules have no no_sync; the sum is the same); DeepSpeed's engine decides itself."""
    if boundary or strategy(acc) != "ddp":
        return contextlib.nullcontext()
    return acc.no_sync(model)


def model_runs_on_every_process(acc) -> bool:
    """True when running the model needs every process (its weights sharded: FSDP, ZeRO-3): validation images are
    then made by all processes together (the main one saves them)."""
    return strategy(acc) == "fsdp" or zero_stage(acc) == 3


@contextlib.contextmanager
def full_parameters(acc, model: torch.nn.Module):
    """Entered by every process (the weights are gathered through collectives): inside, the main process's
    `model` holds its trained parameters whole, as plain tensors on the CPU, so code that reads them from the
    module (export_lora, state_dict(), the checkpoint) works unchanged; afterwards the sharded ones are back.
    Single process, DDP and ZeRO-2 hold them whole already: nothing happens."""
    kind = strategy(acc)
    if kind not in ("fsdp", "deepspeed") or (kind == "deepspeed" and zero_stage(acc) < 3):
        yield
        return
    inner = unwrapped(model)
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=True))
    else:   # ZeRO-3: accelerate gathers the 16-bit weights (zero3_save_16bit_model), all of them
        trained = {n for n, _ in trained_parameters(inner)}
        full = {n: t for n, t in acc.get_state_dict(model).items() if n in trained}
    swapped = []
    try:
        if acc.is_main_process:
            for name, tensor in full.items():
                owner, _, leaf = name.rpartition(".")
                module = inner.get_submodule(owner)
                old = module._parameters.get(leaf)
                if old is None:   # a buffer (the state dict holds those too): FSDP2 keeps them whole on every process
                    continue
                # Put straight into _parameters: FSDP2's state-dict hooks stay out of it (its groups are sharded)
                module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
                swapped.append((module, leaf, old))
        yield
    finally:
        for module, leaf, old in reversed(swapped):
            module._parameters[leaf] = old


def optimizer_state(acc, model: torch.nn.Module, optimizer) -> dict:
    """The optimizer state to save (on the main process), gathered whole under FSDP (keyed by parameter names,
    torch.distributed.checkpoint's layout) and torch's own optimizer.state_dict() otherwise. A collective under FSDP."""
    if strategy(acc) != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(unwrapped(model), _plain(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(acc, model: torch.nn.Module, optimizer, trainable: dict[str, torch.Tensor], state: dict) -> None:
    """Load a checkpoint's trained weights and optimizer state into the prepared model and optimizer; every process
    reads the same files. Under FSDP each process keeps its shard (torch.distributed.checkpoint's setters)."""
    inner = unwrapped(model)
    if strategy(acc) == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                              set_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(inner, trainable, options=options)
        set_optimizer_state_dict(inner, _plain(optimizer), state, options=options)
        return
    params = dict(trained_parameters(inner))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name].to(p.device, p.dtype))
    optimizer.load_state_dict(state)


def _plain(optimizer):
    """torch's optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)
