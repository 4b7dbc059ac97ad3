"""What is trained: a LoRA added to the DiT with `peft`, or the whole DiT; and how each is saved and loaded.

LoRA targets are Linear layers named by suffix, as peft matches them: `img_attn.qkv` hits
`double_blocks.N.img_attn.qkv`, `linear1` hits `single_blocks.N.linear1`. Our names are the Black Forest Labs
ones; DiffSynth-Studio's names for the same layers are accepted as aliases (`a_to_qkv` is `img_attn.qkv`,
`to_qkv_mlp` is `linear1`, `norm.linear` is `modulation.lin`, ...). The LoRA has alpha = rank (scale 1), as
DiffSynth's, peft's default init (A Kaiming-uniform, B zero), and float32 weights: the base model computes in
the training dtype, the LoRA in float32, and AdamW's state stays float32 too.

Saved LoRAs go through lora_tools' writers: kohya by default (`lora_unet_double_blocks_0_img_attn_qkv
.lora_down.weight` + `.alpha`), which ComfyUI, diffusers, kohya, Forge, DiffSynth and `flux_core.lora.load_lora`
all load. Full fine-tunes are saved as a DiT state dict with the BFL names, which `load_model` loads.

A trained ControlNet (`--trainable_models controlnet`) is saved the way DiffSynth-Studio's ControlNet training saves
it: the module's parameters named `pipe.controlnet.models.0.<DiffSynth name>` (`blocks.N.attn.a_to_qkv`,
`single_blocks.N.to_qkv_mlp`, `x_embedder`, ...; the heads `controlnet_blocks.N`, `controlnet_x_embedder`,
`controlnet_mode_embedder` keep their published names) minus --remove_prefix_in_ckpt. With
`--remove_prefix_in_ckpt pipe.controlnet.models.0.` that is the state dict DiffSynth's `FluxControlNet` loads with
`load_state_dict` (its validate_full script), and `load_model(path, kind="controlnet")` reads it (and the
unstripped prefix) too. The names are our BFL names renamed by the inverse of the loader's own DiffSynth table
(`flux_core.loading.dit_layouts.DIFFSYNTH_RULES`), so writing and reading cannot drift apart.

A trained IP-Adapter (`--trainable_models ipadapter`) is saved as `pipe.ipadapter.<name>` minus the prefix (our names
are DiffSynth's: `image_proj.*`, `ipadapter_modules.<i>.to_{k,v}_ip.weight`), InfiniteYou (`--trainable_models
controlnet,image_proj_model`) as the ControlNet's names above beside `pipe.image_proj_model.<ByteDance name>`; with
DiffSynth's `--remove_prefix_in_ckpt pipe.ipadapter.` / `pipe.` these are the files its training writes, and
`load_model` reads them (kinds "ipadapter", "controlnet" and "infiniteyou").

A trained LoRA-Encoder (`--trainable_models lora_encoder`) is saved as `pipe.lora_encoder.<name>` minus the prefix (our
names are DiffSynth's: `embedder.model_dict.*`, `embedder.proj_dict.*`, `encoders.<n>.*`, `special_embeds`, `final_*`);
with DiffSynth's `--remove_prefix_in_ckpt pipe.lora_encoder.` that is the state dict its validate script loads into
`pipe.lora_encoder`, and `load_model(path, kind="lora_encoder")` reads it (with or without the prefix).
"""
from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import nn

from ..loading.dit_layouts import bfl_to_diffsynth
from .args import TrainError

DIFFSYNTH_ALIASES = {
    "a_to_qkv": "img_attn.qkv", "b_to_qkv": "txt_attn.qkv", "a_to_out": "img_attn.proj", "b_to_out": "txt_attn.proj",
    "ff_a.0": "img_mlp.0", "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2",
    "norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin", "norm.linear": "modulation.lin",
    "to_qkv_mlp": "linear1", "proj_out": "linear2",
}
ADAPTER = "default"
AUTO_MIN_FEATURES = 512


# ------------------------------------------------------------------------------------------------ targets
def canonical_target(name: str) -> str:
    """Our BFL suffix for a target given in either naming (`attn.a_to_qkv` and `a_to_qkv` both work)."""
    short = name[len("attn."):] if name.startswith("attn.") and name[len("attn."):] in DIFFSYNTH_ALIASES else name
    return DIFFSYNTH_ALIASES.get(short, name)


def resolve_targets(spec: str, dit: nn.Module) -> list[str]:
    """Full names of the DiT's Linear layers that --lora_target_modules names. Every entry must match at
    least one layer. An empty spec selects, as DiffSynth does, every Linear with at least 512 input and
    output features inside a ModuleList of more than one block."""
    linears = {n: m for n, m in dit.named_modules() if isinstance(m, nn.Linear)}
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        chosen = []
        for list_name, module_list in dit.named_children():
            if isinstance(module_list, nn.ModuleList) and len(module_list) > 1:
                chosen += [n for n, m in linears.items() if n.startswith(list_name + ".")
                           and min(m.in_features, m.out_features) >= AUTO_MIN_FEATURES]
        if not chosen:
            raise TrainError(f"--lora_target_modules is empty, so layers are chosen automatically (Linear layers "
                             f"with >= {AUTO_MIN_FEATURES} features in the blocks), but this DiT has none; name "
                             f"the targets, e.g. --lora_target_modules img_attn.qkv,linear1.")
        return chosen
    chosen: list[str] = []
    for entry in entries:
        target = canonical_target(entry)
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.split(".", 2)[2] if n.startswith(("double_blocks.", "single_blocks.")) else n
                               for n in linears})
            shown = f"'{entry}' (= '{target}')" if target != entry else f"'{entry}'"
            raise TrainError(f"--lora_target_modules: {shown} matches no Linear layer of the DiT. Layer names "
                             f"(BFL): {', '.join(suffixes)}; DiffSynth names are accepted too: "
                             f"{', '.join(DIFFSYNTH_ALIASES)}.")
        chosen += [h for h in hits if h not in chosen]
    return chosen


# ------------------------------------------------------------------------------------------------ LoRA
def add_lora(dit: nn.Module, layer_names: list[str], rank: int) -> None:
    """Inject a peft LoRA (alpha = rank) into the named Linear layers; only the LoRA weights train."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(layer_names), lora_dropout=0.0,
                        init_lora_weights=True)
    inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    for module in lora_modules(dit).values():
        for part in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
            part.to(torch.float32)
        # peft draws the init, then casts it to the base weight's dtype (bf16, or float8 for --fp8_models):
        # draw it again in float32, so the start does not depend on how the frozen weights are stored.
        module.reset_lora_parameters(ADAPTER, True)
    for name, p in dit.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)


def lora_modules(dit: nn.Module) -> dict[str, nn.Module]:
    """{BFL layer name: peft LoRA layer} of a DiT with an injected LoRA."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in dit.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def export_lora(dit: nn.Module, source: str = "flux_core.train"):
    """The DiT's trained LoRA as lora_tools' canonical `LoraFile` (float32, each layer's alpha)."""
    from lora_tools import LoraFile, LoraLayer

    layers = {}
    for name, m in lora_modules(dit).items():
        down = m.lora_A[ADAPTER].weight.detach().float().cpu().clone()
        up = m.lora_B[ADAPTER].weight.detach().float().cpu().clone()
        layers[name] = LoraLayer(down=down, up=up, alpha=float(m.scaling[ADAPTER]) * down.shape[0],
                                 source_keys=(name,))
    return LoraFile(layers=layers, format="fluxcore", source=source)


def load_lora_weights(dit: nn.Module, path: str, rank: int) -> list[str]:
    """Start the injected LoRA from a file (--lora_checkpoint), in any format lora_tools reads. Its alpha/rank
    scale is folded into B (our scale is 1). Returns the layers set; layers the file has but the run does not
    train are reported with a warning."""
    from lora_tools import read_lora

    modules = lora_modules(dit)
    shapes = {n: tuple(m.get_base_layer().weight.shape) for n, m in modules.items()}
    lora = read_lora(path, target_shapes=shapes)
    loaded, extra = [], []
    with torch.no_grad():
        for name, layer in lora.layers.items():
            if name not in modules:
                extra.append(name)
                continue
            if layer.rank != rank:
                raise TrainError(f"--lora_checkpoint {path}: layer {name} has rank {layer.rank}, but --lora_rank "
                                 f"is {rank}; set --lora_rank {layer.rank}.")
            m = modules[name]
            m.lora_A[ADAPTER].weight.copy_(layer.down.float())
            m.lora_B[ADAPTER].weight.copy_(layer.up.float() * (layer.scale / float(m.scaling[ADAPTER])))
            loaded.append(name)
    if not loaded:
        raise TrainError(f"--lora_checkpoint {path}: none of its {len(lora.layers)} layers is among the trained "
                         f"target modules; check --lora_target_modules.")
    if extra:
        warnings.warn(f"--lora_checkpoint {path}: {len(extra)} layer(s) are not trained in this run and were left "
                      f"out, e.g. {extra[:3]}.", stacklevel=2)
    return loaded


# ------------------------------------------------------------------------------------------------ full DiT
def make_fully_trainable(dit: nn.Module) -> None:
    dit.requires_grad_(True)


def checkpoint_tensors(named: Mapping[str, torch.Tensor], prefix: str, remove_prefix: str
                       ) -> dict[str, torch.Tensor]:
    """Tensors named `prefix + name` (DiffSynth's `pipe.<attribute>.` names), minus --remove_prefix_in_ckpt where a
    name starts with it, on the CPU: what every full checkpoint writes."""
    out = {}
    for name, tensor in named.items():
        key = prefix + name
        if remove_prefix and key.startswith(remove_prefix):
            key = key[len(remove_prefix):]
        out[key] = tensor.detach().cpu()
    return out


def full_state_dict(dit: nn.Module, remove_prefix: str) -> dict[str, torch.Tensor]:
    """The DiT's weights named `pipe.dit.<BFL name>` minus --remove_prefix_in_ckpt (default: plain BFL names)."""
    return checkpoint_tensors(dit.state_dict(), "pipe.dit.", remove_prefix)



# ------------------------------------------------------------------------------------------------ ControlNet
CONTROLNET_CHECKPOINT_PREFIX = "pipe.controlnet.models.0."   # DiffSynth's name of the trained ControlNet
# safetensors metadata of full checkpoints: the setting shapes cannot tell (RoPE axes), read back by validate.py.
DIT_CONFIG_KEY, CONTROLNET_CONFIG_KEY = "fluxcore_dit_config", "fluxcore_controlnet_config"


def make_controlnet_trainable(controlnet: nn.Module) -> None:
    controlnet.requires_grad_(True)


def controlnet_state_dict(controlnet: nn.Module, remove_prefix: str) -> dict[str, torch.Tensor]:
    """The ControlNet's weights named `pipe.controlnet.models.0.<DiffSynth name>` minus --remove_prefix_in_ckpt."""
    state = controlnet.state_dict()
    names = bfl_to_diffsynth(list(state))  # flux_core.loading.dit_layouts
    return checkpoint_tensors({names[name]: tensor for name, tensor in state.items()}, CONTROLNET_CHECKPOINT_PREFIX,
                              remove_prefix)


# ---------------------------------------------------------------------------------------- IP-Adapter, InfiniteYou
# DiffSynth's names of the trained modules (its pipeline attributes): saved as `pipe.<name>.<parameter>`.
IPADAPTER_CHECKPOINT_PREFIX = "pipe.ipadapter."
PROJECTOR_CHECKPOINT_PREFIX = "pipe.image_proj_model."
LORA_ENCODER_CHECKPOINT_PREFIX = "pipe.lora_encoder."
ADAPTER_CHECKPOINT_PREFIXES = {"ipadapter": IPADAPTER_CHECKPOINT_PREFIX,
                               "image_proj_model": PROJECTOR_CHECKPOINT_PREFIX,
                               "lora_encoder": LORA_ENCODER_CHECKPOINT_PREFIX}


class TrainedModules(nn.ModuleDict):
    """The adapter modules one run trains, under DiffSynth-Studio's pipeline attribute names (`ipadapter`;
    `controlnet` and `image_proj_model` for InfiniteYou), as one module for the optimizer, accelerate and DDP.

    `forward(compute, *args)` returns `compute(*args)`: a training step's whole use of these modules (the
    IP-Adapter's keys and values, the projector's identity tokens, InfuseNet's residuals inside the DiT call) runs
    inside one call of the module accelerate wraps, so DDP sees one forward for each backward and synchronises the
    gradients of all of them."""

    def forward(self, compute, *args, **kwargs):
        return compute(*args, **kwargs)


def make_adapters_trainable(modules: dict[str, nn.Module]) -> TrainedModules:
    trained = TrainedModules(modules)
    trained.requires_grad_(True)
    return trained


def adapters_state_dict(trained: Mapping[str, nn.Module], remove_prefix: str) -> dict[str, torch.Tensor]:
    """The trained modules' weights under DiffSynth's names minus --remove_prefix_in_ckpt: `pipe.ipadapter.<name>`
    (its names are DiffSynth's: `image_proj.*`, `ipadapter_modules.<i>.*`), `pipe.image_proj_model.<name>`
    (ByteDance's names, which DiffSynth keeps) and the ControlNet's `pipe.controlnet.models.0.<DiffSynth name>`.
    With --remove_prefix_in_ckpt pipe. InfiniteYou's file is DiffSynth's (`controlnet.models.0.*` beside
    `image_proj_model.*`); with pipe.ipadapter. the IP-Adapter's is the state dict DiffSynth's FluxIpAdapter loads, and
    with pipe.lora_encoder. the LoRA-Encoder's (`pipe.lora_encoder.<name>`, its names DiffSynth's) the one its
    FluxLoRAEncoder loads."""
    out: dict[str, torch.Tensor] = {}
    for name, module in trained.items():
        if name == "controlnet":
            out.update(controlnet_state_dict(module, remove_prefix))
        else:
            out.update(checkpoint_tensors(module.state_dict(), ADAPTER_CHECKPOINT_PREFIXES[name], remove_prefix))
    return out
