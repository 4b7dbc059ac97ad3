"""flux_core.train with EliGen (DiffSynth-Studio's command for the EliGen row: a DiT LoRA trained with each row's
entity prompts and masks, `--extra_inputs eligen_entity_masks,eligen_entity_prompts --data_file_keys
image,eligen_entity_masks`):
- the conditioned training loss equals DiffSynth's own FlowMatchSFTLoss with model_fn_flux_image fed its
  EntityControl unit's entity_prompt_emb / entity_masks;
- a tiny run lowers the loss, the entities reach the LoRA's gradient, the LoRA loads back;
- resume equals an uninterrupted run;
- masks are cropped like the image; every data problem of every row in one message;
- validation images (in the run and validate_lora) get the entities.
"""
from __future__ import annotations

import contextlib
import io
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import Trainer
from tests.tiny_train import (ELIGEN_ROWS, ELIGEN_SIZE, eligen_mask, loss_gradient, make_eligen_data, make_train_setup,
                              nonzero_lora, resumed_and_whole, train_argv)
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

EXTRAS = ("--extra_inputs", "eligen_entity_masks,eligen_entity_prompts",
          "--data_file_keys", "image,eligen_entity_masks")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eligen train")
    setup = make_train_setup(tmp)
    return types.SimpleNamespace(setup=setup, tmp=tmp, metadata=make_eligen_data(setup.data))


def eligen_argv(world, output, *extra, metadata=None):
    argv = train_argv(world.setup, output, *EXTRAS, *extra)
    argv[argv.index("--dataset_metadata_path") + 1] = str(metadata or world.metadata)
    return argv


def run_quietly(trainer: Trainer) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer._run()


def failing_setup(argv) -> str:
    with pytest.raises(TrainError) as info:
        Trainer(parse_args(argv)).setup()
    return str(info.value)


def fixed_loss(trainer: Trainer, samples: list[dict], draws: int = 4) -> float:
    with torch.no_grad():
        return float(np.mean([trainer._loss(s, torch.Generator().manual_seed(50 + k)).item()
                              for s in samples for k in range(draws)]))


def write_rows(world, name: str, rows: list[dict]):
    path = world.setup.data / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ DiffSynth's loss
def test_eligen_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path):
    """One sample's loss with two entities: ours (trainer._loss) against DiffSynth-Studio 2.1.12's FlowMatchSFTLoss with
    its FlowMatchScheduler and model_fn_flux_image, its EntityControl unit's mask preprocessing of the mask files
    (read as its LoadImage reads them) and the entity prompts encoded by diffusers, on the same weights, drawing from
    the global generator seeded alike."""
    from tests.diffsynth_ref import diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.pipelines.flux_image import FluxImageUnit_EntityControl

    trainer = Trainer(parse_args(eligen_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[0]   # masks at the image's size: DiffSynth's crop of them is the identity
    seed = 2024
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(ref.transformer), strict=True)
    pipe = diffsynth_training_pipe(model_fn, dit=their_dit)
    width, height = ELIGEN_SIZE
    files = json.loads(world.metadata.read_text(encoding="utf-8"))[0]["eligen_entity_masks"]
    masks = [Image.open(world.setup.data / f).convert("RGB") for f in files]
    masks = torch.cat(FluxImageUnit_EntityControl().preprocess_masks(pipe, masks, height // 8, width // 8, 1))[None]
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        entity_emb, _, _ = ref.encode_prompt(prompt=sample["eligen_entity_prompts"], prompt_2=None,
                                             max_sequence_length=16)
        inputs = dict(input_latents=reference_encode_image(ref.vae, sample["image"]), prompt_emb=emb,
                      pooled_prompt_emb=pooled, guidance=torch.tensor([1.0]), text_ids=torch.zeros(1, emb.shape[1], 3),
                      entity_prompt_emb=entity_emb[None], entity_masks=masks, progress_id=0, num_inference_steps=1)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        torch.manual_seed(seed)   # the same draw without the entities: how much they move this loss
        plain = FlowMatchSFTLoss(pipe, **{k: v for k, v in inputs.items() if not k.startswith("entity_")}).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f} ({abs(ours - theirs) / theirs:.1e} relative), without the "
          f"entities {plain:.6f} ({abs(plain - theirs) / theirs:.1e})")
    # Measured 0.415578 vs 0.415578 (1.4e-7 relative, float32); without the entities DiffSynth's loss is 0.426013,
    # 2.5e-2 relative away: 250 times the bound. Planted mistakes seen to fail: the EliGen adapter left out of the
    # loss, entity prompts encoded at 512 T5 tokens instead of --t5_sequence_length.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(theirs - plain) > 10 * 1e-4 * abs(theirs)


# ------------------------------------------------------------------------------------------------ learning
def test_the_entities_reach_the_loras_gradient(world, tmp_path):
    trainer = Trainer(parse_args(eligen_argv(world, tmp_path / "out")))
    trainer.setup()
    nonzero_lora(trainer)
    sample = trainer.dataset[0]

    def gradient(s):
        return loss_gradient(trainer, s, 7)

    base = gradient(sample)
    swapped = gradient(dict(sample, eligen_entity_masks=sample["eligen_entity_masks"][::-1]))
    renamed = gradient(dict(sample, eligen_entity_prompts=["a castle", "the moon"]))
    scale = base.abs().max().item()
    print(f"LoRA gradient: max {scale:.3e}; swapped masks move it by {(base - swapped).abs().max():.3e}, other "
          f"entity prompts by {(base - renamed).abs().max():.3e}")
    # Measured: max 0.36; swapped masks move it by 2.7e-2, other prompts by 2.8e-2. With the EliGen adapter left out of
    # the loss both differences are exactly 0 (seen).
    assert (base - swapped).abs().max().item() > 1e-3 * scale
    assert (base - renamed).abs().max().item() > 1e-3 * scale
    assert torch.equal(base, gradient(sample))   # deterministic, so the differences are real


@pytest.mark.slow
def test_eligen_lora_training_learns_and_loads_back(world, tmp_path):
    from lora_tools import read_lora

    from flux_core.train.trainable import lora_modules

    trainer = Trainer(parse_args(eligen_argv(world, tmp_path / "out", "--dataset_repeat", "3")))
    trainer.setup()
    samples = [trainer.dataset[i] for i in range(len(ELIGEN_ROWS))]
    before = fixed_loss(trainer, samples)
    result = run_quietly(trainer)
    after = fixed_loss(trainer, samples)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    # Measured 1.95 -> 1.12 over 12 steps at lr 1e-2; an optimizer that never steps leaves it equal.
    assert after < 0.8 * before
    assert result["path"].name == "epoch-0.safetensors"
    saved = read_lora(result["path"])   # kohya names, read back by lora_tools (what load_lora applies)
    modules = lora_modules(trainer.pipe.dit)
    assert set(saved.layers) == set(modules) == set(trainer.targets)
    for name, m in modules.items():
        layer = saved.layers[name]
        assert layer.scale == 1.0
        assert torch.equal(layer.down, m.lora_A["default"].weight.detach())   # bit-exact (float32 run)
        assert torch.equal(layer.up, m.lora_B["default"].weight.detach())


def test_eligen_resume_across_an_epoch_equals_an_uninterrupted_run(world, tmp_path):
    argv = lambda out, *x: eligen_argv(world, out, "--num_epochs", "2", "--save_steps", "3", *x)  # noqa: E731
    start, whole = resumed_and_whole(argv, tmp_path, cut=3)   # cut in epoch 0 (4 steps an epoch)
    assert start["start_step"] == 3 and start["steps_per_epoch"] == 4
    assert whole["path"].name == "step-8.safetensors"


# ------------------------------------------------------------------------------------------------ data
def test_masks_are_cropped_and_resized_like_the_image(world, tmp_path):
    """Row 1's masks are painted at twice the image's resolution: a sample gets them at the image's training size,
    on the same latent cells as masks painted at 1x; a 72x48 image trains at 64x48 (centre crop) and its masks are
    cut the same way."""
    from flux_core.eligen import entity_grid
    from flux_core.train.dataset import ImageDataset

    data = world.setup.data
    dataset = ImageDataset(data, world.metadata, ["image", "eligen_entity_masks"],
                           required_keys=["eligen_entity_masks", "eligen_entity_prompts"])
    dataset.check()
    sample = dataset[1]
    assert [m.size for m in sample["eligen_entity_masks"]] == [ELIGEN_SIZE] * 2
    for mask, (_, _, box) in zip(sample["eligen_entity_masks"], ELIGEN_ROWS[1][1]):
        assert torch.equal(entity_grid(mask, 6, 8), entity_grid(eligen_mask(box), 6, 8))
    # 72x48 -> 64x48: 4 columns cut on each side, from the image and from its mask alike
    Image.new("RGB", (72, 48), (200, 10, 10)).save(data / "wide.png")
    stripe = Image.new("RGB", (72, 48))
    stripe.paste((255, 255, 255), (4, 0, 12, 48))    # columns 4-11 -> 0-7 after the crop
    stripe.save(data / "masks" / "stripe.png")
    path = write_rows(world, "wide.json", [{"image": "wide.png", "prompt": "a cat", "eligen_entity_prompts": ["a cat"],
                                            "eligen_entity_masks": ["masks/stripe.png"]}])
    wide = ImageDataset(data, path, ["image", "eligen_entity_masks"],
                        required_keys=["eligen_entity_masks", "eligen_entity_prompts"])
    wide.check()
    mask = np.asarray(wide[0]["eligen_entity_masks"][0])[:, :, 0]
    assert wide[0]["image"].size == (64, 48) and mask.shape == (48, 64)
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()


def test_every_entity_problem_of_every_row_in_one_message(world, tmp_path):
    data = world.setup.data
    eligen_mask((0, 0, 63, 47), (48, 48)).save(data / "masks" / "square.png")
    Image.new("RGB", (72, 48), (10, 200, 10)).save(data / "wide 2.png")
    edge = Image.new("RGB", (72, 48))
    edge.paste((255, 255, 255), (0, 0, 3, 48))        # only in the 4 columns the crop cuts away
    edge.save(data / "masks" / "edge.png")
    (data / "masks" / "broken.png").write_bytes(b"not a png")
    eligen_mask((0, 0, 31, 47)).save(data / "masks" / "left.gif")
    rows = [
        {"image": "entities 0.png", "prompt": "a", "eligen_entity_prompts": ["a cat", "a dog", "a horse"],
         "eligen_entity_masks": ["masks/0 0.png", "masks/0 1.png"]},                              # fewer masks
        {"image": "entities 1.png", "prompt": "b", "eligen_entity_prompts": ["a cat", "a dog"],
         "eligen_entity_masks": ["masks/0 0.png", "masks/gone.png"]},                             # missing file
        {"image": "entities 2.png", "prompt": "c", "eligen_entity_prompts": ["a cat"],
         "eligen_entity_masks": ["masks/square.png"]},                                            # other shape
        {"image": "wide 2.png", "prompt": "d", "eligen_entity_prompts": ["a cat"],
         "eligen_entity_masks": ["masks/edge.png"]},                                              # empty once cropped
        {"image": "entities 3.png", "prompt": "e", "eligen_entity_prompts": [3],
         "eligen_entity_masks": ["masks/broken.png"]},                                            # not text, not image
        {"image": "entities 3.png", "prompt": "f", "eligen_entity_prompts": ["a cat"],
         "eligen_entity_masks": ["masks/left.gif"]},                                              # a type not read
    ]
    message = failing_setup(eligen_argv(world, tmp_path / "out", metadata=write_rows(world, "bad.json", rows)))
    print(message)
    assert message.startswith("--extra_inputs eligen_entity_masks,eligen_entity_prompts: ")
    for part in ("bad.json entry 1: 3 eligen_entity_prompts but 2 eligen_entity_masks",
                 "bad.json entry 2: eligen_entity_masks[1] gone.png: no such file",
                 "bad.json entry 3: eligen_entity_masks[0] square.png is 48x48 but the image is 64x48",
                 "bad.json entry 4: eligen_entity_masks[0] edge.png has no white pixel left at the latent resolution "
                 "(8x6) once cropped like the image to 64x48",
                 "bad.json entry 5: column 'eligen_entity_prompts' must hold the entity prompts",
                 "bad.json entry 5: eligen_entity_masks[0] broken.png: cannot be read as an image",
                 "bad.json entry 6: 'eligen_entity_masks' left.gif is not a supported image type"):
        assert part in message
    # CSV rows hold the lists as JSON text; a row without its masks is named like any missing column
    (data / "bad.csv").write_text('image,prompt,eligen_entity_prompts,eligen_entity_masks\n'
                                  'entities 0.png,a,"[""a cat""]",\n', encoding="utf-8")
    message = failing_setup(eligen_argv(world, tmp_path / "csv", metadata=data / "bad.csv"))
    assert message.startswith("bad.csv row 1") and "no 'eligen_entity_masks' value" in message


def test_csv_rows_hold_the_lists_as_json_text(world, tmp_path):
    from flux_core.train.dataset import ImageDataset
    data = world.setup.data
    (data / "entities.csv").write_text('image,prompt,eligen_entity_prompts,eligen_entity_masks\n'
                                       'entities 0.png,a cat and a dog,"[""a red cat"", ""a blue dog""]",'
                                       '"[""masks/0 0.png"", ""masks/0 1.png""]"\n', encoding="utf-8")
    from_csv = ImageDataset(data, data / "entities.csv", ["image", "eligen_entity_masks"],
                            required_keys=["eligen_entity_masks", "eligen_entity_prompts"])
    from_json = ImageDataset(data, world.metadata, ["image", "eligen_entity_masks"],
                             required_keys=["eligen_entity_masks", "eligen_entity_prompts"])
    from_csv.check()
    a, b = from_csv[0], from_json[0]
    assert a["eligen_entity_prompts"] == b["eligen_entity_prompts"] == ["a red cat", "a blue dog"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(a["eligen_entity_masks"], b["eligen_entity_masks"]))


@pytest.mark.parametrize("extra, message", [
    (("--extra_inputs", "eligen_entity_prompts"),
     r"eligen_entity_prompts without eligen_entity_masks: EliGen takes one mask per entity prompt"),
    (("--extra_inputs", "eligen_entity_masks"),
     r"eligen_entity_masks without eligen_entity_prompts"),
    (("--extra_inputs", "eligen_entity_masks,eligen_entity_prompts", "--data_file_keys",
      "image,eligen_entity_prompts"), r"--data_file_keys eligen_entity_prompts: that column holds the entity prompts"),
    (("--validation_prompts", "a cat", "--validation_eligen_entity_prompts", "a cat",
      "--validation_eligen_entity_masks", "m.png"),
     r"validation entities are for runs with --extra_inputs eligen_entity_masks,eligen_entity_prompts"),
])
def test_argument_errors_name_the_flag(world, tmp_path, extra, message):
    with pytest.raises(TrainError, match=message):
        parse_args(train_argv(world.setup, tmp_path / "out", *extra))


def test_validation_entity_flags_are_checked(world, tmp_path):
    mask = str(world.setup.data / "masks" / "0 0.png")
    with pytest.raises(TrainError, match=r"--validation_eligen_entity_prompts \(2\) and "
                                         r"--validation_eligen_entity_masks \(1\): give one mask per prompt"):
        parse_args(eligen_argv(world, tmp_path / "a", "--validation_prompts", "x", "--validation_eligen_entity_prompts",
                               "a cat", "a dog", "--validation_eligen_entity_masks", mask))
    with pytest.raises(TrainError, match=r"--validation_eligen_entity_masks gone.png: no such file"):
        parse_args(eligen_argv(world, tmp_path / "b", "--validation_prompts", "x", "--validation_eligen_entity_prompts",
                               "a cat", "--validation_eligen_entity_masks", "gone.png"))
    # a 64x48 mask for square validation images: named at setup, before any training step
    message = failing_setup(eligen_argv(world, tmp_path / "c", "--validation_prompts", "x", "--validation_height", "32",
                                        "--validation_width", "32", "--validation_eligen_entity_prompts", "a cat",
                                        "--validation_eligen_entity_masks", mask))
    assert "--validation_eligen_entity_masks[0] is 64x48 but the image is 32x32" in message


# ------------------------------------------------------------------------------------------------ validation
def test_validation_images_get_the_entities(world, tmp_path):
    out = tmp_path / "out"
    width, height = ELIGEN_SIZE
    validation = ("--validation_prompts", "a cat and a dog", "--validation_height", str(height), "--validation_width",
                  str(width), "--validation_num_inference_steps", "2")
    trainer = Trainer(parse_args(eligen_argv(world, out, "--max_steps", "1", *validation)))
    trainer.setup()
    run_quietly(trainer)
    image = np.asarray(Image.open(out / "validation" / "step-1-0.png"), dtype=np.int16)
    first = trainer.dataset[0]
    common = dict(prompt="a cat and a dog", height=height, width=width, seed=0, num_inference_steps=2,
                  embedded_guidance=3.5, t5_sequence_length=16, progress_bar_cmd=None)
    again = np.asarray(trainer.pipe(**common, eligen_entity_prompts=first["eligen_entity_prompts"],
                                    eligen_entity_masks=first["eligen_entity_masks"]), dtype=np.int16)
    plain = np.asarray(trainer.pipe(**common), dtype=np.int16)
    print(f"validation image vs the pipeline with the first row's entities: {np.abs(image - again).max()}, without "
          f"them: {np.abs(image - plain).max()} levels")
    # Measured 0 (the same call on the same weights) and 35 levels without the entities.
    assert np.abs(image - again).max() == 0
    assert np.abs(image - plain).max() > 2

    # validate_lora renders the trained LoRA with the entities given as flags
    from flux_core.train.__main__ import main
    masks = [str(world.setup.data / "masks" / f"0 {j}.png") for j in range(2)]
    flags = ["--model_paths", world.setup.model_paths, "--lora_path", str(out / "step-1.safetensors"), "--height",
             str(height), "--width", str(width), "--num_inference_steps", "2", "--t5_sequence_length", "16",
             "--torch_dtype", "float32", "--device", "cpu", "--prompt", "a cat and a dog", "--embedded_guidance", "3.5"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["validate_lora", *flags, "--output", str(tmp_path / "v.png"), "--eligen_entity_prompts",
                     *first["eligen_entity_prompts"], "--eligen_entity_masks", *masks]) == 0
    rendered = np.asarray(Image.open(tmp_path / "v.png"), dtype=np.int16)
    assert np.abs(image - rendered).max() == 0   # measured 0: the same weights (LoRA merged: 0 levels), inputs, call
    from flux_core.train.validate import run
    with pytest.raises(TrainError, match=r"EliGen: 2 --eligen_entity_prompts but 1 --eligen_entity_masks"):
        with contextlib.redirect_stderr(io.StringIO()):
            run("validate_lora", [*flags, "--output", str(tmp_path / "w.png"), "--eligen_entity_prompts", "a", "b",
                                  "--eligen_entity_masks", masks[0]])


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_keeps_the_entity_mask(world, tmp_path, offload):
    """The DiT's blocks are recomputed in the backward pass with EliGen's attention mask and entity tokens again: the
    same LoRA gradients as without checkpointing."""
    flag = "--use_gradient_checkpointing_offload" if offload else "--use_gradient_checkpointing"
    trainer = Trainer(parse_args(eligen_argv(world, tmp_path / "out", flag)))
    trainer.setup()
    nonzero_lora(trainer)
    dit = trainer.pipe.dit
    assert dit.gradient_checkpointing and dit.gradient_checkpointing_offload == offload
    sample = trainer.dataset[0]

    def gradient(s):
        return loss_gradient(trainer, s, 3)

    checkpointed = gradient(sample)
    swapped = gradient(dict(sample, eligen_entity_masks=sample["eligen_entity_masks"][::-1]))
    dit.gradient_checkpointing = dit.gradient_checkpointing_offload = False
    plain = gradient(sample)
    print(f"checkpointed vs plain: {(checkpointed - plain).abs().max():.2e} (gradient up to {plain.abs().max():.2e}; "
          f"swapped masks move it by {(checkpointed - swapped).abs().max():.2e})")
    # Measured 0 (the same kernels run again in the backward pass), on gradients up to 2.6e-2; a mask lost in the
    # recomputation would move the gradient like swapped masks do (4.7e-3, measured), far beyond the bound.
    assert torch.allclose(checkpointed, plain, atol=1e-6, rtol=0)
    assert (checkpointed - swapped).abs().max() > 1e-3
