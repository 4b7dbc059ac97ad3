"""flux_core.train with the LoRA-Encoder (DiffSynth-Studio's command for the LoRA-Encoder row: `--trainable_models
lora_encoder --extra_inputs lora_encoder_inputs --remove_prefix_in_ckpt pipe.lora_encoder.`):
- the encoder learns with the DiT frozen, and the LoRA is not applied to the DiT (as in DiffSynth's training);
- the training loss equals DiffSynth's own FlowMatchSFTLoss with its LoRA-Encoder unit's tokens;
- its checkpoint is in DiffSynth's names, loads back through load_model(kind="lora_encoder") bit-exact and strictly
  into DiffSynth's own FluxLoRAEncoder with the same tokens; resume equals an uninterrupted run;
- validation images (in the run and validate_full) get the LoRA's tokens;
- errors naming the flag, column, row or file.
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
from safetensors.torch import load_file

from flux_core.loading.loader import load_model
from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import Trainer
from tests.tiny_train import loss_gradient, make_lora_encoder_data, make_train_setup, resumed_and_whole
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

FULL = ("--trainable_models", "lora_encoder", "--extra_inputs", "lora_encoder_inputs", "--remove_prefix_in_ckpt",
        "pipe.lora_encoder.", "--learning_rate", "1e-3")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora encoder train")
    setup = make_train_setup(tmp)
    return types.SimpleNamespace(setup=setup, tmp=tmp, encoder=make_lora_encoder_data(setup, tmp))


def le_argv(world, output, *extra, metadata="loras.csv", encoder=True, mode=FULL):
    data = world.setup.data
    models = [str(world.setup.model)] + ([str(world.encoder)] if encoder else [])
    return ["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / metadata), "--model_paths",
            json.dumps(models), "--output_path", str(output), "--torch_dtype", "float32", "--t5_sequence_length", "16",
            *mode, *extra]


def run_quietly(trainer: Trainer) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer._run()


def failing_setup(argv) -> str:
    with pytest.raises(TrainError) as info:
        Trainer(parse_args(argv)).setup()
    return str(info.value)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def fixed_loss(trainer: Trainer, samples: list[dict], draws: int = 4) -> float:
    with torch.no_grad():
        return float(np.mean([trainer._loss(s, torch.Generator().manual_seed(50 + k)).item()
                              for s in samples for k in range(draws)]))


def their_tokens(module, path) -> torch.Tensor:
    """DiffSynth's tokens of a LoRA file: its FluxLoRALoader's conversion (as its LoRA-Encoder unit reads the file; it
    scales tensors in place: fed copies) through `module`, a DiffSynth FluxLoRAEncoder."""
    from tests.diffsynth_ref import diffsynth_lora_models
    _, _, loader = diffsynth_lora_models()
    sd = {k: v.clone() for k, v in load_file(str(path)).items()}
    return module(loader(torch_dtype=torch.float32, device="cpu").convert_state_dict(sd))


# ------------------------------------------------------------------------------------------------ training
def test_lora_encoder_training_learns_and_writes_diffsynths_names(world, tmp_path):
    from tests.tiny_lora_models import TINY_ENCODER
    from tests.diffsynth_ref import tiny_diffsynth_lora_encoder, tiny_lora_patterns

    (world.setup.data / "loras one.csv").write_text(
        "image,prompt,lora_encoder_inputs\ngreen é.png,a dog green,loras/style b.safetensors\n", encoding="utf-8")
    trainer = Trainer(parse_args(le_argv(world, tmp_path / "out", "--learning_rate", "1e-1", "--dataset_repeat", "12",
                                         metadata="loras one.csv")))
    trainer.setup()
    pipe = trainer.pipe
    encoder = pipe.lora_encoder
    dit_before, encoder_before = states(pipe.dit), states(encoder)
    assert trainer.mode == "lora_encoder" and trainer.trained["lora_encoder"] is encoder
    assert {n for n, _ in trainer.params} == {f"lora_encoder.{k}" for k in encoder.state_dict()}
    assert not any(p.requires_grad for m in (pipe.dit, pipe.vae, pipe.text_encoder_1) for p in m.parameters())
    assert not any("lora" in n for n, _ in pipe.dit.named_modules())   # the LoRA is not applied to the DiT
    samples = [trainer.dataset[0]]
    before = fixed_loss(trainer, samples)
    result = run_quietly(trainer)
    after = fixed_loss(trainer, samples)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    # Measured 2.0755 -> 2.0484 over 12 steps at lr 1e-1 (the fixed draws are deterministic: any drop is learning;
    # one token among the caption's 16 moves the tiny DiT little); an optimizer that never steps, or tokens computed
    # without gradients (no parameter gets one), leave it equal.
    assert after < 0.995 * before
    assert all(torch.equal(v, dit_before[k]) for k, v in pipe.dit.state_dict().items())   # frozen DiT
    trained = encoder.state_dict()
    moved = sum(not torch.equal(trained[k], encoder_before[k]) for k in trained)
    assert moved == len(trained)   # every tensor of the encoder learned

    saved = load_file(result["path"])
    assert set(saved) == set(trained)   # DiffSynth's names: embedder.model_dict.*, encoders.0.*, special_embeds, ...
    assert "special_embeds" in saved and "embedder.proj_dict.attn___a_to_qkv.weight" in saved
    loaded = load_model(result["path"], torch_dtype=torch.float32, kind="lora_encoder")
    assert loaded.params == encoder.params
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)   # bit-exact

    # DiffSynth's own FluxLoRAEncoder takes the file with load_state_dict(strict=True), as its validate_full script
    # does, and makes the trained encoder's tokens.
    theirs = tiny_diffsynth_lora_encoder(tiny_lora_patterns(), **TINY_ENCODER)
    theirs.load_state_dict({k: v.clone() for k, v in saved.items()}, strict=True)
    from flux_core.lora_encoder import check_lora_encoder_inputs, encode_loras
    lora = world.setup.data / "loras" / "style a.safetensors"
    with torch.no_grad():
        expected = their_tokens(theirs, lora)
        ours = encode_loras(loaded, check_lora_encoder_inputs(str(lora), loaded, pipe.dit))
        theirs.load_state_dict(encoder_before, strict=True)
        untrained = their_tokens(theirs, lora)
    relative = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    print(f"tokens: ours vs DiffSynth's {relative(ours, expected):.1e}, the untrained ones "
          f"{relative(untrained, expected):.1e} relative")
    # Measured 1.9e-8 relative (float32); the untrained encoder's tokens differ by 1.0 relative.
    assert relative(ours, expected) < 1e-4
    assert relative(untrained, expected) > 1e-2


def test_the_encoder_gets_gradients_from_the_sample_lora(world, tmp_path):
    trainer = Trainer(parse_args(le_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[0]

    def gradient(s):
        return loss_gradient(trainer, s, 7)

    base = gradient(sample)
    other = gradient(trainer.dataset[1])   # the other LoRA (and caption, image)
    same_lora = gradient(dict(sample, lora_encoder_inputs=trainer.dataset[1]["lora_encoder_inputs"]))
    assert all(p.grad is None for p in trainer.pipe.dit.parameters())
    scale = base.abs().max().item()
    print(f"encoder gradient: max {scale:.3e}; the other LoRA file moves it by {(base - same_lora).abs().max():.3e}")
    # Measured: max 4.6e-2; the other LoRA moves it by 4.0e-3. A LoRA file not read into the tokens gives exactly 0.
    assert scale > 1e-4 and (base - same_lora).abs().max().item() > 1e-3 * scale
    assert not torch.equal(base, other)
    assert torch.equal(base, gradient(sample))   # deterministic, so the difference is real


def test_lora_encoder_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path):
    """One sample's loss: ours against DiffSynth-Studio 2.1.12's FlowMatchSFTLoss with its model_fn_flux_image, the
    prompt extended by its FluxImageUnit_LoRAEncode (its FluxLoRAEncoder and FluxLoRALoader on the file), on the same
    weights, drawing from the global generator seeded alike."""
    from tests.diffsynth_ref import (diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_dit,
                                     tiny_diffsynth_lora_encoder, tiny_lora_patterns)
    from tests.tiny_dit import diffsynth_state_dict
    from tests.tiny_lora_models import TINY_ENCODER
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.pipelines.flux_image import FluxImageUnit_LoRAEncode

    trainer = Trainer(parse_args(le_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[0]
    seed = 777
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(ref.transformer), strict=True)
    their_encoder = tiny_diffsynth_lora_encoder(tiny_lora_patterns(), **TINY_ENCODER)
    their_encoder.load_state_dict({k: v.clone() for k, v in load_file(str(world.encoder)).items()}, strict=True)
    pipe = diffsynth_training_pipe(model_fn, dit=their_dit, lora_encoder=their_encoder)
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        _, posi, _ = FluxImageUnit_LoRAEncode().process(pipe, {"lora_encoder_inputs": sample["lora_encoder_inputs"]},
                                                         {"prompt_emb": emb, "text_ids": torch.zeros(1, 16, 3)}, {})
        inputs = dict(input_latents=reference_encode_image(ref.vae, sample["image"]), pooled_prompt_emb=pooled,
                      guidance=torch.tensor([1.0]), progress_id=0, num_inference_steps=1)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs, **posi).item()
        torch.manual_seed(seed)   # the same draw without the LoRA's tokens: how much they move this loss
        plain = FlowMatchSFTLoss(pipe, **inputs, prompt_emb=emb, text_ids=torch.zeros(1, 16, 3)).item()
    assert posi["prompt_emb"].shape == (1, 17, 32)
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f} ({abs(ours - theirs) / theirs:.1e} relative), without the "
          f"tokens {plain:.6f} ({abs(plain - theirs) / theirs:.1e})")
    # Measured 6.4e-7 relative (float32); without the LoRA's token DiffSynth's loss moves by 8.4e-3 relative: 84 times
    # the bound. The LoRA-Encoder adapter left out of the loss was seen to fail it.
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(theirs - plain) > 10 * 1e-4 * abs(theirs)


def test_lora_encoder_resume_across_an_epoch_equals_an_uninterrupted_run(world, tmp_path):
    argv = lambda out, *x: le_argv(world, out, "--num_epochs", "2", "--save_steps", "3",  # noqa: E731
                                   "--gradient_accumulation_steps", "2", *x)
    start, whole = resumed_and_whole(argv, tmp_path, cut=3)   # cut in epoch 0 (4 steps an epoch)
    assert start["start_step"] == 3 and start["mode"] == "lora_encoder"
    assert whole["path"].name == "step-8.safetensors"


# ------------------------------------------------------------------------------------------------ validation
def test_validation_images_get_the_first_rows_lora_tokens(world, tmp_path):
    out = tmp_path / "out"
    validation = ("--validation_prompts", "a cat red", "--validation_height", "32", "--validation_width", "32",
                  "--validation_num_inference_steps", "2")
    trainer = Trainer(parse_args(le_argv(world, out, "--max_steps", "1", *validation)))
    trainer.setup()
    run_quietly(trainer)
    image = np.asarray(Image.open(out / "validation" / "step-1-0.png"), dtype=np.int16)
    first = trainer.dataset[0]["lora_encoder_inputs"]
    common = dict(prompt="a cat red", height=32, width=32, seed=0, num_inference_steps=2, embedded_guidance=3.5,
                  t5_sequence_length=16, progress_bar_cmd=None)
    again = np.asarray(trainer.pipe(**common, lora_encoder_inputs=[first]), dtype=np.int16)
    plain = np.asarray(trainer.pipe(**common), dtype=np.int16)
    print(f"validation image vs the pipeline with the first row's LoRA: {np.abs(image - again).max()}, without it: "
          f"{np.abs(image - plain).max()} levels")
    # Measured 0 (the same call on the same weights) and 8 levels without the LoRA's token.
    assert np.abs(image - again).max() == 0
    assert np.abs(image - plain).max() > 2

    # validate_full renders the trained encoder from its checkpoint in place of the one of the model flags; with
    # --lora_path the LoRA is applied to the DiT too (DiffSynth's validate script)
    from flux_core.lora import load_lora
    from flux_core.train.__main__ import main
    from flux_core.train.validate import run
    flags = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--t5_sequence_length", "16",
             "--torch_dtype", "float32", "--device", "cpu", "--prompt", "a cat red", "--embedded_guidance", "3.5",
             "--model_paths", json.dumps([str(world.setup.model)]), "--checkpoint", str(out / "step-1.safetensors")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["validate_full", *flags, "--output", str(tmp_path / "v.png"), "--lora_encoder_inputs", first]) == 0
        assert main(["validate_full", *flags, "--output", str(tmp_path / "w.png"), "--lora_encoder_inputs", first,
                     "--lora_path", first]) == 0
    assert np.abs(image - np.asarray(Image.open(tmp_path / "v.png"), dtype=np.int16)).max() == 0   # measured 0
    load_lora(trainer.pipe.dit, first)
    with_lora = np.asarray(trainer.pipe(**common, lora_encoder_inputs=[first]), dtype=np.int16)
    assert np.abs(with_lora - np.asarray(Image.open(tmp_path / "w.png"), dtype=np.int16)).max() == 0
    assert np.abs(with_lora - image).max() > 0
    with pytest.raises(TrainError, match="is a LoRA-Encoder: give --lora_encoder_inputs"):
        run("validate_full", [*flags, "--output", str(tmp_path / "x.png")])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("extra, message", [
    (("--trainable_models", "lora_encoder"),
     r"--trainable_models lora_encoder needs the LoRAs it encodes: add --extra_inputs lora_encoder_inputs"),
    (("--trainable_models", "dit,lora_encoder", "--extra_inputs", "lora_encoder_inputs"),
     r"--trainable_models dit,lora_encoder: train one model per run"),
    (("--trainable_models", "lora_encoder", "--extra_inputs", "lora_encoder_inputs", "--data_file_keys",
      "image,lora_encoder_inputs"), r"--data_file_keys lora_encoder_inputs: that column holds a LoRA file"),
    (("--lora_base_model", "dit", "--validation_prompts", "a cat", "--validation_lora_encoder_inputs", "x.safetensors"),
     r"--validation_lora_encoder_inputs: validation LoRAs are for runs with --extra_inputs lora_encoder_inputs"),
])
def test_argument_errors_name_the_flag(world, tmp_path, extra, message):
    with pytest.raises(TrainError, match=message):
        parse_args(le_argv(world, tmp_path / "out", mode=extra))


def test_a_run_without_a_lora_encoder_is_refused_before_any_weights_load(world, tmp_path, monkeypatch):
    from flux_core.pipeline import FluxImagePipeline

    def not_called(*a, **k):
        raise AssertionError("from_pretrained ran before the model flags were checked")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", not_called)
    message = failing_setup(le_argv(world, tmp_path / "a", encoder=False))
    assert message.startswith("--extra_inputs lora_encoder_inputs: the model flags load no LoRA-Encoder")


def test_bad_lora_rows_are_named_all_at_once(world, tmp_path):
    from tests.tiny_lora_models import write_site_lora
    data = world.setup.data
    write_site_lora(data / "loras" / "partial.safetensors", "kohya", seed=5, drop=("single_blocks.1.linear2",))
    (data / "bad loras.csv").write_text("image,prompt,lora_encoder_inputs\n"
                                        "red é.png,a cat,loras/style a.safetensors\n"
                                        "green é.png,a dog,loras/partial.safetensors\n"
                                        "blue é.png,a horse,loras/partial.safetensors\n", encoding="utf-8")
    message = failing_setup(le_argv(world, tmp_path / "a", metadata="bad loras.csv"))
    print(message)
    assert message.startswith("--extra_inputs lora_encoder_inputs: bad loras.csv row 2")
    assert "bad loras.csv row 3" in message and "bad loras.csv row 1" not in message
    assert "has LoRAs on 25 of the 26 layers the LoRA-Encoder reads; 1 missing: single_blocks.1.linear2" in message
    (data / "gone lora.csv").write_text("image,prompt,lora_encoder_inputs\nred é.png,a cat,loras/gone.safetensors\n",
                                        encoding="utf-8")
    message = failing_setup(le_argv(world, tmp_path / "b", metadata="gone lora.csv"))
    assert message.startswith("gone lora.csv row 1 (line 2): 'lora_encoder_inputs' file")
    assert "does not exist" in message


def test_a_frozen_lora_encoder_conditions_a_dit_lora(world, tmp_path):
    """--lora_base_model dit with lora_encoder_inputs: the frozen encoder's tokens condition the LoRA's training."""
    lora = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2", "--extra_inputs",
            "lora_encoder_inputs", "--max_steps", "2")
    trainer = Trainer(parse_args(le_argv(world, tmp_path / "out", mode=lora)))
    trainer.setup()
    assert trainer.mode == "lora" and not any(p.requires_grad for p in trainer.pipe.lora_encoder.parameters())
    assert run_quietly(trainer)["step"] == 2
    # With validation images: the pipeline reads the LoRA against the DiT, whose layers peft has wrapped.
    validated = Trainer(parse_args(le_argv(world, tmp_path / "val", "--validation_prompts", "a cat",
                                           "--validation_height", "32", "--validation_width", "32",
                                           "--validation_num_inference_steps", "2", mode=lora[:-1] + ("1",))))
    validated.setup()
    run_quietly(validated)
    assert (tmp_path / "val" / "validation" / "step-1-0.png").is_file()
    message = failing_setup(le_argv(world, tmp_path / "fp8", "--fp8_models", str(world.encoder)))
    assert message.startswith("--fp8_models names the LoRA-Encoder, which --trainable_models lora_encoder trains")


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(world, tmp_path):
    """The tokens are made inside the one forward of the module accelerate wraps, so DDP averages the encoder's
    gradients."""
    from tests.tiny_train import two_processes_and_one
    a, b = two_processes_and_one(lambda out, *extra: le_argv(world, out, *extra), tmp_path)
    assert a.keys() == b.keys()
    print(f"2 processes vs 1 with accumulation: {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    # Measured 0 (float32, gloo on a CPU); gradients not synchronised would leave each process its own weights.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_a_row_may_hold_a_list_of_loras(world, tmp_path):
    """A JSON list in the column (a .json row's list, or JSON text in a CSV cell): the LoRAs' tokens one after the
    other, as DiffSynth's LoRA-Encoder unit encodes a list."""
    from flux_core.adapters import DiTCall
    from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs
    from flux_core.lora_encoder import check_lora_encoder_inputs, encode_loras
    data = world.setup.data
    (data / "two loras.csv").write_text('image,prompt,lora_encoder_inputs\nred é.png,a cat red,'
                                        '"[""loras/style a.safetensors"", ""loras/style b.safetensors""]"\n',
                                        encoding="utf-8")
    trainer = Trainer(parse_args(le_argv(world, tmp_path / "out", metadata="two loras.csv")))
    trainer.setup()
    sample = trainer.dataset[0]
    paths = [str(data / "loras" / f"style {s}.safetensors") for s in "ab"]
    assert sample["lora_encoder_inputs"] == paths
    from flux_core.train.lora_encoder import lora_tokens, sample_loras
    encoder = trainer.pipe.lora_encoder
    with torch.no_grad():
        adapter = lora_tokens(trainer.pipe, sample_loras(trainer.pipe, sample))
        one_by_one = [encode_loras(encoder, check_lora_encoder_inputs(p, encoder, None)) for p in paths]
        inputs = prepare_dit_inputs(torch.zeros(1, 16, 4, 4), 0.5, PromptEmbeds(torch.zeros(1, 16, 32),
                                                                              torch.zeros(1, 32)), 1.0, torch.float32)
        txt = adapter.contribute(inputs, DiTCall()).txt
    assert txt.shape == (1, 18, 32)
    assert torch.equal(txt[:, 16:], torch.cat(one_by_one, dim=1))
    # the validation images' default is the whole list of the first row
    assert trainer.validation_adapter_inputs()["lora_encoder_inputs"] == paths
