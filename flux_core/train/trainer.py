"""The training loop: load the pipeline, make the DiT (or a LoRA on it, or the ControlNet) trainable, and step
through the data with `accelerate` doing the distributed part.

ControlNets. With `--extra_inputs controlnet_image[,...]` each sample's controlnet_* columns become one
ControlNetInput for the one ControlNet of the model flags, turned into a `ControlNetAdapter` by the pipeline's own
`controlnet_adapters` (control latent = VAE posterior mean, as at inference) and passed to the loss as an adapter.
With `--trainable_models controlnet` that ControlNet is the trained (and DDP-wrapped) module and the DiT stays
frozen; gradients reach the ControlNet through the DiT's blocks, whose residual inputs they are.

IP-Adapter and InfiniteYou. With `--extra_inputs ipadapter_images` the frozen image encoder computes each sample's
reference features, and the IP-Adapter is bound to them inside the step (its keys and values under autograd when it
trains). With an identity column (infinityou_id_image / infinityou_id_embedding) the projector's identity tokens
become the ControlNet adapter's text (InfuseNet's). `--trainable_models ipadapter` and `controlnet,image_proj_model`
train a `TrainedModules` (trainable.py): one module holding the trained adapters, whose forward runs the whole
adapted loss, so accelerate's DDP wrapper sees one forward per backward and averages every adapter's gradients.

EliGen. With `--extra_inputs eligen_entity_masks,eligen_entity_prompts` each sample's entity prompts are encoded like
its caption (frozen text encoders, no gradients) and its masks (cropped like the image by the dataset) become the
pipeline's own EliGen adapter, added last (as the pipeline adds it: ControlNets see the plain prompt); a LoRA then
learns through the attention mask that routes each entity prompt to its region (train/eligen.py).

LoRA-Encoder. With `--extra_inputs lora_encoder_inputs` each sample's LoRA file is read and encoded by the LoRA-Encoder
into tokens appended to the caption's (first among the adapters, as in the pipeline); the LoRA itself is not applied
to the DiT, as in DiffSynth's training. `--trainable_models lora_encoder` trains the encoder (a `TrainedModules`, like
the IP-Adapter) with the DiT frozen (train/lora_encoder.py).

Split training (DiffSynth's two-stage training, cache.py). `--task data_process` writes each row's image latent,
caption conditioning and Kontext reference tokens (what `_loss` computes before the DiT, by the same function,
`encode_inputs`) to a cache folder; `--task sft:train` trains from it with the VAE and the text encoders never loaded.
Order, timesteps and noise are those of `--task sft`, so the losses and weights are the same.

Data order. Each epoch is a permutation of the (repeated) dataset drawn from (seed, epoch). With P processes
and G accumulation steps an optimizer step consumes P x G consecutive places of that order: process r takes
places r, r + P, r + 2P, ... Each sample's timestep and noise come from (seed, epoch, place). So a run
resumed from a checkpoint continues the same order with the same draws, and `--num_processes 2` computes
exactly what one process with `--gradient_accumulation_steps 2` computes. An epoch's places are cut to a
multiple of P (the few left over wait for the next epoch's order); an epoch always ends on an optimizer step
(a shorter last accumulation window), so epoch-end checkpoints are exact too.

Progress: one JSON object per line on stdout (main process) and in <output_path>/train_log.jsonl, and a
progress bar on stderr when it is a terminal (progress.py):
    {"event": "start", "total_steps", "start_step", "steps_per_epoch", "num_processes", "effective_batch", ...}
    {"event": "step", "step", "total_steps", "epoch", "loss", "lr", "images_per_s", "eta_s"}
    {"event": "checkpoint", "step", "path", "state"}       weights file + resumable state folder
    {"event": "validation", "step", "images": [...]}
    {"event": "stopped", "step", "path", "state"}          after SIGINT/SIGTERM or an <output_path>/STOP file
    {"event": "done", "step", "path"}                       the last weights file
    {"event": "error", "message"}
The start also prints the number of processes and the effective batch (batch per process x processes x
gradient accumulation) on stderr, with a warning when `accelerate launch` was asked for several processes but
started one (its plain launcher does that on a machine without GPUs unless --multi_gpu is given).
Stopping: SIGINT, SIGTERM (SIGBREAK on Windows) or a file named STOP in the output folder makes every process
finish its current optimizer step, save a checkpoint and exit 0; `--resume` continues from it. A second
SIGINT interrupts at once.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path

import torch

from lora_tools.io import atomic_write

from ..loading.files import save_safetensors
from ..model_config import ModelConfig, ModelFileError
from ..text_conditioning import Conditioning
from ..vram import ComputeDevice, VRAMManager, store_model
from . import checkpoint as ckpt
from . import distributed
from .args import (CACHED_TASK, CHANNEL_EXTRAS, ENCODER_EXTRAS, FLEX_CONTROL_DEFAULTS, FP8_COMPONENTS, TrainError,
                   comma_list, data_file_keys, identity_input, is_controlnet_run, is_lora, model_path_entries,
                   torch_dtype, training_mode, uses_eligen, uses_ipadapter, uses_lora_encoder)
from .cache import CACHED, ENCODER_SLOTS, CachedDataset, cached_inputs, encode_inputs
from .control import (check_controlnet_columns, check_controlnet_count, needs_controlnet, sample_control_input,
                      validation_control_input)
from .dataset import ImageDataset, first_sample
from .eligen import sample_entities, validation_entities
from .infiniteyou import ID_EMBEDDING, ID_IMAGE, check_infiniteyou_models, embed_faces, sample_identity
from .ipadapter import bind, check_ipadapter_fit, check_ipadapter_slots, reference_features
from .lora_encoder import check_lora_encoder_slots, check_lora_rows, lora_tokens, sample_loras, validation_loras
from .loss import flow_matching_loss, sample_generator, training_attention, training_schedule
from .messages import SLOT_NAMES, ModelEntry, reworded_logs, trainer_message, user_values
from .packages import require_training_packages
from .progress import Log
from .run_folder import ARGS_FILE, LOG_FILE, check_output, earlier_run, prepare_output

STOP_FILE = "STOP"
BATCH_PER_PROCESS = 1   # one image per forward: FLUX training samples differ in size (dynamic resolution)
FP8_STORAGE = torch.float8_e4m3fn
PIPELINE_LOGGERS = ("flux_core.pipeline", "flux_core.pipeline_models")  # what from_pretrained logs through
# Every model slot starts frozen and in inference mode; the trained one is then made trainable.
FROZEN_SLOTS = ("dit", "vae", "text_encoder_1", "text_encoder_2", "ipadapter", "ipadapter_image_encoder",
                "image_proj_model", "lora_encoder")
# Modes whose trained adapters form one TrainedModules (trainable.py), run as one (DDP-wrapped) forward per step.
ADAPTER_MODES = ("ipadapter", "infiniteyou", "lora_encoder")
# How a --resume mismatch names each setting a resumed run must share (the flag that sets it).
SETTING_NAMES = {"mode": "LoRA, full DiT, ControlNet, IP-Adapter, InfiniteYou or LoRA-Encoder training "
                         "(--lora_base_model / --trainable_models)",
                 "lora_rank": "--lora_rank", "targets": "LoRA layers (--lora_target_modules)", "seed": "--seed",
                 "samples": "dataset samples (rows x --dataset_repeat)",
                 "num_processes": "processes (accelerate launch --num_processes)",
                 "gradient_accumulation_steps": "--gradient_accumulation_steps", "learning_rate": "--learning_rate",
                 "weight_decay": "--weight_decay", "torch_dtype": "--torch_dtype",
                 "strategy": "a single process or DDP, FSDP or DeepSpeed (accelerate launch --config_file)"}
# DiffSynth-Studio steps torch's ConstantLR with its defaults: the first 5 optimizer steps at lr / 3.
LR_START_FACTOR, LR_START_STEPS = 1.0 / 3.0, 5


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    samples: int            # dataset length (rows x repeat)
    processes: int
    accumulation: int
    per_process: int        # samples each process sees per epoch
    steps_per_epoch: int
    epochs: int
    max_steps: int | None

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: batch per process x processes x gradient accumulation."""
        return BATCH_PER_PROCESS * self.processes * self.accumulation

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def window(self, k: int) -> tuple[int, int]:
        """(first place, length) of the accumulation window holding a process's k-th sample of an epoch."""
        start = k // self.accumulation * self.accumulation
        return start, min(self.accumulation, self.per_process - start)


def make_plan(samples: int, processes: int, accumulation: int, epochs: int, max_steps: int | None) -> Plan:
    per_process = samples // processes
    if per_process == 0:
        raise TrainError(f"the dataset has {samples} sample(s) for {processes} processes; each process needs at "
                         f"least one: raise --dataset_repeat or use fewer processes.")
    return Plan(samples, processes, accumulation, per_process, math.ceil(per_process / accumulation), epochs,
                max_steps)


def epoch_order(seed: int, epoch: int, samples: int) -> list[int]:
    generator = torch.Generator().manual_seed((seed * 7919 + epoch) % (2**63 - 1))
    return torch.randperm(samples, generator=generator).tolist()


# ------------------------------------------------------------------------------------------------ models
def model_sources(args: argparse.Namespace) -> list[tuple[ModelEntry, str, ModelConfig]]:
    """(which flag entry, what the user wrote, ModelConfig) for every model: the --model_paths entries, then the
    --model_id_with_origin_paths entries, in the order given (the order of from_pretrained's model_configs)."""
    out = [(ModelEntry("--model_paths", n), json.dumps(entry), ModelConfig(path=entry))
           for n, entry in enumerate(model_path_entries(args.model_paths), 1)]
    for n, item in enumerate(comma_list(args.model_id_with_origin_paths), 1):
        entry = ModelEntry("--model_id_with_origin_paths", n)
        if os.path.exists(item):
            out.append((entry, item, ModelConfig(path=item)))
            continue
        if ":" not in item:
            raise TrainError(f"--model_id_with_origin_paths entry '{item}': expected model_id:origin_file_pattern "
                             f"(e.g. black-forest-labs/FLUX.1-dev:flux1-dev.safetensors) or an existing path.")
        model_id, pattern = item.split(":", 1)
        out.append((entry, item, ModelConfig(model_id=model_id, origin_file_pattern=pattern)))
    return out


def model_configs(args: argparse.Namespace) -> list[tuple[str, ModelConfig]]:
    """(what the user wrote, ModelConfig) for every model of --model_paths and --model_id_with_origin_paths."""
    return [(spec, config) for _, spec, config in model_sources(args)]


def load_pipeline(args: argparse.Namespace, device: torch.device, skip_kinds: tuple[str, ...] = ()):
    """The FluxImagePipeline the run trains on (every model frozen, in inference mode). A model or tokenizer
    that cannot be found or is of the wrong kind stops it with a TrainError in the trainer's flags."""
    from ..loading.files import CheckpointError
    from ..models.text_encoders import TokenizerFilesError
    from ..pipeline import FluxImagePipeline

    sources = model_sources(args)
    values = user_values(model_path_entries(args.model_paths), comma_list(args.model_id_with_origin_paths),
                         [args.tokenizer_1_path, args.tokenizer_2_path])
    try:
        if skip_kinds:
            sources = without_slots(sources, skip_kinds)
        # What the adapter columns need, from the files' keys, before any weights load.
        if needs_controlnet(args) or uses_ipadapter(args) or identity_input(args) or uses_lora_encoder(args):
            slots = [(entry, config_slots(config, entry)) for entry, _, config in sources]
            if needs_controlnet(args) and "controlnet" not in skip_kinds:
                check_controlnet_count(args, [entry for entry, held in slots if "controlnet" in held])
            every_slot = [slot for _, held in slots for slot in held]
            if uses_ipadapter(args):
                check_ipadapter_slots(every_slot)
            check_infiniteyou_models(args, every_slot)
            if uses_lora_encoder(args):
                check_lora_encoder_slots(every_slot)
        tok1 = ModelConfig(path=args.tokenizer_1_path) if args.tokenizer_1_path else None
        tok2 = ModelConfig(path=args.tokenizer_2_path) if args.tokenizer_2_path else None
        # from_pretrained numbers the configs it was given: its model_configs[i] is sources[i] (after skip_kinds).
        reword = functools.partial(trainer_message, entries=[entry for entry, _, _ in sources], protected_values=values)
        with reworded_logs(PIPELINE_LOGGERS, reword):
            pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch_dtype(args), device=device,
                                                     model_configs=[c for _, _, c in sources], tokenizer_1_config=tok1,
                                                     tokenizer_2_config=tok2)
    except (CheckpointError, ModelFileError, TokenizerFilesError) as e:
        raise TrainError(trainer_message(str(e), [entry for entry, _, _ in sources], values)) from None
    configs = [(spec, config) for _, spec, config in sources]
    # The captions' conditioning encoder: CLIP-L + T5, or Step1X-Edit's / Nexus-Gen's models (their images to edit)
    extras = comma_list(vars(args).get("extra_inputs"))   # the validate scripts have no --extra_inputs
    encoder_slots = pipe.encoder_slots(True if "step1x_reference_image" in extras else None,
                                       True if "nexus_gen_reference_image" in extras else None)
    needed = ("dit", "vae", *(slot for slot in encoder_slots if slot in SLOT_NAMES))
    missing = [slot for slot in needed if slot not in skip_kinds and getattr(pipe, slot) is None]
    if missing:
        raise TrainError(f"the models of --model_paths / --model_id_with_origin_paths hold no "
                         f"{', '.join(SLOT_NAMES[m] for m in missing)}; training needs "
                         f"{', '.join(SLOT_NAMES[m] for m in needed)}: add the missing files there.")
    for module in [getattr(pipe, slot) for slot in FROZEN_SLOTS] + list(pipe.controlnet.models):
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe, configs


def without_slots(sources: list[tuple[ModelEntry, str, ModelConfig]], skip: tuple[str, ...]
                  ) -> list[tuple[ModelEntry, str, ModelConfig]]:
    """The sources without the models of the `skip` slots, none of which is then read: a config holding only such
    models is left out; one holding others too (a diffusers FLUX folder, an all-in-one checkpoint) becomes one config
    per model it keeps (`ModelConfig.kind`), each with the entry and spec of the flag it came from."""
    from ..pipeline_models import MODEL_SLOTS, detect_components

    out = []
    for entry, spec, config in sources:
        try:
            kinds = [config.kind] if config.kind else [kind for _, kind, _, _ in detect_components(config.resolve())]
        except ModelFileError as e:
            raise ModelFileError(f"{entry.describe()}: {e}") from None
        kept = [kind for kind in kinds if MODEL_SLOTS[kind] not in skip]
        if len(kept) == len(kinds):
            out.append((entry, spec, config))
        else:
            out += [(entry, spec, replace(config, kind=kind)) for kind in dict.fromkeys(kept)]
    return out


def config_slots(config: ModelConfig, entry: ModelEntry | None = None) -> list[str]:
    """Pipeline slots (dit, vae, text_encoder_1, text_encoder_2) a model config holds, from its keys only.
    `entry`: where the config came from, named when its files cannot be found."""
    from ..pipeline_models import MODEL_SLOTS, detect_components

    try:
        paths = config.resolve()
    except ModelFileError as e:
        if entry is None:
            raise
        raise ModelFileError(f"{entry.describe()}: {e}") from None
    return [MODEL_SLOTS[kind] for _, kind, _, _ in detect_components(paths)]


def fp8_slots(args: argparse.Namespace, configs: list[tuple[str, ModelConfig]], pipe) -> list[str]:
    """The pipeline slots --fp8_models names: model names, or entries of the model flags, whose slots are read
    from what from_pretrained loaded (`pipe.loaded_from`; the files are not read again)."""
    slots: list[str] = []
    for entry in comma_list(args.fp8_models):
        if entry in FP8_COMPONENTS:
            found = [FP8_COMPONENTS[entry]]
        else:
            # spec is what the user wrote: a --model_id_with_origin_paths item, or a --model_paths entry as JSON
            # (one entry may have become several configs: load_pipeline's without_slots)
            indices = [i for i, (spec, _) in enumerate(configs) if spec in (entry, json.dumps(entry))]
            if not indices:
                raise TrainError(f"--fp8_models {entry}: neither a model name ({', '.join(FP8_COMPONENTS)}) nor "
                                 f"an entry of --model_paths / --model_id_with_origin_paths.")
            found = [e.slot for e in pipe.loaded_from.values() if e.config_index in indices]
        slots += [s for s in found if s not in slots]
    return slots


def store_in_fp8(pipe, slots: list[str], compute_dtype: torch.dtype) -> None:
    """--fp8_models: the weight matrices of these frozen models are stored in float8_e4m3fn where they are
    (flux_core.vram.store_model) and computed in the training dtype through the pipeline's VRAMManager, the
    one FP8 mechanism of inference and training. Call it before the LoRA is injected: the manager then places
    only the frozen layers, and the LoRA's float32 weights (and their gradients) stay outside it."""
    if not slots:
        return
    if pipe.vram is None:
        pipe.vram = VRAMManager(ComputeDevice(pipe.device))  # no budget: every layer stays where it is
    for slot in slots:
        model = attrgetter(slot)(pipe)   # "controlnet.models.0" for a ControlNet entry
        store_model(model, weight_dtype=FP8_STORAGE)
        pipe.vram.add(slot, model, compute_dtype)


# ------------------------------------------------------------------------------------------------ launch
def single_process_launch(env: dict | None = None) -> bool:
    """True when `accelerate launch` was asked for several processes but started this one alone: its plain
    launcher (used on a machine without GPUs unless --multi_gpu is given) sets MASTER_ADDR for
    --num_processes > 1 but starts one process without WORLD_SIZE (checked with accelerate 1.15)."""
    env = os.environ if env is None else env
    return "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and env.get("WORLD_SIZE", "1") == "1"


SINGLE_PROCESS_WARNING = (
    "flux_core.train: warning: `accelerate launch` was asked for more than one process (--num_processes) but "
    "started only this one: without GPUs its plain launcher runs a single process. Add --multi_gpu (on a CPU "
    "machine the processes then train together over gloo): accelerate launch --multi_gpu --num_processes N "
    "-m flux_core.train ...")


# ------------------------------------------------------------------------------------------------ logging
class StopFlag:
    """Set by SIGINT/SIGTERM/SIGBREAK; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def install(self) -> None:
        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # not the main thread: the caller handles stopping
                    pass

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"flux_core.train: signal {signum}: stopping after this step and saving a checkpoint "
              f"(press Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output = Path(args.output_path)
        self.dtype = torch_dtype(args)
        self.lora = is_lora(args)
        self.mode = training_mode(args)   # lora, full, controlnet, ipadapter, infiniteyou
        self.control = is_controlnet_run(args)   # each sample feeds the ControlNet its controlnet_* columns
        self.reference = uses_ipadapter(args)    # ... the IP-Adapter its ipadapter_images
        self.identity = identity_input(args)     # ... InfuseNet an identity (infinityou_id_image / _embedding)
        self.eligen = uses_eligen(args)          # ... EliGen its entity prompts and masks
        self.encoded = uses_lora_encoder(args)   # ... the LoRA-Encoder its LoRA file
        self.cached = args.task == CACHED_TASK   # sft:train: the rows' encodings come from a data_process cache
        self.stop = StopFlag()

    # -------------------------------------------------------------------- setup
    def prepare_data(self) -> ImageDataset | CachedDataset:
        a = self.args
        if self.cached:
            dataset = CachedDataset(a.dataset_base_path, a.dataset_repeat)
            self.data_summary = dataset.check(a)
            return dataset
        dataset = ImageDataset(a.dataset_base_path, a.dataset_metadata_path, data_file_keys(a), a.height, a.width,
                               a.max_pixels, a.dataset_repeat, required_keys=comma_list(a.extra_inputs))
        self.data_summary = dataset.check()
        if self.identity == ID_IMAGE:   # insightface is needed now, not after the models have loaded
            dataset.set_row_values(ID_EMBEDDING, embed_faces(dataset), replaces=ID_IMAGE)
        return dataset

    def setup(self) -> None:
        from accelerate.utils import DistributedDataParallelKwargs

        a = self.args
        # Every process checks the run folder before anything changes; only the main process then changes it.
        check_output(self.output, a.resume, a.overwrite)
        self.dataset = self.prepare_data()  # every row read before any model is loaded
        # gloo between CPU processes, FSDP on them too when launched with it (flux_core.train.distributed)
        self.accelerator = acc = distributed.make_accelerator(
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=a.find_unused_parameters)])
        self.plan = make_plan(len(self.dataset), acc.num_processes, a.gradient_accumulation_steps, a.num_epochs,
                              a.max_steps)
        if acc.is_main_process:
            if single_process_launch():
                print(SINGLE_PROCESS_WARNING, file=sys.stderr, flush=True)
            removed = prepare_output(self.output, a.resume, a.overwrite)
            if removed:
                print(f"flux_core.train: --overwrite: deleted the earlier run in {self.output} "
                      f"({', '.join(removed)}).", file=sys.stderr, flush=True)
        acc.wait_for_everyone()
        self.log = Log(self.output / LOG_FILE, acc.is_main_process)
        resumable = self.find_resumable() if a.resume else None  # verified before any model loads

        # sft:train: the VAE and the text encoders are never loaded (the cache holds what they would compute).
        self.pipe, configs = load_pipeline(a, acc.device, skip_kinds=ENCODER_SLOTS if self.cached else ())
        # T5 tokens per prompt (captions, EliGen entities, validation images): the flag's, else the T5 tokenizer's
        # model_max_length (FLUX.1-dev 512, the demo model 32), resolved once for the whole run; the cache's.
        if self.cached:
            self.dataset.check_dit(self.pipe.dit, a)
            self.t5_sequence_length = self.dataset.t5_sequence_length
        else:
            self.t5_sequence_length = self.pipe.t5_sequence_length(a.t5_sequence_length)
        if self.control:
            check_controlnet_columns(a, self.pipe, configs)
        if self.reference:
            check_ipadapter_fit(self.pipe)
        if self.encoded:   # every row's LoRA read once, before the first step
            check_lora_rows(self.pipe, self.dataset)
        # (models a task leaves out, the encoders of sft:train, are not stored: they are not there)
        fp8 = [slot for slot in fp8_slots(a, configs, self.pipe) if not (self.cached and slot in ENCODER_SLOTS)]
        trained_slots = {"controlnet": ("controlnet.models.0", "the ControlNet"),
                         "ipadapter": ("ipadapter", "the IP-Adapter"),
                         "image_proj_model": ("image_proj_model", "InfiniteYou's image projector"),
                         "lora_encoder": ("lora_encoder", "the LoRA-Encoder")}
        for model in comma_list(a.trainable_models):
            slot, what = trained_slots.get(model, (None, None))
            if slot in fp8:
                raise TrainError(f"--fp8_models names {what}, which --trainable_models {a.trainable_models} "
                                 f"trains; FP8 storage is for frozen models: leave it out of --fp8_models.")
        problems = distributed.run_problems(acc, fp8, a.gradient_accumulation_steps, a.resume)
        if problems:
            raise TrainError("\n".join(problems))
        store_in_fp8(self.pipe, fp8, self.dtype)
        dit = self.pipe.dit
        torch.manual_seed(a.seed)
        if self.lora:
            from .trainable import add_lora, load_lora_weights, resolve_targets
            self.targets = resolve_targets(a.lora_target_modules, dit)
            add_lora(dit, self.targets, a.lora_rank)
            if a.lora_checkpoint:
                load_lora_weights(dit, a.lora_checkpoint, a.lora_rank)
            trained = dit
        elif self.mode == "controlnet":
            from .trainable import make_controlnet_trainable
            self.targets = []
            trained = self.pipe.controlnet.models[0]
            make_controlnet_trainable(trained)
        elif self.mode in ADAPTER_MODES:
            from .trainable import make_adapters_trainable
            self.targets = []
            names = comma_list(a.trainable_models)
            trained = make_adapters_trainable({name: self.pipe.controlnet.models[0] if name == "controlnet" else
                                               getattr(self.pipe, name) for name in names})
        else:
            from .trainable import make_fully_trainable
            self.targets = []
            make_fully_trainable(dit)
            trained = dit
        # A trained adapter's gradients flow back through the frozen DiT (ControlNet residuals enter every DiT block,
        # IP-Adapter keys and values its attention), so the DiT's activations are kept or recomputed as well.
        checkpointed = [dit] + ([] if trained is dit else [trained] if self.mode == "controlnet" else
                                [trained["controlnet"]] if "controlnet" in trained else [])
        for model in checkpointed:
            model.gradient_checkpointing = a.use_gradient_checkpointing or a.use_gradient_checkpointing_offload
            model.gradient_checkpointing_offload = a.use_gradient_checkpointing_offload
        trained.train()
        self.trained = trained

        self.params = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([p for _, p in self.params], lr=a.learning_rate, weight_decay=a.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=LR_START_FACTOR,
                                                             total_iters=LR_START_STEPS)
        self.step, self.epoch, self.position = 0, 0, 0
        self.resumed_from, self.last_saved, self.last_path = None, None, None
        self.skipped_checkpoints: list[str] = []
        # DDP-wrapped when several processes, sharded under FSDP (then the trained parameters are new objects)
        self.model, self.optimizer = distributed.prepare(acc, trained, optimizer, BATCH_PER_PROCESS)
        self.params = distributed.trained_parameters(self.model)
        if resumable is not None:
            self.restore(resumable)
            del resumable  # the restored tensors are in the parameters now
        self.dit_model = self.model if trained is dit else dit
        self.schedule = training_schedule()
        self.guidance = a.embedded_guidance if dit.params.guidance_embed else None
        self.validation_control = (validation_control_input(a, self.dataset, self.pipe)
                                   if self.control and a.validation_prompts else None)
        self.validation_inputs = self.validation_adapter_inputs() if a.validation_prompts else {}

    def validation_adapter_inputs(self) -> dict:
        """The validation images' IP-Adapter reference images, InfiniteYou identity, EliGen entities, LoRA-Encoder
        inputs, Step1X-Edit / Nexus-Gen images to edit and FLEX.2 / Fill images: the --validation_* flags', else the
        first data row's (each face embedded and the entities checked now, not after the first training steps)."""
        from .infiniteyou import validation_identity
        from .ipadapter import validation_references
        inputs = {}
        if self.reference:
            inputs["ipadapter_images"] = validation_references(self.args, self.dataset)
        if self.identity:
            inputs.update(validation_identity(self.args, self.dataset))
        if self.eligen:
            inputs.update(validation_entities(self.args, self.dataset, *validation_size(self.args)))
        if self.encoded:
            inputs["lora_encoder_inputs"] = validation_loras(self.args, self.dataset, self.pipe)
        extras = comma_list(self.args.extra_inputs)
        for key in (*ENCODER_EXTRAS, *CHANNEL_EXTRAS):  # the image to edit, FLEX.2 / Fill images: the first row's
            if key in extras:
                inputs[key] = self.dataset.row_image(0, key)[0]
        return inputs

    def settings(self) -> dict:
        """What a resumed run must share with the run that saved the state, for the result to be the same."""
        a = self.args
        return {"mode": self.mode, "lora_rank": a.lora_rank if self.lora else None,
                "targets": self.targets, "seed": a.seed, "samples": self.plan.samples,
                "num_processes": self.plan.processes, "gradient_accumulation_steps": self.plan.accumulation,
                "learning_rate": a.learning_rate, "weight_decay": a.weight_decay, "torch_dtype": a.torch_dtype,
                # the optimizer state's layout differs between strategies (distributed.check_resume)
                "strategy": distributed.checkpoint_strategy(self.accelerator)}

    def find_resumable(self) -> ckpt.TrainingState | None:
        """The verified state --resume continues from (warning about corrupt newer ones), or None for a folder
        with no run yet; an error when the folder holds a run that cannot be resumed."""
        loaded = ckpt.find_resumable(self.output, self.args.resume)
        main = self.accelerator.is_main_process
        if loaded is None:
            weights = earlier_run(self.output)
            if weights:
                raise TrainError(f"--resume: {self.output} holds weights of an earlier run ({', '.join(weights)}) but "
                                 f"no resumable checkpoint in {ckpt.checkpoints_dir(self.output)}. Start again with "
                                 f"--overwrite, or start from one of them with --lora_checkpoint and a new "
                                 f"--output_path.")
            if main:
                print(f"flux_core.train: --resume: {self.output} holds no earlier run; starting a new run.",
                      file=sys.stderr, flush=True)
            return None
        distributed.check_resume(self.accelerator, loaded.folder, loaded.state.get("settings", {}), loaded.optimizer,
                                 self.output / loaded.state["weights"])
        if main:
            for corrupt, why in loaded.skipped:
                print(f"flux_core.train: warning: --resume: skipping the corrupt checkpoint {corrupt} ({why}); "
                      f"resuming from {loaded.folder.name}, the newest complete one.", file=sys.stderr, flush=True)
        return loaded

    def restore(self, loaded: ckpt.TrainingState) -> None:
        folder, state = loaded.folder, loaded.state
        saved, now = state.get("settings", {}), self.settings()
        for key, value in now.items():
            if key in saved and saved[key] != value:
                raise TrainError(f"--resume {folder}: the checkpoint was trained with {SETTING_NAMES.get(key, key)} "
                                 f"{saved[key]!r}, this run has {value!r}. Resume with the same settings (only "
                                 f"--num_epochs, --max_steps, saving and validation options may change).")
        names = {n for n, _ in self.params}
        if set(loaded.trainable) != names:
            model = {"controlnet": "ControlNet", "ipadapter": "IP-Adapter", "infiniteyou": "InfiniteYou models",
                     "lora_encoder": "LoRA-Encoder"}.get(self.mode, "DiT")
            raise TrainError(f"--resume {folder}: its trained parameters differ from this run's "
                             f"({len(loaded.trainable)} vs {len(names)}); resume with the same {model} "
                             f"(--model_paths / --model_id_with_origin_paths) and --lora_target_modules.")
        distributed.restore(self.accelerator, self.model, self.optimizer, loaded.trainable, loaded.optimizer)
        self.scheduler.load_state_dict(loaded.scheduler)
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.resumed_from = str(folder)
        self.skipped_checkpoints = [str(p) for p, _ in loaded.skipped]
        self.last_saved, self.last_path = self.step, self.output / state["weights"]

    # -------------------------------------------------------------------- loop
    def run(self) -> dict:
        require_training_packages()
        self.stop.install()
        try:
            self.setup()
            return self._run()
        finally:
            self.stop.uninstall()

    def _run(self) -> dict:
        a, acc, plan = self.args, self.accelerator, self.plan
        if acc.is_main_process:
            text = json.dumps(vars(a), indent=1, ensure_ascii=False)
            atomic_write(self.output / ARGS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            print(f"flux_core.train: {plan.processes} process{'es' if plan.processes > 1 else ''}, effective batch "
                  f"{plan.effective_batch} ({BATCH_PER_PROCESS} per process x {plan.processes} process"
                  f"{'es' if plan.processes > 1 else ''} x {plan.accumulation} gradient accumulation step"
                  f"{'s' if plan.accumulation > 1 else ''}).", file=sys.stderr, flush=True)
        self.log("start", total_steps=plan.total_steps, start_step=self.step, steps_per_epoch=plan.steps_per_epoch,
                 epochs=plan.epochs, num_processes=plan.processes, distributed=distributed.describe(acc, self.model),
                 batch_per_process=BATCH_PER_PROCESS,
                 gradient_accumulation_steps=plan.accumulation, effective_batch=plan.effective_batch,
                 samples=plan.samples, dataset_rows=self.data_summary["rows"], mode=self.mode,
                 trainable_parameters=sum(p.numel() for _, p in self.params), lora_layers=len(self.targets),
                 resumed_from=self.resumed_from, skipped_checkpoints=self.skipped_checkpoints,
                 t5_sequence_length=self.t5_sequence_length, output_path=str(self.output))
        self.log.start_bar(a.progress_bar, plan.total_steps, self.step)
        try:
            return self._loop()
        finally:
            self.log.close()

    def _loop(self) -> dict:
        a, acc, plan = self.args, self.accelerator, self.plan
        step_times: list[float] = []
        if self._any(self._stop_requested()):  # stopped while the models were loading: nothing new to save
            if self.accelerator.is_main_process:
                (self.output / STOP_FILE).unlink(missing_ok=True)
            self.log("stopped", step=self.step, path=_str(self.last_path), state=None)
            return {"step": self.step, "path": self.last_path, "stopped": True}
        if self.step >= plan.total_steps:
            return self._finish()
        while self.epoch < plan.epochs:
            order = epoch_order(a.seed, self.epoch, plan.samples)
            mine = [order[k * plan.processes + acc.process_index] for k in range(plan.per_process)]
            start = self.position
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, mine[start:]), batch_size=1,
                                                 shuffle=False, collate_fn=first_sample,
                                                 num_workers=a.dataset_num_workers)
            losses: list[torch.Tensor] = []
            t0 = time.perf_counter()
            for k, sample in enumerate(loader, start=start):
                window_start, window_len = plan.window(k)
                boundary = k - window_start + 1 == window_len
                place = k * plan.processes + acc.process_index
                with distributed.no_sync(acc, self.model, boundary), training_attention():
                    loss = self._loss(sample, sample_generator(a.seed, self.epoch, place))
                    acc.backward(loss / window_len)
                losses.append(loss.detach().float())
                if not boundary:
                    continue
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step, self.position = self.step + 1, k + 1
                stop, mean_loss = self._gather(losses)
                losses = []
                dt = time.perf_counter() - t0
                step_times = (step_times + [dt])[-20:]
                images_per_s = plan.processes * window_len / dt
                self.log("step", step=self.step, total_steps=plan.total_steps, epoch=self.epoch, loss=mean_loss, lr=lr,
                         images_per_s=images_per_s,
                         eta_s=sum(step_times) / len(step_times) * (plan.total_steps - self.step))
                self.log.step(self.step, mean_loss, images_per_s)
                epoch_done = self.position == plan.per_process
                if epoch_done:  # the saved state points at the start of the next epoch
                    self.epoch, self.position = self.epoch + 1, 0
                if a.save_steps and self.step % a.save_steps == 0:
                    self.save(f"step-{self.step}", validate=not stop)
                elif epoch_done and a.save_steps is None:
                    self.save(f"epoch-{self.epoch - 1}", validate=not stop)
                if stop:
                    return self._stopped()
                if a.validation_steps and self.step % a.validation_steps == 0:
                    self.validate()
                if self.step >= plan.total_steps:
                    return self._finish()
                t0 = time.perf_counter()
        return self._finish()

    def _loss(self, sample: dict, generator: torch.Generator) -> torch.Tensor:
        pipe = self.pipe
        with torch.no_grad():
            # The row's image latent, caption conditioning and reference tokens: encoded now, or (sft:train) what
            # data_process encoded with the same function.
            inputs = (cached_inputs(sample[CACHED], pipe.device) if CACHED in sample else
                      encode_inputs(pipe, sample, self.t5_sequence_length))
            x0, prompt, extras = inputs.x0, inputs.prompt, inputs.extras
            height, width = x0.shape[-2] * 8, x0.shape[-1] * 8
            adapters = self.control_adapters(sample, x0) if self.control else []
            # FLEX.2 / Fill: the DiT's extra input channels (none for a 64-channel DiT)
            adapters += pipe.channel_adapters(height, width, 1, self.schedule.sigmas, {},
                                              **{k: sample.get(k) for k in CHANNEL_EXTRAS}, **FLEX_CONTROL_DEFAULTS)
            features = reference_features(pipe, sample["ipadapter_images"]) if self.reference else None
            # EliGen last, as in the pipeline: the ControlNets see the plain prompt
            entities = ([sample_entities(pipe, sample, self.t5_sequence_length, self.dtype, height, width)]
                        if self.eligen else [])
            loras = sample_loras(pipe, sample) if self.encoded else []
        if self.mode in ADAPTER_MODES:   # the trained modules' whole use, in one (DDP) forward
            return self.model(self._adapted_loss, sample, x0, prompt, extras, adapters, features, generator, entities,
                              loras)
        return self._adapted_loss(sample, x0, prompt, extras, adapters, features, generator, entities, loras)

    def _adapted_loss(self, sample: dict, x0: torch.Tensor, prompt: Conditioning, extras, adapters: list,
                      features: torch.Tensor | None, generator: torch.Generator, entities: list = (),
                      loras: list = ()) -> torch.Tensor:
        """The loss with the LoRA-Encoder's tokens of the sample's LoRA first (as the pipeline adds them: the
        ControlNets and EliGen's global prompt see them), the IP-Adapter bound to the sample's reference features and
        InfiniteYou's identity given to the ControlNet adapter, each under autograd only when its module trains;
        EliGen's entities (no trained part) after them."""
        pipe, adapters, grad = self.pipe, list(adapters), torch.is_grad_enabled()
        if self.identity:
            with torch.set_grad_enabled(grad and self.mode == "infiniteyou"):
                identity = sample_identity(pipe.image_proj_model, sample)
            adapters = [replace(adapter, identity=identity) for adapter in adapters]
        if features is not None:
            with torch.set_grad_enabled(grad and self.mode == "ipadapter"):
                adapters.append(bind(pipe.ipadapter, features, pipe.dit))
        if loras:
            with torch.set_grad_enabled(grad and self.mode == "lora_encoder"):
                adapters.insert(0, lora_tokens(pipe, loras))
        adapters += entities
        loss, _ = flow_matching_loss(self.dit_model, x0, prompt, self.schedule, generator, self.guidance, self.dtype,
                                     extras, adapters)
        return loss

    def control_adapters(self, sample: dict, x0: torch.Tensor) -> list:
        """The sample's controlnet_* columns as one ControlNetInput for ControlNet 0 (DiffSynth's parse_extra_inputs),
        made into an adapter by the pipeline's own function: the control latent is the VAE posterior mean of the
        control image (masked pixels blacked out and the mask channel added for inpainting), as at inference.
        When the ControlNet trains, the adapter runs its DDP wrapper, so gradients are synchronised."""
        item = sample_control_input(sample)
        adapters = self.pipe.controlnet_adapters([item], x0.shape[-2] * 8, x0.shape[-1] * 8)
        if self.mode == "controlnet":
            adapters = [replace(adapter, model=self.model) for adapter in adapters]
        return adapters

    def _stop_requested(self) -> bool:
        return self.stop.requested or (self.output / STOP_FILE).exists()

    def _any(self, flag: bool) -> bool:
        acc = self.accelerator
        if acc.num_processes == 1:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum")[0] > 0)

    def _gather(self, losses: list[torch.Tensor]) -> tuple[bool, float]:
        """(stop requested on any process, mean loss over the window on all processes): one collective."""
        acc = self.accelerator
        stop = self._stop_requested()
        t = torch.tensor([float(torch.stack(losses).sum()), float(len(losses)), float(stop)])
        t = acc.reduce(t.to(acc.device), "sum") if acc.num_processes > 1 else t
        return bool(t[2] > 0), float(t[0] / t[1])

    # -------------------------------------------------------------------- outputs
    def save(self, label: str, validate: bool = True) -> Path:
        """The weights file `<label>.safetensors` and a resumable state, from the main process."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.output / f"{label}.safetensors"
        optimizer_state = distributed.optimizer_state(acc, self.model, self.optimizer)   # whole under FSDP
        with distributed.full_parameters(acc, self.model):   # the trained weights whole on the main process
            if acc.is_main_process:
                self._write(path, optimizer_state)
        acc.wait_for_everyone()
        self.last_saved, self.last_path = self.step, path
        if validate and self.args.validation_prompts and not self.args.validation_steps:
            self.validate()
        return path

    def _write(self, path: Path, optimizer_state: dict) -> None:
        """The weights file and the resumable state, from the main process's whole trained parameters."""
        dit = self.pipe.dit
        if self.lora:
            from lora_tools import save_lora
            from .trainable import export_lora
            save_lora(export_lora(dit), path, fmt=self.args.lora_format, dtype=self.dtype)
        elif self.mode == "controlnet" or self.mode in ADAPTER_MODES:
            from .trainable import CONTROLNET_CONFIG_KEY, adapters_state_dict
            modules = {"controlnet": self.trained} if self.mode == "controlnet" else self.trained
            metadata = {"format": "pt"}
            if "controlnet" in modules:  # its RoPE axes: the one setting shapes cannot tell
                config = {"axes_dim": list(modules["controlnet"].params.axes_dim)}
                metadata[CONTROLNET_CONFIG_KEY] = json.dumps(config)
            save_safetensors(adapters_state_dict(modules, self.args.remove_prefix_in_ckpt), path,
                             metadata=metadata)
        else:
            from .trainable import DIT_CONFIG_KEY, full_state_dict
            config = {"axes_dim": list(dit.params.axes_dim)}  # the one setting shapes cannot tell
            save_safetensors(full_state_dict(dit, self.args.remove_prefix_in_ckpt), path,
                             metadata={"format": "pt", DIT_CONFIG_KEY: json.dumps(config)})
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "weights": path.name,
                 "settings": self.settings()}
        folder = ckpt.save_state(self.output, dict(distributed.trained_parameters(self.model)), optimizer_state,
                                 self.scheduler.state_dict(), state, self.args.keep_checkpoints)
        self.log("checkpoint", step=self.step, path=str(path), state=str(folder))

    def validate(self) -> list[str]:
        """Render the validation prompts with the current weights into <output_path>/validation."""
        from ..image import save_image

        a, acc = self.args, self.accelerator
        acc.wait_for_everyone()
        paths = []
        # sharded weights (FSDP, ZeRO-3): every process runs the model, the main one saves the images
        if acc.is_main_process or distributed.model_runs_on_every_process(acc):
            height, width = validation_size(a)
            self.trained.eval()
            control = {"controlnet_inputs": [self.validation_control]} if self.validation_control else {}
            control.update(self.validation_inputs)
            for i, prompt in enumerate(a.validation_prompts):
                image = self.pipe(prompt=prompt, height=height, width=width, seed=a.validation_seed,
                                  num_inference_steps=a.validation_num_inference_steps,
                                  embedded_guidance=a.validation_embedded_guidance,
                                  t5_sequence_length=self.t5_sequence_length, progress_bar_cmd=None, **control)
                if acc.is_main_process:
                    paths.append(str(save_image(image, self.output / "validation" / f"step-{self.step}-{i}.png")))
            self.trained.train()
            if acc.is_main_process:
                self.log("validation", step=self.step, images=paths, prompts=a.validation_prompts)
        acc.wait_for_everyone()
        return paths

    def _stopped(self) -> dict:
        if self.last_saved != self.step:
            self.save(f"step-{self.step}", validate=False)
        if self.accelerator.is_main_process:
            (self.output / STOP_FILE).unlink(missing_ok=True)
        self.log("stopped", step=self.step, path=_str(self.last_path),
                 state=str(ckpt.checkpoints_dir(self.output) / f"step-{self.step}"))
        return {"step": self.step, "path": self.last_path, "stopped": True}

    def _finish(self) -> dict:
        if self.last_saved != self.step:
            self.save(f"step-{self.step}")
        self.log("done", step=self.step, path=_str(self.last_path))
        return {"step": self.step, "path": self.last_path, "stopped": False}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def validation_size(args: argparse.Namespace) -> tuple[int, int]:
    """(height, width): --validation_height/width, else the fixed training size, else the largest square
    (multiple of 16) within --max_pixels."""
    side = max(16, int(math.sqrt(args.max_pixels)) // 16 * 16)
    height = args.validation_height or args.height or side
    width = args.validation_width or args.width or side
    return height, width


def train(args: argparse.Namespace) -> dict:
    """Run the --task: sft and sft:train train (Trainer), data_process / sft:data_process encode (cache.py)."""
    if args.task != "sft" and args.task != CACHED_TASK:
        from .cache import data_process
        require_training_packages()
        return data_process(args)
    return Trainer(args).run()
