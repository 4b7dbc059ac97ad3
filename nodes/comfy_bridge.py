"""Everything FluxCore takes from ComfyUI, in one place, with plain fallbacks when ComfyUI is absent.

Inside ComfyUI: model folders through `folder_paths`, devices and memory through `comfy.model_management`
(our models are wrapped in `ModelPatcher`s, so "Unload models" and ComfyUI's memory manager move them like
native ones, and `--cpu` is honoured), progress and previews through `comfy.utils.ProgressBar`, Cancel
through `throw_exception_if_processing_interrupted`. Standalone (tests, scripts): model folders under
$FLUXCORE_MODELS_DIR (default ./models) and the folders a test puts into `standalone_extra_folders`, the input
folder $FLUXCORE_INPUT_DIR (default ./input), CUDA if available, no progress UI, and an interrupt flag tests set.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from flux_core import demo
from flux_core.dtypes import FLOAT8_DTYPES
from flux_core.vram import stored_compute_dtype

try:  # ComfyUI present?
    import comfy.model_management as _mm
    import comfy.model_patcher as _patcher
    import comfy.utils as _utils
    import folder_paths as _folder_paths
    IN_COMFYUI = True
except ImportError:
    _mm = _patcher = _utils = _folder_paths = None
    IN_COMFYUI = False

MODEL_EXTENSIONS = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Files FluxCore reads that ComfyUI's own listing of a folder leaves out (its extension list has no .gguf; the
# folder's registration is not changed, so native loaders never offer a file they cannot read).
EXTRA_EXTENSIONS = {"diffusion_models": (".gguf",)}
# The model folders of the bundled demo model (flux_core.demo.MODELS_DIR/<name>: the first part of each of its
# files' paths), registered as extra paths.
DEMO_FOLDERS = tuple(dict.fromkeys(Path(name).parts[0] for name in (*demo.FILES.values(), demo.LORA_FILE)))
# Standalone stand-in for ComfyUI's extra model paths: folder name -> folders read after models_dir()/<name>. Empty,
# so a test sees exactly its own files; a test of the demo puts demo_folders() here, as register_demo_folders does
# inside ComfyUI.
standalone_extra_folders: dict[str, list[Path]] = {}


class Interrupted(Exception):
    """Raised standalone when `request_interrupt()` was called (ComfyUI raises its own exception)."""


_interrupt_requested = False


# ---------------------------------------------------------------- model folders
def register_model_folder(folder: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> None:
    """Make <models>/<folder> a ComfyUI model folder (for folders ComfyUI itself does not define: `ipadapter`,
    `infinite_you`, `face_embeddings`, `insightface`); an existing registration (ours from an earlier import, or
    another pack's) keeps its paths and gains our extensions. Standalone, models_dir()/<folder> is read directly."""
    if not IN_COMFYUI:
        return
    if folder in _folder_paths.folder_names_and_paths:
        paths, known = _folder_paths.folder_names_and_paths[folder]
        if known:  # an empty set means "every file" to ComfyUI: leave it
            _folder_paths.folder_names_and_paths[folder] = (paths, set(known) | set(extensions))
        return
    _folder_paths.folder_names_and_paths[folder] = ([os.path.join(_folder_paths.models_dir, folder)], set(extensions))


def demo_folders() -> dict[str, Path]:
    """The bundled demo model's folders by ComfyUI model folder name (its files: flux_core.demo.FILES)."""
    return {name: demo.MODELS_DIR / name for name in DEMO_FOLDERS}


def register_demo_folders() -> None:
    """The demo model's folders as extra paths of ComfyUI's model folders, after the user's own (not the default
    path: downloads and trained LoRAs still go to the user's folders), so its files show in the loaders' lists
    without being copied; native loaders list them too. Standalone: nothing (see standalone_extra_folders)."""
    if not IN_COMFYUI:
        return
    for name, path in demo_folders().items():
        _folder_paths.add_model_folder_path(name, str(path), is_default=False)


def models_dir() -> Path:
    return Path(os.environ.get("FLUXCORE_MODELS_DIR", "models"))


def list_models(folder: str) -> list[str]:
    """File names (relative paths) in a ComfyUI model folder such as "diffusion_models" or "loras"."""
    if IN_COMFYUI:
        names = set(_folder_paths.get_filename_list(folder))
        for root in _folder_paths.get_folder_paths(folder):
            names.update(_files_in(Path(root), EXTRA_EXTENSIONS.get(folder, ())))
        return sorted(names)
    names = set()
    for root in folder_paths_for(folder):
        if root.is_dir():
            names.update(_files_in(root, MODEL_EXTENSIONS))
            names.update(_relative(root, p) for p in _walk(root) if p.is_dir() and (p / "config.json").is_file())
    return sorted(names)


def _walk(root: Path):
    """Every file and folder under `root`, following linked folders (as ComfyUI's listing does), each real
    folder once (a link back up does not loop)."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(folder, name) for name in dirs + files)


def _files_in(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Relative names of the files under `root` (links followed) whose extension is one of `extensions`."""
    if not extensions or not root.is_dir():
        return []
    return [_relative(root, p) for p in _walk(root) if p.suffix.lower() in extensions and p.is_file()]


def _relative(root: Path, path: Path) -> str:
    return str(path.relative_to(root)).replace(os.sep, "/")


def weight_folders(folder: str) -> list[str]:
    """Sub-folders of a model folder that hold one model as a folder (its `config.json` or a shard index beside the
    weights: a transformers SigLIP / CLIP snapshot, a sharded diffusers ControlNet such as InfiniteYou's
    InfuseNetModel/). ComfyUI's own listing names files only, so a sharded model would show as its shards."""
    found = set()
    for root in folder_paths_for(folder):
        if root.is_dir():
            found.update(_relative(root, p) for p in _walk(root)
                         if p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.safetensors.index.json"))))
    return sorted(found)


class UnsafeModelName(ValueError):
    """A model file name that would reach outside its model folder (`..`, an absolute path)."""


def safe_name(folder: str, name: str) -> str:
    """`name` as a relative path inside a model folder; refuses an absolute path and `..` by name, before any
    file is touched. (ComfyUI validates combo values against the folder listing; a workflow file or an API
    prompt can still carry any string, and standalone nothing checks it.)"""
    text = str(name).replace("\\", "/")
    parts = text.split("/")
    if (not text.strip() or text.startswith("/") or Path(str(name)).is_absolute() or re.match(r"^[A-Za-z]:", text)
            or ".." in parts):
        raise UnsafeModelName(f"{name!r} is not a file name inside the {folder!r} model folder (no absolute paths, "
                              f"no '..'): pick a file listed in {folder}, or put the file there.")
    return "/".join(p for p in parts if p not in ("", "."))


def model_path(folder: str, name: str) -> str:
    """The full path of a file (or diffusers-style folder) named in a model folder. The name must stay inside
    the folder: an absolute path or `..` raise UnsafeModelName; a missing file raises FileNotFoundError. Both
    messages name the folder. Links are followed, as ComfyUI follows them: a link in a model folder was put
    there by the person who owns the machine (models kept on another disk), while a name comes from a workflow
    or an API prompt, which anyone may write."""
    relative = safe_name(folder, name)
    if IN_COMFYUI:
        full = _folder_paths.get_full_path(folder, relative)
        if full is None:
            raise FileNotFoundError(f"{name} not found in the {folder!r} model folders "
                                    f"({', '.join(_folder_paths.get_folder_paths(folder))})")
        return full
    roots = folder_paths_for(folder)
    path = next((root / relative for root in roots if (root / relative).exists()), None)
    if path is None:
        raise FileNotFoundError(f"{name} not found in {', '.join(str(root) for root in roots)}")
    return str(path)


def folder_paths_for(folder: str) -> list[Path]:
    if IN_COMFYUI:
        return [Path(p) for p in _folder_paths.get_folder_paths(folder)]
    return [models_dir() / folder, *standalone_extra_folders.get(folder, ())]


def list_diffusers_folders() -> list[str]:
    """Sub-folders of the "diffusers" model folders that hold a diffusers pipeline (model_index.json)."""
    return sorted({p.name for root in folder_paths_for("diffusers") if root.is_dir()
                   for p in root.iterdir() if (p / "model_index.json").is_file()})


def diffusers_folder_path(name: str) -> str:
    relative = safe_name("diffusers", name)
    for root in folder_paths_for("diffusers"):
        if (root / relative / "model_index.json").is_file():
            return str(root / relative)
    raise FileNotFoundError(f"{name} is not a diffusers folder (with model_index.json) in "
                            f"{', '.join(str(r) for r in folder_paths_for('diffusers'))}")


def output_directory() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_output_directory())
    return Path(os.environ.get("FLUXCORE_OUTPUT_DIR", "output"))


def input_directory() -> Path:
    if IN_COMFYUI:
        return Path(_folder_paths.get_input_directory())
    return Path(os.environ.get("FLUXCORE_INPUT_DIR", "input"))


def comfy_tokenizer_dirs() -> tuple[Path | None, Path | None]:
    """ComfyUI ships FLUX's tokenizers (CLIP-L vocab and T5 tokenizer.json) inside its source tree."""
    if not IN_COMFYUI:
        return None, None
    import comfy
    root = Path(list(comfy.__path__)[0])  # a namespace package in ComfyUI: no __file__
    clip, t5 = root / "sd1_tokenizer", root / "text_encoders" / "t5_tokenizer"
    return (clip if clip.is_dir() else None), (t5 if t5.is_dir() else None)


# ---------------------------------------------------------------- devices and memory
def compute_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if IN_COMFYUI:
        return _mm.unet_offload_device()
    return torch.device("cpu")


class _PatcherModel(nn.Module):
    """What a ModelPatcher holds: ComfyUI writes bookkeeping attributes (`device`, ...) on the module it
    manages, which our models expose as read-only properties, so it gets this container instead."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module
        self.device = offload_device()
        self.manual_cast_dtype = None  # set_model_compute_dtype patches it (ManagedModel.step_patcher)


class ManagedModel:
    """A flux_core module that ComfyUI's memory manager can load and unload like its own models. `patcher`: the
    ModelPatcher that owns it, when it has one already (a DiT's native container, nodes/native_model.py)."""

    def __init__(self, module: nn.Module, patcher=None):
        self.module = module
        self.patcher = patcher if patcher is not None else (
            _patcher.ModelPatcher(_PatcherModel(module), load_device=compute_device(),
                                  offload_device=offload_device()) if IN_COMFYUI else None)
        self._cast_patcher = None

    def step_patcher(self):
        """The patcher ComfyUI loads for this model when it computes at every step of a native MODEL (a ControlNet,
        Step1X-Edit's connector): weights stored in FP8 are cast per call to the model's compute dtype (ComfyUI's
        manual cast; FluxCore's own sampler gives such a model a VRAM manager instead). None standalone."""
        if self.patcher is None or not any(p.dtype in FLOAT8_DTYPES for p in self.module.parameters()):
            return self.patcher
        if self._cast_patcher is None:
            self._cast_patcher = self.patcher.clone()
            self._cast_patcher.set_model_compute_dtype(stored_compute_dtype(self.module))
        return self._cast_patcher


def take_back_weights(model: ManagedModel) -> None:
    """Before FluxCore places a module's weights itself (its VRAM manager: FP8 storage, offload): ComfyUI unloads every
    clone of its container it holds (a native MODEL), which takes their weight patches (a native LoRA) off and leaves
    no record of the module as loaded. (Loading the container with `ready` hands over within ComfyUI instead.)"""
    if not IN_COMFYUI or model.patcher is None:
        return
    for loaded in [m for m in _mm.current_loaded_models if m.model.is_clone(model.patcher)]:
        loaded.model_unload()
        _mm.current_loaded_models.remove(loaded)
    applied = getattr(model.patcher.model, "current_weight_patches_uuid", None)
    if applied is not None:  # patched but not in ComfyUI's list (its manager dropped the record)
        model.patcher.detach(unpatch_all=True)


@contextlib.contextmanager
def models_kept_loaded():
    """Run a block that loads models of its own (an encoder, a VAE) while a native MODEL is sampling, as ComfyUI's own
    ControlNet encodes its hint: the models in use are loaded again afterwards as ComfyUI loads them for sampling (a
    partial load stays partial), with the ManagedModels the block adds to the yielded list."""
    also: list[ManagedModel] = []
    if not IN_COMFYUI:
        yield also
        return
    in_use = _mm.loaded_models(only_currently_used=True)
    try:
        yield also
    finally:
        _mm.load_models_gpu(in_use + [m.step_patcher() for m in also if m.patcher is not None])


def blocked_output(message: str):
    """An output that stops every node it reaches with `message` (ComfyUI's ExecutionBlocker: for an output a node
    cannot give this time, such as a GGUF DiT's MODEL); None standalone or in a ComfyUI without it."""
    if not IN_COMFYUI:
        return None
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ImportError:
        return None
    return ExecutionBlocker(message)


def make_castable(module: nn.Module) -> nn.Module:
    """Inside ComfyUI: the module's torch layers become ComfyUI's castable ones of the same name (comfy.ops'
    disable_weight_init: the same parameters and forward, until ComfyUI's loader makes a layer cast its weights per
    call: a partial "lowvram" load leaves none behind on the CPU). Standalone: unchanged."""
    if IN_COMFYUI:
        import comfy.ops
        for m in module.modules():
            if type(m) in CASTABLE_LAYERS:
                m.__class__ = getattr(comfy.ops.disable_weight_init, type(m).__name__)
    return module


# The torch layers made castable (ComfyUI's cast reads a layer's weight and bias: not Embedding, which has no bias;
# a union ControlNet's small mode embedding stays a plain module, which ComfyUI loads whole).
CASTABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm)


def ready(*models: ManagedModel) -> None:
    """Put the modules on the compute device (ComfyUI may first unload other models to make room)."""
    if IN_COMFYUI:
        _mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
    else:
        for m in models:
            m.module.to(compute_device())


def free_memory(nbytes: int) -> None:
    """Make ComfyUI unload its own models until `nbytes` are free on the compute device (for weights that
    flux_core.vram places itself, which ComfyUI does not count). Standalone: nothing to do."""
    if IN_COMFYUI:
        _mm.free_memory(nbytes, compute_device())


# ---------------------------------------------------------------- progress and interrupt
def check_interrupt() -> None:
    """Stop promptly when the user pressed Cancel (standalone: when `request_interrupt()` was called)."""
    global _interrupt_requested
    if IN_COMFYUI:
        _mm.throw_exception_if_processing_interrupted()
    elif _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("processing interrupted")


def request_interrupt() -> None:
    global _interrupt_requested
    _interrupt_requested = True


class Progress:
    """ComfyUI's progress bar (with an optional preview image per step); records updates when standalone."""

    def __init__(self, total: int):
        self.total = total
        self.updates: list[tuple[int, object]] = []
        self.bar = _utils.ProgressBar(total) if IN_COMFYUI else None

    def update(self, value: int, preview=None) -> None:
        self.updates.append((value, preview))
        if self.bar is not None:
            self.bar.update_absolute(value, self.total, preview)


sent_events: list[tuple[str, dict]] = []   # standalone: what send_ui_event would have sent (tests read it)


def send_ui_event(event: str, data: dict) -> None:
    """Push a message to the browser, where a front-end extension listens for `event` (PromptServer.send_sync);
    standalone, the message is recorded in `sent_events` (the last 1000)."""
    if IN_COMFYUI:
        from server import PromptServer
        PromptServer.instance.send_sync(event, data)
        return
    sent_events.append((event, data))
    del sent_events[:-1000]


def latent_previewer():
    """f(scaled FLUX latent (B, 16, h, w)) -> a preview for Progress.update, following the user's ComfyUI preview
    setting (TAESD or latent-to-RGB); None standalone or when previews are off."""
    if not IN_COMFYUI:
        return None
    import comfy.latent_formats
    import latent_preview
    previewer = latent_preview.get_previewer(compute_device(), comfy.latent_formats.Flux())
    if previewer is None:
        return None
    return lambda latents: previewer.decode_latent_to_preview_image("JPEG", latents)
