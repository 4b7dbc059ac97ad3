"""FluxCore engine: FLUX.1 models, loaders, pipeline. No ComfyUI import anywhere in this package."""
