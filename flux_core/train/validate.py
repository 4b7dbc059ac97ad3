"""Render a trained checkpoint, as DiffSynth-Studio's validate_lora / validate_full scripts do:

    python -m flux_core.train validate_lora --model_paths '[...]' --lora_path models/train/step-500.safetensors \\
        --prompt "a dog" --seed 0 --output image.jpg
    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/epoch-0.safetensors \\
        --prompt "a dog" --output image.jpg

The base models are named like the trainer's (--model_paths / --model_id_with_origin_paths, tokenizers).
validate_lora loads the LoRA (any format) onto the DiT with `flux_core.lora.load_lora`; validate_full loads the
fine-tuned DiT with `load_model` in place of the base DiT (which is then not loaded at all).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .args import DTYPES, TrainError


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


def saved_dit_config(path: str) -> dict:
    """The DiT settings flux_core.train stores beside a full checkpoint's weights (RoPE axes), if any."""
    import json

    from ..loading.files import safetensors_metadata

    try:
        return json.loads(safetensors_metadata(path).get("fluxcore_dit_config", "{}"))
    except (ValueError, OSError):
        return {}


def run(command: str, argv: list[str]) -> Path:
    from ..image import save_image
    from ..pipeline import default_device
    from .trainer import load_pipeline

    args = build_parser(command).parse_args(argv)
    if not args.model_paths and not args.model_id_with_origin_paths:
        raise TrainError("no base models: give --model_paths and/or --model_id_with_origin_paths.")
    device = torch.device(args.device or default_device())
    if command == "validate_lora":
        pipe, _ = load_pipeline(args, device)
        from ..lora import load_lora
        report = load_lora(pipe.dit, args.lora_path, alpha=args.lora_alpha)
        print(report.loras[0].summary(), file=sys.stderr)
    else:
        from ..loading.loader import load_model
        pipe, _ = load_pipeline(args, device, skip_kinds=("dit",))
        pipe.dit = load_model(args.checkpoint, config=saved_dit_config(args.checkpoint),
                              torch_dtype=DTYPES[args.torch_dtype], device=device, kind="dit")
    image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                 embedded_guidance=args.embedded_guidance, height=args.height, width=args.width,
                 num_inference_steps=args.num_inference_steps, t5_sequence_length=args.t5_sequence_length,
                 seed=args.seed)
    path = save_image(image, Path(args.output))
    print(f"saved {path} (seed {args.seed})")
    return path
