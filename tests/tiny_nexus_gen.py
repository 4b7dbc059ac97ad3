"""A tiny Nexus-Gen for tests, laid out as DiffSynth-Studio/Nexus-GenV2 publishes it:

    ar = make_ar()    # NexusGenAutoregressiveModel on tests/tiny_qwen_vl.py's config
    files = write_nexus_gen_files(tmp / "decoders", dit, ar_folder=tmp / "Nexus-Gen", ar=ar)

- the AR model's folder: `model-0000i-of-00002.safetensors` shards in the published (transformers 4.49) names with
  their index, config.json, the processor in processor/;
- `generation_decoder.bin` / `edit_decoder.bin` (and .safetensors copies): the DiT under `pipe.dit.` (Nexus-Gen's
  order of the final AdaLN halves) plus DiffSynth's own NexusGenAdapter's `adapter.*` keys / its merger's keys under
  `embedding_merger.` (the models themselves are DiffSynth's classes, returned for reference computations).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_core.models.nexus_gen import NexusGenAutoregressiveModel
from tests.diffsynth_nexus_gen_ref import diffsynth_nexus_gen, tiny_diffsynth_merger
from tests.tiny_dit import write_nexus_gen_dit
from tests.tiny_qwen_vl import TINY_TEXT, randomised, tiny_qwen_vl_config, write_processor, write_qwen_vl_folder

# The tiny AR model (tests/tiny_qwen_vl.py): hidden 16, heads of 8 with multimodal-RoPE sections 1 + 1 + 2. The tiny
# DiT (tests/tiny_dit.py) reads text tokens of width 32.
AR_HIDDEN, TEXT_DIM, MROPE = TINY_TEXT["hidden_size"], 32, (1, 1, 2)
MERGER_SIZES = dict(hidden=AR_HIDDEN, heads=2, kv_heads=1, intermediate=32, mrope=MROPE, out_channel=TEXT_DIM)
# What the tiny decoders' shapes cannot tell (the published sizes need none of it), in a config.json beside them: the
# DiT's RoPE axes for its 16-wide heads, the merger's head count and rotary sections for its 8-wide heads.
DECODER_CONFIG = {"axes_dims_rope": [4, 6, 6], "num_heads": 2, "mrope_section": list(MROPE)}


def make_ar(seed: int = 0) -> NexusGenAutoregressiveModel:
    return randomised(NexusGenAutoregressiveModel(tiny_qwen_vl_config()), seed, scale=0.3)


def white(side: int = 252) -> Image.Image:
    """DiffSynth's placeholder for the image being generated."""
    return Image.new("RGB", (side, side), (255, 255, 255))


def decoder_state_dict(dit, extra: dict[str, torch.Tensor], tmp: Path) -> dict[str, torch.Tensor]:
    """A Nexus-Gen decoder's keys: the DiT under `pipe.dit.` (tests/tiny_dit.py's Nexus-Gen writer) plus `extra`."""
    sd = load_file(str(write_nexus_gen_dit(dit, Path(tmp) / "_dit.safetensors")))
    (Path(tmp) / "_dit.safetensors").unlink()
    sd = {k: v.clone() for k, v in sd.items() if k.startswith("pipe.dit.")}
    return {**sd, **{k: v.detach().clone().contiguous() for k, v in extra.items()}}


def write_decoder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return path


def write_ar_folder(ar, folder: Path) -> Path:
    """Nexus-GenV2's layout: the AR model's shards and config.json, its processor in processor/."""
    write_qwen_vl_folder(ar, folder, with_processor=False)
    write_processor(Path(folder) / "processor")
    return Path(folder)


def write_nexus_gen_files(decoders: Path, dit, ar_folder: Path, ar, seed: int = 5) -> dict:
    """The AR folder and both decoders (.bin and .safetensors) of the diffusers DiT `dit`, with DiffSynth's adapter and
    merger at random weights. Returns {"ar_folder", "generation", "editing", "generation_st", "editing_st": paths,
    "adapter", "merger": DiffSynth's modules}."""
    decoders = Path(decoders)
    decoders.mkdir(parents=True, exist_ok=True)
    p, _, _ = diffsynth_nexus_gen()
    adapter = randomised(p.NexusGenAdapter(AR_HIDDEN, TEXT_DIM), seed, scale=0.3)
    merger = randomised(tiny_diffsynth_merger(**MERGER_SIZES), seed + 1, scale=0.3)
    # DiffSynth's adapter converter keeps the file's `adapter.*` keys as they are: its NexusGenAdapter's own names.
    generation = decoder_state_dict(dit, adapter.state_dict(), decoders)
    editing = decoder_state_dict(dit, {f"embedding_merger.{k}": v for k, v in merger.state_dict().items()}, decoders)
    (decoders / "config.json").write_text(json.dumps(DECODER_CONFIG))
    return dict(adapter=adapter, merger=merger, ar_folder=write_ar_folder(ar, ar_folder),
                generation=write_decoder(decoders / "generation_decoder.bin", generation),
                editing=write_decoder(decoders / "edit_decoder.bin", editing),
                generation_st=write_decoder(decoders / "generation_decoder.safetensors", generation),
                editing_st=write_decoder(decoders / "edit_decoder.safetensors", editing))
