"""flux_core.train with the InstantX IP-Adapter (DiffSynth-Studio's commands for the IP-Adapter row):
- `--trainable_models ipadapter --extra_inputs ipadapter_images`: the IP-Adapter learns with the DiT and the SigLIP
  encoder frozen; its checkpoint (`--remove_prefix_in_ckpt pipe.ipadapter.`) is in DiffSynth's names, loads back
  through load_model(kind="ipadapter") equal to the trained module, and loads strictly into DiffSynth's own
  FluxIpAdapter with the same keys and values; resume across an epoch boundary equals an uninterrupted run;
- `--lora_base_model dit --extra_inputs ipadapter_images`: the reference image reaches the LoRA's gradient;
- validation images get the first row's reference images;
- errors naming the flag, column or row.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux_core.loading.loader import load_model
from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import Trainer
from tests.tiny_ipadapter import reference_image
from tests.tiny_train import (adapter_argv, loss_gradient, make_adapter_setup, nonzero_lora, read_log,
                              resumed_and_whole)
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

FULL = ("--trainable_models", "ipadapter", "--extra_inputs", "ipadapter_images", "--remove_prefix_in_ckpt",
        "pipe.ipadapter.", "--learning_rate", "1e-3")
LORA = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2", "--extra_inputs", "ipadapter_images")
MODELS = ("ipadapter", "siglip")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """make_adapter_setup's world, plus ipadapter one.csv: its row 2 alone (two reference images)."""
    world = make_adapter_setup(tmp_path_factory.mktemp("ip train"))
    (world.data / "ipadapter one.csv").write_text(
        'image,prompt,ipadapter_images\ngreen é.png,a dog green,"[""reference 1.png"", ""reference 0.png""]"\n',
        encoding="utf-8")
    return world


def ip_argv(world, output, *extra, lora=False, models=MODELS, metadata="ipadapter.csv"):
    return adapter_argv(world, output, metadata, models, *(LORA if lora else FULL), *extra)


def run_quietly(trainer: Trainer) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer._run()


def fixed_loss(trainer: Trainer, samples: list[dict], draws: int = 6) -> float:
    """The training objective on fixed (timestep, noise) draws: the loss without sampling noise."""
    with torch.no_grad():
        return float(np.mean([trainer._loss(s, torch.Generator().manual_seed(50 + k)).item()
                              for s in samples for k in range(draws)]))


def failing_setup(argv) -> str:
    with pytest.raises(TrainError) as info:
        Trainer(parse_args(argv)).setup()
    return str(info.value)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ full training
def test_ipadapter_training_learns_and_writes_diffsynths_names(world, tmp_path):
    from tests.diffsynth_ref import tiny_diffsynth_ipadapter

    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "out", "--dataset_repeat", "16", "--learning_rate", "1e-2",
                                         metadata="ipadapter one.csv")))
    trainer.setup()
    pipe = trainer.pipe
    ip = pipe.ipadapter
    dit_before, encoder_before, ip_before = states(pipe.dit), states(pipe.ipadapter_image_encoder), states(ip)
    assert trainer.mode == "ipadapter" and trainer.trained["ipadapter"] is ip
    assert {n for n, _ in trainer.params} == {f"ipadapter.{k}" for k in ip.state_dict()}   # the whole IP-Adapter
    assert not any(p.requires_grad for m in (pipe.dit, pipe.ipadapter_image_encoder, pipe.vae)
                   for p in m.parameters())
    samples = [trainer.dataset[0]]
    assert len(samples[0]["ipadapter_images"]) == 2   # a JSON list of two references
    before = fixed_loss(trainer, samples)
    result = run_quietly(trainer)
    after = fixed_loss(trainer, samples)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    # Measured 1.487 -> 1.172 (ratio 0.79) over 16 steps at lr 1e-2; an optimizer that never steps, or keys and
    # values bound without gradients (detached from the IP-Adapter: no parameter gets a gradient), leave it at 1.
    assert after < 0.93 * before
    assert all(torch.equal(v, dit_before[k]) for k, v in pipe.dit.state_dict().items())        # frozen DiT
    assert all(torch.equal(v, encoder_before[k]) for k, v in pipe.ipadapter_image_encoder.state_dict().items())
    trained = ip.state_dict()
    assert sum(not torch.equal(trained[k], ip_before[k]) for k in trained) == len(trained)   # every tensor moved

    saved = load_file(result["path"])
    assert set(saved) == set(trained)   # DiffSynth's names: image_proj.*, ipadapter_modules.<i>.to_{k,v}_ip.weight
    assert "ipadapter_modules.3.to_k_ip.weight" in saved and "image_proj.proj.0.weight" in saved
    loaded = load_model(result["path"], torch_dtype=torch.float32, kind="ipadapter")
    assert loaded.params == ip.params
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)   # bit-exact

    # DiffSynth's own FluxIpAdapter takes the file with load_state_dict(strict=True), as its validate_full script
    # does, and makes the trained module's keys and values.
    theirs = tiny_diffsynth_ipadapter()
    theirs.load_state_dict({k: v.clone() for k, v in saved.items()}, strict=True)
    features = torch.randn(2, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(features)
        ours = loaded.keys_values(loaded.image_tokens(features), num_heads=2)
    for block, (k, v) in enumerate(ours):
        # Measured 0 to 5e-7 (float32); the untrained weights' keys and values are 1e-2+ away.
        assert torch.allclose(k, expected[block]["ip_k"], atol=1e-5, rtol=0)
        assert torch.allclose(v, expected[block]["ip_v"], atol=1e-5, rtol=0)


def test_the_ipadapter_gets_gradients_only_from_the_reference_features(world, tmp_path):
    """Keys and values are bound inside the step: the IP-Adapter's gradient is not zero and follows the reference
    image; the image encoder gets none."""
    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[0]

    def gradient(s):
        return loss_gradient(trainer, s, 7)

    base = gradient(sample)
    moved = gradient(dict(sample, ipadapter_images=[reference_image(99, (48, 40))]))
    assert all(p.grad is None for p in trainer.pipe.ipadapter_image_encoder.parameters())
    scale = base.abs().max().item()
    print(f"IP-Adapter gradient: max {scale:.3e}; another reference image moves it by {(base - moved).abs().max():.3e}")
    # Measured: max 0.16, moved by 1.3e-2. Bound 1e-3 of the gradient: a reference ignored gives exactly 0.
    assert scale > 1e-4 and (base - moved).abs().max().item() > 1e-3 * scale
    assert torch.equal(base, gradient(sample))   # deterministic, so the difference is real


def test_ipadapter_resume_across_an_epoch_equals_an_uninterrupted_run(world, tmp_path):
    argv = lambda out, *x: ip_argv(world, out, "--num_epochs", "2", "--save_steps", "3",  # noqa: E731
                                   "--gradient_accumulation_steps", "2", *x)
    start, whole = resumed_and_whole(argv, tmp_path, cut=3)   # cut in epoch 0 (4 steps an epoch)
    assert start["start_step"] == 3 and start["mode"] == "ipadapter" and start["steps_per_epoch"] == 4
    assert whole["path"].name == "step-8.safetensors"
    earlier, last = (load_file(tmp_path / "whole" / f"step-{n}.safetensors") for n in (3, 8))
    assert any(not torch.equal(earlier[k], last[k]) for k in last)   # the steps after the cut trained


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(world, tmp_path):
    """The IP-Adapter is bound inside the one forward of the module accelerate wraps, so DDP averages its gradients."""
    from tests.tiny_train import two_processes_and_one
    a, b = two_processes_and_one(lambda out, *extra: ip_argv(world, out, *extra), tmp_path)
    assert a.keys() == b.keys()
    print(f"2 processes vs 1 with accumulation: {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    # Measured 0. The IP-Adapter bound outside the DDP-wrapped forward (gradients not synchronised) gave 1.8e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


# ------------------------------------------------------------------------------------------------ LoRA
def test_the_reference_image_reaches_the_loras_gradient(world, tmp_path):
    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "out", lora=True)))
    trainer.setup()
    nonzero_lora(trainer)
    sample = trainer.dataset[0]

    def gradient(s):
        return loss_gradient(trainer, s, 7)

    base, moved = gradient(sample), gradient(dict(sample, ipadapter_images=[reference_image(99, (48, 40))]))
    assert all(p.grad is None and not p.requires_grad for p in trainer.pipe.ipadapter.parameters())   # frozen
    scale = base.abs().max().item()
    print(f"LoRA gradient: max {scale:.3e}; another reference image moves it by {(base - moved).abs().max():.3e}")
    # Measured: max 0.34, moved by 5.8e-3; with the IP-Adapter left out of the loss the difference is exactly 0.
    assert (base - moved).abs().max().item() > 1e-3 * scale
    assert trainer.mode == "lora" and trainer.trained is trainer.pipe.dit


# ------------------------------------------------------------------------------------------------ validation
def test_validation_images_get_the_first_rows_reference_images(world, tmp_path):
    out = tmp_path / "out"
    validation = ("--validation_prompts", "a cat red", "--validation_height", "32", "--validation_width", "32",
                  "--validation_num_inference_steps", "2")
    trainer = Trainer(parse_args(ip_argv(world, out, "--max_steps", "1", *validation)))
    trainer.setup()
    run_quietly(trainer)
    image = np.asarray(Image.open(out / "validation" / "step-1-0.png"), dtype=np.int16)
    common = dict(prompt="a cat red", height=32, width=32, seed=0, num_inference_steps=2, embedded_guidance=3.5,
                  t5_sequence_length=16, progress_bar_cmd=None)
    from flux_core.train.dataset import crop_and_resize
    # the first row's reference as training sees it: 48x40 cropped to 48x32 (multiples of 16)
    first = [crop_and_resize(Image.open(world.data / "reference 0.png").convert("RGB"), 48, 32)]
    again = np.asarray(trainer.pipe(**common, ipadapter_images=first), dtype=np.int16)
    plain = np.asarray(trainer.pipe(**common), dtype=np.int16)
    print(f"validation image vs the pipeline with the first row's reference: {np.abs(image - again).max()}, "
          f"without it: {np.abs(image - plain).max()} levels")
    # Measured 0 (the same call on the same weights; the uncropped reference gives 1 level) and 20 levels without
    # the reference image.
    assert np.abs(image - again).max() == 0
    assert np.abs(image - plain).max() > 3

    # --validation_ipadapter_images replaces the first row's reference
    other = tmp_path / "other reference.png"
    Image.new("RGB", (40, 40), (250, 250, 250)).save(other)   # far from the noise references (tiny SigLIP)
    flagged = Trainer(parse_args(ip_argv(world, tmp_path / "flagged", "--max_steps", "1", *validation,
                                         "--validation_ipadapter_images", str(other))))
    flagged.setup()
    run_quietly(flagged)
    flagged_image = np.asarray(Image.open(tmp_path / "flagged" / "validation" / "step-1-0.png"), dtype=np.int16)
    expected = np.asarray(flagged.pipe(**common, ipadapter_images=[Image.open(other).convert("RGB")]), dtype=np.int16)
    print(f"with --validation_ipadapter_images: {np.abs(flagged_image - image).max()} levels from the first row's")
    # Measured 0 from the pipeline given that image, and 2 levels from the first row's image (the tiny random SigLIP
    # pools different images to close features); with the flag ignored the two runs are the same call: exactly 0.
    assert np.abs(flagged_image - expected).max() == 0 and np.abs(flagged_image - image).max() > 0

    # validate_full renders the trained IP-Adapter from its checkpoint in place of the one of the model flags
    from flux_core.train.__main__ import main
    first[0].save(tmp_path / "first reference.png")
    common_flags = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--t5_sequence_length", "16",
                    "--torch_dtype", "float32", "--device", "cpu", "--prompt", "a cat red",
                    "--embedded_guidance", "3.5", "--model_paths", world.model_paths("siglip")]
    checkpoint = str(out / "step-1.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate_full", "--checkpoint", checkpoint, "--output", str(tmp_path / "v.png"),
                     "--ipadapter_images", str(tmp_path / "first reference.png"), *common_flags]) == 0
    rendered = np.asarray(Image.open(tmp_path / "v.png"), dtype=np.int16)
    assert np.abs(image - rendered).max() == 0   # measured 0: the same weights, inputs and call
    from flux_core.train.validate import run
    with pytest.raises(TrainError, match="is an IP-Adapter: give --ipadapter_images"):
        run("validate_full", ["--checkpoint", checkpoint, "--output", str(tmp_path / "w.png"), *common_flags])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("extra, message", [
    (("--trainable_models", "ipadapter"),
     r"--extra_inputs --trainable_models ipadapter needs the reference images: add --extra_inputs ipadapter_images"),
    (("--trainable_models", "dit,ipadapter", "--extra_inputs", "ipadapter_images"),
     r"--trainable_models dit,ipadapter: train one model per run"),
    (("--trainable_models", "ipadapter,image_proj_model", "--extra_inputs", "ipadapter_images"),
     r"--trainable_models ipadapter,image_proj_model: train one model per run"),
    (("--trainable_models", "ipadapter", "--lora_base_model", "dit", "--extra_inputs", "ipadapter_images"),
     r"--trainable_models ipadapter and --lora_base_model dit together"),
    (("--trainable_models", "ipadapter", "--extra_inputs", "ipadapter_images", "--fp8_models", "dit",
      "--data_file_keys", "image,infinityou_guidance"), r"--data_file_keys infinityou_guidance: that column holds a "
                                                        r"number"),
    (("--lora_base_model", "dit", "--validation_prompts", "a cat", "--validation_ipadapter_images", "x.png"),
     r"--validation_ipadapter_images: validation reference images are for runs with --extra_inputs ipadapter_images"),
    (("--lora_base_model", "dit", "--extra_inputs", "ipadapter_images", "--validation_prompts", "a cat",
      "--validation_ipadapter_images", "gone.png"), r"--validation_ipadapter_images gone.png: no such file"),
])
def test_argument_errors_name_the_flag(world, tmp_path, extra, message):
    argv = adapter_argv(world, tmp_path / "out", "ipadapter.csv", MODELS, *extra)
    with pytest.raises(TrainError, match=message):
        parse_args(argv)


def test_missing_models_are_named_before_any_weights_load(world, tmp_path, monkeypatch):
    from flux_core.pipeline import FluxImagePipeline

    def not_called(*a, **k):
        raise AssertionError("from_pretrained ran before the model flags were checked")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", not_called)
    message = failing_setup(ip_argv(world, tmp_path / "a", models=()))
    assert message.startswith("--extra_inputs ipadapter_images: the model flags load no IP-Adapter "
                              "(InstantX/FLUX.1-dev-IP-Adapter:ip-adapter.bin")
    assert "and no image encoder for it (InstantX: google/siglip-so400m-patch14-384" in message
    message = failing_setup(ip_argv(world, tmp_path / "b", models=("ipadapter",)))
    assert "load no image encoder for it" in message and "IP-Adapter (InstantX" not in message
    # LoRA runs need them too
    assert "load no" in failing_setup(ip_argv(world, tmp_path / "c", lora=True, models=("siglip",)))


def test_an_ipadapter_that_does_not_fit_the_dit_is_named(world, tmp_path):
    from tests.tiny_ipadapter import instantx_state_dict, write_instantx
    write_instantx(instantx_state_dict(blocks=3), tmp_path / "short.bin")   # 3 blocks for a 2 + 2 block DiT
    argv = ip_argv(world, tmp_path / "a")
    models = json.loads(argv[argv.index("--model_paths") + 1])
    argv[argv.index("--model_paths") + 1] = json.dumps([models[0], str(tmp_path / "short.bin"), models[2]])
    message = failing_setup(argv)
    assert "the IP-Adapter has 3 blocks of width 32, but the DiT needs 4 of width 32" in message


def test_a_row_without_its_reference_names_the_row_and_column(world, tmp_path):
    data = world.data
    (data / "no reference.csv").write_text("image,prompt,ipadapter_images\nred é.png,a cat,reference 0.png\n"
                                           "red é.png,a cat,\n", encoding="utf-8")
    message = failing_setup(ip_argv(world, tmp_path / "a", metadata="no reference.csv"))
    assert message.startswith("no reference.csv row 2") and "no 'ipadapter_images' value" in message
    (data / "gone reference.csv").write_text('image,prompt,ipadapter_images\n'
                                             'red é.png,a cat,"[""reference 0.png"", ""gone.png""]"\n',
                                             encoding="utf-8")
    message = failing_setup(ip_argv(world, tmp_path / "b", metadata="gone reference.csv"))
    assert message.startswith("gone reference.csv row 1") and "'ipadapter_images' image" in message
    assert "gone.png does not exist" in message


def test_a_frozen_ipadapter_may_be_stored_in_fp8_but_not_the_trained_one(world, tmp_path):
    entry = str(world.ipadapter)
    message = failing_setup(ip_argv(world, tmp_path / "a", "--fp8_models", entry))
    assert message.startswith("--fp8_models names the IP-Adapter, which --trainable_models ipadapter trains")
    # LoRA runs: the frozen IP-Adapter and SigLIP stored in float8, computed in the training dtype
    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "lora", "--fp8_models", f"{entry},{world.siglip}",
                                         "--max_steps", "2", lora=True)))
    trainer.setup()
    for model in (trainer.pipe.ipadapter, trainer.pipe.ipadapter_image_encoder):
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        assert matrices and all(p.dtype == torch.float8_e4m3fn for p in matrices)
    assert run_quietly(trainer)["step"] == 2
    assert all(np.isfinite(e["loss"]) for e in read_log(tmp_path / "lora") if e["event"] == "step")


# ------------------------------------------------------------------------------------------------ DiffSynth's loss
def test_ipadapter_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path):
    """One sample's loss with the IP-Adapter: ours (trainer._loss) against DiffSynth-Studio's own FlowMatchSFTLoss with
    its FlowMatchScheduler, model_fn_flux_image and FluxIpAdapter (its converter reading ip-adapter.bin), drawing from
    the global generator seeded alike; latents and text from diffusers, SigLIP's pooled features from transformers
    (DiffSynth's preprocessing: bicubic resize to the encoder's size, [-1, 1]; the tiny tower takes 28, not 384)."""

    from tests.diffsynth_ref import (diffsynth_flux, diffsynth_ipadapter, diffsynth_training_pipe, tiny_diffsynth_dit,
                                     tiny_diffsynth_ipadapter)
    from tests.tiny_dit import diffsynth_state_dict as dit_diffsynth_sd
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    _, converter = diffsynth_ipadapter()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from transformers import SiglipModel

    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[1]   # two reference images
    seed = 4321
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    vae = ref.vae

    def encode(image):
        return reference_encode_image(vae, image)

    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(dit_diffsynth_sd(ref.transformer), strict=True)
    their_ip = tiny_diffsynth_ipadapter()
    their_ip.load_state_dict(converter(torch.load(world.ipadapter, weights_only=True)), strict=True)
    siglip = SiglipModel.from_pretrained(world.siglip).vision_model.eval()   # the folder holds both towers
    size = siglip.config.image_size
    pixels = torch.cat([torch.from_numpy(np.asarray(i.convert("RGB").resize((size, size), resample=3),
                                                    dtype=np.float32)).permute(2, 0, 1)[None] / 255 * 2 - 1
                        for i in sample["ipadapter_images"]])
    pipe = diffsynth_training_pipe(model_fn, dit=their_dit)
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        features = siglip(pixel_values=pixels).pooler_output
        inputs = dict(input_latents=encode(sample["image"]), prompt_emb=emb, pooled_prompt_emb=pooled,
                      guidance=torch.tensor([1.0]), text_ids=torch.zeros(1, emb.shape[1], 3),
                      ipadapter_kwargs_list=their_ip(features), progress_id=0, num_inference_steps=1)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        torch.manual_seed(seed)   # the same draw without the IP-Adapter: how much it moves this loss
        plain = FlowMatchSFTLoss(pipe, **{**inputs, "ipadapter_kwargs_list": {}}).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f}, DiffSynth without the IP-Adapter {plain:.6f}")
    # Measured 0.270403 vs 0.270402 (4e-6 relative, float32); without the IP-Adapter DiffSynth's loss is 0.267079,
    # 1.2e-2 relative away: 120 times the bound.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(theirs - plain) > 10 * 1e-4 * abs(theirs)


# ------------------------------------------------------------------------------------------------ memory options
@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_gives_the_ipadapter_the_same_gradients(world, tmp_path, offload):
    """The DiT's blocks are recomputed in the backward pass with the IP-Adapter's keys and values (made once, outside
    the blocks) attended to again: the same gradients."""
    flag = "--use_gradient_checkpointing_offload" if offload else "--use_gradient_checkpointing"
    trainer = Trainer(parse_args(ip_argv(world, tmp_path / "out", flag)))
    trainer.setup()
    dit = trainer.pipe.dit
    assert dit.gradient_checkpointing and dit.gradient_checkpointing_offload == offload
    sample = trainer.dataset[1]

    def gradient():
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._loss(sample, torch.Generator().manual_seed(3)).backward()
        grads = torch.cat([p.grad.flatten() for _, p in trainer.params])
        trainer.optimizer.zero_grad(set_to_none=True)
        return grads

    checkpointed = gradient()
    dit.gradient_checkpointing = dit.gradient_checkpointing_offload = False
    plain = gradient()
    print(f"checkpointed vs plain: {(checkpointed - plain).abs().max():.2e} (gradient up to {plain.abs().max():.2e})")
    # Measured 0 (the same kernels run again in the backward pass); keys and values lost in the recomputation would
    # zero or change the gradient far beyond the bound.
    assert plain.abs().max() > 1e-3 and torch.allclose(checkpointed, plain, atol=1e-6, rtol=0)


def test_the_xlabs_ipadapter_trains_and_reads_back_too(world, tmp_path):
    """XLabs' IP-Adapter (double blocks only, CLIP ViT-L features, biases) through the same run: it learns, and its
    file (DiffSynth-style names) loads back as the XLabs family, equal to the trained module."""
    from tests.tiny_ipadapter import make_clip_vision, write_xlabs, xlabs_state_dict
    write_xlabs(xlabs_state_dict(seed=8), tmp_path / "flux-ip-adapter.safetensors")
    make_clip_vision(seed=9).save_pretrained(tmp_path / "clip-vit")   # a transformers folder (its config.json)
    argv = ip_argv(world, tmp_path / "out", "--max_steps", "3")
    argv[argv.index("--model_paths") + 1] = json.dumps([str(world.setup.model), str(tmp_path / "clip-vit"),
                                                        str(tmp_path / "flux-ip-adapter.safetensors")])
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    ip = trainer.pipe.ipadapter
    assert ip.params.family == "xlabs" and ip.params.num_blocks == 2
    before = states(ip)
    result = run_quietly(trainer)
    trained = ip.state_dict()
    assert sum(not torch.equal(trained[k], before[k]) for k in trained) == len(trained)
    loaded = load_model(result["path"], torch_dtype=torch.float32, kind="ipadapter")
    assert loaded.params == ip.params
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
