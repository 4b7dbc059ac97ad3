"""Load Nexus-Gen / Load Nexus-Gen Adapter / Nexus-Gen Encode (FluxCore) and FluxCore's sampler on them, on tiny
models: the same latents as FluxImagePipeline with the same files (our library, which tests/test_nexus_gen.py checks
against DiffSynth-Studio's own code; here the node layer is checked against it), text-to-image and editing, and every
error naming the node and the input."""
import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.model_config import ModelConfig
from flux_core.models.nexus_gen import NexusGenAdapter, NexusGenAutoregressiveModel, NexusGenImageEmbeddingMerger
from flux_core.pipeline import FluxImagePipeline
from nodes.conditioning import TEXT_KEY, FluxCoreTextEncode
from nodes.loaders import FluxCoreDiTLoader, NodeInputError
from nodes.nexus_gen_nodes import (NODE_CLASS_MAPPINGS, FluxCoreNexusGenAdapterLoader, FluxCoreNexusGenEncode,
                                   FluxCoreNexusGenLoader)
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir
from tests.tiny_nexus_gen import make_ar, write_nexus_gen_files
from tests.tiny_qwen_vl import sample_image

H, W = 48, 64          # latent 6x8
LT = 16                # t5_sequence_length of the negative prompt
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
AR_NAME, GENERATION, EDITING = "Nexus-GenV2", "nexus/generation_decoder.bin", "nexus/edit_decoder.bin"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ComfyUI models folder with the tiny FLUX parts, Nexus-GenV2's folder in text_encoders and its decoders in
    diffusion_models/nexus/; the node-loaded models and pipelines from the same files."""
    tmp = tmp_path_factory.mktemp("comfy_nexus")
    models_dir, ref = make_models_dir(tmp)
    files = write_nexus_gen_files(models_dir / "diffusion_models" / "nexus", ref.transformer,
                                  models_dir / "text_encoders" / AR_NAME, make_ar())
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    flux = [ModelConfig(path=str(models_dir / sub)) for sub in
            ("vae/" + NAMES["vae"], "text_encoders/" + NAMES["clip"], "text_encoders/" + NAMES["t5"])]

    def pipe(decoder):
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(decoder)), ModelConfig(path=str(files["ar_folder"])), *flux])
    yield dict(dir=models_dir, files=files, pipes={"generation": pipe(files["generation"]),
                                                   "editing": pipe(files["editing"])}, **loaded)
    mp.undo()


def image_tensor(pil: Image.Image) -> torch.Tensor:
    """A PIL image as the ComfyUI IMAGE LoadImage gives: (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255)[None]


def sample(dit, positive, negative, cfg=2.0, steps=2):
    latent = FluxCoreEmptyLatent().generate(W, H, 1)[0]
    return FluxCoreSampler().sample(dit, positive, negative, latent, seed=3, steps=steps, cfg=cfg)[0]["samples"]


def pipeline_latent(models, task, cfg=2.0, steps=2, **kwargs):
    """The pipeline's final latent as raw VAE latent (what the sampler's LATENT holds)."""
    with torch.no_grad():
        scaled = models["pipes"][task](prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=cfg, height=H, width=W,
                                       seed=3, num_inference_steps=steps, t5_sequence_length=LT,
                                       output_type="latent", progress_bar_cmd=None, **kwargs)
    return models["vae"].model.module.to_comfy_latent(scaled)


def test_the_nodes_are_declared_with_tooltips():
    assert set(NODE_CLASS_MAPPINGS) == {"FluxCoreNexusGenLoader", "FluxCoreNexusGenAdapterLoader",
                                        "FluxCoreNexusGenEncode"}
    for cls in NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY.startswith("FluxCore/")
        spec = cls.INPUT_TYPES()
        for name, (_, options) in {**spec["required"], **spec.get("optional", {})}.items():
            assert options.get("tooltip"), name
    assert FluxCoreNexusGenEncode.INPUT_TYPES()["optional"]["image"][0] == "IMAGE"


def test_loaders_find_the_published_files(models):
    assert AR_NAME in FluxCoreNexusGenLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert {GENERATION, EDITING} <= set(FluxCoreNexusGenAdapterLoader.INPUT_TYPES()["required"]["decoder_name"][0])
    nexus, = FluxCoreNexusGenLoader().load(AR_NAME)
    assert type(nexus.model.module) is NexusGenAutoregressiveModel and nexus.processor is not None
    generation, = FluxCoreNexusGenAdapterLoader().load(GENERATION)
    editing, = FluxCoreNexusGenAdapterLoader().load(EDITING)
    assert (generation.task, type(generation.model.module)) == ("generation", NexusGenAdapter)
    assert (editing.task, type(editing.model.module)) == ("editing", NexusGenImageEmbeddingMerger)


@pytest.mark.parametrize("task", ["generation", "editing"])
def test_encode_and_sample_equal_the_pipeline(models, task):
    """Nexus-Gen Encode on the positive side, FLUX Text Encode (T5) on the negative, cfg 2 (DiffSynth's example):
    the pipeline's latent from the same files with the same seed. Measured 0 (the same float32 computations); the
    editing ids laid out on a latent of the width and height swapped move it by 1.7e-2."""
    decoder = GENERATION if task == "generation" else EDITING
    nexus, = FluxCoreNexusGenLoader().load(AR_NAME)
    adapter, = FluxCoreNexusGenAdapterLoader().load(decoder)
    dit = FluxCoreDiTLoader().load(decoder)[0]
    reference = sample_image(200, 120)
    image = image_tensor(reference) if task == "editing" else None
    positive, = FluxCoreNexusGenEncode().encode(nexus, adapter, models["te"], PROMPT, 3.5, W, H, image=image)
    negative, = FluxCoreTextEncode().encode(models["te"], NEGATIVE, 3.5, t5_sequence_length=LT)
    encoded = positive[0][1][TEXT_KEY].conditioning
    assert encoded.prompt_emb.shape == (1, 81 + 28 * (task == "editing"), 32)
    assert (encoded.text_ids is None) == (task == "generation")
    got = sample(dit, positive, negative)
    expected = pipeline_latent(models, task, **({"nexus_gen_reference_image": reference} if task == "editing" else {}))
    assert (got - expected).abs().max().item() <= 1e-5
    plain = sample(dit, FluxCoreTextEncode().encode(models["te"], PROMPT, 3.5, t5_sequence_length=LT)[0], negative)
    assert (got - plain).abs().max().item() > 1e-2   # the Nexus-Gen tokens are what the DiT reads


def test_the_editing_positions_follow_the_width_and_height_inputs(models):
    nexus, = FluxCoreNexusGenLoader().load(AR_NAME)
    adapter, = FluxCoreNexusGenAdapterLoader().load(EDITING)
    image = image_tensor(sample_image(200, 120))
    small = FluxCoreNexusGenEncode().encode(nexus, adapter, models["te"], PROMPT, 3.5, 512, 512, image=image)[0]
    large = FluxCoreNexusGenEncode().encode(nexus, adapter, models["te"], PROMPT, 3.5, 1024, 512, image=image)[0]
    ids_small, ids_large = (c[0][1][TEXT_KEY].conditioning.text_ids for c in (small, large))
    assert torch.equal(ids_small[..., 1], ids_large[..., 1]) and torch.equal(ids_large[..., 2], 2 * ids_small[..., 2])


def test_node_errors_name_the_node_and_input(models, monkeypatch):
    nexus, = FluxCoreNexusGenLoader().load(AR_NAME)
    generation, = FluxCoreNexusGenAdapterLoader().load(GENERATION)
    editing, = FluxCoreNexusGenAdapterLoader().load(EDITING)
    image = image_tensor(sample_image())
    with pytest.raises(NodeInputError, match=r"FluxCoreNexusGenEncode, input 'adapter': .*generation adapter, but an "
                                             r"image is given \(editing\): load edit_decoder.bin's adapter"):
        FluxCoreNexusGenEncode().encode(nexus, generation, models["te"], PROMPT, 3.5, W, H, image=image)
    with pytest.raises(NodeInputError, match=r"input 'adapter': .*editing adapter, but no image is given"):
        FluxCoreNexusGenEncode().encode(nexus, editing, models["te"], PROMPT, 3.5, W, H)
    with pytest.raises(NodeInputError, match=r"FluxCoreNexusGenAdapterLoader, input 'decoder_name': .* holds no "
                                             r"Nexus-Gen adapter \(it holds FLUX DiT"):
        FluxCoreNexusGenAdapterLoader().load(NAMES["dit"])
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")   # no processor/ beside it: not fetched from ModelScope here
    with pytest.raises(NodeInputError, match=r"FluxCoreNexusGenLoader, input 'model_name': the Nexus-Gen processor "
                                             r"was not found. .*skip_download is set"):
        FluxCoreNexusGenLoader().load(NAMES["clip"])
