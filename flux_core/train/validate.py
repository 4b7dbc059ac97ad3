"""Render a trained checkpoint, as DiffSynth-Studio's validate_lora / validate_full scripts do:

    python -m flux_core.train validate_lora --model_paths '[...]' --lora_path models/train/step-500.safetensors \\
        --prompt "a dog" --seed 0 --output image.jpg
    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/epoch-0.safetensors \\
        --prompt "a dog" --output image.jpg

    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/cn/epoch-0.safetensors \
        --controlnet_image depth.png --controlnet_processor_id depth --prompt "a dog" --output image.jpg

    python -m flux_core.train validate_full --model_paths '[..., "siglip-so400m-patch14-384"]' \
        --checkpoint models/train/ip/epoch-0.safetensors --ipadapter_images ref.png --prompt "a dog" --output image.jpg
    python -m flux_core.train validate_full --model_paths '[...]' --checkpoint models/train/iy/epoch-0.safetensors \
        --controlnet_image black.png --infinityou_id_embedding face.npy --prompt "a man" --output image.jpg

    python -m flux_core.train validate_lora --model_paths '[...]' --lora_path models/train/eligen/epoch-4.safetensors \
        --eligen_entity_prompts "a red hat" "a blue scarf" --eligen_entity_masks hat.png scarf.png \
        --prompt "a woman" --output image.jpg
    python -m flux_core.train validate_full --model_paths '[..., "LoRA-Encoder/model.safetensors"]' \
        --checkpoint models/train/le/epoch-0.safetensors --lora_encoder_inputs style.safetensors \
        --lora_path style.safetensors --prompt "a car" --output image.jpg

The base models are named like the trainer's (--model_paths / --model_id_with_origin_paths, tokenizers).
validate_lora loads the LoRA (any format) onto the DiT with `flux_core.lora.load_lora`; validate_full loads what the
checkpoint holds with `load_model` in place of that model of the model flags (which is then not loaded at all): the
fine-tuned DiT, a trained ControlNet, a trained IP-Adapter, or InfiniteYou's InfuseNet and/or image projector.
--controlnet_image (with --controlnet_inpaint_mask / --controlnet_processor_id / --controlnet_scale) feeds the
ControlNet, as `ControlNetInput(image=..., ...)`; --ipadapter_images (--ipadapter_scale) the IP-Adapter;
--infinityou_id_image or --infinityou_id_embedding (--infinityou_guidance) InfiniteYou; --eligen_entity_prompts with
one --eligen_entity_masks image per prompt (of the output's shape; --eligen_enable_on_negative) EliGen, as DiffSynth's
EliGen validate script passes them with the trained LoRA loaded; --lora_encoder_inputs (--lora_encoder_scale) the
LoRA-Encoder (a trained one from --checkpoint, or the one of the model flags), and validate_full's --lora_path applies
LoRA files to the DiT as well, as DiffSynth's LoRA-Encoder validate script loads the encoded LoRA into the DiT.
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
        p.add_argument("--lora_path", nargs="+", default=None,
                       help="LoRA file(s) applied to the DiT too, at strength 1 (DiffSynth's LoRA-Encoder validate "
                            "script loads the LoRA it encodes into the DiT as well)")
    p.add_argument("--controlnet_image", default=None, help="control image for the ControlNet (0) of the models")
    p.add_argument("--controlnet_inpaint_mask", default=None, help="inpainting ControlNet: the mask image")
    p.add_argument("--controlnet_processor_id", default=None, help="union ControlNet: the mode (canny, depth, ...)")
    p.add_argument("--controlnet_scale", type=float, default=1.0, help="ControlNet strength")
    p.add_argument("--ipadapter_images", nargs="+", default=None, help="reference image(s) for the IP-Adapter")
    p.add_argument("--ipadapter_scale", type=float, default=1.0, help="IP-Adapter strength")
    p.add_argument("--infinityou_id_image", default=None, help="InfiniteYou: a face photo (needs insightface)")
    p.add_argument("--infinityou_id_embedding", default=None,
                   help="InfiniteYou: the face's 512-d ArcFace embedding (.safetensors or .npy file)")
    p.add_argument("--infinityou_guidance", type=float, default=1.0, help="InfiniteYou: InfuseNet's guidance")
    p.add_argument("--eligen_entity_prompts", nargs="+", default=None, help="EliGen: one prompt per entity")
    p.add_argument("--eligen_entity_masks", nargs="+", default=None,
                   help="EliGen: one mask image per entity prompt, in the same order (white = the entity's region; "
                        "the output's shape)")
    p.add_argument("--eligen_enable_on_negative", action="store_true",
                   help="EliGen: with --cfg_scale above 1 the negative pass gets the entities too")
    p.add_argument("--lora_encoder_inputs", nargs="+", default=None,
                   help="LoRA-Encoder: LoRA file(s) encoded into tokens appended to the prompt")
    p.add_argument("--lora_encoder_scale", type=float, default=1.0, help="LoRA-Encoder: scale of those tokens")
    p.add_argument("--prompt", default="a dog")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--cfg_scale", type=float, default=1.0)
    p.add_argument("--embedded_guidance", type=float, default=3.5)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--t5_sequence_length", type=int, default=None,
                   help="T5 tokens of the prompt (default: the T5 tokenizer's model_max_length, at most 512)")
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


# Pipeline slots of the adapter kinds a full checkpoint may hold (load_model kind -> pipeline attribute).
ADAPTER_SLOTS = {"controlnet": "controlnet", "ipadapter": "ipadapter", "infiniteyou": "image_proj_model",
                 "lora_encoder": "lora_encoder"}


def adapter_kinds(path: str) -> list[str]:
    """The adapter kinds a full checkpoint holds, from its keys: ["controlnet"], ["ipadapter"], ["controlnet",
    "infiniteyou"] (InfiniteYou's training output), ...; [] for a DiT, or a file that cannot be read (load_model then
    says what it is)."""
    from ..loading.files import CheckpointError
    from ..pipeline_models import detect_components
    try:
        return [kind for _, kind, _, _ in detect_components(path) if kind in ADAPTER_SLOTS]
    except (CheckpointError, OSError, ValueError):
        return []


def _read_image(flag: str, path: str):
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise TrainError(f"--{flag} {path}: cannot be read as an image ({e}).") from None


def adapter_inputs(args: argparse.Namespace) -> dict:
    """The pipeline's IP-Adapter and InfiniteYou parameters from --ipadapter_images / --infinityou_* flags."""
    inputs = {}
    if args.ipadapter_images:
        inputs.update(ipadapter_images=[_read_image("ipadapter_images", p) for p in args.ipadapter_images],
                      ipadapter_scale=args.ipadapter_scale)
    if args.infinityou_id_image and args.infinityou_id_embedding:
        raise TrainError("--infinityou_id_image and --infinityou_id_embedding together: give one.")
    if args.infinityou_id_image:
        inputs["infinityou_id_image"] = _read_image("infinityou_id_image", args.infinityou_id_image)
    if args.infinityou_id_embedding:
        from .infiniteyou import read_face_embedding
        try:
            inputs["infinityou_id_embedding"] = read_face_embedding(Path(args.infinityou_id_embedding))
        except ValueError as e:
            raise TrainError(f"--infinityou_id_embedding: {e}.") from None
    if "infinityou_id_image" in inputs or "infinityou_id_embedding" in inputs:
        inputs["infinityou_guidance"] = args.infinityou_guidance
    if args.eligen_entity_prompts is not None or args.eligen_entity_masks is not None:
        inputs.update(eligen_entity_prompts=args.eligen_entity_prompts,
                      eligen_entity_masks=None if args.eligen_entity_masks is None else
                      [_read_image("eligen_entity_masks", p) for p in args.eligen_entity_masks],
                      eligen_enable_on_negative=args.eligen_enable_on_negative)
    if args.lora_encoder_inputs:
        inputs.update(lora_encoder_inputs=list(args.lora_encoder_inputs), lora_encoder_scale=args.lora_encoder_scale)
    return inputs


def controlnet_inputs(args: argparse.Namespace) -> list:
    if not args.controlnet_image:
        if args.controlnet_inpaint_mask or args.controlnet_processor_id:
            raise TrainError("--controlnet_inpaint_mask / --controlnet_processor_id go with --controlnet_image.")
        return []
    from ..controlnet import ControlNetInput

    mask = args.controlnet_inpaint_mask
    return [ControlNetInput(image=_read_image("controlnet_image", args.controlnet_image), scale=args.controlnet_scale,
                            inpaint_mask=_read_image("controlnet_inpaint_mask", mask) if mask else None,
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
    adapters = adapter_inputs(args)
    if command == "validate_lora":
        pipe, _ = load_pipeline(args, device)
        from ..lora import load_lora
        report = load_lora(pipe.dit, args.lora_path, alpha=args.lora_alpha)
        print(report.loras[0].summary(), file=sys.stderr)
    elif adapter_kinds(args.checkpoint):
        from ..loading.loader import load_model
        kinds = adapter_kinds(args.checkpoint)
        pipe, _ = load_pipeline(args, device, skip_kinds=tuple(ADAPTER_SLOTS[k] for k in kinds))
        for kind in kinds:
            model = load_model(args.checkpoint, config=saved_controlnet_config(args.checkpoint) if kind == "controlnet"
                               else None, torch_dtype=DTYPES[args.torch_dtype], device=device, kind=kind)
            if kind == "controlnet":
                pipe.controlnet.models.append(model)
            else:
                setattr(pipe, ADAPTER_SLOTS[kind], model)
        if "controlnet" in kinds and not control:
            raise TrainError(f"--checkpoint {args.checkpoint} is a ControlNet: give --controlnet_image (and "
                             f"--controlnet_processor_id / --controlnet_inpaint_mask where it needs them).")
        if "ipadapter" in kinds and not args.ipadapter_images:
            raise TrainError(f"--checkpoint {args.checkpoint} is an IP-Adapter: give --ipadapter_images.")
        if "infiniteyou" in kinds and not (args.infinityou_id_image or args.infinityou_id_embedding):
            raise TrainError(f"--checkpoint {args.checkpoint} holds InfiniteYou's image projector: give "
                             f"--infinityou_id_embedding (or --infinityou_id_image) and --controlnet_image.")
        if "lora_encoder" in kinds and not args.lora_encoder_inputs:
            raise TrainError(f"--checkpoint {args.checkpoint} is a LoRA-Encoder: give --lora_encoder_inputs (the LoRA "
                             f"file(s) it encodes; --lora_path applies them to the DiT too).")
    else:
        from ..loading.loader import load_model
        pipe, _ = load_pipeline(args, device, skip_kinds=("dit",))
        pipe.dit = load_model(args.checkpoint, config=saved_dit_config(args.checkpoint),
                              torch_dtype=DTYPES[args.torch_dtype], device=device, kind="dit")
    if command == "validate_full" and args.lora_path:
        from ..lora import load_lora
        report = load_lora(pipe.dit, list(args.lora_path))
        for lora in report.loras:
            print(lora.summary(), file=sys.stderr)
    try:
        image = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
                     embedded_guidance=args.embedded_guidance, height=args.height, width=args.width,
                     num_inference_steps=args.num_inference_steps, t5_sequence_length=args.t5_sequence_length,
                     seed=args.seed, controlnet_inputs=control or None, **adapters)
    except (ValueError, RuntimeError) as e:
        message = str(e)
        if control and "controlnet_inputs[0]" in message:
            raise TrainError(message.replace("controlnet_inputs[0]: ", "--controlnet_image: ")) from None
        if adapters and any(name in message for name in ("ipadapter", "infinityou", "InfiniteYou", "eligen",
                                                          "lora_encoder")):
            # the pipeline's parameter names are the flags' names; its model_configs are the model flags
            message = message.replace("model_configs", "--model_paths / --model_id_with_origin_paths")
            for name in ("eligen_entity_prompts", "eligen_entity_masks", "lora_encoder_inputs"):
                message = message.replace(name, "--" + name)
            raise TrainError(message) from None
        raise
    path = save_image(image, Path(args.output))
    print(f"saved {path} (seed {args.seed})")
    return path
