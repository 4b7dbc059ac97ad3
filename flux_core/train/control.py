"""The ControlNet side of training (DiffSynth-Studio's semantics): which ControlNet a run feeds, which controlnet_*
columns it needs, and each sample's columns as one `ControlNetInput` for ControlNet 0.

    --trainable_models controlnet      the ControlNet trains, the DiT is frozen
    --extra_inputs controlnet_image[,controlnet_inpaint_mask|controlnet_processor_id]
                                       one ControlNetInput(image=, inpaint_mask=, processor_id=) per sample

Every check names the flags and columns to change and lists all problems at once.
"""
from __future__ import annotations

import argparse

from PIL import Image

from ..controlnet import INPAINT_CONDITION_CHANNELS, ControlNetInput, check_controlnet_input, is_inpainting
from .args import TrainError, comma_list, is_controlnet_run, trains_controlnet
from .messages import ModelEntry


def needs_controlnet(args: argparse.Namespace) -> bool:
    """Whether a training run feeds a ControlNet (validate.py's arguments have no such flags)."""
    return hasattr(args, "extra_inputs") and (is_controlnet_run(args) or trains_controlnet(args))


def controlnet_flags(args: argparse.Namespace) -> str:
    """The flags that ask for a ControlNet, as a message names them."""
    flags = []
    if trains_controlnet(args):
        flags.append(f"--trainable_models {','.join(comma_list(args.trainable_models))}")
    control = [e for e in comma_list(getattr(args, "extra_inputs", None)) if e.startswith("controlnet_")]
    if control:
        flags.append(f"--extra_inputs {','.join(control)}")
    return " and ".join(flags)


def check_controlnet_count(args: argparse.Namespace, found: list[ModelEntry]) -> None:
    """A ControlNet run needs exactly one ControlNet among the model flags' entries (`found`: those holding one):
    the controlnet_* columns make one control input per sample, for ControlNet 0 (DiffSynth's default id)."""
    if not found:
        raise TrainError(f"{controlnet_flags(args)}: no ControlNet is loaded; add the ControlNet's file or folder "
                         f"(diffusers format, e.g. InstantX/FLUX.1-dev-Controlnet-Union-alpha) to --model_paths or "
                         f"--model_id_with_origin_paths.")
    if len(found) > 1:
        raise TrainError(f"{controlnet_flags(args)}: {len(found)} ControlNets are loaded "
                         f"({', '.join(e.describe() for e in found)}), but the controlnet_* columns make one control "
                         f"input per sample, for the first one; give only the ControlNet to train with.")


def check_controlnet_columns(args: argparse.Namespace, pipe, configs: list) -> None:
    """The controlnet_* columns the loaded ControlNet needs, and only those; every problem in one message."""
    model = pipe.controlnet.models[0]
    entry = pipe.loaded_from["controlnet.models.0"]
    spec = configs[entry.config_index][0]
    extras = comma_list(args.extra_inputs)
    problems = []
    if model.params.num_modes and "controlnet_processor_id" not in extras:
        problems.append("it is a union ControlNet: add controlnet_processor_id to --extra_inputs and a "
                        "controlnet_processor_id column to the metadata with each row's mode (canny, tile, depth, "
                        "blur, pose, gray, lq)")
    elif not model.params.num_modes and "controlnet_processor_id" in extras:
        problems.append("it has no control modes (not a union ControlNet): leave controlnet_processor_id out of "
                        "--extra_inputs")
    if is_inpainting(model) and "controlnet_inpaint_mask" not in extras:
        problems.append("it is an inpainting ControlNet: add controlnet_inpaint_mask to --extra_inputs and a "
                        "controlnet_inpaint_mask column (mask image paths, white where it repaints) to the metadata")
    elif not is_inpainting(model) and "controlnet_inpaint_mask" in extras:
        problems.append(f"it is not an inpainting ControlNet (its input has {model.params.extra_condition_channels} "
                        f"extra channels, alimama's has {INPAINT_CONDITION_CHANNELS}): leave controlnet_inpaint_mask "
                        f"out of --extra_inputs")
    if problems:
        raise TrainError(f"the ControlNet {spec}: " + "; ".join(problems) + ".")


def sample_control_input(sample: dict) -> ControlNetInput:
    """One sample's controlnet_<field> columns as ControlNetInput(<field>=value) for ControlNet 0."""
    return ControlNetInput(image=sample["controlnet_image"], inpaint_mask=sample.get("controlnet_inpaint_mask"),
                           processor_id=sample.get("controlnet_processor_id"))


def validation_control_input(args: argparse.Namespace, dataset, pipe) -> ControlNetInput:
    """The control input of the validation images: --validation_controlnet_* files (checked against the loaded
    ControlNet now, not after the first training steps), else the first data row's."""
    if not args.validation_controlnet_image:
        return sample_control_input(dataset[0])
    mask = args.validation_controlnet_inpaint_mask
    item = ControlNetInput(image=_read_image(args.validation_controlnet_image),
                           inpaint_mask=_read_image(mask) if mask else None,
                           processor_id=args.validation_controlnet_processor_id)
    try:
        check_controlnet_input(0, item, pipe.controlnet)
    except ValueError as e:   # the pipeline's parameter names, told as the flags that set them
        message = str(e).replace("controlnet_inputs[0]: ", "")
        message = message.replace("inpaint_mask", "--validation_controlnet_inpaint_mask")
        message = message.replace("processor_id", "--validation_controlnet_processor_id")
        raise TrainError(f"--validation_controlnet_image: {message}") from None
    return item


def _read_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
