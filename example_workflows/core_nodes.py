"""The interfaces of the ComfyUI core nodes the example workflows use, as ComfyUI declares them (node id, inputs
in widget order, outputs): what the workflow writer needs to lay out their sockets and saved widget values
without ComfyUI. Only the interface: the nodes themselves run in ComfyUI (tests run stand-ins that declare the
same interfaces, checked against these in tests/test_workflows.py).
"""
from __future__ import annotations

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def _node(inputs: dict, outputs: tuple = (), names: tuple | None = None) -> type:
    return type("CoreNode", (), {"INPUT_TYPES": classmethod(lambda cls: inputs), "RETURN_TYPES": outputs,
                                 "RETURN_NAMES": names or outputs})


def core_nodes(input_files: list[str], vae_files: list[str] = ("ae.safetensors",)) -> dict[str, type]:
    """Interface classes by node id; `input_files` are LoadImage's choices (the files in ComfyUI's input/),
    `vae_files` VAELoader's (the files in models/vae/; ComfyUI adds "pixel_space" and any TAESD it finds)."""
    return {
        "LoadImage": _node({"required": {"image": (sorted(input_files), {"image_upload": True})}}, ("IMAGE", "MASK")),
        "SaveImage": _node({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}),
        "PreviewImage": _node({"required": {"images": ("IMAGE",)},
                               "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}),
        "ImageScale": _node({"required": {
            "image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (["disabled", "center"],)}}, ("IMAGE",)),
        "ImageScaleBy": _node({"required": {
            "image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}, ("IMAGE",)),
        "SetLatentNoiseMask": _node({"required": {"samples": ("LATENT",), "mask": ("MASK",)}}, ("LATENT",)),
        "FluxGuidance": _node({"required": {"conditioning": ("CONDITIONING",), "guidance": (
            "FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}}, ("CONDITIONING",)),
        "ConditioningZeroOut": _node({"required": {"conditioning": ("CONDITIONING",)}}, ("CONDITIONING",)),
        "ReferenceLatent": _node({"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}},
                                 ("CONDITIONING",)),
        "VAELoader": _node({"required": {"vae_name": ([*vae_files, "pixel_space"],)}}, ("VAE",)),
        "VAEDecode": _node({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, ("IMAGE",)),
        "InpaintModelConditioning": _node({"required": {
            "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",), "pixels": ("IMAGE",),
            "mask": ("MASK",), "noise_mask": ("BOOLEAN", {"default": True})}},
            ("CONDITIONING", "CONDITIONING", "LATENT"), ("positive", "negative", "latent")),
    }


# ComfyUI's samplers and schedulers in 0.3.64 (comfy.samplers.KSampler.SAMPLERS / SCHEDULERS), first the ones the
# examples use.
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "deis",
            "uni_pc", "res_multistep"]
SCHEDULERS = ["simple", "normal", "karras", "exponential", "sgm_uniform", "ddim_uniform", "beta",
              "linear_quadratic", "kl_optimal"]


def native_sampling_nodes(lora_files: list[str]) -> dict[str, type]:
    """The interfaces of the core nodes that sample a native MODEL (KSampler and the model patches before it):
    workflows with them run in ComfyUI only (tests/test_comfyui_server.py), there being no stand-in for ComfyUI's
    samplers. `lora_files`: LoraLoaderModelOnly's choices (the files in models/loras/)."""
    model = ("MODEL",)
    return {
        "KSampler": _node({"required": {
            "model": model, "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                             "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLERS,), "scheduler": (SCHEDULERS,), "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}, ("LATENT",)),
        "LoraLoaderModelOnly": _node({"required": {
            "model": model, "lora_name": (sorted(lora_files),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})}}, model),
        "ModelSamplingFlux": _node({"required": {
            "model": model, "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01}),
            "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01}),
            "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 8})}}, model),
    }
