"""Step1X-Edit nodes: loaders from a ComfyUI models folder, the encode node's CONDITIONING, and a sampler run equal to
the pipeline's Step1X-Edit run (tests/test_step1x.py checks the pipeline against DiffSynth-Studio)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_core.vram import compute_place
from nodes.conditioning import TEXT_KEY, EncodedText
from nodes.loaders import FluxCoreDiTLoader, FluxCoreVAELoader, NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from nodes.step1x_nodes import (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FluxCoreQwenVLLoader,
                                FluxCoreStep1XConnectorLoader, FluxCoreStep1XEncode)
from tests.test_step1x import STEP1X_DIT, step1x_file, tiny_reference_connector
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_qwen_vl import make_processor, make_qwen_vl, sample_image, write_qwen_vl_folder
from tests.tiny_vae import make_diffusers_vae, write_diffusers_folder

H, W = 48, 64
DIT_FILE, QWEN, VAE = "step1x-edit-i1258.safetensors", "Qwen2.5-VL-7B-Instruct", "tiny-vae"
PROMPT, NEGATIVE = 'make the sign say "OPEN"', "blurry"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step1x_nodes")
    models_dir = tmp / "models"
    (models_dir / "diffusion_models").mkdir(parents=True)
    step1x_file(models_dir / "diffusion_models" / DIT_FILE, make_diffusers_dit(seed=1, **STEP1X_DIT),
                tiny_reference_connector(in_channels=16, hidden=32, heads=32))
    write_qwen_vl_folder(make_qwen_vl(seed=2, conditional_generation=True), models_dir / "text_encoders" / QWEN)
    write_diffusers_folder(make_diffusers_vae(seed=4), models_dir / "vae" / VAE)
    (models_dir / "text_encoders" / "no-processor").mkdir()
    write_qwen_vl_folder(make_qwen_vl(seed=2), models_dir / "text_encoders" / "no-processor", with_processor=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    loaded = dict(dir=models_dir, dit=FluxCoreDiTLoader().load(DIT_FILE)[0],
                  connector=FluxCoreStep1XConnectorLoader().load(DIT_FILE)[0],
                  qwen=FluxCoreQwenVLLoader().load(QWEN)[0], vae=FluxCoreVAELoader().load(VAE)[0])
    yield loaded
    mp.undo()


def comfy_image(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def test_nodes_are_listed_with_tooltips_and_the_qwen_folder_is_offered(models):
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for cls in NODE_CLASS_MAPPINGS.values():
        for spec in cls.INPUT_TYPES()["required"].values():
            assert spec[1].get("tooltip")
    assert QWEN in FluxCoreQwenVLLoader.INPUT_TYPES()["required"]["qwen_vl_name"][0]
    assert DIT_FILE in FluxCoreStep1XConnectorLoader.INPUT_TYPES()["required"]["connector_name"][0]


def test_encode_gives_native_conditioning_with_the_encoder_output(models):
    image = sample_image(W, H)
    conditioning, = FluxCoreStep1XEncode().encode(models["qwen"], models["connector"], models["vae"],
                                                  comfy_image(image), PROMPT)
    tokens, extra = conditioning[0]
    encoded = extra[TEXT_KEY]
    assert isinstance(encoded, EncodedText) and encoded.step_models == (models["connector"],)
    assert tokens.shape == (1, 640, 32) and extra["pooled_output"].shape == (1, 768)
    want = models["vae"].model.module.encode(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
                                             .permute(2, 0, 1)[None])
    assert torch.allclose(encoded.reference_latents[0], want, atol=1e-6)


def pipeline_latent(models, image, steps, cfg):
    """The pipeline's Step1X-Edit run with the nodes' models and the tiny processor."""
    from flux_core.pipeline import FluxImagePipeline
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.vae = models["dit"].model.module, models["vae"].model.module
    pipe.qwenvl, pipe.step1x_connector = models["qwen"].model.module, models["connector"].model.module
    pipe.qwenvl_processor = make_processor()
    with torch.no_grad():
        scaled = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=cfg, step1x_reference_image=image,
                      height=H, width=W, seed=3, num_inference_steps=steps, sigma_shift=3.0, output_type="latent",
                      progress_bar_cmd=None)
    return pipe.vae.to_comfy_latent(scaled)


@pytest.mark.slow
def test_sampler_run_equals_the_pipelines_step1x_run(models):
    image = sample_image(W, H)
    encode = FluxCoreStep1XEncode().encode
    positive, = encode(models["qwen"], models["connector"], models["vae"], comfy_image(image), PROMPT)
    negative, = encode(models["qwen"], models["connector"], models["vae"], comfy_image(image), NEGATIVE)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    got = FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=3, steps=2, cfg=6.0,
                                   sigma_shift=3.0)[0]["samples"]
    want = pipeline_latent(models, image, steps=2, cfg=6.0)
    # measured 0 (one code path: the same encoder, connector and reference tokens); without the reference latent
    # the result moves by > 1e-2
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_qwen_folder_without_processor_files_is_named(models):
    with pytest.raises(NodeInputError, match=r"FluxCoreQwenVLLoader, input 'qwen_vl_name'.*preprocessor_config.json"):
        FluxCoreQwenVLLoader().load("no-processor")


def test_the_connector_loader_refuses_a_file_without_a_connector(models, tmp_path):
    from tests.tiny_dit import write_bfl_dit
    write_bfl_dit(make_diffusers_dit(seed=1, **STEP1X_DIT), models["dir"] / "diffusion_models" / "plain.safetensors")
    with pytest.raises(NodeInputError, match=r"FluxCoreStep1XConnectorLoader, input 'connector_name'.*Step1X-Edit "
                                             r"connector"):
        FluxCoreStep1XConnectorLoader().load("plain.safetensors")


def test_models_load_on_the_cpu_in_float32_standalone(models):
    assert compute_place(models["qwen"].model.module) == (torch.device("cpu"), torch.float32)
