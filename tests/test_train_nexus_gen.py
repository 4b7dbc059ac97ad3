"""flux_core.train with Nexus-Gen (a DiT LoRA on a decoder's DiT; editing with `--extra_inputs
nexus_gen_reference_image`): the training loss equals DiffSynth-Studio's own FlowMatchSFTLoss with model_fn_flux_image
fed the Nexus-Gen conditioning as DiffSynth computes it (its get_target_embeddings on the AR model, its adapter or
merger, its editing text ids, CLIP-L's pooled vector of the caption), and the image to edit reaches the LoRA's
gradient.

The models: tests/tiny_nexus_gen.py's decoders and AR folder (its processor is the tiny one of tests/tiny_qwen_vl.py:
the real processor files are not available offline; DiffSynth's AR file does not import on transformers 5.x, see
tests/diffsynth_nexus_gen_ref.py), and the tiny FLUX folder's VAE, CLIP-L and T5.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from flux_core.nexus_gen import bound_image
from flux_core.train.args import parse_args
from flux_core.train.trainer import Trainer
from tests.diffsynth_nexus_gen_ref import diffsynth_editing_text_ids, diffsynth_messages, diffsynth_target_embeddings
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_nexus_gen import make_ar, white, write_nexus_gen_files
from tests.tiny_train import loss_gradient, make_train_setup, noise_picture, nonzero_lora, train_argv
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

EDITING = ("--extra_inputs", "nexus_gen_reference_image", "--data_file_keys", "image,nexus_gen_reference_image")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nexus train")
    setup = make_train_setup(tmp)
    ar = make_ar()
    # The decoders' DiT: the tiny FLUX folder's (make_diffusers_pipeline's seed 1), so DiffSynth's copy is the same.
    files = write_nexus_gen_files(tmp / "decoders", make_diffusers_dit(seed=1), tmp / "Nexus-GenV2", ar)
    rows = []
    for i, (file, caption) in enumerate(list(setup.captions.items())[:2]):
        noise_picture(10 + i).save(setup.data / f"before {i}.png")
        rows.append({"image": file, "prompt": caption, "nexus_gen_reference_image": f"before {i}.png"})
    metadata = setup.data / "nexus_gen.json"
    metadata.write_text(json.dumps(rows), encoding="utf-8")
    return types.SimpleNamespace(setup=setup, files=files, ar=ar, metadata=metadata)


def nexus_trainer(world, output, task: str) -> Trainer:
    decoder = world.files["editing" if task == "editing" else "generation"]
    argv = train_argv(world.setup, output, *(EDITING if task == "editing" else ()))
    argv[argv.index("--dataset_metadata_path") + 1] = str(world.metadata)
    argv[argv.index("--model_paths") + 1] = json.dumps(
        [str(decoder), str(world.files["ar_folder"])]
        + [str(world.setup.model / sub) for sub in ("vae", "text_encoder", "text_encoder_2")])
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("task", ["generation", "editing"])
def test_nexus_gen_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path, task):
    """One sample's loss: ours (trainer._loss) against DiffSynth-Studio 2.1.12's FlowMatchSFTLoss with its training
    FlowMatchScheduler and model_fn_flux_image on its DiT, fed prompt_emb = its adapter (text-to-image) or merger
    (editing) on its get_target_embeddings, text_ids 0 or its get_editing_text_ids, pooled = CLIP-L of the caption
    (diffusers), guidance 1 (the trainer's default), drawing from the global generator seeded alike."""
    from tests.diffsynth_ref import diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss

    trainer = nexus_trainer(world, tmp_path / "out", task)
    sample = trainer.dataset[0]
    seed = 2024
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(ref.transformer), strict=True)
    pipe = diffsynth_training_pipe(model_fn, dit=their_dit)
    editing = task == "editing"
    images = [bound_image(sample["nexus_gen_reference_image"]), white()] if editing else [white()]
    ar = world.ar
    target, reference, grids = diffsynth_target_embeddings(ar, ar.vision_head, ar.image_prefill_embeds,
                                                           trainer.pipe.nexus_gen_processor, images,
                                                           diffsynth_messages(sample["prompt"], editing))
    with torch.no_grad():
        latents = reference_encode_image(ref.vae, sample["image"])
        if editing:
            emb = world.files["merger"](target[None], grids[1:2], reference[None], grids[0:1])
            text_ids = diffsynth_editing_text_ids(latents, grids[1].tolist(), grids[0].tolist())
        else:
            emb = world.files["adapter"](target[None])
            text_ids = torch.zeros(1, emb.shape[1], 3)
        _, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        inputs = dict(input_latents=latents, prompt_emb=emb, pooled_prompt_emb=pooled, guidance=torch.tensor([1.0]),
                      text_ids=text_ids)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        torch.manual_seed(seed)   # the same draw with T5's tokens of the caption: how much Nexus-Gen moves this loss
        t5, _, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        plain = FlowMatchSFTLoss(pipe, **dict(inputs, prompt_emb=t5, text_ids=torch.zeros(1, t5.shape[1], 3))).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f} ({abs(ours - theirs) / theirs:.1e} relative), with T5's "
          f"tokens {plain:.6f}")
    # Measured 1.4e-6 (text-to-image) and 1.1e-6 (editing) relative. The smallest planted mistake: the editing text
    # ids left at 0 moved our loss by 1.5e-5 relative (the bound, 5e-6, is 3 times smaller); T5's tokens instead of
    # Nexus-Gen's move DiffSynth's loss by 3.1e-2 and 1.6e-1.
    assert ours == pytest.approx(theirs, rel=5e-6)
    assert abs(theirs - plain) > 100 * 5e-6 * abs(theirs)


def test_the_image_to_edit_reaches_the_loras_gradient(world, tmp_path):
    trainer = nexus_trainer(world, tmp_path / "out", "editing")
    nonzero_lora(trainer)
    sample = trainer.dataset[0]
    base = loss_gradient(trainer, sample, 2024)
    other = loss_gradient(trainer, dict(sample, nexus_gen_reference_image=noise_picture(99)), 2024)
    assert (base - other).norm() > 1e-3 * base.norm()
