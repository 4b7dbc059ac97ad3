"""FluxCore engine: FLUX.1 models, loaders, pipeline. No ComfyUI import anywhere in this package."""
from .controlnet import ControlNetInput
from .loading.loader import load_model, load_models
from .model_config import ModelConfig
from .pipeline import FluxImagePipeline

__all__ = ["ControlNetInput", "FluxImagePipeline", "ModelConfig", "load_model", "load_models"]
