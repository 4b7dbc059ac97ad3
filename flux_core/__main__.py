"""Command line.

    python -m flux_core generate --demo --prompt "a red circle on a blue background" --output demo.png  # offline
    python -m flux_core download --model-id black-forest-labs/FLUX.1-dev    # fetch the files once (ModelScope)
    python -m flux_core generate --prompt "a cat" --output cat.png
    accelerate launch -m flux_core generate --prompts-file prompts.txt --output images  # a line, an image; all GPUs

`--demo` runs the bundled demo model (flux_core.demo: tiny, trained on coloured shapes, shipped in the package):
no download, its trained size (128x128) and float32 unless --height/--width/--dtype say otherwise.

By default the models are FLUX.1-dev's, fetched through ModelScope into ./models exactly as the
DiffSynth-Studio example does (local files are used when already there). `--model-id` picks Krea-dev or
Kontext-dev; `--model-dir` runs from a local folder; `--dit/--vae/--clip/--t5/--tokenizer/--tokenizer-2`
name single files (tokenizer/ and tokenizer_2/ are found beside them).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import demo
from .demo import DEMO_COMMAND
from .download import DIT_FILES, NeededFile, download_models, layout_tree, needed_files
from .dtypes import DTYPES, WEIGHT_DTYPES
from .image import save_image, saving_format
from .inputs import DEFAULT_SIZE, SEED_MAX
from .messages import rename_parameters
from .model_config import FLUX_DEV, ModelConfig

# The separate-file flags, named after the kind of model each file must hold, in the pipeline's load order.
MODEL_KINDS = ("dit", "clip", "t5", "vae")
# The options that pick the model's files (argparse names): --demo brings its own, so they cannot go with it.
MODEL_SOURCE_OPTIONS = ("model_id", "model_dir", "local_model_path", *MODEL_KINDS, "tokenizer", "tokenizer_2")
DEFAULT_DTYPE, DEMO_DTYPE = "bfloat16", "float32"
DEFAULT_OUTPUT, DEFAULT_OUTPUT_FOLDER = "image.png", "images"
# --prompts-file: image k's file name, zero-padded to at least this many digits (sorted order = prompt order).
NAME_DIGITS = 5


class UsageError(ValueError):
    """A bad command line, found before any model loads; the message names every bad flag."""


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flux_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image (or one per line of --prompts-file)")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="UTF-8 text, one prompt per line (blank lines skipped, each line stripped of surrounding "
                           "spaces): image k (0-based, counting prompts) is OUTPUT/NNNNN.png with seed --seed + k "
                           "(--seed left out: 0); images already there are skipped (rerun to resume); under "
                           "`accelerate launch` each process generates its share (process r: prompts r, r+P, ...)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--output", default=None,
                   help="image path, in the format its extension names (.png, .jpg, .webp, ...: any PIL can write); "
                        f"written atomically (default {DEFAULT_OUTPUT}); with --prompts-file a folder (default "
                        f"{DEFAULT_OUTPUT_FOLDER}/)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="true CFG when above 1 (uses the negative prompt)")
    g.add_argument("--embedded-guidance", type=float, default=3.5)
    g.add_argument("--t5-sequence-length", type=int, default=None,
                   help="T5 tokens per prompt (default: the T5 tokenizer's model_max_length, at most 512: FLUX.1-dev "
                        "512, --demo 32)")
    g.add_argument("--input-image", help="image-to-image start image")
    g.add_argument("--denoising-strength", type=float, default=1.0)
    g.add_argument("--height", type=int, default=None, help=f"default 1024 (--demo: {demo.HEIGHT}, its trained size)")
    g.add_argument("--width", type=int, default=None, help=f"default 1024 (--demo: {demo.WIDTH}, its trained size)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--rand-device", default="cpu")
    g.add_argument("--sigma-shift", type=float, default=None)
    g.add_argument("--num-inference-steps", "--steps", type=int, default=30)
    g.add_argument("--sigmas", type=_float_list, default=None,
                   help="explicit schedule, comma-separated decreasing values in (0, 1], e.g. 1,0.75,0.5,0.25")
    g.add_argument("--kontext-image", action="append", default=None, help="Kontext reference (repeatable)")
    g.add_argument("--tiled", action="store_true", help="tiled VAE encode/decode and tiled DiT (as DiffSynth-Studio: large images within memory)")
    g.add_argument("--tile-size", type=int, default=128)
    g.add_argument("--tile-stride", type=int, default=64)
    g.add_argument("--tea-cache-l1-thresh", type=float, default=None, metavar="FLOAT",
                   help="TeaCache: skip the DiT on steps whose input barely changed (0.25, 0.4, 0.6, 0.8: "
                        "faster, less exact); off by default")
    g.add_argument("--lora", action="append", type=parse_lora, default=[], metavar="PATH[:SCALE]",
                   help="LoRA file applied to the DiT at SCALE (default 1.0); repeatable, the LoRAs add up")
    g.add_argument("--device", default=None, help="cuda, cuda:N, cpu or mps (default: cuda if available); checked "
                                                   "before loading")
    g.add_argument("--quiet", action="store_true", help="do not print what each model file was detected as and "
                                                       "the memory/compute estimates (warnings are still shown)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help=f"compute dtype (default {DEFAULT_DTYPE}; --demo: {DEMO_DTYPE})")
    memory = g.add_argument_group("memory")
    storage = memory.add_mutually_exclusive_group()
    storage.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="default",
                         help="how the DiT's weight matrices are stored: fp8_* halves their memory and computes "
                              "in --dtype (default: stored in --dtype)")
    storage.add_argument("--fp8", dest="weight_dtype", action="store_const", const="fp8_e4m3fn",
                         help="same as --weight-dtype fp8_e4m3fn")
    memory.add_argument("--vram-limit", type=float, default=None, metavar="GB",
                        help="offload: keep at most GB (GiB, minus 0.5 of headroom) of weights on the device and "
                             "stream the rest layer by layer; 0 streams everything")
    speed = g.add_argument_group("speed")
    speed.add_argument("--fp8-compute", action="store_true",
                       help="the DiT's blocks compute in FP8 (torch._scaled_mm on GPUs of compute capability 8.9+: "
                            "Ada, Hopper, Blackwell; elsewhere stored in FP8, computed in --dtype); lossy; "
                            "supersedes an fp8 --weight-dtype for the DiT")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the DiT's blocks (the first image waits for the compilation); not with "
                            "--vram-limit, nor with --weight-dtype fp8_* unless --fp8-compute (which fits in less "
                            "memory and compiles)")
    src = g.add_argument_group("models")
    src.add_argument("--demo", action="store_true",
                     help="the bundled demo model (tiny, trained on coloured shapes; no download, runs in seconds on "
                          "a CPU); not with the other model flags")
    src.add_argument("--model-id", default=None, help=f"ModelScope id: {', '.join(DIT_FILES)} (default {FLUX_DEV})")
    src.add_argument("--model-dir", help="local folder: a diffusers FLUX folder, or the layout `download` makes")
    _add_modelscope_options(src)
    for kind in MODEL_KINDS:
        src.add_argument(f"--{kind}", metavar="PATH", help=f"{kind} weights file or folder (must hold a {kind})")
    src.add_argument("--tokenizer", metavar="FOLDER", help="CLIP-L tokenizer folder (default: tokenizer/ beside "
                                                           "the model files, else FLUX.1-dev's)")
    src.add_argument("--tokenizer-2", metavar="FOLDER", help="T5 tokenizer folder (default: tokenizer_2/ beside "
                                                             "the model files, else FLUX.1-dev's)")

    d = sub.add_parser("download", help="fetch the files a model needs from ModelScope (resumable)")
    d.add_argument("--model-id", default=FLUX_DEV, choices=list(DIT_FILES))
    _add_modelscope_options(d, download=True)
    return parser


def _add_modelscope_options(group, download: bool = False) -> None:
    group.add_argument("--local-model-path", default=None, metavar="FOLDER",
                       help="where models are looked for and ModelScope downloads go (default ./models, or "
                            "$DIFFSYNTH_MODEL_BASE_PATH)")
    if not download:
        group.add_argument("--skip-download", action="store_true",
                           help="never download; local files only (also $DIFFSYNTH_SKIP_DOWNLOAD=true)")


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_lora(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale). The scale is split off at the last ':' only when what follows is a
    number, so a Windows path (`C:\\loras\\x.safetensors`, `C:\\loras\\x.safetensors:0.8`) keeps its drive."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


# ------------------------------------------------------------------------------------------------ models

def model_configs_for(args) -> tuple[list[ModelConfig], ModelConfig, ModelConfig]:
    """(model configs in MODEL_KINDS order, tokenizer_1 config, tokenizer_2 config) from the command line.

    Each model comes from its flag (--dit ...), else from --model-dir, else from ModelScope (the files
    `flux_core.download.needed_files` names, as `download` fetches them). Every config states the kind its file
    must hold; the DiT's carries the --weight-dtype storage."""
    base = _modelscope_options(args)
    local = {kind: Path(getattr(args, kind)) for kind in MODEL_KINDS if getattr(args, kind)}
    if args.model_dir:
        local = {**_model_dir_components(Path(args.model_dir), look_for_dit="dit" not in local), **local}
        absent = [k for k in MODEL_KINDS if k not in local]
        if absent:
            raise UsageError(f"--model-dir {args.model_dir}: has no {', '.join(absent)}; add the files to it or pass "
                             f"{' '.join(f'--{k} PATH' for k in absent)}.")
    model_id = args.model_id or FLUX_DEV
    if "dit" not in local and model_id not in DIT_FILES:
        raise UsageError(f"--model-id {model_id}: unknown; use one of {', '.join(DIT_FILES)} or give --dit FILE.")
    needed = {f.slot: f for f in needed_files(FLUX_DEV if "dit" in local else model_id)}
    # --fp8-compute supersedes an fp8 --weight-dtype (as the Speed Options node does): the blocks become FP8 codes
    # with row scales, quantized from the loaded weights; scale-1 codes first would add FP8 storage's error on top.
    storage = None if args.fp8_compute else WEIGHT_DTYPES[args.weight_dtype]
    configs = []
    for kind in MODEL_KINDS:
        extra = {"offload_dtype": storage} if kind == "dit" and storage is not None else {}
        if kind in local:
            configs.append(ModelConfig(path=str(local[kind]), kind=kind, **extra))
        else:
            configs.append(ModelConfig(model_id=needed[kind].model_id, origin_file_pattern=needed[kind].pattern,
                                       kind=kind, **base, **extra))
    beside = list(local.values()) + ([Path(args.model_dir)] if args.model_dir else [])
    tok1 = _tokenizer_config(args.tokenizer, beside, needed["tokenizer_1"], base, "--tokenizer")
    tok2 = _tokenizer_config(args.tokenizer_2, beside, needed["tokenizer_2"], base, "--tokenizer-2")
    return configs, tok1, tok2


def _modelscope_options(args) -> dict:
    # Only what was given: otherwise ModelConfig's own defaults apply (DIFFSYNTH_MODEL_BASE_PATH, DIFFSYNTH_SKIP_DOWNLOAD).
    given = dict(local_model_path=args.local_model_path, skip_download=True if args.skip_download else None)
    return {k: v for k, v in given.items() if v is not None}


def _model_dir_components(root: Path, look_for_dit: bool = True) -> dict[str, Path]:
    """The model files of a local folder, by kind: a diffusers FLUX folder's component folders, or the layout
    `download` makes (one DiT .safetensors at the top, ae.safetensors, text_encoder/, text_encoder_2/).
    `look_for_dit=False` (--dit given): the folder's DiT files are not looked at."""
    from .pipeline import DIFFUSERS_COMPONENTS  # transformer/, vae/, text_encoder/, text_encoder_2/ by kind

    if not root.is_dir():
        raise UsageError(f"--model-dir {root}: no such folder.")
    found = {kind: root / folder for kind, folder in DIFFUSERS_COMPONENTS.items() if (root / folder).is_dir()}
    if (root / "model_index.json").is_file():
        return found
    if (root / "ae.safetensors").is_file():
        found["vae"] = root / "ae.safetensors"
    dits = [found.pop("dit")] if "dit" in found else []
    dits += [p for suffix in ("*.safetensors", "*.gguf") for p in sorted(root.glob(suffix)) if p.name != "ae.safetensors"]
    if not look_for_dit:
        return found
    if len(dits) > 1:
        raise UsageError(f"--model-dir {root}: holds several DiTs ({', '.join(p.name for p in dits)}); "
                         f"pick one with --dit PATH.")
    if dits:
        found["dit"] = dits[0]
    return found


def _tokenizer_config(flag_value: str | None, beside: list[Path], need: NeededFile, base: dict,
                      flag: str) -> ModelConfig:
    """The tokenizer folder: the flag's, else `tokenizer/` (`tokenizer_2/`) beside a given model file or folder,
    where FluxImagePipeline.from_pretrained looks (`pipeline_models.search_roots`: the file's folder, its parent
    and grandparent), else FLUX.1-dev's from ModelScope."""
    from . import pipeline_models

    if flag_value:
        return ModelConfig(path=flag_value)
    sub = need.pattern.rstrip("/")
    searched = []
    for path in beside:
        for root in pipeline_models.search_roots(str(path)):
            if root / sub not in searched:
                searched.append(root / sub)
    for candidate in searched:
        if candidate.is_dir():
            return ModelConfig(path=str(candidate))
    config = ModelConfig(model_id=need.model_id, origin_file_pattern=need.pattern, **base)
    if searched:
        print(f"no {sub}/ beside the model files (searched {', '.join(map(str, searched))}); using {need.model_id}'s "
              f"{sub}/ under {config.local_model_path} (or pass {flag} FOLDER).", file=sys.stderr)
    return config


# ------------------------------------------------------------------------------------------------ generate

def check_generate_args(args) -> dict:
    """Everything checkable before the models load (minutes for real FLUX), every problem at once.
    Returns the opened images: {"input_image": ..., "kontext_images": ...}."""
    from PIL import Image

    problems, images = [], {}
    problems += _demo_problems(args)
    if args.prompts_file is None:
        problems += _output_problems(output_path(args))
    else:
        prompts, file_problems = read_prompts(args.prompts_file)
        problems += file_problems + _output_folder_problems(output_path(args))
        # (a --seed outside 0..2**64-1 itself is _pipeline_input_problems' to report)
        if args.seed is not None and 0 <= args.seed <= SEED_MAX < args.seed + len(prompts) - 1:
            problems.append(f"--seed {args.seed}: image {len(prompts) - 1} of --prompts-file would get seed "
                            f"{args.seed + len(prompts) - 1}, above 2**64-1; use a seed at most "
                            f"{SEED_MAX - len(prompts) + 1}.")
    for flag, paths, key in (("--input-image", [args.input_image] if args.input_image else [], "input_image"),
                             ("--kontext-image", args.kontext_image or [], "kontext_images")):
        opened = []
        for p in paths:
            try:
                opened.append(Image.open(p).convert("RGB"))
            except (OSError, ValueError) as e:
                problems.append(f"{flag} {p}: cannot be read as an image ({e}).")
        images[key] = opened
    named = [(f"--{k.replace('_', '-')}", getattr(args, k))
             for k in (*MODEL_KINDS, "tokenizer", "tokenizer_2", "model_dir")]
    named += [("--lora", path) for path, _ in args.lora]
    problems += [f"{flag} {p}: does not exist." for flag, p in named if p and not Path(p).exists()]
    problems += [f"--lora {path}:{scale}: the scale is not a finite number." for path, scale in args.lora
                 if not math.isfinite(scale)]
    problems += _pipeline_input_problems(args)
    if args.vram_limit is not None and not args.vram_limit >= 0:
        problems.append(f"--vram-limit {args.vram_limit}: use 0 (stream everything) or more GB.")
    problems += _compile_problems(args)
    if problems:
        raise UsageError("\n  ".join(["the command line has problems:", *problems]))
    return {"input_image": images["input_image"][0] if images["input_image"] else None,
            "kontext_images": images["kontext_images"] or None}


def _demo_problems(args) -> list[str]:
    """--demo: no flag that picks other model files beside it, and the demo files present in this installation."""
    if not args.demo:
        return []
    given = [f"--{name.replace('_', '-')}" for name in MODEL_SOURCE_OPTIONS if getattr(args, name) is not None]
    problems = []
    if given:
        problems.append(f"--demo runs the bundled demo model, so it cannot be combined with {', '.join(given)} "
                        f"(which pick other model files); leave {'that flag' if len(given) == 1 else 'those flags'} "
                        f"out, or leave out --demo to run that model.")
    missing = demo.missing_files()
    if missing:
        problems.append(demo.missing_files_message(missing))
    return problems


def output_path(args) -> Path:
    """--output, else image.png (one prompt) or the folder images/ (--prompts-file)."""
    if args.output is not None:
        return Path(args.output)
    return Path(DEFAULT_OUTPUT_FOLDER if args.prompts_file is not None else DEFAULT_OUTPUT)


def read_prompts(path: str) -> tuple[list[str], list[str]]:
    """(prompts, problems) of a --prompts-file: UTF-8 (a BOM is dropped), one prompt per line, each stripped of
    surrounding whitespace (editors add trailing spaces unseen; a prompt's meaning never hangs on them), blank
    lines skipped, so image k is the k-th non-blank line."""
    flag = f"--prompts-file {path}"
    file = Path(path)
    if not file.exists():
        return [], [f"{flag}: does not exist; give a text file with one prompt per line."]
    if not file.is_file():
        return [], [f"{flag}: is not a file; give a text file with one prompt per line."]
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [f"{flag}: is not UTF-8 text ({e}); save it as UTF-8."]
    except OSError as e:
        return [], [f"{flag}: cannot be read ({e.strerror or e})."]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        return [], [f"{flag}: holds no prompt (every line is blank); write one prompt per line."]
    return prompts, []


def image_name(index: int, count: int) -> str:
    """Image `index`'s file name among `count` prompts: zero-padded to NAME_DIGITS digits, or as many as the
    largest index needs, so the names sort in prompt order."""
    return f"{index:0{max(NAME_DIGITS, len(str(count - 1)))}d}.png"


def image_size(args) -> tuple[int, int]:
    """(height, width): the flags', else the demo's trained size with --demo, else FLUX.1's 1024x1024."""
    default = (demo.HEIGHT, demo.WIDTH) if args.demo else DEFAULT_SIZE
    return (default[0] if args.height is None else args.height, default[1] if args.width is None else args.width)


def compute_dtype(args) -> str:
    """--dtype, else float32 with --demo (tiny models: fast on a CPU, which bfloat16 is not) or bfloat16."""
    return args.dtype or (DEMO_DTYPE if args.demo else DEFAULT_DTYPE)


def _output_problems(output: Path) -> list[str]:
    """--output: an extension PIL can write an RGB image in (tried on a tiny image: PIL reads .psd/.xpm/... but
    cannot write them, and some writers are stubs or take other modes), and a folder that exists or can be
    created, and can be written to. Folders made for the test are removed again (saving makes them)."""
    from PIL import Image

    image_format = saving_format(output)
    if image_format is None:
        what = repr(output.suffix) if output.suffix else "a name without an extension"
        return [f"--output {output}: PIL cannot write {what} files; use .png, .jpg or .webp."]
    try:
        Image.new("RGB", (16, 16)).save(io.BytesIO(), format=image_format)
    except (OSError, ValueError, KeyError) as e:
        return [f"--output {output}: PIL cannot write the image as {image_format} ({e}); use .png, .jpg or .webp."]
    if output.is_dir():
        return [f"--output {output}: is a folder; give a file name such as {output / 'image.png'}."]
    folder = output.absolute().parent
    why = _unwritable(folder, keep_made=False)
    return [f"--output {output}: cannot write into {folder} ({why}); pick a folder you can write to."] if why else []


def _unwritable(folder: Path, keep_made: bool) -> str | None:
    """Why `folder` cannot be written into, as the OS says it (None: it can), trying for real: made if missing, a
    temporary file created in it. Folders made for the try are removed again unless `keep_made` (several processes
    checking one folder: one removing it while another tries would fail the other)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return str(e.strerror or e)
    finally:
        for made in ([] if keep_made else created):   # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
    return None


def _output_folder_problems(folder: Path) -> list[str]:
    """--output with --prompts-file: a folder that exists or can be created, and can be written to. Under several
    processes (`accelerate launch`: WORLD_SIZE) each checks it, so a folder made for the check is kept."""
    if folder.exists() and not folder.is_dir():
        return [f"--output {folder}: is a file, and with --prompts-file --output names the folder the images go "
                f"into; give a folder (default {DEFAULT_OUTPUT_FOLDER}/)."]
    why = _unwritable(folder.absolute(), keep_made=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return [f"--output {folder}: cannot write into it ({why}); pick a folder you can write to."] if why else []


def _pipeline_input_problems(args) -> list[str]:
    """The pipeline's own input checks (flux_core.inputs), run on the command line's values before loading."""
    from . import inputs, scheduler

    checks = [
        lambda: inputs.check_device("device", args.device),
        lambda: None if args.sigmas is None else scheduler.explicit_sigmas(args.sigmas),
        lambda: inputs.check_size(*image_size(args)), lambda: inputs.check_cfg_scale(args.cfg_scale),
        lambda: inputs.check_seed(args.seed), lambda: inputs.check_t5_sequence_length(args.t5_sequence_length),
        lambda: inputs.check_steps(args.num_inference_steps),
        lambda: inputs.check_denoising_strength(args.denoising_strength),
        lambda: inputs.check_embedded_guidance(args.embedded_guidance),
        lambda: inputs.check_sigma_shift(args.sigma_shift),
        lambda: inputs.check_tiling(args.tiled, args.tile_size, args.tile_stride),
        lambda: inputs.check_dit_tiling(args.tiled, args.tile_size, args.tea_cache_l1_thresh),
        lambda: inputs.check_rand_device(args.rand_device),
        lambda: inputs.check_tea_cache_threshold(args.tea_cache_l1_thresh),
    ]
    problems = []
    for check in checks:
        try:
            check()
        except (TypeError, ValueError) as e:
            problems.append(str(e))
    if args.denoising_strength < 1.0 and not args.input_image:
        problems.append("--denoising-strength below 1 needs --input-image to start from.")
    return problems


def _compile_problems(args) -> list[str]:
    """--compile with flags that put the DiT under the VRAM manager, whose per-call weight swaps cannot be compiled."""
    if not args.compile:
        return []
    clashing = ([f"--vram-limit {args.vram_limit:g}"] if args.vram_limit is not None else []) + \
        ([f"--weight-dtype {args.weight_dtype}"] if args.weight_dtype != "default" and not args.fp8_compute else [])
    return [f"--compile with {' and '.join(clashing)}: those stream or cast the DiT's weights at every call, which a "
            f"compiled forward cannot do; drop one (--fp8-compute stores the DiT in FP8 and compiles)."] if clashing else []


def build_pipeline(args, device: str | None = None):
    """The pipeline the command line describes: models loaded, LoRAs applied, VRAM management on if asked.
    `device`: where it runs when not --device (generate_prompts_file: this process's device)."""
    from .pipeline import FluxImagePipeline

    dtype = DTYPES[compute_dtype(args)]
    device = device or args.device
    if args.demo:
        pipe = FluxImagePipeline.from_demo(torch_dtype=dtype, device=device, fp8_compute=args.fp8_compute)
    else:
        configs, tok1, tok2 = model_configs_for(args)
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=device, model_configs=configs,
                                                 tokenizer_1_config=tok1, tokenizer_2_config=tok2,
                                                 fp8_compute=args.fp8_compute)
    for path, scale in args.lora:
        report = pipe.load_lora(pipe.dit, path, alpha=scale)
        print(f"LoRA {path} at scale {scale}: {len(report.layers)} DiT layers ({report.mode})")
    if args.vram_limit is not None:
        print(pipe.enable_vram_management(vram_limit=args.vram_limit).summary())
    if args.compile:
        pipe.compile_pipeline()
    return pipe


def generate(args) -> tuple[Path, int]:
    """Run the pipeline with the command-line options (one --prompt); returns (image path, seed used)."""
    images = check_generate_args(args)
    pipe = build_pipeline(args)
    image = _run(pipe, args, images, args.prompt, args.seed)
    return save_image(image, output_path(args)), pipe.last_seed


def _run(pipe, args, images: dict, prompt: str, seed: int | None):
    """One image of `prompt` at `seed`, every other pipeline argument from the command line."""
    height, width = image_size(args)
    image = pipe(
        prompt=prompt, negative_prompt=args.negative_prompt, cfg_scale=args.cfg_scale,
        embedded_guidance=args.embedded_guidance, t5_sequence_length=args.t5_sequence_length,
        input_image=images["input_image"],
        denoising_strength=args.denoising_strength, height=height, width=width, seed=seed,
        rand_device=args.rand_device, sigma_shift=args.sigma_shift, num_inference_steps=args.num_inference_steps,
        kontext_images=images["kontext_images"], sigmas=args.sigmas,
        tiled=args.tiled, tile_size=args.tile_size, tile_stride=args.tile_stride,
        tea_cache_l1_thresh=args.tea_cache_l1_thresh,
    )
    for stats in (pipe.last_tea_cache_stats or {}).values():
        print(stats)
    return image


@dataclass
class PromptsRun:
    """What one process of `generate --prompts-file` did: its share of the prompts' indices (process r of P
    takes r, r+P, r+2P, ...: fixed by the prompt count and P alone, so the processes never disagree, and a
    rerun with another P still finds every image by its name), which of them it wrote and which were there."""
    folder: Path
    count: int                 # prompts in the file
    process: int
    num_processes: int
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def generate_prompts_file(args) -> PromptsRun:
    """One image per prompt of --prompts-file into the --output folder, this process's share of them (every
    process loads the pipeline once). Image k is `image_name(k)`, seed `--seed + k` (--seed left out: 0, so the
    images do not depend on the process count and a rerun resumes the same run), written atomically; an image
    already there is skipped. Under `accelerate launch` the processes wait for each other at the end (the only
    collective), then the main process prints the summary."""
    images = check_generate_args(args)
    prompts, _ = read_prompts(args.prompts_file)
    folder = output_path(args)
    from .train.distributed import process_state

    state = process_state()
    run = PromptsRun(folder, len(prompts), state.process_index, state.num_processes)
    mine = range(run.process, run.count, run.num_processes)
    todo = [k for k in mine if not (folder / image_name(k, run.count)).exists()]
    run.skipped = [k for k in mine if k not in todo]
    if todo:
        pipe = build_pipeline(args, device=_process_device(args, state))
        base = 0 if args.seed is None else args.seed
        for k in todo:
            path = save_image(_run(pipe, args, images, prompts[k], base + k), folder / image_name(k, run.count))
            run.written.append(k)
            _say(f"saved {path} (seed {base + k}; process {run.process} of {run.num_processes})")
    _say(f"process {run.process} of {run.num_processes}: wrote {len(run.written)}, skipped {len(run.skipped)} "
         f"already there")
    state.wait_for_everyone()
    return run


def _say(line: str) -> None:
    """A line on stdout in one write: the processes share the launcher's stdout, and print() writes the text and
    its newline separately, so two processes' lines could run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _process_device(args, state) -> str | None:
    """--device, except that a bare `cuda` (or none given) under several processes means this process's own GPU,
    cuda:LOCAL_RANK (accelerate's device for it); a device with an index is used as given."""
    if state.num_processes > 1 and args.device in (None, "cuda") and state.device.type == "cuda":
        return str(state.device)
    return args.device


def prompts_summary(run: PromptsRun) -> str:
    """The main process's line after every process finished: how many images the folder now holds."""
    there = sum((run.folder / image_name(k, run.count)).exists() for k in range(run.count))
    return (f"{there} of {run.count} images in {run.folder} ({run.num_processes} process"
            f"{'es' if run.num_processes > 1 else ''}; rerun the same command to add any missing)")


# ------------------------------------------------------------------------------------------------ download

def download(args) -> None:
    """Fetch what `generate --model-id` needs; print what was requested and the folder layout."""
    needs = needed_files(args.model_id)
    print(f"{args.model_id} needs: " + ", ".join(f"{f.model_id}/{f.pattern}" for f in needs))
    print("Fetching what is missing through ModelScope (its progress bars: one per file, in bytes; one for the "
          "file count). Interrupted? Run again: complete files are skipped, partial ones resume.")
    fetched = download_models(args.model_id, args.local_model_path)
    for model in fetched:
        skipped = [p for p in model.patterns if p not in model.requested]
        if skipped:
            print(f"{model.model_id}: already complete, skipped: {', '.join(skipped)}")
        if model.requested:
            print(f"{model.model_id}: fetched {', '.join(model.requested)}")
    print(layout_tree(fetched))
    print(f"Run: python -m flux_core generate --model-id {args.model_id}"
          + (f" --local-model-path {args.local_model_path}" if args.local_model_path else "")
          + " --prompt \"...\"")


# ------------------------------------------------------------------------------------------------ messages

# Python-API names in library messages -> this command line's flags. Specific phrases first; then any
# `name=` or bare snake_case name that is one of the command's options (or a renamed pipeline parameter).
_PHRASES = [
    (r"^from_pretrained: ", ""),
    (r"FluxImagePipeline\.from_demo\(\): ", "--demo: "),
    (re.escape("FluxImagePipeline.from_demo()"), lambda m: f"`{DEMO_COMMAND}`"),
    (r"(\d+) of (\d+) model_configs name files that are not there", r"\1 of \2 models have no files"),
    # generate passes one config per kind, in MODEL_KINDS order: config i is the model of flag --MODEL_KINDS[i].
    (r"\bmodel_configs\[(\d+)\]", lambda m: f"--{MODEL_KINDS[int(m.group(1))]}"
     if int(m.group(1)) < len(MODEL_KINDS) else m.group(0)),
    (r"kind='(\w+)' \(the model for pipe\.\w+\)", r"that flag takes a \1"),
    (r"Pick the right file, or change kind=\.", "Give that flag the right file."),
    (r"ModelConfig\(model_id='([^']*)'\)", r"ModelScope model '\1'"),
    (r"ModelConfig\(path=\.\.\.\)", "model path"),
    (r"(tokenizer_[12]_config)=ModelConfig\(path=[^)]*\)", r"\1 FOLDER"),
    (r"give model_id= and origin_file_pattern= to download the model", "leave the flag out to use ModelScope's files"),
    (r"Put the files in that folder, fix the pattern, pass path= to a local file",
     "Fetch them with `python -m flux_core download` (same --model-id and --local-model-path), put the files in "
     "that folder, pass local files with --dit/--vae/--clip/--t5/--tokenizer/--tokenizer-2"),
    (r"pass path= to local files", "pass local files with --dit/--vae/--clip/--t5/--tokenizer/--tokenizer-2"),
    (r"\bmodel_configs\b", "the model flags (--dit/--vae/--clip/--t5 or --model-dir)"),
    (r"origin_file_pattern ", ""),
    # None is "leave the flag out" on a command line.
    (r", or None for a random seed \(then read it from pipe\.last_seed\)", ", or leave it out for a random seed"),
    (r"use None \(off\) or", "leave it out (off) or use"),
    (r", or None for the T5 tokenizer's own length", ", or leave it out for the T5 tokenizer's own length"),
    (r"\(None: 3, FLUX's default\)", "(left out: 3, FLUX's default)"),
    # Warnings' and estimates' advice (flux_core.pipeline, flux_core.run_cost): one image per command.
    (r"kontext_images=PIL\.Image\.open\(path\)\.convert\('RGB'\)", "--kontext-image PATH"),
    (r"no kontext_images were given", "no --kontext-image was given"),
    (r"(?<![\w.])device='([^']*)'", r"--device \1"),
    (r"Lower height/width, generate fewer images per call \(fewer prompts\), or pass smaller kontext_images",
     "Lower --height/--width, or pass smaller --kontext-image images"),
    (r"Lower height/width, the batch or the kontext_images", "Lower --height/--width or the --kontext-image sizes"),
    (r"lower the size, the steps or the batch", "lower --height/--width or --steps"),
    (r"(?<![\w.])height/width\b", "--height/--width"),
    # A model's detection, as FluxImagePipeline.from_pretrained logs it.
    (r"^FluxImagePipeline: (--\w+ .*): (.*) -> pipe\.\w+$", r"\1: detected \2"),
]
_RENAMED = {"kontext_images": "--kontext-image", "tokenizer_1_config": "--tokenizer",
            "tokenizer_2_config": "--tokenizer-2", "torch_dtype": "--dtype", "offload_dtype": "--weight-dtype",
            "local_model_path": "--local-model-path", "skip_download": "--skip-download", "alpha": "--lora PATH:SCALE"}


def cli_message(text: str, options=None) -> str:
    """A library error message with its Python names (skip_download, path=, tokenizer_1_config, cfg_scale=...)
    replaced by the command line's flags. `options`: the command's option names as argparse stores them
    (default: every `generate` option)."""
    if options is None:
        options = vars(build_parser().parse_args(["generate", "--prompt", ""]))
    # The user's own values (paths such as `model_dir` or `tokenizer_2`) are never rewritten: rename_parameters
    # hides them from every rule below.
    table = [("(?m)" + pattern if pattern.startswith("^") else pattern, replacement)
             for pattern, replacement in _PHRASES]
    if options.get("demo"):
        # --demo loads flux_core.demo.model_configs(), in its own order: config i is the demo's model of that kind.
        kinds = [config.kind for config in demo.model_configs()]
        table.insert(0, (r"\bmodel_configs\[(\d+)\]", lambda m: f"--demo {kinds[int(m.group(1))]}"
                         if int(m.group(1)) < len(kinds) else m.group(0)))
    if not options.get("skip_download"):
        # Skipping came from $DIFFSYNTH_SKIP_DOWNLOAD (the flag was not given); say both.
        table.append((r"(?<![\w./'=&?-])skip_download(?![\w=/'-])( is set)?"
                      r"( \(by \$?DIFFSYNTH_SKIP_DOWNLOAD\)| by \$?DIFFSYNTH_SKIP_DOWNLOAD)?",
                      lambda m: "--skip-download (or $DIFFSYNTH_SKIP_DOWNLOAD)" + (m.group(1) or "")))
    flags = {**{name: "--" + name.replace("_", "-") for name in options if name != "command"}, **_RENAMED}
    words = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    # `name=value` -> `--flag value` (`name=True` -> `--flag`); a bare name only when it has an underscore
    # (prose says "prompt", "seed").
    table += [(rf"(?<![\w./'=&?-])({words})=(True\b|(?=\s))?",
               lambda m: flags[m.group(1)] + ("" if m.group(2) is not None else " ")),
              (rf"(?<![\w./'=&?-])({words})(?![\w/'-]|\.\w)",
               lambda m: flags[m.group(1)] if "_" in m.group(1) else m.group(1))]
    return rename_parameters(text, table, protected_values=_given_values(options))


# Options whose values are the user's text, not names: never protected (a prompt is not in messages).
_FREE_TEXT = ("command", "prompt", "negative_prompt")


def _given_values(options: dict) -> list[str]:
    """The command line's string values (paths, ids; each as given and as pathlib prints it), longest first."""
    values = set()
    for name, value in options.items():
        if name in _FREE_TEXT:
            continue
        for item in value if isinstance(value, list) else [value]:
            item = item[0] if isinstance(item, tuple) else item   # --lora (path, scale)
            if isinstance(item, str) and item.strip():
                values.update({item, str(Path(item))})
    return sorted(values, key=len, reverse=True)


class _CliLogFormatter(logging.Formatter):
    """flux_core's log lines in the command line's words (flags, not Python names)."""

    def __init__(self, options: dict):
        super().__init__("%(message)s")
        self.options = options

    def format(self, record: logging.LogRecord) -> str:
        return cli_message(super().format(record), self.options)


@contextlib.contextmanager
def _cli_output(options: dict, quiet: bool):
    """While a command runs: warnings are printed in flags (`warning: ...` on stderr), and the `flux_core`
    logger's INFO lines (what each file was detected as, the memory and compute estimates) go to stderr,
    WARNING and above only with --quiet. Everything is restored afterwards (main() may be called in-process)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning ({category.__name__}): {cli_message(str(message), options)}", file=sys.stderr)

    logger = logging.getLogger("flux_core")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliLogFormatter(options))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    saved_level = logger.level
    logger.addHandler(handler)
    if not quiet and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        # catch_warnings restores showwarning afterwards, and a fresh filter state shows each command's warnings
        # even when an earlier main() in this process showed the same one.
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _cli_output(vars(args), quiet=getattr(args, "quiet", False)):
            if args.command == "download":
                download(args)
            elif args.prompts_file is not None:
                run = generate_prompts_file(args)
                if run.process == 0:
                    print(prompts_summary(run))
            else:
                out, seed = generate(args)
                print(f"saved {out} (seed {seed})")
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # user errors: the message says the fix
        print(f"error: {cli_message(str(e), vars(args))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
