"""`ModelConfig`: where one model's weights are, found locally first and downloaded from ModelScope otherwise.

The names and meaning follow DiffSynth-Studio v1, so a user's `model_configs=[ModelConfig(...)]` keeps working:

    ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="flux1-dev.safetensors")
    ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern="text_encoder_2/")
    ModelConfig(path="/models/flux1-dev.safetensors")

`resolve()` returns what `load_model` takes: a file, a folder, or a sorted list of files (shards).

origin_file_pattern, relative to `<local_model_path>/<model_id>/`:
- None, "" or "./": the whole model folder; the result is the folder.
- ending in "/" ("tokenizer/"): a sub-folder and everything under it; the result is the folder
  (tokenizers and diffusers component folders are loaded as folders).
- anything else: a glob ("flux1-dev.safetensors", "text_encoder_2/*.safetensors", "**/*.json"); the result is
  the matching paths, sorted; one match collapses to a string.
- a list of the above: the union, in the order given (each pattern's matches sorted).

Unlike DiffSynth, which asks the hub on every call, a pattern that already matches local files is not
downloaded again: resolving works offline once the files are there. A folder counts as there when it holds
files, no `*.incomplete` file (ModelScope's partial download, resumed on the next download) and every shard
its `*.index.json` names; a folder interrupted before its index arrived cannot be told from a complete one,
so delete it to fetch it again.

Environment variables (DiffSynth-Studio v2), read when the config is made and only for a field not given:
- DIFFSYNTH_MODEL_BASE_PATH replaces the default `local_model_path` ("./models");
- DIFFSYNTH_SKIP_DOWNLOAD ("true"/"false", also 1/0, yes/no, on/off) replaces the default `skip_download`.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

ENV_MODEL_BASE_PATH = "DIFFSYNTH_MODEL_BASE_PATH"
ENV_SKIP_DOWNLOAD = "DIFFSYNTH_SKIP_DOWNLOAD"
DEFAULT_LOCAL_MODEL_PATH = "./models"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # the default model id (tokenizers, text encoders, VAE)


class ModelFileError(FileNotFoundError):
    """A model's files cannot be found or fetched. The message names the model, pattern and folder, and the fix."""


class _NotGiven:
    """Default of a field that an environment variable may set. It prints as the plain default, so the
    signature reads `skip_download: bool = False`; `__post_init__` replaces it with a real value."""

    def __init__(self, default):
        self.default = default

    def __repr__(self) -> str:
        return repr(self.default)


@dataclass
class ModelConfig:
    path: str | list[str] | None = None
    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    local_model_path: str = field(default=_NotGiven(DEFAULT_LOCAL_MODEL_PATH))  # type: ignore[assignment]
    skip_download: bool = field(default=_NotGiven(False))  # type: ignore[assignment]
    # Where the pipeline keeps this model's weights between uses (DiffSynth v1: the model is loaded there and
    # moved to the compute device when VRAM management is on). Resolution does not use them.
    offload_device: str | None = None
    offload_dtype: torch.dtype | None = None
    # FluxCore addition: the kind of model the file must hold ("dit", "vae", "clip", "t5", "controlnet", "ipadapter",
    # "image_encoder", "infiniteyou", "lora_encoder", "lora_patcher"; flux_core.pipeline_models.MODEL_SLOTS); a file of another
    # kind is refused by name instead of filling the wrong pipeline slot. None: detected from the keys.
    kind: str | None = None
    _skip_set_by_env: bool = field(default=False, init=False, repr=False, compare=False)  # for the error message

    def __post_init__(self):
        if isinstance(self.local_model_path, _NotGiven):
            self.local_model_path = os.environ.get(ENV_MODEL_BASE_PATH) or DEFAULT_LOCAL_MODEL_PATH
        if isinstance(self.skip_download, _NotGiven):
            self.skip_download = _env_flag(ENV_SKIP_DOWNLOAD, default=False)
            self._skip_set_by_env = self.skip_download

    def resolve(self) -> str | list[str]:
        """The path (or sorted list of paths) of this model's weights, downloading them if they are missing.

        An explicit `path` wins and must exist. Otherwise each pattern is looked up under
        `<local_model_path>/<model_id>/`; the patterns with no local match are downloaded together with
        `modelscope.snapshot_download` (unless `skip_download`), then looked up again."""
        if self.path is not None:
            return _existing_paths(self.path)
        if not self.model_id:
            raise ValueError("ModelConfig needs `path` (a local file or folder) or `model_id` (a ModelScope id "
                             "such as 'black-forest-labs/FLUX.1-dev', with origin_file_pattern).")
        folder = self.model_folder()
        patterns = _pattern_list(self.origin_file_pattern)
        found = {p: _local_matches(folder, p) for p in patterns}
        missing = [p for p in patterns if not found[p]]
        if missing and not self.skip_download:
            download_from_modelscope(self.model_id, folder, [_download_pattern(p) for p in missing])
            found.update({p: _local_matches(folder, p) for p in missing})
            missing = [p for p in patterns if not found[p]]
        if missing:
            raise ModelFileError(self._not_found_message(folder, missing))
        paths: list[str] = []
        for p in patterns:
            paths.extend(m for m in found[p] if m not in paths)
        return paths[0] if len(paths) == 1 else paths

    @property
    def skip_download_by_env(self) -> bool:
        """skip_download is on because $DIFFSYNTH_SKIP_DOWNLOAD said so (not given as a field)."""
        return self._skip_set_by_env

    def model_folder(self) -> str:
        """`<local_model_path>/<model_id>`: where this model's ModelScope files are looked for and downloaded."""
        if not self.model_id:
            raise ValueError("ModelConfig without model_id has no ModelScope folder.")
        return os.path.join(self.local_model_path, self.model_id)

    def missing_patterns(self) -> list[str]:
        """The origin_file_patterns with no complete local match: what `resolve()` would download. Offline."""
        folder = self.model_folder()
        return [p for p in _pattern_list(self.origin_file_pattern) if not _local_matches(folder, p)]

    def _not_found_message(self, folder: str, missing: list[str]) -> str:
        shown = ", ".join(repr(p) for p in missing)
        if self.skip_download:
            by = f" (by {ENV_SKIP_DOWNLOAD})" if self._skip_set_by_env else ""
            why = f"skip_download is set{by}, so nothing was downloaded"
        else:
            why = f"the ModelScope repository '{self.model_id}' has no file matching it"
        return (f"ModelConfig(model_id='{self.model_id}'): no file matches origin_file_pattern {shown} in "
                f"{os.path.abspath(folder)}; {why}. Put the files in that folder, fix the pattern, pass "
                f"path= to a local file, or set local_model_path= (or {ENV_MODEL_BASE_PATH}) to the folder that "
                f"holds '{self.model_id}/'.")


def download_from_modelscope(model_id: str, local_dir: str, allow_file_pattern: str | list[str]) -> None:
    """Fetch the files of `model_id` that match `allow_file_pattern` into `local_dir` (ModelScope)."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelFileError(f"Downloading '{model_id}' needs the `modelscope` package: pip install modelscope "
                             f"(or download the files yourself into {local_dir} and pass skip_download=True).") from None
    try:
        snapshot_download(model_id, local_dir=local_dir, allow_file_pattern=allow_file_pattern)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repository errors all end here
        raise ModelFileError(
            f"Downloading {allow_file_pattern!r} of '{model_id}' from ModelScope into {os.path.abspath(local_dir)} "
            f"failed ({type(e).__name__}: {e}). Check the model id and your network, or download the files "
            f"yourself into that folder (then skip_download=True), or pass path= to local files.") from e


def _existing_paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str | list[str]:
    paths = [os.path.expanduser(os.fspath(p)) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise ValueError("ModelConfig(path=[]): give at least one file or folder.")
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
        raise ModelFileError(f"ModelConfig(path=...): {', '.join(repr(p) for p in absent)} does not exist. Check "
                             f"the path, or give model_id= and origin_file_pattern= to download the model.")
    return paths[0] if len(paths) == 1 else paths


def _pattern_list(pattern: str | list[str] | None) -> list[str]:
    if pattern is None or isinstance(pattern, str):
        return [pattern or ""]
    if not pattern:
        raise ValueError("ModelConfig(origin_file_pattern=[]): give at least one pattern, or None for the whole folder.")
    return [p or "" for p in pattern]


def _is_folder_pattern(pattern: str) -> bool:
    return pattern in ("", "./") or pattern.endswith("/")


def _download_pattern(pattern: str) -> str:
    """The ModelScope allow pattern (fnmatch: `*` also crosses `/`) for one of our patterns."""
    if pattern in ("", "./"):
        return "*"
    return pattern + "*" if pattern.endswith("/") else pattern


def _local_matches(folder: str, pattern: str) -> list[str]:
    """Local paths a pattern names: complete folders for folder patterns, else glob matches (empty or
    partly downloaded folders do not count: they are what an interrupted download leaves)."""
    if pattern in ("", "./"):
        return [folder] if _complete_dir(folder) else []
    target = os.path.join(glob.escape(folder), pattern.rstrip("/") if _is_folder_pattern(pattern) else pattern)
    hits = sorted(glob.glob(target, recursive=True))
    if _is_folder_pattern(pattern):
        return [h for h in hits if _complete_dir(h)]
    return [h for h in hits if (os.path.isfile(h) and not h.endswith(INCOMPLETE_SUFFIX)) or _complete_dir(h)]


INCOMPLETE_SUFFIX = ".incomplete"  # ModelScope's partial file beside its target, renamed when complete


def _complete_dir(path: str) -> bool:
    """A folder that holds files, none of them a partial download, and every shard its index files name."""
    if not os.path.isdir(path):
        return False
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
    if not files or any(f.endswith(INCOMPLETE_SUFFIX) for f in files):
        return False
    for index in (f for f in files if f.endswith(".index.json")):
        try:
            with open(index, encoding="utf-8") as fh:
                shards = set(json.load(fh).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False  # a truncated or foreign index: fetch the folder again
        if any(not os.path.isfile(os.path.join(os.path.dirname(index), s)) for s in shards):
            return False
    return True


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"Environment variable {name}={os.environ[name]!r}: expected true or false.")
