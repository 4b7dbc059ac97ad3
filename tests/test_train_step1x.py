"""flux_core.train with Step1X-Edit (a DiT LoRA with `--extra_inputs step1x_reference_image`): the training loss
equals DiffSynth-Studio's own FlowMatchSFTLoss with model_fn_flux_image fed its Step1X inputs (the embedder's states
and mask, the connector, the reference latents), and the reference image reaches the LoRA's gradient.

The models: the Step1X-Edit DiT+connector file, a Qwen2.5-VL folder with the tiny processor of tests/tiny_qwen_vl.py
(built in the test: the real processor files are not available offline) and the tiny FLUX folder's VAE (and its
CLIP-L / T5, which the trainer's setup still requires, unused by the Step1X-Edit loss).
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from flux_core.train.args import parse_args
from flux_core.train.trainer import Trainer
from tests.test_step1x import (DIFFSYNTH_PREFIX, MAX_LENGTH, STEP1X_DIT, diffsynth_embedding, step1x_file,
                               tiny_reference_connector)
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_qwen_vl import make_processor, make_qwen_vl, write_qwen_vl_folder
from tests.tiny_train import loss_gradient, make_train_setup, noise_picture, nonzero_lora, train_argv
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode

EXTRAS = ("--extra_inputs", "step1x_reference_image", "--data_file_keys", "image,step1x_reference_image")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step1x train")
    setup = make_train_setup(tmp)
    step1x = tmp / "step1x-edit-i1258.safetensors"
    connector = tiny_reference_connector(in_channels=16, hidden=32, heads=32)
    step1x_file(step1x, make_diffusers_dit(seed=1, **STEP1X_DIT), connector)
    lm = make_qwen_vl(seed=2, conditional_generation=True)
    qwen = write_qwen_vl_folder(lm, tmp / "Qwen2.5-VL-7B-Instruct")
    rows = []
    for i, (file, caption) in enumerate(list(setup.captions.items())[:2]):
        noise_picture(10 + i).save(setup.data / f"before {i}.png")
        rows.append({"image": file, "prompt": caption, "step1x_reference_image": f"before {i}.png"})
    metadata = setup.data / "step1x.json"
    metadata.write_text(json.dumps(rows), encoding="utf-8")
    # No CLIP-L / T5: a Step1X-Edit run encodes its captions with Qwen2.5-VL and the connector only.
    model_paths = json.dumps([str(step1x), str(qwen), str(setup.model / "vae")])
    return types.SimpleNamespace(setup=setup, metadata=metadata, model_paths=model_paths, connector=connector,
                                 qwen=lm.model)


def step1x_trainer(world, output) -> Trainer:
    argv = train_argv(world.setup, output, *EXTRAS)
    argv[argv.index("--dataset_metadata_path") + 1] = str(world.metadata)
    argv[argv.index("--model_paths") + 1] = world.model_paths
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2024, 7])
def test_step1x_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path, seed):
    """One sample's loss: ours (trainer._loss) against DiffSynth-Studio 2.1.12's FlowMatchSFTLoss with its training
    FlowMatchScheduler (1000 timesteps), model_fn_flux_image with its DiT and connector (in_iteration_models), the
    states of its Step1xEditEmbedder (float32, sliced as it slices them) and the reference latents as its Step1x unit
    makes them (diffusers' VAE), drawing from the global generator seeded alike."""
    from tests.diffsynth_ref import diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_dit
    from tests.tiny_dit import bfl_state_dict
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, convert, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss

    trainer = step1x_trainer(world, tmp_path / "out")
    sample = trainer.dataset[0]
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same VAE
    their_dit = tiny_diffsynth_dit(dim=128, heads=1, axes=(16, 56, 56), guidance=False, pooled_dim=768)
    their_dit.load_state_dict(convert(bfl_state_dict(make_diffusers_dit(seed=1, **STEP1X_DIT))), strict=True)
    pipe = diffsynth_training_pipe(model_fn, ("dit", "step1x_connector"), dit=their_dit,
                                   step1x_connector=world.connector)
    _, mask, recorder = diffsynth_embedding(world.qwen, make_processor(), [sample["prompt"]],
                                            sample["step1x_reference_image"])
    hidden = recorder.calls[0][2]
    states = torch.zeros(1, MAX_LENGTH, hidden.shape[-1])
    n = int(mask[0].sum())
    states[0, :n] = hidden[0, DIFFSYNTH_PREFIX:DIFFSYNTH_PREFIX + n]
    with torch.no_grad():
        reference = pipe.preprocess_image(sample["step1x_reference_image"])
        inputs = dict(input_latents=reference_encode(ref.vae, pipe.preprocess_image(sample["image"])),
                      step1x_llm_embedding=states, step1x_mask=mask,
                      step1x_reference_latents=reference_encode(ref.vae, reference))
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        torch.manual_seed(seed)   # the same draw without the reference tokens: how much they move this loss
        without = FlowMatchSFTLoss(pipe, **dict(inputs, step1x_reference_latents=None)).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f} ({abs(ours - theirs) / theirs:.1e} relative), without the "
          f"reference {without:.6f}")
    # Measured 3.6e-7 relative (seed 2024) and 2.0e-7 (seed 7). Leaving the reference image's tokens out moves
    # DiffSynth's loss by 1.1e-3 and 2.9e-4 relative: the bound (2e-5, 55 times the measured) is 14 times smaller.
    assert ours == pytest.approx(theirs, rel=2e-5)
    assert abs(theirs - without) > 10 * 2e-5 * abs(theirs)


@pytest.mark.slow
def test_the_reference_image_reaches_the_loras_gradient(world, tmp_path):
    trainer = step1x_trainer(world, tmp_path / "out")
    nonzero_lora(trainer)
    sample = trainer.dataset[0]
    base = loss_gradient(trainer, sample, 2024)
    other = loss_gradient(trainer, dict(sample, step1x_reference_image=noise_picture(99)), 2024)
    assert (base - other).norm() > 1e-3 * base.norm()


def test_a_step1x_run_without_qwen_vl_names_what_is_missing(world, tmp_path):
    """--extra_inputs step1x_reference_image needs Qwen2.5-VL and the connector, not CLIP-L / T5: the message says
    so."""
    from flux_core.train.args import TrainError
    argv = train_argv(world.setup, tmp_path / "out", *EXTRAS)
    argv[argv.index("--dataset_metadata_path") + 1] = str(world.metadata)
    argv[argv.index("--model_paths") + 1] = json.dumps(json.loads(world.model_paths)[::2])  # the DiT file, the VAE
    with pytest.raises(TrainError, match=r"hold no Qwen2\.5-VL; training needs DiT, VAE, Qwen2\.5-VL, Step1X-Edit "
                                         r"connector"):
        Trainer(parse_args(argv)).setup()
