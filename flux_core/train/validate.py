"""Render a trained checkpoint, as DiffSynth-Studio's validate_lora / validate_full scripts do:

    python -m flux_core.train validate_lora --model_paths '[...]' --lora_path models/train/step-500.safetensors \\
        --prompt "a dog" --seed 0 --output image.jpg
    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/epoch-0.safetensors \\
        --prompt "a dog" --output image.jpg

    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/cn/epoch-0.safetensors \
        --controlnet_image depth.png --controlnet_processor_id depth --prompt "a dog" --output image.jpg

The base models are named like the trainer's (--model_paths / --model_id_with_origin_paths, tokenizers).
validate_lora loads the LoRA (any format) onto the DiT with `flux_core.lora.load_lora`; validate_full loads the
fine-tuned DiT with `load_model` in place of the base DiT (which is then not loaded at all), or a trained ControlNet
in place of the ControlNet of the model flags. --controlnet_image (with --controlnet_inpaint_mask /
--controlnet_processor_id / --controlnet_scale) feeds the ControlNet, as `ControlNetInput(image=..., ...)`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .args import DTYPES, TrainError
from .trainable import CONTROLNET_CONFIG_KEY, DIT_CONFIG_KEY


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m flux_core.train {command}",
                                description="Generate an image with a trained " +
                                ("LoRA" if command == "validate_lora" else "full DiT checkpoint") + ".")
    p.add_argument("--model_paths", default=None, help="JSON list of local model files/folders (as for training)")
    p.add_argument("--model_id_with_origin_paths", default=None, help="comma list of model_id:pattern (ModelScope)")
    p.add_argument("--tokenizer_1_path", default=None)
    p.add_argument("--tokenizer_2_path", default=None)
    if command == "validate_lora":
        p.add_argument("--lora_path", required=True, help="the trained LoRA file")
        p.add_argument("--lora_alpha", type=float, default=1.0, help="LoRA strength")
    else:
        p.add_argument("--checkpoint", required=True, help="the fine-tuned DiT file")
    p.add_argument("--controlnet_image", default=None, help="control image for the ControlNet (0) of the models")
    p.add_argument("--controlnet_inpaint_mask", default=None, help="inpainting ControlNet: the mask image")
    p.add_argument("--controlnet_processor_id", default=None, help="union ControlNet: the mode (canny, depth, ...)")
    p.add_argument("--controlnet_scale", type=float, default=1.0, help="ControlNet strength")
    p.add_argument("--prompt", default="a dog")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--cfg_scale", type=float, default=1.0)
    p.add_argument("--embedded_guidance", type=float, default=3.5)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--t5_sequence_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch_dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="image.jpg", help="image path (written atomically)")
    return p


def saved_dit_config(path: str, key: str = DIT_CONFIG_KEY) -> dict:
    """The model settings flux_core.train stores beside a full checkpoint's weights (RoPE axes), if any: `key`
    fluxcore_dit_config (a DiT) or fluxcore_controlnet_config (a ControlNet)."""
    import json

    from ..loading.files import safetensors_metadata

    try:
        return json.loads(safetensors_metadata(path).get(key, "{}"))
    except (ValueError, OSError):
        return {}


def saved_controlnet_config(path: str) -> dict:
    return saved_dit_config(path, CONTROLNET_CONFIG_KEY)


def is_controlnet_checkpoint(path: str) -> bool:
    """Whether a full checkpoint holds a ControlNet (its heads), from the key names only."""
    from safetensors import safe_open

    from ..models.controlnet import has_controlnet_heads

    try:
        with safe_open(path, framework="pt") as f:
            return has_controlnet_heads(f.keys())
    except (OSError, ValueError):
        return False  # not a safetensors file: load_model says what it is


def controlnet_inputs(args: argparse.Namespace) -> list:
    if not args.controlnet_image:
        if args.controlnet_inpaint_mask or args.controlnet_processor_id:
            raise TrainError("--controlnet_inpaint_mask / --controlnet_processor_id go with --controlnet_image.")
        return []
    from PIL import Image

    from ..controlnet import ControlNetInput

    def read(flag, path):
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as e:
            raise TrainError(f"--{flag} {path}: cannot be read as an image ({e}).") from None
    mask = args.controlnet_inpaint_mask
    return [ControlNetInput(image=read("controlnet_image", args.controlnet_image), scale=args.controlnet_scale,
                            inpaint_mask=read("controlnet_inpaint_mask", mask) if mask else None,
                            processor_id=args.controlnet_processor_id)]


def run(command: str, argv: list[str]) -> Path:
    from ..image import save_image
    from ..pipeline import default_device
    from .trainer import load_pipeline

    args = build_parser(command).parse_args(argv)
    if not args.model_paths and not args.model_id_with_origin_paths:
        raise TrainError("no base models: give --model_paths and/or --model_id_with_origin_paths.")
    device = torch.device(args.device or default_device())
    control = controlnet_inputs(args)
    if command == "validate_lora":
        pipe, _ = load_pipeline(args, device)
        from ..lora import load_lora
        report = load_lora(pipe.dit, args.lora_path, alpha=args.lora_alpha)
        print(report.loras[0].summary(), file=sys.stderr)
    elif is_controlnet_checkpoint(args.checkpoint):
        from ..loading.loader import load_model
        pipe, _ = load_pipeline(args, device, skip_kinds=("controlnet",))
        pipe.controlnet.models.append(load_model(args.checkpoint, config=saved_controlnet_config(args.checkpoint),
                                                 torch_dtype=DTYPES[args.torch_dtype], device=device,
                                                 kind="controlnet"))
        if not control:
            raise TrainError(f"--checkpoint {args.checkpoint} is a ControlNet: give --controlnet_image (and "
                             f"--controlnet_processor_id / --controlnet_inpaint_mask where it needs them).")
    else:
        from ..loading.loader import load_model
        pipe, _ = load_pipeline(args, device, skip_kinds=("dit",))
        pipe.dit = load_model(args.checkpoint, config=saved_dit_config(args.checkpoint),
                              torch_dtype=DTYPES[args.torch_dtype], device=device, kind="dit")
    try:
        image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                     embedded_guidance=args.embedded_guidance, height=args.height, width=args.width,
                     num_inference_steps=args.num_inference_steps, t5_sequence_length=args.t5_sequence_length,
                     seed=args.seed, controlnet_inputs=control or None)
    except ValueError as e:
        if not control or "controlnet_inputs[0]" not in str(e):
            raise
        raise TrainError(str(e).replace("controlnet_inputs[0]: ", "--controlnet_image: ")) from None
    path = save_image(image, Path(args.output))
    print(f"saved {path} (seed {args.seed})")
    return path
