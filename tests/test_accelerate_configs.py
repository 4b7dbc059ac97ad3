"""The shipped accelerate config files (flux_core/train/accelerate_configs): each read by accelerate's own loader and
turned into the environment `accelerate launch` gives the processes, and the fields that matter checked there; the
FSDP ones' wrapped block classes are FluxDiT's, found by accelerate's own wrap policy on a DiT."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import prepare_multi_gpu_env

import flux_core.train
from flux_core.models.dit import FluxDiT, FluxParams

CONFIGS = Path(flux_core.train.__file__).parent / "accelerate_configs"
SHIPPED = {"ddp.yaml", "fsdp_lora.yaml", "fsdp_full.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}


def launch_env(name: str) -> tuple[object, dict]:
    """(the parsed launch arguments, the environment the launched processes get) for `--config_file name`."""
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    args, _, _ = _validate_launch_command(args)
    # (DeepSpeed's environment needs the deepspeed package's launcher: its arguments are checked instead)
    return args, {} if args.use_deepspeed else prepare_multi_gpu_env(args)


def test_every_shipped_config_is_listed_and_loads():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == SHIPPED
    for name in SHIPPED:
        config = load_config_from_file(str(CONFIGS / name))
        assert config.num_machines == 1 and config.num_processes == 8 and not config.use_cpu, name


def test_ddp():
    config = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "no"
    args, _ = launch_env("ddp.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed


@pytest.mark.parametrize("name", ["fsdp_lora.yaml", "fsdp_full.yaml"])
def test_fsdp_full_shard_wraps_the_dit_blocks(name, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from flux_core.models.layers import DoubleStreamBlock, SingleStreamBlock

    args, env = launch_env(name)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"   # FSDP2 full shard
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_OFFLOAD_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"   # every process loads the files itself
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()   # as the launched trainer's Accelerator builds it
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    dit = FluxDiT(FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=32, num_heads=1, depth=1,
                             depth_single_blocks=1, axes_dim=(8, 12, 12)))
    plugin.set_auto_wrap_policy(dit)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, dit)
    wrapped = {type(m) for m in dit.modules() if policy(m)}
    assert wrapped == {DoubleStreamBlock, SingleStreamBlock}


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_zero(name, stage):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision == "bf16"
    ds = config.deepspeed_config
    assert ds["zero_stage"] == stage and ds["gradient_accumulation_steps"] == 1
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    assert ds.get("zero3_save_16bit_model", False) is (stage == 3)   # ZeRO-3: one gathered weights file
    args, _ = launch_env(name)
    assert args.use_deepspeed and int(args.zero_stage) == stage


def test_configs_ship_as_package_data():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"flux_core.train" = ["accelerate_configs/*.yaml"]' in text
    assert os.path.isdir(CONFIGS)
