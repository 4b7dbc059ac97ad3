"""What `FluxImagePipeline.from_pretrained` loads, worked out before any weights are read.

    plan = plan_models(model_configs, {"tokenizer": tokenizer_1_config, "tokenizer_2": tokenizer_2_config})
    plan.entries      # [(config, resolved paths, LoadedModel)]: each file's kind, layout and pipeline slot
    plan.tokenizers   # {"tokenizer": folder, "tokenizer_2": folder}

All problems of one kind are reported at once: every missing model file (one ModelFileError for all configs),
every missing tokenizer, every file of the wrong kind or filling a slot that another file already filled.
Detection reads only the safetensors headers, so a wrong file is refused before a large one is loaded.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .loading.files import CheckpointError, checkpoint_files, open_state_dict
from .loading.loader import describe_source, detect_components_of
from .messages import DEMO_HINT
from .model_config import FLUX_DEV, ModelConfig, ModelFileError

logger = logging.getLogger(__name__)

# Component folders of a diffusers FLUX pipeline folder, by the kind of model they hold.
DIFFUSERS_COMPONENTS = {"dit": "transformer", "vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}
# The models of a FLUX.1 text-to-image pipeline (None: a config whose kind is detected from its file).
BASE_KINDS = (None, "dit", "vae", "clip", "t5")
# The pipeline attribute that holds each kind of model (DiffSynth-Studio's attribute names). ControlNets, any number
# of them, go to `pipe.controlnet.models[i]` in model_configs order (slot "controlnet.models.<i>").
MODEL_SLOTS = {"dit": "dit", "vae": "vae", "clip": "text_encoder_1", "t5": "text_encoder_2",
               "controlnet": "controlnet", "ipadapter": "ipadapter", "image_encoder": "ipadapter_image_encoder",
               "infiniteyou": "image_proj_model", "lora_encoder": "lora_encoder", "lora_patcher": "lora_patcher",
               "qwen_vl": "qwenvl", "step1x_connector": "step1x_connector", "nexus_gen": "nexus_gen",
               "nexus_gen_adapter": "nexus_gen_generation_adapter", "nexus_gen_merger": "nexus_gen_editing_adapter"}
# The slots every generation needs filled: the DiT, the VAE and one conditioning encoder's models (CLIP-L + T5, or
# Step1X-Edit's Qwen2.5-VL + connector when either of those is loaded: such a pipeline needs no CLIP-L / T5).
GENERATION_SLOTS = ("dit", "vae", "text_encoder_1", "text_encoder_2")
STEP1X_SLOTS = ("qwenvl", "step1x_connector")
# Kinds of which a pipeline holds a list rather than one model.
LISTED_KINDS = frozenset({"controlnet"})
# The kind of model each tokenizer folder serves.
TOKENIZER_KINDS = {"tokenizer": "clip", "tokenizer_2": "t5"}
# Tokenizer folder -> (what it is, the from_pretrained parameter that names it).
TOKENIZERS = {"tokenizer": ("CLIP-L tokenizer", "tokenizer_1_config"),
              "tokenizer_2": ("T5 tokenizer", "tokenizer_2_config")}


class TokenizerNotFoundError(ModelFileError):
    """No folder holds a tokenizer. `missing` lists (folder name, from_pretrained parameter, places searched)."""

    def __init__(self, message: str, missing: list[tuple[str, str, list[str]]]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class LoadedModel:
    """One model `from_pretrained` put in a pipeline slot, and where it came from."""
    slot: str              # pipeline attribute: "dit", "vae", "text_encoder_1", "text_encoder_2", "controlnet.models.0"
    kind: str              # "dit", "vae", "clip", "t5"
    title: str             # "FLUX DiT", ... (the loader's name for the kind)
    layout: str            # checkpoint layout detected from the keys ("bfl", "diffusers", ...)
    source: str            # the file(s) or folder it was read from
    config_index: int      # its position in model_configs
    model_id: str | None   # the config's ModelScope id, if any

    @property
    def is_kontext(self) -> bool:
        """From a FLUX.1 Kontext model: its model id or file name says "Kontext" (the weights cannot tell; the
        folders above the file are not looked at: `~/kontext-tests/flux1-dev.safetensors` is not Kontext)."""
        return "kontext" in f"{self.model_id or ''} {Path(self.source.split(' (+')[0]).name}".lower()

    def describe(self) -> str:
        return f"model_configs[{self.config_index}] {self.source}: {self.title} ({self.layout} layout) -> pipe.{self.slot}"


@dataclass
class ModelPlan:
    """What to load: one entry per model, each with the config and the resolved path(s) it came from, and the
    tokenizer folders ({"tokenizer": folder, "tokenizer_2": folder}; a Step1X-Edit plan without CLIP-L / T5 has
    none of theirs: `tokenizer_unused`)."""
    entries: list[tuple[ModelConfig, str | list[str], LoadedModel]]
    tokenizers: dict[str, str]

    def describe(self) -> str:
        return "; ".join(entry.describe() for _, _, entry in self.entries) or "no model_configs given"


def find_files(model_configs: Sequence[ModelConfig], tokenizer_configs: dict[str, ModelConfig | None],
               local_model_path: str) -> tuple[list[str | list[str]], dict[str, str]]:
    """(every config's resolved paths, the tokenizer folders). Every config whose files are missing and every
    tokenizer not found are reported together: in one ModelFileError, or a TokenizerNotFoundError when only
    tokenizers are missing."""
    for i, config in enumerate(model_configs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"model_configs[{i}] is a {type(config).__name__}; pass ModelConfig(path=...) or "
                            f"ModelConfig(model_id=..., origin_file_pattern=...).")
        if config.kind is not None and config.kind not in MODEL_SLOTS:
            raise ValueError(f"model_configs[{i}]: kind={config.kind!r}; use one of "
                             f"{', '.join(repr(k) for k in MODEL_SLOTS)}, or None to detect it from the file.")
    # Configs that resolve without downloading come first, so that a mistyped local path is reported before
    # gigabytes of other models are fetched.
    offline = [i for i, c in enumerate(model_configs)
               if c.path is not None or c.skip_download or not c.model_id or not c.missing_patterns()]
    online = [i for i in range(len(model_configs)) if i not in offline]
    resolved: list = [None] * len(model_configs)
    missing: dict[int, str] = {}
    for group in (offline, online):
        if missing:
            break  # a local problem: say so now, and fetch nothing
        for i in group:
            try:
                resolved[i] = model_configs[i].resolve()
            except ModelFileError as e:
                missing[i] = f"model_configs[{i}]: {e}"
    errors = [missing[i] for i in sorted(missing)]
    not_fetched = [i for i in online if resolved[i] is None and i not in missing]
    if not_fetched:
        errors.append(f"model_configs{not_fetched} were not downloaded: fix the files above first (nothing is "
                      f"fetched while a local file is missing).")
    roots = [root for paths in resolved if paths is not None for root in search_roots(paths)]
    kinds = None if errors else planned_kinds(resolved)
    tokenizer_configs = {folder: config for folder, config in tokenizer_configs.items()
                         if config is not None or not tokenizer_unused(folder, kinds)}
    missing_tokenizers = 0
    try:
        tokenizers = tokenizer_folders(tokenizer_configs, roots, local_model_path, allow_download=not errors)
    except TokenizerNotFoundError as e:
        if not errors:
            raise
        errors.extend(str(e).splitlines())
        missing_tokenizers = len(e.missing)
    if errors:
        tokenizers_note = f", and {missing_tokenizers} tokenizer(s) were not found" if missing_tokenizers else ""
        # A ModelScope model that is neither here nor downloadable: the demo model needs no download.
        hint = f"\n{DEMO_HINT}" if any(model_configs[i].path is None and model_configs[i].kind in BASE_KINDS
                                       for i in missing) else ""
        raise ModelFileError(f"{len(missing)} of {len(model_configs)} model_configs name files that are not "
                             f"there{tokenizers_note}:\n- " + "\n- ".join(errors) + hint)
    return resolved, tokenizers


def planned_kinds(resolved: list[str | list[str]]) -> set[str] | None:
    """The kinds of model the resolved paths hold (headers only); None when one of them is not a FLUX component
    (plan_models names it)."""
    try:
        return {kind for paths in resolved for _, kind, _, _ in detect_components(paths)}
    except CheckpointError:
        return None


def tokenizer_unused(folder: str, kinds: set[str] | None) -> bool:
    """Whether a plan can go without a tokenizer: it holds no model that reads it, and Step1X-Edit's Qwen2.5-VL
    encodes its prompts instead (a plan of a DiT alone still gets FLUX.1-dev's tokenizers, for CLIP-L / T5 added
    later). Unknown kinds (None): the tokenizer is looked for."""
    return kinds is not None and TOKENIZER_KINDS[folder] not in kinds and "qwen_vl" in kinds


def plan_models(model_configs: Sequence[ModelConfig], tokenizer_configs: dict[str, ModelConfig | None] | None = None,
                local_model_path: str | None = None) -> ModelPlan:
    """Find every file (`find_files`), detect what each holds, and put each model in its slot. Raises one error
    that lists every file of the wrong kind (a config's `kind`) and every second model of a kind already placed.
    Tokenizers default to those beside the files or FLUX.1-dev's under `local_model_path` (default: the first
    config's)."""
    if local_model_path is None:
        local_model_path = (model_configs[0] if model_configs else ModelConfig()).local_model_path  # env-aware default
    tokenizer_configs = tokenizer_configs or {"tokenizer": None, "tokenizer_2": None}
    resolved, tokenizers = find_files(model_configs, tokenizer_configs, local_model_path)
    entries, problems = [], []
    placed: dict[str, LoadedModel] = {}
    for index, (config, paths) in enumerate(zip(model_configs, resolved)):
        components = detect_components(paths)
        if config.kind is not None:
            wanted = [c for c in components if c[1] == config.kind]
            if not wanted:
                problems.append(f"model_configs[{index}] {describe_source(paths)}: kind={config.kind!r} (the model "
                                f"for pipe.{MODEL_SLOTS[config.kind]}), but it holds "
                                f"{' + '.join(c[2] for c in components)}. Pick the right file, or change kind=.")
            components = wanted
        for source, kind, title, layout in components:
            slot = MODEL_SLOTS[kind]
            if kind in LISTED_KINDS:
                slot = f"{slot}.models.{sum(1 for *_, e in entries if e.kind == kind)}"
            entry = LoadedModel(slot, kind, title, layout, describe_source(source), index, config.model_id)
            earlier = None if kind in LISTED_KINDS else placed.get(kind)
            if earlier is not None:
                problems.append(f"model_configs[{index}] {entry.source} is a second {title}: pipe.{entry.slot} is "
                                f"already filled by model_configs[{earlier.config_index}] {earlier.source}. "
                                f"Remove one of the two from model_configs.")
                continue
            placed[kind] = entry
            entries.append((config, source, entry))
    if problems:
        raise CheckpointError("from_pretrained: " + "\n".join(problems))
    return ModelPlan(entries, tokenizers)


def empty_slots(loaded: dict[str, LoadedModel]) -> list[str]:
    """The generation slots (GENERATION_SLOTS, or Step1X-Edit's instead of CLIP-L + T5) that nothing filled."""
    slots = GENERATION_SLOTS
    if any(slot in loaded for slot in STEP1X_SLOTS):
        slots = ("dit", "vae") + STEP1X_SLOTS
    return [slot for slot in slots if slot not in loaded]


def detect_components(paths: str | list[str]) -> list[tuple[str | list[str], str, str, str]]:
    """(source to load, kind, title, layout) for each model the resolved path(s) hold, read from the safetensors
    headers only. A diffusers FLUX folder yields its component folders; a file may hold several models (ComfyUI
    all-in-one checkpoints)."""
    single = paths if isinstance(paths, str) else (paths[0] if len(paths) == 1 else None)
    if single is not None and Path(single).is_dir() and (Path(single) / "model_index.json").is_file():
        root = Path(single)
        out = []
        for kind, folder in DIFFUSERS_COMPONENTS.items():
            if (root / folder).is_dir():
                out.extend(c for c in detect_components(str(root / folder)) if c[1] == kind)
        if not out:
            raise CheckpointError(f"{root}: diffusers folder without transformer/, vae/ or text encoder folders.")
        return out
    found = detect_components_of(open_state_dict(checkpoint_files(paths)), describe_source(paths))
    return [(paths, d.kind.name, d.kind.title, d.layout) for d in found]


def search_roots(paths: str | list[str]) -> list[Path]:
    """Folders where tokenizer/ and tokenizer_2/ may sit beside a model: for a file, its folder, that folder's
    parent and grandparent; for a folder, the folder, its parent and grandparent. Paths as given (absolute, links
    not resolved), so a linked model file is searched beside the link, where the user put it."""
    first = Path(paths if isinstance(paths, str) else paths[0]).absolute()
    folder = first if first.is_dir() else first.parent
    return [folder, *list(folder.parents)[:2]]


def tokenizer_folder(config: ModelConfig | None, roots: list[Path], folder: str, local_model_path: str) -> str:
    """A tokenizer folder: the config's, else `<root>/<folder>` for the first root that has it, else FLUX.1-dev's
    `<folder>/` resolved through ModelScope under `local_model_path` (downloaded once). Raises
    TokenizerNotFoundError naming the tokenizer, every place searched and the parameter that fixes it."""
    return tokenizer_folders({folder: config}, roots, local_model_path)[folder]


def tokenizer_folders(configs: dict[str, ModelConfig | None], roots: list[Path], local_model_path: str,
                      allow_download: bool = True) -> dict[str, str]:
    """`tokenizer_folder` for several tokenizers ({"tokenizer": config, "tokenizer_2": config}); every tokenizer
    that cannot be found is reported in one TokenizerNotFoundError. `allow_download=False`: FLUX.1-dev's
    tokenizers are only looked for locally (while other files are missing, nothing is fetched)."""
    found, missing, messages = {}, [], []
    for folder, config in configs.items():
        title, parameter = TOKENIZERS[folder]
        if config is not None:
            try:
                found[folder] = _folder_of(config.resolve())
            except ModelFileError as e:
                missing.append((folder, parameter, [str(config.path or config.model_id)]))
                messages.append(f"{parameter}: {e}")
            continue
        local = next((root / folder for root in _unique(roots) if (root / folder).is_dir()), None)
        if local is not None:
            found[folder] = str(local)
            continue
        fallback = ModelConfig(model_id=FLUX_DEV, origin_file_pattern=f"{folder}/", local_model_path=local_model_path)
        if not allow_download:
            fallback.skip_download = True
        try:
            found[folder] = _folder_of(fallback.resolve())
            continue
        except ModelFileError as e:
            if not allow_download:
                why = "not downloaded while other model files are missing"
            elif fallback.skip_download:
                why = ("skip_download is set by $DIFFSYNTH_SKIP_DOWNLOAD, so it was not downloaded"
                       if fallback.skip_download_by_env else "skip_download is set, so it was not downloaded")
            else:
                why = f"fetching it failed: {e}"
        searched = [str(root / folder) for root in _unique(roots)]
        searched.append(str(Path(local_model_path, FLUX_DEV, folder).resolve()))
        missing.append((folder, parameter, searched))
        messages.append(f"the {title} ({folder}/) was not found. Searched: {', '.join(searched)} (the last is "
                        f"FLUX.1-dev's {folder}/ through ModelScope: {why}). Fix: pass {parameter}="
                        f"ModelConfig(path='.../{folder}') naming a {folder}/ folder, or put {folder}/ beside the "
                        f"model files.")
    if missing:
        raise TokenizerNotFoundError("\n".join(messages), missing)
    return found


# ------------------------------------------------------------------------------ vision-language processors

@dataclass(frozen=True)
class ProcessorSpec:
    """A processor (tokenizer + image processor) a vision-language model reads its input with, and where to find it:
    the from_pretrained parameter naming it, `subfolder` beside the model's files ("" for the model's own folder),
    DiffSynth-Studio's default model id (only `download_patterns` are fetched from it) and the image processor's
    arguments."""
    title: str
    parameter: str
    model_id: str
    subfolder: str
    download_patterns: tuple[str, ...]
    image_kwargs: tuple[tuple[str, int], ...] = ()


# Step1X-Edit: Qwen2.5-VL-7B-Instruct's own processor files; DiffSynth-Studio's pixel bounds (256..324 image tokens).
STEP1X_PROCESSOR = ProcessorSpec(
    "Qwen2.5-VL processor (Step1X-Edit)", "step1x_processor_config", "Qwen/Qwen2.5-VL-7B-Instruct", "",
    ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt",
     "chat_template.json"),
    (("min_pixels", 256 * 28 * 28), ("max_pixels", 324 * 28 * 28)))
# Nexus-Gen: the processor/ folder of DiffSynth-Studio/Nexus-GenV2.
NEXUS_GEN_PROCESSOR = ProcessorSpec("Nexus-Gen processor", "nexus_gen_processor_config",
                                    "DiffSynth-Studio/Nexus-GenV2", "processor/", ("processor/",))


class ProcessorNotFoundError(ModelFileError):
    """No folder holds a processor's files. `searched` lists every folder looked at."""

    def __init__(self, message: str, searched: list[str]):
        super().__init__(message)
        self.searched = searched


def missing_processor_files(folder: str | Path) -> list[str]:
    """The processor files a folder lacks: preprocessor_config.json, tokenizer_config.json and the tokenizer
    (tokenizer.json, or vocab.json + merges.txt)."""
    folder = Path(folder)
    missing = [f for f in ("preprocessor_config.json", "tokenizer_config.json") if not (folder / f).is_file()]
    bpe_files = all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not (folder / "tokenizer.json").is_file() and not bpe_files:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def processor_folder(spec: ProcessorSpec, config: ModelConfig | None, model_paths: str | list[str] | None,
                     local_model_path: str, allow_download: bool = True) -> str:
    """The folder of a processor: the config's (it must hold the files), else `<root>/<spec.subfolder>` for the first
    of the model's search roots (its folder, parent, grandparent) that holds them, else the spec's default model's
    files under `local_model_path` (downloaded unless skip_download or `allow_download=False`). Raises
    ProcessorNotFoundError naming every folder searched, what each lacks and the parameter that fixes it."""
    searched: list[str] = []
    if config is not None:
        candidates = [_folder_of(config.resolve())]
    else:
        roots = _unique(search_roots(model_paths)) if model_paths else []
        candidates = [str(root / spec.subfolder) if spec.subfolder else str(root) for root in roots]
    for folder in candidates:
        missing = missing_processor_files(folder)
        if not missing:
            return folder
        searched.append(f"{folder} (no {', '.join(missing)})")
    if config is None:
        fallback = ModelConfig(model_id=spec.model_id, origin_file_pattern=list(spec.download_patterns),
                               local_model_path=local_model_path)
        if not allow_download:
            fallback.skip_download = True
        folder = str(Path(local_model_path, spec.model_id, spec.subfolder).resolve())
        try:
            resolved = fallback.resolve()
            folder = _folder_of(resolved) if not spec.subfolder else folder
            missing = missing_processor_files(folder)
            if not missing:
                return folder
            why = f"no {', '.join(missing)}"
        except ModelFileError as e:
            why = ("skip_download is set, so it was not downloaded" if fallback.skip_download
                   else f"fetching failed: {e}")
        searched.append(f"{folder} ({spec.model_id}'s {spec.subfolder or 'files'} through ModelScope: {why})")
    raise ProcessorNotFoundError(
        f"the {spec.title} was not found. Searched: {'; '.join(searched)}. Fix: pass {spec.parameter}="
        f"ModelConfig(path='...') naming a folder with preprocessor_config.json, tokenizer_config.json and "
        f"tokenizer.json (or vocab.json + merges.txt), or put those files "
        f"{'in ' + spec.subfolder + ' ' if spec.subfolder else ''}beside the model files.", searched)


def load_processor(spec: ProcessorSpec, config: ModelConfig | None, model_paths: str | list[str] | None,
                   local_model_path: str):
    """transformers' processor from `processor_folder` (flux_core.vl_processor), with the spec's image arguments."""
    from .vl_processor import load_vl_processor
    return load_vl_processor(processor_folder(spec, config, model_paths, local_model_path), **dict(spec.image_kwargs))


def _folder_of(resolved: str | list[str]) -> str:
    return resolved if isinstance(resolved, str) else str(Path(resolved[0]).parent)


def _unique(paths: list[Path]) -> list[Path]:
    return list(dict.fromkeys(paths))
