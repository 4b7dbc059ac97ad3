"""The EliGen side of training (DiffSynth-Studio's semantics, reference notes §3.6): each row's entities (one prompt
per painted region) condition the DiT through flux_core.eligen's attention mask while a LoRA learns.

    --lora_base_model dit --extra_inputs eligen_entity_masks,eligen_entity_prompts
    --data_file_keys image,eligen_entity_masks

Columns (a .json metadata holds lists; a .csv cell holds the list as JSON text):
    eligen_entity_prompts   ["a red hat", "a blue scarf"]         one prompt per entity (a plain string: one entity)
    eligen_entity_masks     ["masks/0_hat.png", "masks/0_scarf.png"]   one mask image per prompt, in the same order,
                                                                   white = the entity's region

Each mask is cropped and resized exactly like the row's image (to its training size), so the regions stay on the
pixels they were painted on; the entity prompts are encoded like the caption (CLIP + T5 at --t5_sequence_length, the
pooled CLIP vector dropped) and the adapter is the pipeline's own `eligen_adapter`. The frozen text encoders run
without gradients; the LoRA learns through the DiT's attention, where the mask routes each entity prompt to its
region. Training runs one branch (DiffSynth trains with cfg_scale 1), so EliGen acts on the positive branch only.

Every row is checked before any model loads, and every problem of every row is listed in one message: a row with
fewer (or more) masks than prompts, a missing or unreadable mask file, a mask of another aspect ratio than its image
(cropping it like the image would move the region), and a mask whose region vanishes at the latent resolution once
cropped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..eligen import ASPECT_TOLERANCE, EliGenInputError, check_entities, eligen_adapter, entity_grid
from .args import TrainError
from .dataset import crop_and_resize

PROMPTS, MASKS = "eligen_entity_prompts", "eligen_entity_masks"
FLAGS = f"--extra_inputs {MASKS},{PROMPTS}"
_LISTED = 20   # problems shown in one message


def entity_prompts(value, where: str) -> list[str]:
    """A row's eligen_entity_prompts as a list of strings (a JSON list, JSON text of one, or one plain string)."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise TrainError(f"{where}: column '{PROMPTS}' looks like a JSON list but is not valid ({e}).") from None
    prompts = value if isinstance(value, list) else [value]
    bad = [p for p in prompts if not isinstance(p, str)]
    if not prompts or bad:
        raise TrainError(f"{where}: column '{PROMPTS}' must hold the entity prompts, a list of strings (e.g. "
                         f'["a red hat", "a blue scarf"]), got {value!r}.')
    return prompts


def check_entity_rows(dataset) -> None:
    """Every row's entity prompts and masks, all problems of all rows in one TrainError."""
    problems = []
    for row in dataset.rows:
        problems += row_problems(dataset, row)
    if problems:
        shown = problems[:_LISTED]
        more = f"; ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise TrainError(f"{FLAGS}: " + "; ".join(shown) + more + ". Each row needs one mask per entity prompt, in "
                         "the same order, painted white on an image of the row's image's shape.")


def row_problems(dataset, row) -> list[str]:
    """What is wrong with one row's entities (the image itself is checked by the dataset)."""
    problems = []
    try:
        prompts = entity_prompts(row.values[PROMPTS], row.where)
    except TrainError as e:
        problems.append(str(e).rstrip("."))
        prompts = None
    try:
        paths = dataset._paths(row, MASKS)
    except TrainError as e:
        return problems + [str(e).rstrip(".")]
    if prompts is not None and len(prompts) != len(paths):
        problems.append(f"{row.where}: {len(prompts)} {PROMPTS} but {len(paths)} {MASKS}: give one mask per prompt")
    image_path = dataset._paths(row, "image")[0]
    try:
        image_size = source_size(image_path)
        train_size = dataset._load(image_path, row, "image")[1]
    except (TrainError, OSError):
        return problems   # the dataset's own check names the image
    for i, path in enumerate(paths):
        name = f"{row.where}: {MASKS}[{i}] {path.name}"
        if not path.is_file():
            problems.append(f"{name}: no such file ({path})")
            continue
        try:
            size = source_size(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            problems.append(f"{name}: cannot be read as an image ({type(e).__name__}: {e})")
            continue
        if abs(size[0] / size[1] - image_size[0] / image_size[1]) > ASPECT_TOLERANCE * image_size[0] / image_size[1]:
            problems.append(f"{name} is {size[0]}x{size[1]} but the image is {image_size[0]}x{image_size[1]}: paint "
                            f"the mask on an image of the same shape (another resolution of it is fine)")
            continue
        try:
            mask = dataset._load(path, row, MASKS, train_size)[0]
        except TrainError as e:   # an extension the dataset does not read
            problems.append(str(e).rstrip("."))
            continue
        width, height = train_size
        if not entity_grid(mask, height // 8, width // 8, name).any():
            problems.append(f"{name} has no white pixel left at the latent resolution ({width // 8}x{height // 8}) "
                            f"once cropped like the image to {width}x{height}: paint the region white (larger), or "
                            f"leave the entity out")
    return problems


def source_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def sample_entities(pipe, sample: dict, t5_sequence_length: int, dtype, height: int, width: int):
    """The sample's EliGen adapter: entity prompts encoded as the pipeline encodes them (without gradients), at the
    run's T5 length (the trainer's resolved --t5_sequence_length), masks cropped like the image (the dataset did
    that)."""
    prompts, masks = check_entities(sample[PROMPTS], sample[MASKS], height, width)
    embeds = pipe.encode_prompt(prompts, t5_sequence_length).prompt_emb.to(dtype)
    return eligen_adapter(embeds, masks, height, width)


def validation_entities(args: argparse.Namespace, dataset, height: int, width: int) -> dict:
    """The validation images' eligen_entity_prompts and eligen_entity_masks: --validation_eligen_entity_prompts /
    --validation_eligen_entity_masks (masks of the validation size's shape), else the first data row's, cropped and
    resized to the validation size as the dataset crops them. Checked now, not after the first training steps."""
    flagged = args.validation_eligen_entity_prompts is not None
    if flagged:
        prompts = list(args.validation_eligen_entity_prompts)
        masks = []
        for path in args.validation_eligen_entity_masks:
            try:
                with Image.open(path) as image:
                    masks.append(image.convert("RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise TrainError(f"--validation_eligen_entity_masks {path}: cannot be read as an image ({e}).") \
                    from None
    else:
        first = dataset[0]
        prompts = first[PROMPTS]
        masks = [crop_and_resize(m, width, height) for m in first[MASKS]]
    try:
        check_entities(prompts, masks, height, width)
    except EliGenInputError as e:
        source = ("--validation_eligen_entity_prompts / --validation_eligen_entity_masks" if flagged else
                  f"the first data row's entities ({dataset.rows[0].where}) cropped to the validation size")
        message = str(e).replace(PROMPTS, "--validation_eligen_entity_prompts" if flagged else PROMPTS)
        message = message.replace(MASKS, "--validation_eligen_entity_masks" if flagged else MASKS)
        raise TrainError(f"{source} for {width}x{height} validation images: {message} (--validation_height / "
                         f"--validation_width set the size).") from None
    return {PROMPTS: prompts, MASKS: masks}
