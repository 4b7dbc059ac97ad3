"""flux_core.train with FLEX.2 (a DiT LoRA on a 196-channel DiT, `--extra_inputs
flex_inpaint_image,flex_inpaint_mask,flex_control_image`): the training loss equals DiffSynth-Studio's own
FlowMatchSFTLoss with model_fn_flux_image fed its Flex unit's condition (before and after the control stop), the
inputs reach the LoRA's gradient, and a FLEX.2 DiT trains without them (zeros and an all-ones mask)."""
from __future__ import annotations

import json
import types

import pytest
import torch
from PIL import Image

from flux_core.train.args import parse_args
from flux_core.train.trainer import Trainer
from tests.tiny_dit import make_diffusers_dit
from tests.tiny_train import SIZE, loss_gradient, make_train_setup, noise_picture, nonzero_lora, train_argv
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode

COLUMNS = ("flex_inpaint_image", "flex_inpaint_mask", "flex_control_image")
EXTRAS = ("--extra_inputs", ",".join(COLUMNS), "--data_file_keys", ",".join(("image", *COLUMNS)))
FLEX_DIT = dict(seed=5, in_channels=196, out_channels=64, num_layers=8)


def box_mask():
    mask = Image.new("RGB", (SIZE, SIZE))
    mask.paste((255, 255, 255), (8, 4, 28, 20))
    return mask


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flex train")
    setup = make_train_setup(tmp)
    make_diffusers_dit(**FLEX_DIT).save_pretrained(setup.model / "transformer")   # the folder's DiT: FLEX.2's
    rows = []
    for i, (file, caption) in enumerate(list(setup.captions.items())[:2]):
        noise_picture(10 + i).save(setup.data / f"inpaint {i}.png")
        noise_picture(20 + i).save(setup.data / f"control {i}.png")
        box_mask().save(setup.data / f"mask {i}.png")
        rows.append({"image": file, "prompt": caption, "flex_inpaint_image": f"inpaint {i}.png",
                     "flex_inpaint_mask": f"mask {i}.png", "flex_control_image": f"control {i}.png"})
    metadata = setup.data / "flex.json"
    metadata.write_text(json.dumps(rows), encoding="utf-8")
    return types.SimpleNamespace(setup=setup, metadata=metadata)


def flex_trainer(world, output, with_inputs=True) -> Trainer:
    argv = train_argv(world.setup, output, *(EXTRAS if with_inputs else ()))
    if with_inputs:
        argv[argv.index("--dataset_metadata_path") + 1] = str(world.metadata)
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("seed", [2024, 7])   # DiffSynth draws timestep 112 of 1000 (controlled), 615 (stopped)
def test_flex_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path, seed):
    """One sample's loss: ours (trainer._loss) against DiffSynth-Studio 2.1.12's FlowMatchSFTLoss with its training
    FlowMatchScheduler (1000 timesteps), its FluxImageUnit_Flex on the row's pictures (strength and stop 0.5, the
    pipeline's defaults, which the trainer uses) and model_fn_flux_image, diffusers' text encoding and VAE, drawing
    from the global generator seeded alike."""
    from tests.diffsynth_ref import diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_channel_dit
    from tests.tiny_dit import diffsynth_state_dict
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.pipelines.flux_image import FluxImageUnit_Flex

    trainer = flex_trainer(world, tmp_path / "out")
    sample = trainer.dataset[0]   # 32x32 pictures, at the image's size: DiffSynth's crop of them is the identity
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same text encoders, VAE
    their_dit = tiny_diffsynth_channel_dit(196, double=8)
    their_dit.load_state_dict(diffsynth_state_dict(make_diffusers_dit(**FLEX_DIT)), strict=True)
    pipe = diffsynth_training_pipe(model_fn, dit=their_dit, vae_encoder=lambda x, **kw: reference_encode(ref.vae, x))
    with torch.no_grad():
        input_latents = reference_encode(ref.vae, pipe.preprocess_image(sample["image"]))
        flex = FluxImageUnit_Flex().process(pipe, input_latents, sample["flex_inpaint_image"],
                                            sample["flex_inpaint_mask"], sample["flex_control_image"], 0.5, 0.5,
                                            False, 128, 64)
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        inputs = dict(input_latents=input_latents, prompt_emb=emb, pooled_prompt_emb=pooled,
                      guidance=torch.tensor([1.0]), text_ids=torch.zeros(1, emb.shape[1], 3), **flex)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        no_control = dict(inputs, flex_condition=flex["flex_uncondition"])
        torch.manual_seed(seed)   # the same draw with the control image off: how much it moves this loss
        uncontrolled = FlowMatchSFTLoss(pipe, **no_control).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f} ({abs(ours - theirs) / theirs:.1e} relative), control off "
          f"{uncontrolled:.6f}")
    # Measured 1.0e-6 relative (seed 2024) and 7e-8 (seed 7). At 2024 (controlled) the control image moves DiffSynth's
    # loss by 5e-3 relative, 50 times the bound; the control kept past the stop (checked: the adapter never
    # switching) puts ours 1.0e-2 relative off at seed 7.
    assert ours == pytest.approx(theirs, rel=1e-4)
    if seed == 2024:
        assert abs(theirs - uncontrolled) > 10 * 1e-4 * abs(theirs)
    else:
        assert theirs == uncontrolled


def test_the_inputs_reach_the_loras_gradient_and_the_dit_trains_without_them(world, tmp_path):
    trainer = flex_trainer(world, tmp_path / "out")
    nonzero_lora(trainer)
    sample = trainer.dataset[0]
    base = loss_gradient(trainer, sample, 2024)
    other = loss_gradient(trainer, dict(sample, flex_inpaint_image=noise_picture(99)), 2024)
    # Measured 5.6e-2 of the gradient's size; a trainer that left the FLEX inputs out would give 0.
    assert (base - other).norm() > 1e-3 * base.norm()
    plain = flex_trainer(world, tmp_path / "plain", with_inputs=False)   # the folder's captions, no FLEX columns
    loss = plain._loss(plain.dataset[0], torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
