"""Split training (DiffSynth-Studio's two-stage training): `--task data_process` encodes every data row once and
writes what the trainer computes before the DiT; `--task sft:train` then trains from those files without loading
the VAE or the text encoders (FLUX.1's T5 alone is 4.7 B parameters).

    python -m flux_core.train --task data_process --dataset_base_path data --dataset_metadata_path data/metadata.csv \\
        --model_paths '[...the same models...]' --output_path cache/        # encode (VAE, CLIP-L, T5; no DiT)
    python -m flux_core.train --task sft:train --dataset_base_path cache/ \\
        --model_paths '[...the same models...]' --output_path run/ --lora_base_model dit ...   # train (DiT only)

The cache folder (the data_process --output_path):
- `rows/<row>.safetensors`, one per data row (not per --dataset_repeat; sft:train repeats rows as sft does), written
  atomically: `x0` the image latent (1, 16, h, w) as `pipe.encode_image` gives it (stored in the run's dtype: the VAE
  computes in it, so the cast back to float32 is exact; float32 when it would not be), `prompt_emb` (1, L, width) and
  `pooled` (1, 768) the caption's CLIP-L + T5 conditioning at the run's T5 sequence length, and with Kontext reference
  images `ref_tokens` / `ref_ids`, the packed reference tokens and their position ids. Its metadata holds the row's
  fingerprint (its metadata values, the sizes and modification times of its files).
- `cache_manifest.json`: what a training run must match: format and version, torch dtype, T5 sequence length, text
  tokens and widths, latent channels, row count, latent and image sizes, the encoder files used (and those stored in
  FP8), how images are sized, the image columns, the data flags, and
  `complete` (false until every process has finished).

Resume: a rerun of the same data_process command (same dtype, T5 length, encoder files, Kontext setting, image size
flags --height/--width or --max_pixels, --data_file_keys, and encoders in --fp8_models) keeps every row file whose
fingerprint still matches its row and encodes only the others, so an interrupted data_process continues where it
stopped. A folder holding a cache made with other settings is refused unless --overwrite is given (which deletes it).

With several processes (`accelerate launch`), process r encodes rows r, r + P, r + 2P, ...; the main process writes
the finished manifest after all of them are done.

What cannot be cached (each needs a model at every step, or a model this cache leaves out): ControlNet, IP-Adapter,
InfiniteYou, EliGen, LoRA-Encoder, Step1X-Edit and Nexus-Gen inputs, FLEX.2 / Fill channels, validation images.
args.check_task lists them and points to --task sft.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lora_tools.io import atomic_write

from ..dit_inputs import PromptEmbeds
from ..image import pil_to_tensor
from ..loading.files import save_safetensors
from ..models.dit import DiTExtras
from ..text_conditioning import Conditioning
from .args import TrainError, comma_list, torch_dtype

FORMAT, VERSION = "flux_core.train_cache", 1
MANIFEST = "cache_manifest.json"
ROWS = "rows"
LOG = "data_process_log.jsonl"
ENCODER_SLOTS = ("vae", "text_encoder_1", "text_encoder_2")   # what sft:train does not load
CACHED = "cached"   # the sample key of a cached row's tensors
# The data_process flags the manifest keeps, to print the command that rebuilds a cache.
DATA_FLAGS = ("dataset_base_path", "dataset_metadata_path", "max_pixels", "height", "width", "data_file_keys",
              "extra_inputs", "model_paths", "model_id_with_origin_paths", "tokenizer_1_path", "tokenizer_2_path",
              "fp8_models")
# Settings a resumed data_process must share with the cache in its folder: each changes every row's encoding (the
# image size its latent is made at, the columns loaded as images, FP8 storage of the encoders), so rows made with
# other values are refused as a whole, not mixed in.
SETTINGS = ("format", "version", "torch_dtype", "t5_sequence_length", "kontext_images", "encoders", "image_size",
            "data_file_keys", "fp8_encoders")


# ------------------------------------------------------------------------------------------------ the inputs
@dataclass
class EncodedInputs:
    """What the trainer computes from a row before the DiT (and before any adapter)."""
    x0: torch.Tensor                 # (1, 16, h, w) float32 scaled latent
    prompt: Conditioning
    extras: DiTExtras | None         # Kontext / Step1X-Edit reference tokens


def encode_inputs(pipe, sample: dict, t5_sequence_length: int) -> EncodedInputs:
    """A sample's image latent, its caption's conditioning and its reference images' tokens: the one place the trainer
    (every step of --task sft) and data_process (once per row) encode them."""
    x0 = pipe.encode_image(pil_to_tensor(sample["image"], "image"))
    height, width = x0.shape[-2] * 8, x0.shape[-1] * 8
    # The caption through the request's conditioning encoder: CLIP-L + T5, or Step1X-Edit's / Nexus-Gen's with the
    # row's image to edit.
    encoder = pipe.conditioning_encoder(t5_sequence_length, sample.get("step1x_reference_image"),
                                        sample.get("nexus_gen_reference_image"), height, width)
    prompt = pipe.encode_with(encoder, [sample["prompt"]], "positive")
    extras = pipe.kontext_extras(sample["kontext_images"], 1) if "kontext_images" in sample else None
    if "step1x_reference_image" in sample:
        extras = pipe.step1x_extras(sample["step1x_reference_image"], 1, extras)
    return EncodedInputs(x0, prompt, extras)


def row_tensors(inputs: EncodedInputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of a row file; x0 in `dtype` when that is exact (the VAE computes in the run's dtype), else in
    float32."""
    x0 = inputs.x0.to(dtype)
    if not torch.equal(x0.float(), inputs.x0):
        x0 = inputs.x0
    tensors = {"x0": x0, "prompt_emb": inputs.prompt.prompt_emb, "pooled": inputs.prompt.pooled}
    if inputs.extras is not None:
        tensors.update(ref_tokens=inputs.extras.ref_tokens, ref_ids=inputs.extras.ref_ids)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def cached_inputs(tensors: dict[str, torch.Tensor], device: torch.device) -> EncodedInputs:
    """A row file's tensors as the EncodedInputs encode_inputs gave when the row was written."""
    extras = (DiTExtras(ref_tokens=tensors["ref_tokens"].to(device), ref_ids=tensors["ref_ids"].to(device))
              if "ref_tokens" in tensors else None)
    return EncodedInputs(tensors["x0"].to(device).float(),
                         PromptEmbeds(tensors["prompt_emb"].to(device), tensors["pooled"].to(device)), extras)


# ------------------------------------------------------------------------------------------------ files
def row_path(folder: Path, index: int) -> Path:
    return folder / ROWS / f"{index:06d}.safetensors"


def row_fingerprint(dataset, index: int) -> str:
    """What a row file was made from: the row's metadata values and the size and modification time of each file it
    names (a row whose image was replaced under the same name is encoded again on resume)."""
    row = dataset.rows[index]
    files = {}
    for key in dataset.file_keys:
        if key in row.values and row.values[key] not in (None, "") and key not in dataset.replaced_keys:
            for path in dataset._paths(row, key):
                stat = path.stat()
                files[str(path)] = [stat.st_size, stat.st_mtime_ns]
    text = json.dumps({"values": row.values, "files": files}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: not a readable cache manifest ({e}); build the cache again with --task "
                         f"data_process --overwrite.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrainError(f"{path}: not a FluxCore training cache manifest (format {FORMAT}).")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, ensure_ascii=False)
    atomic_write(folder / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def rebuild_command(manifest: dict | None, args: argparse.Namespace, folder: Path) -> str:
    """The data_process command that builds a cache matching this training run into a new folder, and how to train
    from it: with the data flags of the cache's manifest, or without one, taking `folder` for the dataset."""
    flags = dict((manifest or {}).get("data_flags") or {})
    if not flags:
        flags = {"dataset_base_path": str(folder), "model_paths": "<the VAE and text encoder files>"}
    t5_length = args.t5_sequence_length or (manifest or {}).get("t5_sequence_length")
    output = folder.parent / (f"{folder.name}-{args.torch_dtype}" + (f"-t5_{t5_length}" if t5_length else "")
                              if manifest else f"{folder.name}-cache")
    flags.update(extra_inputs=args.extra_inputs, torch_dtype=args.torch_dtype, t5_sequence_length=t5_length,
                 output_path=str(output))
    words = ["python", "-m", "flux_core.train", "--task", "data_process"]
    for name, value in flags.items():
        if value is not None:
            words += [f"--{name}", str(value)]
    return f"{shlex.join(words)} (then train with --dataset_base_path {shlex.quote(str(output))})"


# ------------------------------------------------------------------------------------------------ sft:train
class CachedDataset(Dataset):
    """The rows of a cache folder: len = rows x repeat; item i is row i % rows as {CACHED: its tensors} (the order,
    timesteps and noise of a run over it are those of --task sft over the same data)."""

    def __init__(self, folder: str | os.PathLike, repeat: int = 1):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder) if self.folder.is_dir() else None
        self.repeat = repeat
        self.rows = [] if self.manifest is None else list(range(self.manifest["rows"]))

    def check(self, args: argparse.Namespace) -> dict:
        """Refuse a folder that is no complete cache of this run's dtype and T5 length (every difference named, with
        the command that builds a matching cache); returns the data summary."""
        a, folder, manifest = args, self.folder, self.manifest
        if not folder.is_dir():
            raise TrainError(f"--task sft:train --dataset_base_path {folder}: no such folder. Build the cache first: "
                             f"{rebuild_command(None, a, folder)}")
        if manifest is None:
            raise TrainError(f"--task sft:train --dataset_base_path {folder}: no {MANIFEST} there, so it is not a "
                             f"cache of --task data_process. Build one: {rebuild_command(None, a, folder)}")
        problems = []
        if manifest.get("version") != VERSION:
            problems.append(f"it is of cache format version {manifest.get('version')}, this FluxCore reads {VERSION}")
        if not manifest.get("complete"):
            problems.append("its data_process run did not finish (rerun that command: finished rows are kept)")
        if manifest.get("torch_dtype") != a.torch_dtype:
            problems.append(f"it was encoded in {manifest.get('torch_dtype')}, this run has --torch_dtype "
                            f"{a.torch_dtype}")
        if a.t5_sequence_length is not None and manifest.get("t5_sequence_length") != a.t5_sequence_length:
            problems.append(f"its captions have {manifest.get('t5_sequence_length')} T5 tokens, this run has "
                            f"--t5_sequence_length {a.t5_sequence_length}")
        kontext = "kontext_images" in comma_list(a.extra_inputs)
        if manifest.get("kontext_images") != kontext:
            problems.append("its rows hold Kontext reference tokens, this run has no --extra_inputs kontext_images"
                            if not kontext else "its rows hold no Kontext reference tokens, this run has "
                            "--extra_inputs kontext_images")
        missing = [str(row_path(folder, i).relative_to(folder)) for i in self.rows if not row_path(folder, i).is_file()]
        if missing:
            problems.append(f"row files are missing ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; "
                            f"rerun its data_process command to write them)")
        if problems:
            raise TrainError(f"--task sft:train --dataset_base_path {folder}: the cache does not fit this run: "
                             f"{'; '.join(problems)}. Build a matching cache: {rebuild_command(manifest, a, folder)}")
        return {"rows": len(self.rows), "samples": len(self), "sizes": manifest["image_sizes"],
                "source": f"{folder} (cache of {manifest.get('source')})"}

    def check_dit(self, dit, args: argparse.Namespace) -> None:
        """The cached latents and text must be what this DiT reads."""
        m, p = self.manifest, dit.params
        problems = []
        if p.in_channels != p.out_channels:
            problems.append(f"the DiT has {p.in_channels} input channels for {p.out_channels} output channels "
                            f"(FLEX.2 / FLUX.1-Fill): its extra channels are VAE encodings made at every step, which "
                            f"a cache leaves out; train it with --task sft")
        elif m["latent_channels"] * 4 != p.in_channels:
            problems.append(f"its latents have {m['latent_channels']} channels, the DiT reads {p.in_channels // 4}")
        if m["text_width"] != p.context_in_dim:
            problems.append(f"its text tokens are {m['text_width']} wide, the DiT's context_in_dim is "
                            f"{p.context_in_dim}")
        if m["pooled_width"] != p.vec_in_dim:
            problems.append(f"its pooled vectors are {m['pooled_width']} wide, the DiT's vec_in_dim is {p.vec_in_dim}")
        if problems:
            raise TrainError(f"--task sft:train --dataset_base_path {self.folder}: the cache does not fit the DiT of "
                             f"--model_paths / --model_id_with_origin_paths: {'; '.join(problems)}. Build a cache "
                             f"with the text encoders and VAE of this DiT: "
                             f"{rebuild_command(m, args, self.folder)}")

    @property
    def t5_sequence_length(self) -> int:
        return self.manifest["t5_sequence_length"]

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        from safetensors.torch import load_file
        return {CACHED: load_file(row_path(self.folder, index % len(self.rows)))}


# ------------------------------------------------------------------------------------------------ data_process
def data_process(args: argparse.Namespace) -> dict:
    """Encode every row of the dataset into --output_path (see the module doc). Returns {"rows", "encoded",
    "skipped" (rows kept from an earlier run), "path", "models" (the pipeline slots loaded)}."""
    from accelerate.utils import reduce

    from .args import data_file_keys
    from .dataset import ImageDataset
    from .distributed import process_state
    from .progress import Log
    from .run_folder import check_writable
    from .trainer import fp8_slots, load_pipeline, store_in_fp8

    a = args
    folder = Path(a.output_path)
    check_writable(folder)
    dtype = torch_dtype(a)
    dataset = ImageDataset(a.dataset_base_path, a.dataset_metadata_path, data_file_keys(a), a.height, a.width,
                           a.max_pixels, 1, required_keys=comma_list(a.extra_inputs))
    summary = dataset.check()   # every row read before any model is loaded
    # gloo between CPU processes; a long barrier timeout, as a resumed run's shares are uneven (flux_core.train.distributed)
    acc = process_state()
    earlier = read_manifest(folder)
    pipe, configs = load_pipeline(a, acc.device, skip_kinds=("dit",))
    fp8_encoders = [slot for slot in fp8_slots(a, configs, pipe) if slot != "dit"]   # no DiT here
    store_in_fp8(pipe, fp8_encoders, dtype)
    t5_length = pipe.t5_sequence_length(a.t5_sequence_length)
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "torch_dtype": a.torch_dtype,
                "t5_sequence_length": t5_length, "kontext_images": "kontext_images" in comma_list(a.extra_inputs),
                "encoders": {slot: pipe.loaded_from[slot].source for slot in ENCODER_SLOTS if slot in pipe.loaded_from},
                "fp8_models": comma_list(a.fp8_models), "fp8_encoders": sorted(fp8_encoders),
                "image_size": image_size(dataset), "data_file_keys": sorted(dataset.file_keys),
                "rows": len(dataset.rows), "source": summary["source"],
                "data_flags": {name: getattr(a, name) for name in DATA_FLAGS if getattr(a, name) is not None}}
    if earlier is not None:
        changed = [k for k in SETTINGS if earlier.get(k) != manifest[k]]
        if changed and not a.overwrite:
            raise TrainError(f"--output_path {folder} holds a cache made with other settings "
                             f"({', '.join(f'{k}: {earlier.get(k)!r} there, {manifest[k]!r} now' for k in changed)}). "
                             f"Give a new --output_path, or add --overwrite to replace it.")
    log = Log(folder / LOG, acc.is_main_process)
    acc.wait_for_everyone()   # every process has read the old manifest before the main one replaces it
    if acc.is_main_process:
        if a.overwrite and earlier is not None:
            for path in (folder / ROWS).glob("*.safetensors"):
                path.unlink()
        (folder / ROWS).mkdir(exist_ok=True)
        for path in (folder / ROWS).glob("*.safetensors"):   # rows of a longer earlier dataset
            if not path.stem.isdigit() or int(path.stem) >= len(dataset.rows):
                path.unlink()
        write_manifest(folder, manifest)
    acc.wait_for_everyone()
    mine = list(range(acc.process_index, len(dataset.rows), acc.num_processes))
    models = sorted(pipe.loaded_from)
    log("data_process_start", rows=len(dataset.rows), processes=acc.num_processes, t5_sequence_length=t5_length,
        torch_dtype=a.torch_dtype, models=models, output_path=str(folder))
    encoded = skipped = 0
    for n, index in enumerate(mine, 1):
        fingerprint = row_fingerprint(dataset, index)
        path = row_path(folder, index)
        if not a.overwrite and _row_fingerprint(path) == fingerprint:
            skipped += 1
            continue
        with torch.no_grad():
            inputs = encode_inputs(pipe, dataset[index], t5_length)
        save_safetensors(row_tensors(inputs, dtype), path, metadata={"format": FORMAT, "fingerprint": fingerprint,
                                                                      "row": dataset.rows[index].where})
        encoded += 1
        log("encoded", row=index, done=n, of=len(mine))
    counts = torch.tensor([encoded, skipped])
    if acc.num_processes > 1:
        counts = reduce(counts.to(acc.device), "sum").cpu()
    acc.wait_for_everyone()
    if acc.is_main_process:
        manifest.update(complete=True, **cache_shapes(folder, len(dataset.rows)))
        write_manifest(folder, manifest)
    acc.wait_for_everyone()
    result = {"rows": len(dataset.rows), "encoded": int(counts[0]), "skipped": int(counts[1]), "path": folder,
              "models": models}
    log("data_process_done", rows=result["rows"], encoded=result["encoded"], skipped=result["skipped"],
        path=str(folder / MANIFEST))
    if acc.is_main_process and result["skipped"]:
        print(f"flux_core.train: data_process: kept {result['skipped']} row(s) already encoded in {folder / ROWS} "
              f"(--overwrite encodes every row again).", file=sys.stderr, flush=True)
    return result


def image_size(dataset) -> str:
    """How the rows' images are sized, as the flags that set it: "--height H --width W" or "--max_pixels N"."""
    if dataset.fixed is not None:
        return f"--height {dataset.fixed[1]} --width {dataset.fixed[0]}"
    return f"--max_pixels {dataset.max_pixels}"


def _row_fingerprint(path: Path) -> str | None:
    """The fingerprint a row file was written with; None for a missing or unreadable file (written again)."""
    from safetensors import safe_open
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:   # a damaged file (atomic writes make it unlikely) is encoded again
        return None


def cache_shapes(folder: Path, rows: int) -> dict:
    """The manifest's shape fields, read from the row files' headers: latent channels, text tokens and widths, and
    how many rows have each latent and image size."""
    from safetensors import safe_open
    latents: dict[str, int] = {}
    images: dict[str, int] = {}
    text = set()
    for index in range(rows):
        with safe_open(str(row_path(folder, index)), "pt") as f:
            x0, emb, pooled = (f.get_slice(k).get_shape() for k in ("x0", "prompt_emb", "pooled"))
        latents[f"{x0[2]}x{x0[3]}"] = latents.get(f"{x0[2]}x{x0[3]}", 0) + 1
        images[f"{x0[3] * 8}x{x0[2] * 8}"] = images.get(f"{x0[3] * 8}x{x0[2] * 8}", 0) + 1
        text.add((x0[1], emb[1], emb[2], pooled[1]))
    if len(text) != 1:
        raise TrainError(f"{folder / ROWS}: the row files disagree on their latent channels and text shapes "
                         f"({sorted(text)}); build the cache again with --overwrite.")
    channels, tokens, width, pooled_width = text.pop()
    return {"latent_channels": channels, "text_tokens": tokens, "text_width": width, "pooled_width": pooled_width,
            "latent_sizes": latents, "image_sizes": images}
