"""The engine side of the bundled demo model (issue 14): T5 prompts as long as the T5 tokenizer says, the image size
from `pipe.default_size`, `FluxImagePipeline.from_demo()` (on a demo-shaped folder here; the shipped files in
test_demo_shipped.py), and errors that point at the demo when a real model is missing and cannot be downloaded."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from transformers import T5TokenizerFast
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from flux_core import demo, model_config
from flux_core.demo.tokenizers import t5_pieces, write_t5_tokenizer
from flux_core.download import download_models
from flux_core.inputs import DEFAULT_SIZE
from flux_core.model_config import FLUX_DEV, ModelConfig, ModelFileError
from flux_core.models.text_encoders import encode_prompt, t5_sequence_length_of
from flux_core.pipeline import FluxImagePipeline
from flux_core.text_conditioning import ClipT5Encoder
from tests.tiny_demo import T5_LENGTH, demo_folder, demo_here, recorded_t5_lengths  # noqa: F401 (fixtures)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(demo_folder):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(demo, "MODELS_DIR", demo_folder)
        return FluxImagePipeline.from_demo(device="cpu")


def t5_tokenizer(folder, model_max_length):
    return T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(folder, t5_pieces(PROMPT), model_max_length)))


def recorded_costs(monkeypatch) -> list:
    """(text tokens, description) of every run-cost check from now on (flux_core.run_cost.check_run_cost)."""
    import flux_core.pipeline as pipeline_module
    calls = []
    check = pipeline_module.check_run_cost

    def record(dit, device, batch, image_tokens, text_tokens, steps, passes, what, *args, **kwargs):
        calls.append((text_tokens, what))
        return check(dit, device, batch, image_tokens, text_tokens, steps, passes, what, *args, **kwargs)
    monkeypatch.setattr(pipeline_module, "check_run_cost", record)
    return calls


# ------------------------------------------------------------------------------------------------ T5 length

def test_t5_length_is_the_tokenizers_capped_at_512(tmp_path):
    demo_like = t5_tokenizer(tmp_path / "demo", 32)
    dev_like = t5_tokenizer(tmp_path / "dev", 512)      # FLUX.1-dev's tokenizer_2/tokenizer_config.json says 512
    unset = t5_tokenizer(tmp_path / "unset", VERY_LARGE_INTEGER)   # what transformers reports when none is set
    assert unset.model_max_length == VERY_LARGE_INTEGER
    assert t5_sequence_length_of(demo_like) == 32
    assert t5_sequence_length_of(dev_like) == 512
    assert t5_sequence_length_of(unset) == 512
    assert t5_sequence_length_of(None) == 512                    # a pipeline without T5 (Step1X-Edit)
    assert t5_sequence_length_of(demo_like, 16) == 16            # an explicit length wins, either way
    assert t5_sequence_length_of(demo_like, 64) == 64
    assert t5_sequence_length_of(dev_like, 256) == 256


def test_encode_prompt_and_encoder_pad_to_the_tokenizers_length(pipe, tmp_path):
    clip, t5, clip_tok = pipe.text_encoder_1, pipe.text_encoder_2, pipe.tokenizer_1
    assert pipe.tokenizer_2.model_max_length == T5_LENGTH
    emb, _ = encode_prompt(PROMPT, clip, t5, clip_tok, pipe.tokenizer_2)
    assert emb.shape[1] == T5_LENGTH
    emb_512, _ = encode_prompt(PROMPT, clip, t5, clip_tok, t5_tokenizer(tmp_path / "dev", 512))
    assert emb_512.shape[1] == 512
    explicit, _ = encode_prompt(PROMPT, clip, t5, clip_tok, pipe.tokenizer_2, t5_sequence_length=T5_LENGTH)
    assert torch.equal(emb, explicit)
    assert ClipT5Encoder(clip, t5, clip_tok, pipe.tokenizer_2).max_tokens == T5_LENGTH
    assert ClipT5Encoder(clip, t5, clip_tok, pipe.tokenizer_2, t5_sequence_length=16).max_tokens == 16
    assert pipe.encode_prompt(PROMPT).prompt_emb.shape[1] == T5_LENGTH
    assert pipe.encode_prompt(PROMPT, 16).prompt_emb.shape[1] == 16
    assert pipe.conditioning_encoder().max_tokens == T5_LENGTH


def test_a_call_without_t5_sequence_length_uses_the_tokenizers(pipe, monkeypatch):
    lengths, costs = recorded_t5_lengths(monkeypatch), recorded_costs(monkeypatch)
    run = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=1, seed=0, output_type="latent",
               progress_bar_cmd=None)
    pipe(**run)
    pipe(**run, t5_sequence_length=16)
    # under true CFG both branches, and EliGen's entity prompts, take the same length
    mask = Image.new("RGB", (32, 32), "white")
    pipe(**run, cfg_scale=2.0, eligen_entity_prompts=["a red circle"], eligen_entity_masks=[mask])
    assert lengths == [T5_LENGTH, 16, T5_LENGTH, T5_LENGTH, T5_LENGTH]
    assert [tokens for tokens, _ in costs] == [T5_LENGTH, 16, T5_LENGTH * 2]   # the estimate counts them too


# ------------------------------------------------------------------------------------------------ size

def test_a_call_without_height_and_width_makes_pipe_default_size(pipe, monkeypatch):
    assert FluxImagePipeline(device="cpu").default_size == DEFAULT_SIZE == (1024, 1024)
    costs = recorded_costs(monkeypatch)
    monkeypatch.setattr(pipe, "default_size", (32, 48))
    run = dict(prompt=PROMPT, num_inference_steps=1, seed=0, progress_bar_cmd=None)
    assert tuple(pipe(**run, output_type="latent").shape) == (1, 16, 4, 6)
    assert pipe(**run).size == (48, 32)
    assert tuple(pipe(**run, height=64, output_type="latent").shape) == (1, 16, 8, 6)   # a given one wins
    assert "height=32, width=48" in costs[0][1] and "height=64, width=48" in costs[2][1]
    monkeypatch.setattr(pipe, "default_size", (50, 48))   # the checks see the resolved numbers
    with pytest.raises(ValueError, match=r"height=50"):
        pipe(**run)


# ------------------------------------------------------------------------------------------------ from_demo

def test_from_demo_loads_the_demo_files_at_the_demo_size(pipe, demo_folder):
    assert pipe.default_size == (demo.HEIGHT, demo.WIDTH) == (128, 128)
    assert pipe.torch_dtype == torch.float32 and pipe.dit.img_in.weight.dtype == torch.float32
    sources = {slot: entry.source for slot, entry in pipe.loaded_from.items()}
    assert sources == {"dit": str(demo_folder / demo.FILES["dit"]), "vae": str(demo_folder / demo.FILES["vae"]),
                       "text_encoder_1": str(demo_folder / demo.FILES["clip"]),
                       "text_encoder_2": str(demo_folder / demo.FILES["t5"])}
    image = pipe(prompt=PROMPT, num_inference_steps=1, seed=0, progress_bar_cmd=None)
    assert image.size == (128, 128)


def test_from_demo_in_another_dtype(demo_here):
    pipe = FluxImagePipeline.from_demo(torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.torch_dtype == torch.bfloat16 and pipe.dit.img_in.weight.dtype == torch.bfloat16


def test_from_demo_names_every_missing_file(demo_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "MODELS_DIR", tmp_path / "nothing")
    with pytest.raises(ModelFileError) as e:
        FluxImagePipeline.from_demo()
    message = str(e.value)
    assert all(path in message for path in demo.missing_files()) and len(demo.missing_files()) == 9
    assert "pip install --force-reinstall ." in message and "python -m flux_core.demo.build" in message
    partial = tmp_path / "partial"
    shutil.copytree(demo_folder, partial)
    (partial / demo.FILES["vae"]).unlink()
    dit_config = (partial / demo.FILES["dit"]).parent / "config.json"   # its RoPE axes: without it the load fails
    dit_config.unlink()
    monkeypatch.setattr(demo, "MODELS_DIR", partial)
    with pytest.raises(ModelFileError, match="missing from this installation") as e:
        FluxImagePipeline.from_demo()
    assert str(partial / demo.FILES["vae"]) in str(e.value) and str(dit_config) in str(e.value)
    assert demo.FILES["dit"] not in str(e.value)


# ------------------------------------------------------------------------------------------------ hints

def dev_configs(local: str, **kw) -> list[ModelConfig]:
    return [ModelConfig(model_id=FLUX_DEV, origin_file_pattern=pattern, local_model_path=local, kind=kind, **kw)
            for kind, pattern in (("dit", "flux1-dev.safetensors"), ("vae", "ae.safetensors"))]


def failing_snapshot_download(monkeypatch):
    """ModelScope's download fails as it does offline (the real download_from_modelscope wraps the error)."""
    import modelscope

    def offline(*args, **kwargs):
        raise ConnectionError("network is unreachable")
    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    monkeypatch.delenv(model_config.ENV_SKIP_DOWNLOAD, raising=False)


def test_a_real_model_neither_here_nor_downloadable_points_at_the_demo(tmp_path, monkeypatch):
    failing_snapshot_download(monkeypatch)
    empty = str(tmp_path / "empty")
    with pytest.raises(ModelFileError, match="skip_download is set") as skipped:
        FluxImagePipeline.from_pretrained(model_configs=dev_configs(empty, skip_download=True))
    with pytest.raises(ModelFileError, match="network is unreachable") as offline:
        FluxImagePipeline.from_pretrained(model_configs=dev_configs(empty))
    with pytest.raises(ModelFileError, match="network is unreachable") as fetched:
        download_models(FLUX_DEV, empty)
    for error in (skipped, offline, fetched):
        assert "try the bundled demo model: FluxImagePipeline.from_demo()" in str(error.value), str(error.value)
    # A local file that is not there is a typo to fix, not a download to do without: no demo advice.
    with pytest.raises(ModelFileError, match="does not exist") as typo:
        FluxImagePipeline.from_pretrained(model_configs=[ModelConfig(path=str(tmp_path / "flux1-dev.safetensors"))])
    assert "from_demo" not in str(typo.value)
