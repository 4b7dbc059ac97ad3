"""The training data: rows of (image, prompt[, kontext_images]) read from a metadata file or a folder of
images with same-name .txt captions, each image cropped and resized to a multiple of 16.

Metadata (DiffSynth-Studio's layout): `.csv` with a header row, `.json` (a list of objects) or `.jsonl` (one
object a line); an `image` column (path relative to --dataset_base_path, or absolute) and a `prompt` column.
A column named in --data_file_keys holds an image path, or a JSON list of paths (`["a.png", "b.png"]`).

Size (DiffSynth's `ImageCropAndResize`): fixed --height/--width, or dynamic: an image over --max_pixels is
scaled down to it (both sides by sqrt(w*h/max_pixels), truncated), then each side floored to a multiple of 16.
The image is resized so it covers the target (bilinear) and centre-cropped. Each sample keeps its own size
(batch size 1), so a dataset may mix aspect ratios without buckets.

ControlNet columns (DiffSynth's names): `controlnet_image` and `controlnet_inpaint_mask` hold one image path each
and are cropped and resized exactly like the row's `image` (to its training size, so control tokens line up with
image tokens one to one); `controlnet_processor_id` holds the union ControlNet's mode (canny, tile, depth, blur,
pose, gray, lq, or its id).

IP-Adapter and InfiniteYou columns (DiffSynth's names): `ipadapter_images` holds one image path or a JSON list of
them (each cropped to its own training size, as DiffSynth does; the image encoder then resizes it);
`infinityou_id_image` one face photo; `infinityou_id_embedding` (FluxCore's addition) a .safetensors/.npy file of
the face's 512-d embedding, relative to --dataset_base_path like the images; `infinityou_guidance` a number.

EliGen columns (DiffSynth's names): `eligen_entity_prompts` a list of prompts and `eligen_entity_masks` a list of mask
image paths, one per prompt (a .json metadata holds lists, a .csv cell JSON text); the masks are cropped and resized
exactly like the row's `image`, and train/eligen.py checks every row's entities together (all problems at once).

Step1X-Edit / Nexus-Gen columns (DiffSynth's names): `step1x_reference_image` / `nexus_gen_reference_image` hold the
image to edit (one path, cropped to its own training size). FLEX.2 / FLUX.1-Fill columns: `flex_inpaint_image`,
`flex_inpaint_mask`, `flex_control_image`, `flux_fill_image`, `flux_fill_mask` (one path each), cropped and resized
exactly like the row's `image`.

LoRA-Encoder column (DiffSynth's name): `lora_encoder_inputs` holds a LoRA file path (or a JSON list of them), relative
to --dataset_base_path (or, as DiffSynth reads it, to the current folder); train/lora_encoder.py reads it (any format
lora_tools reads).

`check()` reads every row before training starts: a missing column, a missing or unreadable image, an
unsupported extension or an image too small for one 16-pixel patch stops the run with the row named.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .args import CHANNEL_EXTRAS, ENCODER_EXTRAS, TrainError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_NAMES = ("metadata.csv", "metadata.json", "metadata.jsonl")
PROMPT_KEY = "prompt"
# Image columns cropped and resized like the row's `image` (not by their own size): a ControlNet's control map and
# mask must cover the training image pixel for pixel.
PAIRED_KEYS = ("controlnet_image", "controlnet_inpaint_mask", "eligen_entity_masks", *CHANNEL_EXTRAS)
SINGLE_KEYS = ("controlnet_image", "controlnet_inpaint_mask", "infinityou_id_image", *ENCODER_EXTRAS,
               *CHANNEL_EXTRAS)   # one path, not a list
MODE_KEY = "controlnet_processor_id"
EMBEDDING_KEY, GUIDANCE_KEY = "infinityou_id_embedding", "infinityou_guidance"
ENTITY_PROMPTS_KEY, ENTITY_MASKS_KEY = "eligen_entity_prompts", "eligen_entity_masks"
# Columns checked together, over all rows, by train/eligen.py (every problem in one message).
ENTITY_KEYS = (ENTITY_PROMPTS_KEY, ENTITY_MASKS_KEY)
LORA_KEY = "lora_encoder_inputs"


@dataclass
class Row:
    values: dict            # column -> value (str, or list[str] for image lists)
    where: str              # "metadata.csv row 3" / "cat.png": how a message names it


# ------------------------------------------------------------------------------------------------ reading
def read_metadata(path: str | os.PathLike) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"--dataset_metadata_path {path}: no such file.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: not UTF-8 text ({e}); save the metadata as UTF-8.") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [Row(dict(r), f"{path.name} row {i + 1} (line {reader.line_num})") for i, r in enumerate(reader)]
        if reader.fieldnames is None:
            return []
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}: not valid JSON ({e}).") from None
        if not isinstance(data, list):
            raise TrainError(f"{path}: must hold a JSON list of objects, one per sample.")
        return [Row(_object(item, f"{path.name} entry {i + 1}"), f"{path.name} entry {i + 1}")
                for i, item in enumerate(data)]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {n}"
            try:
                rows.append(Row(_object(json.loads(line), where), where))
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: not valid JSON ({e}).") from None
        return rows
    raise TrainError(f"--dataset_metadata_path {path}: unsupported metadata type '{suffix}'; use .csv, .json "
                     f"or .jsonl.")


def _object(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise TrainError(f"{where}: must be a JSON object with 'image' and 'prompt', got {type(item).__name__}.")
    return item


def folder_rows(base: Path) -> list[Row]:
    """Every image under `base` (recursively, sorted) with the caption of its same-name .txt file."""
    rows = []
    for image in sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise TrainError(f"{image}: no caption file {caption.name} beside it. Each image of a dataset folder "
                             f"needs a same-name .txt caption (or give a metadata.csv with image,prompt columns).")
        try:
            prompt = caption.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise TrainError(f"{caption}: not UTF-8 text ({e}).") from None
        rows.append(Row({"image": str(image.relative_to(base)), PROMPT_KEY: prompt}, str(image.relative_to(base))))
    return rows


def load_rows(base_path: str | os.PathLike, metadata_path: str | os.PathLike | None) -> tuple[list[Row], str]:
    """(rows, where they came from). Without a metadata path: metadata.csv/json/jsonl in the base folder,
    else the folder's images with their .txt captions."""
    base = Path(base_path)
    if not base.is_dir():
        raise TrainError(f"--dataset_base_path {base}: no such folder.")
    if metadata_path is None:
        found = [base / n for n in METADATA_NAMES if (base / n).is_file()]
        if found:
            metadata_path = found[0]
    if metadata_path is not None:
        rows, source = read_metadata(metadata_path), str(metadata_path)
    else:
        rows, source = folder_rows(base), f"{base} (images with .txt captions)"
    if not rows:
        raise TrainError(f"the dataset is empty: {source} has no samples. Add images with captions (an `image` "
                         f"and a `prompt` column, or image + same-name .txt files).")
    return rows, source


# ------------------------------------------------------------------------------------------------ sizes
def target_size(width: int, height: int, fixed: tuple[int, int] | None, max_pixels: int) -> tuple[int, int]:
    """(width, height) a sample is trained at: `fixed` = (width, height), or dynamic (see module doc)."""
    if fixed is not None:
        return fixed
    if width * height > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        width, height = int(width / scale), int(height / scale)
    return width // 16 * 16, height // 16 * 16


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers (width, height), then cut the centre."""
    w, h = image.size
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


# ------------------------------------------------------------------------------------------------ dataset
class ImageDataset(Dataset):
    """len = rows x repeat; item i is row i % rows as {"image": PIL, "prompt": str, other file keys: [PIL]}."""

    def __init__(self, base_path: str | os.PathLike, metadata_path: str | os.PathLike | None = None,
                 file_keys: tuple[str, ...] | list[str] = ("image",), height: int | None = None,
                 width: int | None = None, max_pixels: int = 1024 * 1024, repeat: int = 1,
                 required_keys: tuple[str, ...] | list[str] = ()):
        """required_keys: columns every row must have (the --extra_inputs); those not in file_keys are values
        (controlnet_processor_id), passed through as they are."""
        self.base = Path(base_path)
        self.rows, self.source = load_rows(base_path, metadata_path)
        self.file_keys = sorted(file_keys, key=lambda k: k != "image")  # the image first: paired keys take its size
        self.required_keys = ["image", PROMPT_KEY, *[k for k in required_keys if k not in ("image", PROMPT_KEY)]]
        self.value_keys = [k for k in self.required_keys if k not in self.file_keys and k != PROMPT_KEY]
        self.fixed = (width, height) if height is not None and width is not None else None
        self.max_pixels = max_pixels
        self.repeat = repeat
        # Values computed from a column once per row (InfiniteYou's face embeddings from infinityou_id_image):
        # key -> one value per row; the column they were computed from is then not read again.
        self.row_values: dict[str, list] = {}
        self.replaced_keys: set[str] = set()

    def set_row_values(self, key: str, values: list, replaces: str | None = None) -> None:
        """Give every sample `key` = values[its row] (computed once per row from column `replaces`, which samples
        then no longer load)."""
        if len(values) != len(self.rows):
            raise ValueError(f"{len(values)} values for {len(self.rows)} rows")
        self.row_values[key] = list(values)
        if replaces:
            self.replaced_keys.add(replaces)

    def row_image(self, index: int, key: str) -> tuple[Image.Image, Path]:
        """Row `index`'s image of column `key` (one path), cropped and resized as a sample gets it, and its path."""
        row = self.rows[index]
        path = self._paths(row, key)[0]
        return self._load(path, row, key)[0], path

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        row = self.rows[index % len(self.rows)]
        sample = {PROMPT_KEY: _prompt(row)}
        size = None
        for key in self.file_keys:
            if key not in row.values or row.values[key] in (None, "") or key in self.replaced_keys:
                continue
            paths = self._paths(row, key)
            images = [self._load(path, row, key, size if key in PAIRED_KEYS else None)[0] for path in paths]
            if key == "image":
                size = images[0].size
            sample[key] = images[0] if key in ("image", *SINGLE_KEYS) else images
        for key in self.value_keys:
            sample[key] = self._value(row, key)
        for key, values in self.row_values.items():
            sample[key] = values[index % len(self.rows)]
        return sample

    def _value(self, row: Row, key: str):
        """A column that is not an image path, read as what it holds."""
        if key == MODE_KEY:
            return mode_value(row)
        if key == EMBEDDING_KEY:
            return self._embedding(row)
        if key == GUIDANCE_KEY:
            from .infiniteyou import guidance_value
            return guidance_value(row.values[key], row.where)
        if key == ENTITY_PROMPTS_KEY:
            from .eligen import entity_prompts
            return entity_prompts(row.values[key], row.where)
        if key == LORA_KEY:
            return self._lora_paths(row)
        return row.values[key]

    def _embedding(self, row: Row):
        from .infiniteyou import read_face_embedding
        value = row.values[EMBEDDING_KEY]
        if not isinstance(value, str):
            raise TrainError(f"{row.where}: column '{EMBEDDING_KEY}' must hold the path of an embedding file "
                             f"(.safetensors or .npy), got {value!r}.")
        path = Path(value)
        path = path if path.is_absolute() else self.base / path
        try:
            return read_face_embedding(path)
        except ValueError as e:
            raise TrainError(f"{row.where}: '{EMBEDDING_KEY}' {e}.") from None

    def _lora_paths(self, row: Row) -> str | list[str]:
        """A row's lora_encoder_inputs: one LoRA file, or a list of them (a JSON list, or JSON text of one in a CSV
        cell: their tokens one after the other, as DiffSynth encodes a list). Each path is relative to
        --dataset_base_path like the images, else (DiffSynth reads the column as ModelConfig(path=...)) to the
        current folder."""
        value = row.values[LORA_KEY]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise TrainError(f"{row.where}: column '{LORA_KEY}' looks like a JSON list but is not valid ({e}).") \
                    from None
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise TrainError(f"{row.where}: column '{LORA_KEY}' must hold the path of a LoRA file (or a list of "
                             f"them), got {row.values[LORA_KEY]!r}.")
        paths = [self._lora_file(row, v) for v in values]
        return paths if isinstance(value, list) else paths[0]

    def _lora_file(self, row: Row, value: str) -> str:
        path = Path(value)
        for candidate in ([path] if path.is_absolute() else [self.base / path, path]):
            if candidate.is_file():
                return str(candidate)
        where = str(path) if path.is_absolute() else f"{self.base / path} (nor {path.resolve()})"
        raise TrainError(f"{row.where}: '{LORA_KEY}' file {where} does not exist.")

    # -------------------------------------------------------------------- checks
    def check(self) -> dict:
        """Read every row once; raise TrainError naming the first bad row. Returns a summary."""
        sizes = {}
        for row in self.rows:
            for key in self.required_keys:
                if key not in row.values or (key != PROMPT_KEY and row.values[key] in (None, "")):
                    columns = ", ".join(sorted(row.values)) or "none"
                    raise TrainError(f"{row.where}: no '{key}' value (columns: {columns}). FLUX training needs "
                                     f"'image' and 'prompt'" + (f" and '{key}'" if key not in ("image", PROMPT_KEY)
                                                                 else "") + ".")
            _prompt(row)
            for key in self.value_keys:
                if key not in ENTITY_KEYS:
                    self._value(row, key)
            image_size = None
            for key in self.file_keys:
                if key not in row.values or row.values[key] in (None, "") or key in ENTITY_KEYS:
                    continue
                paths = self._paths(row, key)
                if key in SINGLE_KEYS and len(paths) != 1:
                    what = "the face photo" if key not in PAIRED_KEYS else "the control for this row's image"
                    raise TrainError(f"{row.where}: '{key}' holds {len(paths)} paths; it takes one image ({what}).")
                for path in paths:
                    size = self._load(path, row, key, image_size if key in PAIRED_KEYS else None)[1]
                    if key == "image":
                        sizes[size] = sizes.get(size, 0) + 1
                        image_size = size
        if ENTITY_MASKS_KEY in self.file_keys:
            from .eligen import check_entity_rows
            check_entity_rows(self)
        return {"rows": len(self.rows), "samples": len(self), "sizes": sizes, "source": self.source}

    def _paths(self, row: Row, key: str) -> list[Path]:
        value = row.values[key]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise TrainError(f"{row.where}: column '{key}' looks like a JSON list but is not valid ({e}).") from None
        values = value if isinstance(value, list) else [value]
        paths = []
        for v in values:
            if not isinstance(v, str):
                raise TrainError(f"{row.where}: column '{key}' must hold an image path, got {v!r}.")
            if v.startswith(("http://", "https://")):
                raise TrainError(f"{row.where}: '{key}' is a URL ({v}); download the images and give local paths.")
            p = Path(v)
            paths.append(p if p.is_absolute() else self.base / p)
        return paths

    def _load(self, path: Path, row: Row, key: str, size: tuple[int, int] | None = None
              ) -> tuple[Image.Image, tuple[int, int]]:
        """The image cropped and resized to `size` (width, height), or to its own training size when None."""
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise TrainError(f"{row.where}: '{key}' {path.name} is not a supported image type; use "
                             f"{', '.join(IMAGE_EXTENSIONS)}.")
        if not path.is_file():
            raise TrainError(f"{row.where}: '{key}' image {path} does not exist.")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise TrainError(f"{row.where}: '{key}' image {path} cannot be read ({type(e).__name__}: {e}); "
                             f"the file is damaged or not an image.") from None
        width, height = size or target_size(*image.size, self.fixed, self.max_pixels)
        if width < 16 or height < 16:
            raise TrainError(f"{row.where}: '{key}' image {path} is {image.size[0]}x{image.size[1]}, too small: "
                             f"it gives a {width}x{height} training size; each side needs at least 16 pixels.")
        return crop_and_resize(image, width, height), (width, height)


def _prompt(row: Row) -> str:
    prompt = row.values.get(PROMPT_KEY, "")
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise TrainError(f"{row.where}: 'prompt' must be text, got {prompt!r}.")
    return prompt


def mode_value(row: Row) -> str | int:
    """The row's controlnet_processor_id: a union mode name, or its id (a JSON number or a string of digits)."""
    from ..models.controlnet import union_mode_id

    value = row.values.get(MODE_KEY)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if value is None or value == "" or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TrainError(f"{row.where}: column '{MODE_KEY}' must name the union ControlNet's mode (canny, tile, "
                         f"depth, blur, pose, gray, lq), got {row.values.get(MODE_KEY)!r}.")
    try:
        union_mode_id(value)
    except ValueError as e:
        raise TrainError(f"{row.where}: column '{MODE_KEY}': {e}") from None
    return value


def first_sample(sample: dict) -> dict:
    """DataLoader collate function for batch size 1 (module level so worker processes can pickle it)."""
    return sample[0]
