"""Command line: `python -m flux_core generate --prompt "a cat" --output cat.png`.

By default the models are FLUX.1-dev's, fetched through ModelScope into ./models exactly as the
DiffSynth-Studio example does (local files are used when already there). `--model-id` picks Krea-dev or
Kontext-dev; `--model-dir` runs from a local folder; `--dit/--vae/--clip/--t5/--tokenizer/--tokenizer-2`
name single files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .dtypes import DTYPES
from .image import save_image
from .model_config import FLUX_DEV, ModelConfig

DIT_FILES = {
    "black-forest-labs/FLUX.1-dev": "flux1-dev.safetensors",
    "black-forest-labs/FLUX.1-Krea-dev": "flux1-krea-dev.safetensors",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux1-kontext-dev.safetensors",
}


def model_configs_for(args) -> tuple[list[ModelConfig], ModelConfig | None, ModelConfig | None]:
    """(model configs, tokenizer_1 config, tokenizer_2 config) from the command-line options."""
    # Only what was given: otherwise ModelConfig's own defaults apply (DIFFSYNTH_MODEL_BASE_PATH, DIFFSYNTH_SKIP_DOWNLOAD).
    base = {k: v for k, v in dict(local_model_path=args.local_model_path,
                                  skip_download=True if args.skip_download else None).items() if v is not None}
    tok1 = ModelConfig(path=args.tokenizer) if args.tokenizer else None
    tok2 = ModelConfig(path=args.tokenizer_2) if args.tokenizer_2 else None
    if args.model_dir:
        root = Path(args.model_dir)
        if (root / "model_index.json").is_file():
            return [ModelConfig(path=str(root))], tok1, tok2
        return [ModelConfig(path=str(p)) for p in _model_dir_files(root)], tok1, tok2
    dit_file = DIT_FILES.get(args.model_id)
    if dit_file is None and not args.dit:
        raise SystemExit(f"--model-id {args.model_id}: unknown; use one of {', '.join(DIT_FILES)} or give --dit FILE.")
    configs = [
        ModelConfig(path=args.dit) if args.dit else ModelConfig(model_id=args.model_id, origin_file_pattern=dit_file, **base),
        ModelConfig(path=args.clip) if args.clip else ModelConfig(model_id=FLUX_DEV, origin_file_pattern="text_encoder/model.safetensors", **base),
        ModelConfig(path=args.t5) if args.t5 else ModelConfig(model_id=FLUX_DEV, origin_file_pattern="text_encoder_2/", **base),
        ModelConfig(path=args.vae) if args.vae else ModelConfig(model_id=FLUX_DEV, origin_file_pattern="ae.safetensors", **base),
    ]
    tok1 = tok1 or ModelConfig(model_id=FLUX_DEV, origin_file_pattern="tokenizer/", **base)
    tok2 = tok2 or ModelConfig(model_id=FLUX_DEV, origin_file_pattern="tokenizer_2/", **base)
    return configs, tok1, tok2


def _model_dir_files(root: Path) -> list[Path]:
    """A local copy of a ModelScope FLUX repo: top-level DiT + ae files and the text encoder folders."""
    if not root.is_dir():
        raise SystemExit(f"--model-dir {root}: no such folder.")
    files = [p for p in sorted(root.glob("*.safetensors"))]
    files += [root / d for d in ("text_encoder", "text_encoder_2", "transformer", "vae") if (root / d).is_dir()]
    if not files:
        raise SystemExit(f"--model-dir {root}: holds no .safetensors files or model folders.")
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flux_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--output", default="image.png", help="PNG/JPEG path (written atomically)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="true CFG when above 1 (uses the negative prompt)")
    g.add_argument("--embedded-guidance", type=float, default=3.5)
    g.add_argument("--t5-sequence-length", type=int, default=512)
    g.add_argument("--input-image", help="image-to-image start image")
    g.add_argument("--denoising-strength", type=float, default=1.0)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--rand-device", default="cpu")
    g.add_argument("--sigma-shift", type=float, default=None)
    g.add_argument("--num-inference-steps", "--steps", type=int, default=30)
    g.add_argument("--sigmas", type=_float_list, default=None,
                   help="explicit schedule, comma-separated decreasing values in (0, 1], e.g. 1,0.75,0.5,0.25")
    g.add_argument("--kontext-image", action="append", default=None, help="Kontext reference (repeatable)")
    g.add_argument("--tiled", action="store_true", help="tiled VAE encode/decode")
    g.add_argument("--tile-size", type=int, default=128)
    g.add_argument("--tile-stride", type=int, default=64)
    g.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    src = g.add_argument_group("models")
    src.add_argument("--model-id", default=FLUX_DEV, help="ModelScope id: FLUX.1-dev, FLUX.1-Krea-dev, FLUX.1-Kontext-dev")
    src.add_argument("--model-dir", help="local folder (diffusers FLUX folder or a copy of the ModelScope repo)")
    src.add_argument("--local-model-path", default=None,
                     help="where models are looked for and ModelScope downloads go (default ./models, or "
                          "$DIFFSYNTH_MODEL_BASE_PATH)")
    src.add_argument("--skip-download", action="store_true",
                     help="never download; local files only (also $DIFFSYNTH_SKIP_DOWNLOAD=true)")
    for name in ("dit", "vae", "clip", "t5"):
        src.add_argument(f"--{name}", help=f"{name} weights file or folder")
    src.add_argument("--tokenizer", help="CLIP tokenizer folder")
    src.add_argument("--tokenizer-2", help="T5 tokenizer folder")
    return parser


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def generate(args) -> tuple[Path, int]:
    """Run the pipeline with the command-line options; returns (image path, seed used)."""
    from PIL import Image

    from .pipeline import FluxImagePipeline

    # Everything that can be checked cheaply is checked before the models load (minutes for real FLUX).
    output = Path(args.output)
    if output.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--output {output}: unknown image extension {output.suffix!r}; use .png, .jpg or .webp.")
    open_rgb = lambda p: Image.open(p).convert("RGB")  # noqa: E731
    input_image = open_rgb(args.input_image) if args.input_image else None
    kontext_images = [open_rgb(p) for p in args.kontext_image] if args.kontext_image else None

    configs, tok1, tok2 = model_configs_for(args)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=DTYPES[args.dtype], device=args.device,
                                             model_configs=configs, tokenizer_1_config=tok1, tokenizer_2_config=tok2)
    image = pipe(
        prompt=args.prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
        embedded_guidance=args.embedded_guidance, t5_sequence_length=args.t5_sequence_length,
        input_image=input_image,
        denoising_strength=args.denoising_strength, height=args.height, width=args.width, seed=args.seed,
        rand_device=args.rand_device, sigma_shift=args.sigma_shift, num_inference_steps=args.num_inference_steps,
        kontext_images=kontext_images, sigmas=args.sigmas,
        tiled=args.tiled, tile_size=args.tile_size, tile_stride=args.tile_stride,
    )
    return save_image(image, output), pipe.last_seed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        try:
            out, seed = generate(args)
        except (ValueError, TypeError, OSError, RuntimeError) as e:  # user errors: the message says the fix
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"saved {out} (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
