"""Loader nodes: the DiT, the text encoders (+ tokenizers), the VAE, or all of them from a diffusers folder."""
from __future__ import annotations

from pathlib import Path

import torch

from flux_core.dtypes import WEIGHT_DTYPES
from flux_core.loading.loader import load_model
from flux_core.model_config import FLUX_DEV, ModelConfig
from flux_core.model_state import state_of
from flux_core.models.text_encoders import TokenizerFilesError, load_clip_tokenizer, load_t5_tokenizer
from flux_core.pipeline_models import DIFFUSERS_COMPONENTS, TokenizerNotFoundError, tokenizer_folders

from . import comfy_bridge as bridge
from .handles import DIT_TYPE, TEXT_ENCODERS_TYPE, VAE_TYPE, DiTHandle, TextEncodersHandle, VAEHandle

bridge.register_demo_folders()  # the bundled demo model in every loader's list (flux_core.demo)


class NodeInputError(ValueError):
    """A node input that cannot be used; the message names the node, the input and the fix."""


def node_error(node: str, input_name: str, error: Exception) -> NodeInputError:
    return NodeInputError(f"{node}, input '{input_name}': {error}")


def default_dtype() -> torch.dtype:
    """bf16 on an accelerator (FLUX's native precision); float32 on the CPU, where bf16 matmuls are slow."""
    return torch.float32 if bridge.compute_device().type == "cpu" else torch.bfloat16


# The spelling FluxCore used for FP8 storage before it took ComfyUI UNETLoader's (flux_core.dtypes.WEIGHT_DTYPES).
# Workflows saved then still load: validation accepts these names and the nodes read them as the new ones.
LEGACY_WEIGHT_DTYPES = {"float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}


def weight_dtype_choice(node: str, value: str) -> str:
    """A weight_dtype input as a WEIGHT_DTYPES key (an old spelling migrated); anything else refused by name."""
    value = LEGACY_WEIGHT_DTYPES.get(value, value)
    if value not in WEIGHT_DTYPES:
        raise NodeInputError(f"{node}, input 'weight_dtype': {value!r} is not one of {', '.join(WEIGHT_DTYPES)}.")
    return value


def validate_weight_dtype(value) -> bool | str:
    """For a node's VALIDATE_INPUTS: ComfyUI then skips its own check of the combo against the current choices,
    so a workflow saved with an old spelling is accepted (and migrated by the node)."""
    if value in WEIGHT_DTYPES or value in LEGACY_WEIGHT_DTYPES:
        return True
    return f"weight_dtype {value!r} is not one of {', '.join(WEIGHT_DTYPES)}"


def load_kind(node: str, input_name: str, source, kind: str, weight_dtype: torch.dtype | None = None):
    """load_model for a node: errors name the node and input; nothing is kept from a failed load."""
    try:
        return load_model(source, torch_dtype=default_dtype(), device=bridge.offload_device(), kind=kind,
                          weight_dtype=weight_dtype)
    except (ValueError, FileNotFoundError) as e:
        raise node_error(node, input_name, e) from None


def modelscope_source(node: str, spec: str, folder: str) -> str | list[str]:
    """"model_id:origin_file_pattern" -> local path(s), downloading into the ComfyUI model folder if needed."""
    model_id, _, pattern = spec.strip().partition(":")
    if not model_id or not pattern:
        raise NodeInputError(f"{node}, input 'modelscope_id': write it as 'model_id:file pattern', e.g. "
                             f"'{FLUX_DEV}:flux1-dev.safetensors' (got {spec!r}).")
    try:  # the download lands in <folder>/<model_id>/<pattern>: neither part may lead out of the model folder
        bridge.safe_name(folder, model_id.strip())
        bridge.safe_name(folder, pattern.strip())
    except bridge.UnsafeModelName as e:
        raise node_error(node, "modelscope_id", e) from None
    base = bridge.folder_paths_for(folder)[0]
    config = ModelConfig(model_id=model_id, origin_file_pattern=pattern, local_model_path=str(base))
    try:
        return config.resolve()
    except FileNotFoundError as e:
        why = ("downloads are off ($DIFFSYNTH_SKIP_DOWNLOAD)" if config.skip_download
               else f"the download failed: {e.__cause__}" if e.__cause__ is not None
               else f"ModelScope's '{model_id.strip()}' has no file matching it")
        raise NodeInputError(f"{node}, input 'modelscope_id': no file matches '{pattern.strip()}' in "
                             f"{config.model_folder()}, and {why}. Check the id and the file pattern, or put the file "
                             f"into {base} and pick it in the file list.") from None


def tokenizer_dirs(clip_file: str | Path, t5_file: str | Path) -> tuple[Path | None, Path | None]:
    """FLUX's tokenizer folders for a CLIP-L and a T5 file (or model folder), each the first found of:
    tokenizer/ beside the CLIP file and tokenizer_2/ beside the T5 file (the model's own: the bundled demo's sit
    beside its encoders, its T5 tokenizer 32 tokens long); tokenizer/ and tokenizer_2/ in a text_encoders folder,
    never the demo's (its tokenizers fit only its own encoders, found beside them); the copies inside ComfyUI.
    None: none here (the caller fetches FLUX.1-dev's from ModelScope)."""
    demo_folder = bridge.demo_folders()["text_encoders"].resolve()
    folders = [f for f in bridge.folder_paths_for("text_encoders") if f.resolve() != demo_folder]
    found = []
    for sub, model, bundled in zip(("tokenizer", "tokenizer_2"), (clip_file, t5_file), bridge.comfy_tokenizer_dirs()):
        own = Path(model).parent / sub
        found.append(own if own.is_dir() else next((f / sub for f in folders if (f / sub).is_dir()), bundled))
    return found[0], found[1]


def find_tokenizers(node: str, clip_file: str | Path, t5_file: str | Path) -> tuple[object, object]:
    """The tokenizers for a CLIP-L and a T5 file (tokenizer_dirs), else FLUX.1-dev's from ModelScope (downloaded
    once into the first text_encoders folder)."""
    folders = bridge.folder_paths_for("text_encoders")
    local = dict(zip(("tokenizer", "tokenizer_2"), tokenizer_dirs(clip_file, t5_file)))
    try:  # the ones found nowhere here, in one request (and one message naming both)
        fetched = tokenizer_folders({sub: None for sub, path in local.items() if path is None}, [], str(folders[0]))
        paths = {sub: str(path) if path else fetched[sub] for sub, path in local.items()}
        return load_clip_tokenizer(paths["tokenizer"]), load_t5_tokenizer(paths["tokenizer_2"])
    except TokenizerNotFoundError as e:  # nowhere here, and the ModelScope fallback failed too
        beside = {"tokenizer": Path(clip_file).parent, "tokenizer_2": Path(t5_file).parent}
        where = ", ".join(str(f) for f in folders)
        places = "; ".join(f"{sub}/ is neither beside the file ({beside[sub]}) nor in any of {where}, nor at "
                           f"{', '.join(searched)}" for sub, _, searched in e.missing)
        raise NodeInputError(f"{node}: FLUX tokenizers not found: {places}. Put FLUX.1-dev's tokenizer/ and "
                             f"tokenizer_2/ folders into {folders[0]}, or let the node download them (network).") from None
    except TokenizerFilesError as e:  # a tokenizer folder without the files a tokenizer needs
        raise NodeInputError(f"{node}: the {e.title} tokenizer folder {e.folder} holds no complete set of tokenizer "
                             f"files (it needs {e.expected}). Replace it with FLUX.1-dev's folder of that name, or "
                             f"remove it to use ComfyUI's bundled tokenizers.") from None


def _model_output(handle: DiTHandle):
    """The loader's MODEL output: the DiT as a native MODEL; for a DiT without a native container (a GGUF file) an
    output that stops the nodes it feeds with the reason (None outside ComfyUI)."""
    from .native_model import model_refusals, native_model
    problems = model_refusals(handle)
    if problems:
        return bridge.blocked_output("FluxCoreDiTLoader, output 'MODEL': " + "; ".join(problems) + ".")
    return native_model(handle)


class FluxCoreDiTLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (DIT_TYPE, "MODEL")
    RETURN_NAMES = ("model", "MODEL")
    OUTPUT_TOOLTIPS = ("The DiT for FLUX Sampler (FluxCore) and FluxCore's model nodes.",
                       "The same DiT as a native MODEL, for KSampler and ComfyUI's model nodes (FluxCore adapters "
                       "still apply through the conditioning).")
    FUNCTION = "load"
    DESCRIPTION = "Loads a FLUX.1 DiT (dev, Krea-dev, Kontext-dev, ...) in any published layout."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (bridge.list_models("diffusion_models") or ["(none found)"],
                             {"tooltip": "FLUX DiT file from models/diffusion_models (or unet): BFL, ComfyUI "
                                         "(scaled fp8 too), diffusers or DiffSynth layout, or a GGUF file (kept "
                                         "quantized); fp8 files are cast on load."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "tooltip": "default: bf16 on GPU, float32 on CPU. fp8_*: weight matrices stored in FP8 (half the "
                               "memory), computed in bf16; LoRAs keep full strength (applied unfused)."}),
            },
            "optional": {
                "modelscope_id": ("STRING", {"default": "", "tooltip": "Instead of dit_name: 'model_id:file', e.g. "
                                             f"'{FLUX_DEV}:flux1-dev.safetensors', downloaded through ModelScope."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, weight_dtype="default"):
        return validate_weight_dtype(weight_dtype)

    def load(self, dit_name, weight_dtype="default", modelscope_id=""):
        node = "FluxCoreDiTLoader"
        weight_dtype = weight_dtype_choice(node, weight_dtype)
        if modelscope_id.strip():
            source, label = modelscope_source(node, modelscope_id, "diffusion_models"), modelscope_id.strip()
        else:
            source, label = model_file(node, "dit_name", "diffusion_models", dit_name), dit_name
        module = load_kind(node, "modelscope_id" if modelscope_id.strip() else "dit_name", source, "dit",
                           WEIGHT_DTYPES[weight_dtype])
        state_of(module).fp8_on_load = WEIGHT_DTYPES[weight_dtype] is not None
        from .native_model import managed_dit  # it imports this module's NodeInputError
        handle = DiTHandle(managed_dit(module), label)
        return (handle, _model_output(handle))


class FluxCoreTextEncoderLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (TEXT_ENCODERS_TYPE,)
    RETURN_NAMES = ("text_encoders",)
    FUNCTION = "load"
    DESCRIPTION = "Loads CLIP-L and T5-XXL (fp16, fp8 or scaled fp8 files) with FLUX's tokenizers."

    @classmethod
    def INPUT_TYPES(cls):
        files = bridge.list_models("text_encoders") or ["(none found)"]
        return {"required": {
            "clip_name": (files, {"tooltip": "CLIP-L file from models/text_encoders (or clip), e.g. clip_l.safetensors."}),
            "t5_name": (files, {"tooltip": "T5-XXL encoder file from models/text_encoders, e.g. t5xxl_fp16.safetensors."}),
        }}

    def load(self, clip_name, t5_name):
        node = "FluxCoreTextEncoderLoader"
        # The cheap checks first: both names and the tokenizers, before gigabytes of T5 are read.
        clip_file = model_file(node, "clip_name", "text_encoders", clip_name)
        t5_file = model_file(node, "t5_name", "text_encoders", t5_name)
        clip_tok, t5_tok = find_tokenizers(node, clip_file, t5_file)
        clip = load_kind(node, "clip_name", clip_file, "clip")
        t5 = load_kind(node, "t5_name", t5_file, "t5")
        return (TextEncodersHandle(bridge.ManagedModel(clip), bridge.ManagedModel(t5), clip_tok, t5_tok,
                                   f"{clip_name} + {t5_name}"),)


class FluxCoreVAELoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (VAE_TYPE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"
    DESCRIPTION = "Loads FLUX's 16-channel VAE (ae.safetensors or a diffusers vae/ folder)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (bridge.list_models("vae") or ["(none found)"],
                                          {"tooltip": "FLUX VAE from models/vae, e.g. ae.safetensors."})}}

    def load(self, vae_name):
        node = "FluxCoreVAELoader"
        module = load_kind(node, "vae_name", model_file(node, "vae_name", "vae", vae_name), "vae")
        return (VAEHandle(bridge.ManagedModel(module), vae_name),)


class FluxCoreDiffusersLoader:
    CATEGORY = "FluxCore/loaders"
    RETURN_TYPES = (DIT_TYPE, TEXT_ENCODERS_TYPE, VAE_TYPE)
    RETURN_NAMES = ("model", "text_encoders", "vae")
    FUNCTION = "load"
    DESCRIPTION = "Loads every FLUX component of a diffusers folder (transformer/, text_encoder(_2)/, vae/, tokenizers)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": (bridge.list_diffusers_folders() or ["(none found)"],
                                        {"tooltip": "A diffusers FLUX folder (with model_index.json) in models/diffusers."})}}

    def load(self, folder):
        node = "FluxCoreDiffusersLoader"
        try:
            root = Path(bridge.diffusers_folder_path(folder))
        except (FileNotFoundError, bridge.UnsafeModelName) as e:
            raise node_error(node, "folder", e) from None
        parts = {}
        for kind, sub in DIFFUSERS_COMPONENTS.items():
            if not (root / sub).is_dir():
                raise NodeInputError(f"{node}, input 'folder': {root} has no {sub}/ folder; it is not a full FLUX "
                                     f"diffusers folder.")
            module = load_kind(node, "folder", root / sub, kind)
            if kind == "dit":
                from .native_model import managed_dit
                parts[kind] = managed_dit(module)
            else:
                parts[kind] = bridge.ManagedModel(module)
        try:
            clip_tok, t5_tok = load_clip_tokenizer(root / "tokenizer"), load_t5_tokenizer(root / "tokenizer_2")
        except FileNotFoundError as e:
            raise node_error(node, "folder", e) from None
        return (DiTHandle(parts["dit"], folder), TextEncodersHandle(parts["clip"], parts["t5"], clip_tok, t5_tok, folder),
                VAEHandle(parts["vae"], folder))


def model_file(node: str, input_name: str, folder: str, name: str) -> str:
    """The full path of a model file picked in a loader, or the node's error naming the input."""
    try:
        return bridge.model_path(folder, name)
    except (FileNotFoundError, bridge.UnsafeModelName) as e:
        raise node_error(node, input_name, e) from None


def list_models_and_folders(folder: str) -> list[str]:
    """The model folders of a model folder (bridge.weight_folders) and its files (as bridge.list_models gives them) but
    those inside a model folder: a shard or half of a snapshot is not a model to pick."""
    folders = bridge.weight_folders(folder)
    files = [f for f in bridge.list_models(folder) if not any(f.startswith(d + "/") for d in folders)]
    return sorted(set(files) | set(folders))


def model_or_folder_path(node: str, input_name: str, folder: str, name: str) -> str:
    """The full path of a file or of a model folder named in a model folder (list_models_and_folders); the name
    must stay inside the model folder, as for files."""
    try:
        return bridge.model_path(folder, name)
    except bridge.UnsafeModelName as e:
        raise node_error(node, input_name, e) from None
    except FileNotFoundError as e:  # inside ComfyUI model_path finds files only
        relative = bridge.safe_name(folder, name)
        for root in bridge.folder_paths_for(folder):
            if (root / relative).is_dir():
                return str(root / relative)
        raise node_error(node, input_name, e) from None


NODE_CLASS_MAPPINGS = {
    "FluxCoreDiTLoader": FluxCoreDiTLoader,
    "FluxCoreTextEncoderLoader": FluxCoreTextEncoderLoader,
    "FluxCoreVAELoader": FluxCoreVAELoader,
    "FluxCoreDiffusersLoader": FluxCoreDiffusersLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxCoreDiTLoader": "Load FLUX DiT (FluxCore)",
    "FluxCoreTextEncoderLoader": "Load FLUX Text Encoders (FluxCore)",
    "FluxCoreVAELoader": "Load FLUX VAE (FluxCore)",
    "FluxCoreDiffusersLoader": "Load FLUX Diffusers Folder (FluxCore)",
}
