"""FluxCore's bundled demo model: FLUX.1's architecture at tiny widths, trained by `python -m flux_core.demo.build`
(dataset, VAE, DiT through `python -m flux_core.train`, the stripes LoRA) on coloured shapes (flux_core.demo.scenes).
It ships inside the package and loads through the normal loaders:

    pipe = FluxImagePipeline.from_demo()
    pipe(prompt="a red circle on a blue background", seed=0).save("demo.png")

The files sit in ComfyUI's folder names under `models/`, which the node pack registers as extra model folders:

    models/diffusion_models/fluxcore_demo_dit.safetensors + config.json   (RoPE axes: the shapes cannot tell them)
    models/vae/fluxcore_demo_vae.safetensors + config.json                (GroupNorm groups, latent scale and shift)
    models/text_encoders/fluxcore_demo_clip_l.safetensors, fluxcore_demo_t5.safetensors, tokenizer/, tokenizer_2/
    models/loras/fluxcore_demo_stripes.safetensors                        (kohya format: draws shapes striped)
    datasets/fluxcore_demo_stripes/                                       (the LoRA's images + metadata.csv)
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models"
DATASETS_DIR = HERE / "datasets"
# slot -> file under MODELS_DIR (ComfyUI's folder name first)
FILES = {"dit": "diffusion_models/fluxcore_demo_dit.safetensors",
         "vae": "vae/fluxcore_demo_vae.safetensors",
         "clip": "text_encoders/fluxcore_demo_clip_l.safetensors",
         "t5": "text_encoders/fluxcore_demo_t5.safetensors"}
LORA_FILE = "loras/fluxcore_demo_stripes.safetensors"
STRIPES_DATASET = "fluxcore_demo_stripes"
# The prompt and command line that show FluxCore working with nothing downloaded (README; offline errors name it).
PROMPT = "a red circle on a blue background"
DEMO_COMMAND = f'python -m flux_core generate --demo --prompt "{PROMPT}" --output demo.png'
# The size the demo DiT was trained at (flux_core.demo.scenes.SIZE): its pictures at other sizes are not trained.
HEIGHT = WIDTH = 128


def model_path(slot: str) -> Path:
    return MODELS_DIR / FILES[slot]


def lora_path() -> Path:
    return MODELS_DIR / LORA_FILE


def stripes_dataset() -> Path:
    return DATASETS_DIR / STRIPES_DATASET


def shipped_files() -> list[Path]:
    """Every file the package ships for the demo: the models and the datasets (pyproject's package-data)."""
    return sorted(p for folder in (MODELS_DIR, DATASETS_DIR) for p in folder.rglob("*") if p.is_file())


def missing_files() -> list[str]:
    """The demo files this installation lacks (an install that dropped package data), as paths."""
    text = MODELS_DIR / "text_encoders"
    wanted = [model_path(slot) for slot in FILES] + [
        lora_path(), model_path("dit").parent / "config.json", model_path("vae").parent / "config.json",
        text / "tokenizer" / "tokenizer_config.json", text / "tokenizer_2" / "tokenizer_config.json"]
    return [str(p) for p in wanted if not p.exists()]


def model_configs():
    """The demo's ModelConfigs for FluxImagePipeline.from_pretrained (each states its kind)."""
    from ..model_config import ModelConfig
    return [ModelConfig(path=str(model_path(slot)), kind=slot) for slot in FILES]


def missing_files_message(missing: list[str]) -> str:
    """The error of a demo model whose files this installation lacks (an install that dropped package data)."""
    return (f"FluxImagePipeline.from_demo(): the bundled demo model's files are missing from this installation: "
            f"{', '.join(missing)}. Reinstall FluxCore with its package data (from a checkout: `pip install "
            f"--force-reinstall .`; the ComfyUI node pack: update or clone it again), or regenerate them with "
            f"`python -m flux_core.demo.build`.")
