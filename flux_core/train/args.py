"""Command-line arguments of `python -m flux_core.train`: DiffSynth-Studio's names, defaults and meanings
(DiffSynth-Studio's `examples/flux/model_training/train.py`), plus FluxCore's additions (resume, validation images, seed, ...).

Every argument is checked here or in `check_args` before a model is loaded, so a typo costs seconds, not a
model load. Checks that need the data (rows, images) are in dataset.py; checks that need the DiT (target
modules) in lora.py; all of them run before the first training step.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..dtypes import DTYPES

# The FLUX LoRA targets of every DiffSynth-Studio FLUX script, in our (Black Forest Labs) module names.
FLUX_LORA_TARGETS = ("img_attn.qkv,txt_attn.qkv,img_attn.proj,txt_attn.proj,img_mlp.0,img_mlp.2,txt_mlp.0,"
                     "txt_mlp.2,img_mod.lin,txt_mod.lin,linear1,linear2,modulation.lin")
LORA_FORMATS = ("kohya", "diffusers", "diffsynth")
FP8_COMPONENTS = {"dit": "dit", "text_encoder_1": "text_encoder_1", "clip": "text_encoder_1",
                  "text_encoder_2": "text_encoder_2", "t5": "text_encoder_2", "vae": "vae"}
# --extra_inputs: DiffSynth-Studio's names. Every `controlnet_<field>` column becomes field <field> of ONE
# ControlNetInput per sample (DiffSynth's parse_extra_inputs), for ControlNet 0.
CONTROLNET_PREFIX = "controlnet_"
CONTROLNET_EXTRAS = ("controlnet_image", "controlnet_inpaint_mask", "controlnet_processor_id")
# IP-Adapter: each row's reference image(s). InfiniteYou: the face, as a photo (insightface computes its embedding)
# or as a precomputed 512-d ArcFace embedding file (FluxCore's addition), and InfuseNet's guidance (a number).
IPADAPTER_EXTRAS = ("ipadapter_images",)
IDENTITY_EXTRAS = ("infinityou_id_image", "infinityou_id_embedding")
INFINITEYOU_EXTRAS = (*IDENTITY_EXTRAS, "infinityou_guidance")
# EliGen: each row's entity prompts (a list of strings) and their masks (a list of image paths), together.
ELIGEN_EXTRAS = ("eligen_entity_masks", "eligen_entity_prompts")
# LoRA-Encoder: each row's LoRA file, encoded into tokens appended to the caption's.
LORA_ENCODER_EXTRAS = ("lora_encoder_inputs",)
# Step1X-Edit / Nexus-Gen: the image to edit, encoded with the caption by their conditioning encoders.
ENCODER_EXTRAS = ("step1x_reference_image", "nexus_gen_reference_image")
# FLEX.2 / FLUX.1-Fill: the images of the DiT's extra input channels, cropped like the row's image.
# A FLEX.2 control image acts with the pipeline's (DiffSynth's) strength and stop in training, as in DiffSynth.
FLEX_CONTROL_DEFAULTS = {"flex_control_strength": 0.5, "flex_control_stop": 0.5}
CHANNEL_EXTRAS = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image", "flux_fill_image", "flux_fill_mask")
EXTRA_INPUTS = ("kontext_images", *CONTROLNET_EXTRAS, *IPADAPTER_EXTRAS, *INFINITEYOU_EXTRAS, *ELIGEN_EXTRAS,
                *LORA_ENCODER_EXTRAS, *ENCODER_EXTRAS, *CHANNEL_EXTRAS)
IMAGE_EXTRA_INPUTS = ("kontext_images", "controlnet_image", "controlnet_inpaint_mask", "ipadapter_images",
                      "infinityou_id_image", "eligen_entity_masks", *ENCODER_EXTRAS,
                      *CHANNEL_EXTRAS)   # columns of image paths
# Columns that hold something else than image paths (a mode name, an embedding file, a number).
NOT_IMAGE_COLUMNS = {"controlnet_processor_id": "a union mode name (canny, depth, ...)",
                     "infinityou_id_embedding": "a face embedding file (.safetensors or .npy), read as numbers",
                     "infinityou_guidance": "a number (InfuseNet's embedded guidance)",
                     "eligen_entity_prompts": "the entity prompts (text)",
                     "lora_encoder_inputs": "a LoRA file, read as a LoRA"}
# --trainable_models: DiffSynth-Studio's pipeline attribute names. One model per run, or InfiniteYou's pair
# (InfuseNet, the ControlNet, with the image projector), as DiffSynth's InfiniteYou command trains them.
TRAINABLE_MODELS = ("dit", "controlnet", "ipadapter", "image_proj_model", "lora_encoder")
TRAINABLE_SETS = ({"dit"}, {"controlnet"}, {"ipadapter"}, {"image_proj_model"}, {"controlnet", "image_proj_model"},
                  {"lora_encoder"})
PROGRESS_BAR_MODES = ("auto", "on", "off")
# --task: DiffSynth's names. data_process and sft:data_process both write the cache (train/cache.py).
TASKS = ("sft", "data_process", "sft:data_process", "sft:train")
DATA_PROCESS_TASKS = ("data_process", "sft:data_process")
CACHED_TASK = "sft:train"
# The extra inputs a cache holds (their encodings need no trained model); every other one is refused by the split tasks.
CACHED_EXTRAS = ("kontext_images",)


class TrainError(ValueError):
    """Bad training input (argument, dataset row, image, target module). The message names it and the fix."""


def build_parser(prog: str = "python -m flux_core.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a LoRA on the FLUX DiT (optionally with EliGen's entity prompts and masks), "
        "fine-tune the whole DiT, or train a FLUX ControlNet, an IP-Adapter, InfiniteYou or a LoRA-Encoder "
        "(DiffSynth-Studio's train.py arguments). Also: `validate_lora` / `validate_full` sub-commands render a "
        "checkpoint.")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset_base_path", required=True,
                   help="folder the metadata's file paths are relative to (and where image + .txt pairs are "
                        "looked for when there is no metadata file); --task sft:train: the cache folder that --task "
                        "data_process wrote")
    d.add_argument("--dataset_metadata_path", default=None,
                   help="metadata .csv/.json/.jsonl with an `image` and a `prompt` column. Default: "
                        "metadata.csv/json/jsonl in the base folder if there is one, else every image of the "
                        "folder with its same-name .txt caption")
    d.add_argument("--max_pixels", type=int, default=1024 * 1024,
                   help="dynamic resolution (height/width not given): images larger than this many pixels are "
                        "scaled down to it, then each side is floored to a multiple of 16")
    d.add_argument("--height", type=int, default=None, help="fixed training height (multiple of 16; with --width)")
    d.add_argument("--width", type=int, default=None, help="fixed training width (multiple of 16; with --height)")
    d.add_argument("--data_file_keys", default="image",
                   help="comma list of metadata columns holding image paths (e.g. image,controlnet_image); the "
                        "image columns of --extra_inputs are added")
    d.add_argument("--dataset_repeat", type=int, default=1, help="each epoch goes over the data this many times")
    d.add_argument("--dataset_num_workers", type=int, default=0, help="DataLoader worker processes")

    m = p.add_argument_group("models")
    m.add_argument("--model_paths", default=None,
                   help='JSON list of local model files/folders; an entry may be a list (shards): '
                        '\'["flux1-dev.safetensors", "ae.safetensors", ["t5-1.safetensors", "t5-2.safetensors"]]\'')
    m.add_argument("--model_id_with_origin_paths", default=None,
                   help="comma list of model_id:origin_file_pattern fetched through ModelScope into "
                        "./models (or $DIFFSYNTH_MODEL_BASE_PATH), e.g. "
                        "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors. An existing local path is taken as a path")
    m.add_argument("--tokenizer_1_path", default=None, help="CLIP tokenizer folder (default: FLUX.1-dev tokenizer/)")
    m.add_argument("--tokenizer_2_path", default=None, help="T5 tokenizer folder (default: FLUX.1-dev tokenizer_2/)")
    m.add_argument("--extra_inputs", default=None,
                   help="comma list of extra model inputs read from the metadata: kontext_images, "
                        "controlnet_image, controlnet_inpaint_mask, controlnet_processor_id (the controlnet_* "
                        "columns form one ControlNetInput per sample for the ControlNet in the model flags), "
                        "ipadapter_images (reference images of the IP-Adapter in the model flags), "
                        "infinityou_id_image (face photos; needs insightface) or infinityou_id_embedding "
                        "(precomputed 512-d ArcFace embeddings, .safetensors/.npy files), infinityou_guidance, "
                        "eligen_entity_masks,eligen_entity_prompts (EliGen: per row a list of entity prompts and one "
                        "mask image per prompt, white = the entity's region), lora_encoder_inputs (LoRA-Encoder: per "
                        "row a LoRA file, relative to --dataset_base_path or the current folder)")
    m.add_argument("--fp8_models", default=None,
                   help="comma list of frozen models stored in float8_e4m3fn and computed in the training dtype: "
                        "dit (LoRA training only), text_encoder_1 (clip), text_encoder_2 (t5), vae, or an entry of "
                        "--model_paths / --model_id_with_origin_paths")

    t = p.add_argument_group("training")
    t.add_argument("--learning_rate", type=float, default=1e-4)
    t.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    t.add_argument("--num_epochs", type=int, default=1)
    t.add_argument("--output_path", default="./models", help="folder for the checkpoints, logs and validation images")
    t.add_argument("--remove_prefix_in_ckpt", default="pipe.dit.",
                   help="full fine-tuning: prefix removed from the saved parameter names, which are "
                        "`pipe.dit.<BFL name>` for the DiT (the default leaves the plain BFL names that load_model, "
                        "ComfyUI and flux1-dev.safetensors use), `pipe.controlnet.models.0.<DiffSynth name>` for a "
                        "ControlNet (give \"pipe.controlnet.models.0.\" for the names DiffSynth-Studio's ControlNet "
                        "loads), `pipe.ipadapter.<name>` for an IP-Adapter (give \"pipe.ipadapter.\") and "
                        "`pipe.image_proj_model.<name>` for InfiniteYou's projector (with InfuseNet: give \"pipe.\"), "
                        "`pipe.lora_encoder.<name>` for a LoRA-Encoder (give \"pipe.lora_encoder.\"). "
                        "(LoRA files always use their format's own names)")
    t.add_argument("--save_steps", type=int, default=None,
                   help="save every N optimizer steps (default: at the end of every epoch)")
    t.add_argument("--find_unused_parameters", action="store_true",
                   help="DDP: allow trainable parameters that get no gradient in a step")
    t.add_argument("--trainable_models", default=None,
                   help="the model trained in full, the others frozen: dit; controlnet (the ControlNet given in "
                        "the model flags; needs --extra_inputs controlnet_image); ipadapter (the IP-Adapter given in "
                        "the model flags; needs --extra_inputs ipadapter_images); image_proj_model (InfiniteYou's "
                        "projector; needs controlnet_image and infinityou_id_image or infinityou_id_embedding); "
                        "InfiniteYou's pair controlnet,image_proj_model; or lora_encoder (the LoRA-Encoder given in "
                        "the model flags; needs --extra_inputs lora_encoder_inputs)")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--task", default="sft", choices=list(TASKS),
                   help="sft: train, encoding each sample's image (VAE) and caption (CLIP-L + T5) at every step. "
                        "data_process (= sft:data_process): encode every row once (VAE, CLIP-L, T5; the DiT is not "
                        "loaded) into a cache in --output_path, then stop. sft:train: train from such a cache, given "
                        "as --dataset_base_path without --dataset_metadata_path: the VAE and text encoders are not "
                        "loaded, and the losses and weights are those of sft over the same data. The cache holds "
                        "images, captions and kontext_images; other extra inputs and validation images need --task "
                        "sft (DiffSynth's distillation tasks are not implemented)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora_base_model", default=None, help="model the LoRA is added to: dit")
    lo.add_argument("--lora_target_modules", default=FLUX_LORA_TARGETS,
                    help="comma list of Linear layers (matched as name suffixes) in our BFL names "
                         "(img_attn.qkv, linear1, modulation.lin, ...) or DiffSynth's (a_to_qkv, to_qkv_mlp, "
                         "norm.linear, ...). Empty: every Linear of >= 512 features in the blocks")
    lo.add_argument("--lora_rank", type=int, default=32)
    lo.add_argument("--lora_checkpoint", default=None,
                    help="LoRA file (any format FluxCore reads) to start from; its rank must be --lora_rank")
    lo.add_argument("--align_to_opensource_format", action="store_true",
                    help="accepted for DiffSynth compatibility: FluxCore always writes the open kohya format "
                         "(see --lora_format)")
    lo.add_argument("--lora_format", default="kohya", choices=LORA_FORMATS,
                    help="file format of the saved LoRAs: kohya (ComfyUI, diffusers, kohya, Forge, DiffSynth load "
                         "it), diffusers (PEFT keys) or diffsynth")

    g = p.add_argument_group("memory")
    g.add_argument("--use_gradient_checkpointing", action="store_true",
                   help="recompute each DiT (and trained ControlNet) block's activations in the backward pass")
    g.add_argument("--use_gradient_checkpointing_offload", action="store_true",
                   help="gradient checkpointing with the saved block inputs kept in CPU memory")

    x = p.add_argument_group("FluxCore additions")
    x.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue an interrupted run from the newest complete checkpoint in --output_path (a "
                        "corrupt newer one is skipped with a warning; a folder with no run yet starts a new one), "
                        "or from the checkpoint folder given: model, optimizer, LR schedule, step and data order")
    x.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output_path that holds an earlier run: that run's checkpoints "
                        "(checkpoints/, step-N/epoch-N .safetensors), train_log.jsonl, training_args.json and "
                        "validation/ images are deleted first. Without it (or --resume) such a folder is refused")
    x.add_argument("--progress_bar", default="auto", choices=PROGRESS_BAR_MODES,
                   help="a progress bar (step, loss, speed, time left) on stderr beside the JSON events on stdout: "
                        "auto (when stderr is a terminal), on, off")
    x.add_argument("--keep_checkpoints", type=int, default=1,
                   help="resumable training states kept in <output_path>/checkpoints (older ones are deleted)")
    x.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    x.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order, timesteps and noise")
    x.add_argument("--torch_dtype", default="bfloat16", choices=list(DTYPES),
                   help="dtype of the models (LoRA weights and their optimizer state are kept in float32)")
    x.add_argument("--t5_sequence_length", type=int, default=None,
                   help="T5 tokens per caption (default: the T5 tokenizer's model_max_length, at most 512: FLUX.1-dev "
                        "512, the demo model 32)")
    x.add_argument("--embedded_guidance", type=float, default=1.0,
                   help="guidance value fed to the DiT's guidance embedder while training (DiffSynth: 1)")
    x.add_argument("--validation_prompts", nargs="+", default=None,
                   help="prompts rendered into <output_path>/validation every --validation_steps steps")
    x.add_argument("--validation_steps", type=int, default=None,
                   help="render the validation prompts every N optimizer steps (default: at each save)")
    x.add_argument("--validation_height", type=int, default=None, help="default: --height, else from --max_pixels")
    x.add_argument("--validation_width", type=int, default=None, help="default: --width, else from --max_pixels")
    x.add_argument("--validation_num_inference_steps", type=int, default=30)
    x.add_argument("--validation_embedded_guidance", type=float, default=3.5)
    x.add_argument("--validation_seed", type=int, default=0)
    x.add_argument("--validation_controlnet_image", default=None,
                   help="ControlNet runs: the control image of the validation images (default: the first data row's "
                        "controlnet_image, with its controlnet_inpaint_mask and controlnet_processor_id)")
    x.add_argument("--validation_controlnet_inpaint_mask", default=None,
                   help="inpainting ControlNet: the mask for --validation_controlnet_image")
    x.add_argument("--validation_controlnet_processor_id", default=None,
                   help="union ControlNet: the mode for --validation_controlnet_image (canny, tile, depth, ...)")
    x.add_argument("--validation_ipadapter_images", nargs="+", default=None,
                   help="IP-Adapter runs: the reference image(s) of the validation images (default: the first data "
                        "row's ipadapter_images)")
    x.add_argument("--validation_infinityou_id_image", default=None,
                   help="InfiniteYou runs: the face photo of the validation images (needs insightface; default: the "
                        "first data row's face)")
    x.add_argument("--validation_infinityou_id_embedding", default=None,
                   help="InfiniteYou runs: the face embedding file (.safetensors/.npy) of the validation images")
    x.add_argument("--validation_infinityou_guidance", type=float, default=None,
                   help="InfiniteYou runs: InfuseNet's guidance for the validation images (default: the first data "
                        "row's infinityou_guidance, else 1.0)")
    x.add_argument("--validation_eligen_entity_prompts", nargs="+", default=None,
                   help="EliGen runs: the entity prompts of the validation images, with "
                        "--validation_eligen_entity_masks (default: the first data row's entities, cropped to the "
                        "validation size)")
    x.add_argument("--validation_eligen_entity_masks", nargs="+", default=None,
                   help="EliGen runs: one mask image per --validation_eligen_entity_prompts entry (white = the "
                        "entity), of the validation images' shape")
    x.add_argument("--validation_lora_encoder_inputs", nargs="+", default=None,
                   help="LoRA-Encoder runs: the LoRA file(s) encoded into the validation images' prompt (default: "
                        "the first data row's lora_encoder_inputs)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def comma_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def check_args(args: argparse.Namespace) -> None:
    """Argument errors that need no data and no model, each naming the argument."""
    if not args.model_paths and not args.model_id_with_origin_paths:
        raise TrainError("no models: give --model_paths (local files) and/or --model_id_with_origin_paths "
                         "(ModelScope model_id:pattern).")
    model_path_entries(args.model_paths)  # JSON checked here
    for name in ("height", "width", "validation_height", "validation_width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            lower = max(16, value // 16 * 16)
            raise TrainError(f"--{name} {value} is not a positive multiple of 16 (FLUX packs 2x2 patches of the "
                             f"8x-downscaled latent); use {lower} or {lower + 16}.")
    if (args.height is None) != (args.width is None):
        raise TrainError("give both --height and --width for a fixed training size, or neither for dynamic "
                         "resolution (limited by --max_pixels).")
    if args.max_pixels < 256:
        raise TrainError(f"--max_pixels {args.max_pixels}: must be at least 256 (one 16x16 patch).")
    for name in ("dataset_repeat", "num_epochs", "gradient_accumulation_steps", "lora_rank", "keep_checkpoints",
                 "t5_sequence_length", "validation_num_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("save_steps", "max_steps", "validation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.dataset_num_workers < 0:
        raise TrainError(f"--dataset_num_workers must be 0 or more, got {args.dataset_num_workers}.")

    trainable = comma_list(args.trainable_models)
    lora_base = (args.lora_base_model or "").strip() or None
    bad = [m for m in trainable if m not in TRAINABLE_MODELS]
    if bad:
        raise TrainError(f"--trainable_models {','.join(bad)}: FluxCore trains the DiT, a ControlNet, an IP-Adapter "
                         f"or InfiniteYou, or a LoRA-Encoder; use --trainable_models dit (full fine-tuning), "
                         f"controlnet (the ControlNet in the model flags), ipadapter (the IP-Adapter in the model flags), "
                         f"controlnet,image_proj_model (InfiniteYou: InfuseNet and its projector), lora_encoder (the "
                         f"LoRA-Encoder in the model flags) or --lora_base_model dit (LoRA).")
    if trainable and set(trainable) not in TRAINABLE_SETS:
        raise TrainError(f"--trainable_models {','.join(trainable)}: train one model per run (dit, controlnet, "
                         f"ipadapter, image_proj_model or lora_encoder; the others stay frozen), or InfiniteYou's pair "
                         f"controlnet,image_proj_model.")
    if lora_base not in (None, "dit"):
        raise TrainError(f"--lora_base_model {lora_base}: FluxCore adds LoRAs to the DiT only; use "
                         f"--lora_base_model dit.")
    if lora_base and trainable:
        raise TrainError(f"--trainable_models {','.join(trainable)} and --lora_base_model dit together: choose "
                         f"full training or a LoRA.")
    check_task(args, trainable)
    if not lora_base and not trainable and args.task not in DATA_PROCESS_TASKS:
        raise TrainError("nothing to train: give --lora_base_model dit (LoRA) or --trainable_models dit "
                         "(full fine-tuning), controlnet, ipadapter, controlnet,image_proj_model or lora_encoder.")
    if args.lora_checkpoint and not lora_base:
        raise TrainError("--lora_checkpoint needs --lora_base_model dit.")
    if args.lora_checkpoint and not os.path.isfile(args.lora_checkpoint):
        raise TrainError(f"--lora_checkpoint {args.lora_checkpoint}: no such file.")

    extras = comma_list(args.extra_inputs)
    check_extra_inputs(extras, trainable, args)
    for entry in comma_list(args.fp8_models):
        if FP8_COMPONENTS.get(entry) == "dit" and "dit" in trainable:
            raise TrainError("--fp8_models dit: the DiT is being fully fine-tuned; FP8 storage is for frozen "
                             "models (use it with LoRA or ControlNet training).")
    validation_controls = [f"--validation_{n}" for n in CONTROLNET_EXTRAS if getattr(args, f"validation_{n}")]
    if validation_controls and "controlnet_image" not in extras:
        raise TrainError(f"{', '.join(validation_controls)}: validation control inputs are for runs with "
                         f"--extra_inputs controlnet_image.")
    if (args.validation_controlnet_inpaint_mask or args.validation_controlnet_processor_id) and \
            not args.validation_controlnet_image:
        raise TrainError("--validation_controlnet_inpaint_mask / --validation_controlnet_processor_id go with "
                         "--validation_controlnet_image (without it the first data row's control inputs are used).")
    if args.validation_lora_encoder_inputs and "lora_encoder_inputs" not in extras:
        raise TrainError("--validation_lora_encoder_inputs: validation LoRAs are for runs with --extra_inputs "
                         "lora_encoder_inputs.")
    for path in args.validation_lora_encoder_inputs or []:
        if not os.path.isfile(path):
            raise TrainError(f"--validation_lora_encoder_inputs {path}: no such file.")
    if args.validation_ipadapter_images and "ipadapter_images" not in extras:
        raise TrainError("--validation_ipadapter_images: validation reference images are for runs with "
                         "--extra_inputs ipadapter_images.")
    validation_faces = [f"--validation_{n}" for n in INFINITEYOU_EXTRAS if getattr(args, f"validation_{n}") is not None]
    if validation_faces and not any(e in extras for e in IDENTITY_EXTRAS):
        raise TrainError(f"{', '.join(validation_faces)}: validation identities are for runs with --extra_inputs "
                         f"infinityou_id_image or infinityou_id_embedding.")
    check_validation_entities(args, extras)
    if args.validation_infinityou_id_image and args.validation_infinityou_id_embedding:
        raise TrainError("--validation_infinityou_id_image and --validation_infinityou_id_embedding together: give "
                         "one.")
    for name in ("validation_controlnet_image", "validation_controlnet_inpaint_mask", "validation_infinityou_id_image",
                 "validation_infinityou_id_embedding"):
        if getattr(args, name) and not os.path.isfile(getattr(args, name)):
            raise TrainError(f"--{name} {getattr(args, name)}: no such file.")
    for path in args.validation_ipadapter_images or []:
        if not os.path.isfile(path):
            raise TrainError(f"--validation_ipadapter_images {path}: no such file.")
    if args.validation_steps and not args.validation_prompts:
        raise TrainError("--validation_steps needs --validation_prompts.")
    if args.resume and args.overwrite:
        raise TrainError("--resume and --overwrite together: --resume continues the run in --output_path, "
                         "--overwrite deletes it; choose one.")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        raise TrainError(f"--resume {args.resume}: no such checkpoint folder.")


def check_task(args: argparse.Namespace, trainable: list[str]) -> None:
    """The split tasks (data_process, sft:train): what a cache cannot hold, and sft:train's data and validation
    flags; every problem in one message that points to --task sft."""
    if args.task == "sft":
        return
    problems = []
    uncached = [e for e in comma_list(args.extra_inputs) if e not in CACHED_EXTRAS]
    if uncached:
        problems.append(f"--extra_inputs {','.join(uncached)}: a cache holds the image, the caption and "
                        f"{', '.join(CACHED_EXTRAS)}; these columns need their models (VAE, image or text encoders, "
                        f"ControlNets, adapters) at every step")
    adapters = [m for m in trainable if m != "dit"]
    if adapters:
        problems.append(f"--trainable_models {','.join(adapters)}: trains on inputs a cache does not hold")
    if args.task == CACHED_TASK:
        if args.dataset_metadata_path:
            problems.append(f"--dataset_metadata_path {args.dataset_metadata_path}: sft:train reads the cache that "
                            f"--task data_process wrote; give its folder as --dataset_base_path and no metadata "
                            f"(DiffSynth's convention)")
        if args.validation_prompts:
            problems.append("--validation_prompts: validation images need the text encoders and the VAE, which "
                            "sft:train does not load; check a saved LoRA with `python -m flux_core generate --prompt "
                            "... --lora <output_path>/step-N.safetensors` (or `python -m flux_core.train "
                            "validate_lora ...`)")
    if problems:
        raise TrainError(f"--task {args.task}: " + "; ".join(problems) + ". Use --task sft for these (it encodes "
                         "every input at each step).")


def check_extra_inputs(extras: list[str], trainable: list[str], args: argparse.Namespace) -> None:
    """--extra_inputs names, and what the ControlNet ones need; all problems in one message."""
    problems = []
    if "controlnet_inputs" in extras:
        problems.append("'controlnet_inputs' is not a column: the control inputs are read from the columns "
                        "controlnet_image (the control map), controlnet_inpaint_mask (inpainting ControlNet) and "
                        "controlnet_processor_id (union ControlNet mode); list those, e.g. --extra_inputs "
                        "controlnet_image,controlnet_processor_id")
    unknown = [e for e in extras if e not in EXTRA_INPUTS and e != "controlnet_inputs"]
    if unknown:
        problems.append(f"{','.join(unknown)}: not supported; FluxCore's trainer reads {', '.join(EXTRA_INPUTS)}")
    control = [e for e in extras if e in CONTROLNET_EXTRAS]
    if control and "controlnet_image" not in extras:
        problems.append(f"{','.join(control)} without controlnet_image: the control image column is what the "
                        f"ControlNet sees; add controlnet_image")
    if "controlnet" in trainable and "controlnet_image" not in extras:
        problems.append("--trainable_models controlnet needs the control images: add --extra_inputs "
                        "controlnet_image (a metadata column of image paths)")
    if "ipadapter" in trainable and "ipadapter_images" not in extras:
        problems.append("--trainable_models ipadapter needs the reference images: add --extra_inputs "
                        "ipadapter_images (a metadata column of image paths, or of JSON lists of them)")
    identity = [e for e in IDENTITY_EXTRAS if e in extras]
    if "image_proj_model" in trainable and not identity:
        problems.append("--trainable_models image_proj_model needs the faces: add --extra_inputs "
                        "infinityou_id_image (face photos; needs insightface) or infinityou_id_embedding (precomputed "
                        "512-d ArcFace embeddings, .safetensors or .npy files)")
    if len(identity) > 1:
        problems.append("infinityou_id_image and infinityou_id_embedding together: give one (the embedding is what "
                        "the face photo is turned into)")
    eligen = [e for e in ELIGEN_EXTRAS if e in extras]
    if len(eligen) == 1:
        other = next(e for e in ELIGEN_EXTRAS if e not in extras)
        problems.append(f"{eligen[0]} without {other}: EliGen takes one mask per entity prompt; list both "
                        f"(--extra_inputs eligen_entity_masks,eligen_entity_prompts)")
    if "lora_encoder" in trainable and "lora_encoder_inputs" not in extras:
        problems.append("--trainable_models lora_encoder needs the LoRAs it encodes: add --extra_inputs "
                        "lora_encoder_inputs (a metadata column with a LoRA file per row)")
    if "infinityou_guidance" in extras and not identity:
        problems.append("infinityou_guidance without infinityou_id_image or infinityou_id_embedding: the guidance is "
                        "InfuseNet's, used with an identity; add one of them")
    if identity and "controlnet_image" not in extras:
        problems.append(f"{identity[0]} without controlnet_image: the identity reaches the DiT only through "
                        f"InfuseNet, a ControlNet, which needs a control image per row (DiffSynth's example uses "
                        f"black images or pose keypoints); add controlnet_image")
    if problems:
        raise TrainError("--extra_inputs " + "; ".join(problems) + ".")
    file_keys = comma_list(args.data_file_keys)
    for key in file_keys:
        if key in NOT_IMAGE_COLUMNS:
            raise TrainError(f"--data_file_keys {key}: that column holds {NOT_IMAGE_COLUMNS[key]}, not an image "
                             f"path; leave it out of --data_file_keys.")


def check_validation_entities(args: argparse.Namespace, extras: list[str]) -> None:
    """--validation_eligen_entity_prompts / _masks: for EliGen runs, together, as many masks as prompts, files that
    exist."""
    prompts, masks = args.validation_eligen_entity_prompts, args.validation_eligen_entity_masks
    if prompts is None and masks is None:
        return
    if "eligen_entity_prompts" not in extras:
        raise TrainError("--validation_eligen_entity_prompts / --validation_eligen_entity_masks: validation entities "
                         "are for runs with --extra_inputs eligen_entity_masks,eligen_entity_prompts.")
    if prompts is None or masks is None or len(prompts) != len(masks):
        raise TrainError(f"--validation_eligen_entity_prompts ({len(prompts or [])}) and "
                         f"--validation_eligen_entity_masks ({len(masks or [])}): give one mask per prompt, in the "
                         f"same order.")
    missing = [path for path in masks if not os.path.isfile(path)]
    if missing:
        raise TrainError(f"--validation_eligen_entity_masks {' '.join(missing)}: no such file.")


def is_controlnet_run(args: argparse.Namespace) -> bool:
    """Whether the run feeds a ControlNet (its control inputs come from the controlnet_* columns)."""
    return "controlnet_image" in comma_list(args.extra_inputs)


def trains_controlnet(args: argparse.Namespace) -> bool:
    return "controlnet" in comma_list(args.trainable_models)


def training_mode(args: argparse.Namespace) -> str:
    """"lora", "full" (the DiT), "controlnet", "ipadapter", "infiniteyou" (the image projector, with or without
    InfuseNet) or "lora_encoder"."""
    trainable = set(comma_list(args.trainable_models))
    if is_lora(args):
        return "lora"
    if "lora_encoder" in trainable:
        return "lora_encoder"
    if "image_proj_model" in trainable:
        return "infiniteyou"
    return "controlnet" if "controlnet" in trainable else "ipadapter" if "ipadapter" in trainable else "full"


def uses_ipadapter(args: argparse.Namespace) -> bool:
    """Whether each sample feeds the IP-Adapter its ipadapter_images."""
    return "ipadapter_images" in comma_list(getattr(args, "extra_inputs", None))


def uses_eligen(args: argparse.Namespace) -> bool:
    """Whether each sample feeds EliGen its entity prompts and masks."""
    return "eligen_entity_prompts" in comma_list(getattr(args, "extra_inputs", None))


def uses_lora_encoder(args: argparse.Namespace) -> bool:
    """Whether each sample's LoRA file is encoded by the LoRA-Encoder into prompt tokens."""
    return "lora_encoder_inputs" in comma_list(getattr(args, "extra_inputs", None))


def identity_input(args: argparse.Namespace) -> str | None:
    """The column InfiniteYou's identity comes from (infinityou_id_image or infinityou_id_embedding), or None."""
    extras = comma_list(getattr(args, "extra_inputs", None))
    return next((e for e in IDENTITY_EXTRAS if e in extras), None)


def is_lora(args: argparse.Namespace) -> bool:
    return bool((args.lora_base_model or "").strip())


def data_file_keys(args: argparse.Namespace) -> list[str]:
    """Columns loaded as images; the extra inputs that are images are added (DiffSynth needs both lists)."""
    keys = comma_list(args.data_file_keys) or ["image"]
    if "image" not in keys:
        keys.insert(0, "image")
    for extra in comma_list(args.extra_inputs):
        if extra in IMAGE_EXTRA_INPUTS and extra not in keys:
            keys.append(extra)
    return keys


def model_path_entries(model_paths: str | None) -> list:
    """--model_paths JSON -> list of paths (str) or shard lists (list[str])."""
    if not model_paths:
        return []
    try:
        entries = json.loads(model_paths)
    except json.JSONDecodeError as e:
        raise TrainError(f"--model_paths is not valid JSON ({e}); write a JSON list of paths, e.g. "
                         f'\'["flux1-dev.safetensors", "ae.safetensors"]\'.') from None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(
            isinstance(e, str) or (isinstance(e, list) and e and all(isinstance(s, str) for s in e)) for e in entries):
        raise TrainError("--model_paths must be a JSON list whose entries are paths or lists of paths (shards).")
    return entries


def torch_dtype(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[args.torch_dtype]
