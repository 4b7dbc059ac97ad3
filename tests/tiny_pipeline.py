"""A whole tiny FLUX model folder (diffusers layout) built from the tiny components, for pipeline, CLI, node
and workflow tests:

    ref = make_diffusers_pipeline(tmp)     # diffusers FluxPipeline with tiny weights; its folder is tmp/"flux-tiny"
    ours = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(tmp / "flux-tiny"))])

Image sizes must be multiples of 16; 48x64 gives a 6x8 latent. The scheduler has no shift of its own, so an
explicit `sigmas=` schedule means the same thing to diffusers and to FluxCore.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from tests.tiny_dit import make_diffusers_dit
from tests.tiny_text import make_clip, make_t5, write_tokenizers
from tests.tiny_vae import make_diffusers_vae

FOLDER_NAME = "flux-tiny"


def make_components(tmp: Path) -> dict:
    clip_dir, t5_dir = write_tokenizers(Path(tmp) / "_tokenizers")
    return dict(
        transformer=make_diffusers_dit(seed=1), vae=make_diffusers_vae(seed=2),
        text_encoder=make_clip(seed=3), text_encoder_2=make_t5(seed=4),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir), tokenizer_2=T5TokenizerFast.from_pretrained(t5_dir),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
    )


def make_diffusers_pipeline(tmp: Path) -> FluxPipeline:
    """The reference pipeline; also saved to tmp/flux-tiny as a diffusers FLUX folder."""
    pipe = FluxPipeline(**make_components(tmp))
    pipe.save_pretrained(Path(tmp) / FOLDER_NAME)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kontext_pipeline(pipe: FluxPipeline) -> FluxKontextPipeline:
    kontext = FluxKontextPipeline(**pipe.components)
    kontext.set_progress_bar_config(disable=True)
    return kontext
