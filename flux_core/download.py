"""The files a FLUX pipeline needs from ModelScope, defined once, and fetching them ahead of time.

`needed_files(model_id)` is the one list: `python -m flux_core generate` builds its model configs from it and
`python -m flux_core download` fetches exactly it, so the two can never disagree. The DiT comes from the model
id itself; the text encoders, the VAE and the tokenizers are FLUX.1-dev's (Krea-dev and Kontext-dev share them).

Downloads go through `ModelConfig.resolve()` (so through `model_config.download_from_modelscope`): a pattern
that already has complete local files is not requested again, and ModelScope's `snapshot_download` resumes a
file it left half-written with an HTTP Range request. Where it keeps that partial file depends on its version:
modelscope >= 1.38 (modelscope_hub) writes `<name>.incomplete` beside the target, older versions a copy under
`<model folder>/._____temp/`; either way the file appears under its own name only once it is complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .messages import DEMO_HINT
from .model_config import FLUX_DEV, INCOMPLETE_SUFFIX, ModelConfig, ModelFileError

# The DiT file of each model id FluxCore knows (the ModelScope repositories of Black Forest Labs).
DIT_FILES = {
    FLUX_DEV: "flux1-dev.safetensors",
    "black-forest-labs/FLUX.1-Krea-dev": "flux1-krea-dev.safetensors",
    "black-forest-labs/FLUX.1-Kontext-dev": "flux1-kontext-dev.safetensors",
}

# Everything else comes from FLUX.1-dev: (slot, origin_file_pattern). A pattern ending in "/" is a folder.
SHARED_FILES = (
    ("clip", "text_encoder/model.safetensors"),
    ("t5", "text_encoder_2/"),
    ("vae", "ae.safetensors"),
    ("tokenizer_1", "tokenizer/"),
    ("tokenizer_2", "tokenizer_2/"),
)


@dataclass(frozen=True)
class NeededFile:
    slot: str       # "dit", "clip", "t5", "vae" (a model kind) or "tokenizer_1", "tokenizer_2"
    model_id: str
    pattern: str    # ModelConfig.origin_file_pattern: a file, or a folder ending in "/"


def needed_files(model_id: str = FLUX_DEV) -> list[NeededFile]:
    """What a pipeline for `model_id` loads from ModelScope, DiT first."""
    if model_id not in DIT_FILES:
        raise ValueError(f"model_id {model_id!r}: unknown; use one of {', '.join(DIT_FILES)}.")
    return [NeededFile("dit", model_id, DIT_FILES[model_id])] + [NeededFile(s, FLUX_DEV, p) for s, p in SHARED_FILES]


@dataclass
class FetchedModel:
    """One ModelScope repository's part of a download: its folder, and which patterns were requested."""
    model_id: str
    folder: str
    patterns: list[str]
    requested: list[str]   # the patterns that had no complete local files (the rest were skipped)


def download_models(model_id: str = FLUX_DEV, local_model_path: str | None = None) -> list[FetchedModel]:
    """Fetch every file `needed_files(model_id)` names into `<local_model_path>/<repository id>/` (default
    ./models or $DIFFSYNTH_MODEL_BASE_PATH), requesting only patterns without complete local files.
    Raises `ModelFileError` naming what could not be fetched (and the demo model, which needs no download)."""
    by_repo: dict[str, list[str]] = {}
    for f in needed_files(model_id):
        by_repo.setdefault(f.model_id, []).append(f.pattern)
    fetched = []
    for repo, patterns in by_repo.items():
        where = {} if local_model_path is None else {"local_model_path": local_model_path}
        config = ModelConfig(model_id=repo, origin_file_pattern=patterns, skip_download=False, **where)
        requested = config.missing_patterns()
        try:
            config.resolve()  # downloads the missing patterns only, then checks every pattern has its files
        except ModelFileError as e:
            raise ModelFileError(f"{e}\n{DEMO_HINT}") from e
        fetched.append(FetchedModel(repo, config.model_folder(), patterns, requested))
    return fetched


def layout_tree(fetched: list[FetchedModel]) -> str:
    """The files of each fetched pattern as an indented tree with sizes, one tree per repository folder."""
    lines = []
    for model in fetched:
        files = sorted({p for pattern in model.patterns for p in _files_of(model.folder, pattern)})
        total = sum(os.path.getsize(os.path.join(model.folder, f)) for f in files)
        lines.append(f"{os.path.abspath(model.folder)}/  ({format_size(total)})")
        shown_dirs: set[str] = set()
        for f in files:
            parts = f.split("/")
            for depth in range(1, len(parts)):
                d = "/".join(parts[:depth])
                if d not in shown_dirs:
                    shown_dirs.add(d)
                    lines.append(f"{'  ' * depth}{parts[depth - 1]}/")
            size = format_size(os.path.getsize(os.path.join(model.folder, f)))
            lines.append(f"{'  ' * len(parts)}{parts[-1]:<{max(1, 44 - 2 * len(parts))}} {size:>10}")
    return "\n".join(lines)


def _files_of(folder: str, pattern: str) -> list[str]:
    """The files (relative, '/'-separated) a pattern covers in `folder`, without partial downloads."""
    target = Path(folder) / pattern.rstrip("/")
    paths = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target] if target.is_file() else []
    return [p.relative_to(folder).as_posix() for p in paths
            if not p.name.endswith(INCOMPLETE_SUFFIX) and not p.name.startswith(".")]


def format_size(num_bytes: int) -> str:
    """Binary units, as ModelScope's progress bars count: 1 MiB = 1024 KiB."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size, unit = float(num_bytes), "B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"
