"""flux_core.train with ControlNets (DiffSynth-Studio's commands for the ControlNet rows):
- `--trainable_models controlnet`: the ControlNet learns with the DiT frozen; its checkpoint is written in DiffSynth's
  own names, loads back with load_model(kind="controlnet") equal to the trained module, and loads strictly into
  DiffSynth's FluxControlNet with the same residuals; resume equals an uninterrupted run;
- `--lora_base_model dit --extra_inputs controlnet_image[,...]`: the control reaches the loss (and the LoRA's gradient);
  the conditioned training loss equals DiffSynth's own FlowMatchSFTLoss with its MultiControlNet;
- validation images get the control input; validate_full renders a trained ControlNet;
- 2 processes equal 1 process with accumulation, for both modes;
- errors naming the flag, column, row or file.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import subprocess
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux_core.loading.loader import load_model
from flux_core.train.__main__ import main
from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import Trainer, train
from flux_core.train.validate import saved_controlnet_config
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_train import SIZE, make_train_setup, nonzero_lora, python, read_log, subprocess_env, resumed_and_whole
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

EXTRAS = {"union": "controlnet_image,controlnet_processor_id", "plain": "controlnet_image",
          "inpaint": "controlnet_image,controlnet_inpaint_mask"}
MODES = ["depth", "canny", "2", "pose", "gray", "tile", "lq", "blur"]



def noise_image(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_rows(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny FLUX folder, three tiny ControlNets (union, plain, alimama-style inpainting) and metadata files whose
    rows pair the 8 colour images with noise control maps, masks and union modes."""
    tmp = tmp_path_factory.mktemp("cn train")
    setup = make_train_setup(tmp)
    nets = {"union": make_diffusers_controlnet(seed=11, num_mode=10),
            "plain": make_diffusers_controlnet(seed=12, num_layers=1, num_single_layers=1),
            "inpaint": make_diffusers_controlnet(seed=13, extra_condition_channels=4)}
    for name, net in nets.items():
        write_diffusers_controlnet(net, tmp / name)
    data = setup.data
    rows = []
    for i, (file, caption) in enumerate(setup.captions.items()):
        noise_image(100 + i).save(data / f"control {i}.png")
        mask = Image.new("RGB", (SIZE, SIZE))
        mask.paste((255, 255, 255), (4 + i, 4, 20 + i, 24))
        mask.save(data / f"mask {i}.png")
        rows.append((file, caption, f"control {i}.png", f"mask {i}.png", MODES[i]))
    write_rows(data / "union.csv", ["image", "prompt", "controlnet_image", "controlnet_processor_id"],
               [(r[0], r[1], r[2], r[4]) for r in rows])
    write_rows(data / "plain.csv", ["image", "prompt", "controlnet_image"], [r[:3] for r in rows])
    write_rows(data / "inpaint.csv", ["image", "prompt", "controlnet_image", "controlnet_inpaint_mask"],
               [r[:4] for r in rows])
    write_rows(data / "one.csv", ["image", "prompt", "controlnet_image", "controlnet_processor_id"],
               [(rows[0][0], rows[0][1], rows[0][2], "depth")])
    return types.SimpleNamespace(tmp=tmp, setup=setup, data=data, nets=nets, rows=rows)


def cn_argv(w, output, net="union", metadata=None, *extra, lora=False, models=None):
    argv = ["--dataset_base_path", str(w.data), "--dataset_metadata_path", str(w.data / f"{metadata or net}.csv"),
            "--model_paths", json.dumps(models if models is not None else [str(w.setup.model), str(w.tmp / net)]),
            "--output_path", str(output), "--torch_dtype", "float32", "--t5_sequence_length", "16",
            "--extra_inputs", EXTRAS[net]]
    if lora:
        argv += ["--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2"]
    else:
        argv += ["--trainable_models", "controlnet", "--learning_rate", "1e-3", "--remove_prefix_in_ckpt",
                 "pipe.controlnet.models.0."]
    return argv + list(extra)


def run_quietly(trainer: Trainer) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer._run()


def fixed_loss(trainer: Trainer, sample: dict, draws: int = 6) -> float:
    """The training objective of one sample on fixed (timestep, noise) draws: its loss without sampling noise."""
    with torch.no_grad():
        return float(np.mean([trainer._loss(sample, torch.Generator().manual_seed(50 + k)).item()
                              for k in range(draws)]))


# ------------------------------------------------------------------------------------------------ ControlNet training
@pytest.mark.slow
def test_controlnet_training_learns_and_writes_diffsynths_names(world, tmp_path):
    from tests.diffsynth_ref import controlnet_key_names, tiny_diffsynth_controlnet
    from tests.test_controlnet_model import AXES, diffsynth_aligned, max_diff
    from tests.tiny_controlnet import controlnet_inputs

    trainer = Trainer(parse_args(cn_argv(world, tmp_path / "out", "union", "one", "--dataset_repeat", "16",
                                         "--use_gradient_checkpointing")))
    trainer.setup()
    dit_before = {k: v.clone() for k, v in trainer.pipe.dit.state_dict().items()}
    cn = trainer.pipe.controlnet.models[0]
    assert trainer.trained is cn and cn.gradient_checkpointing and trainer.pipe.dit.gradient_checkpointing
    assert {n for n, _ in trainer.params} == set(cn.state_dict())      # the whole ControlNet trains ...
    assert not any(p.requires_grad for p in trainer.pipe.dit.parameters())   # ... the DiT does not
    sample = trainer.dataset[0]
    before = fixed_loss(trainer, sample)
    result = run_quietly(trainer)
    after = fixed_loss(trainer, sample)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    # Measured 1.49 -> 1.15 (ratio 0.77) over 16 steps at lr 1e-3; an optimizer that never steps, or a ControlNet
    # whose residuals do not reach the loss, leaves the ratio at 1.
    assert after < 0.85 * before
    assert all(torch.equal(v, dit_before[k]) for k, v in trainer.pipe.dit.state_dict().items())  # frozen DiT

    path = result["path"]
    assert path.name == "epoch-0.safetensors"
    saved = load_file(path)
    # DiffSynth's FluxControlNet names (its training prefix removed), the heads verbatim.
    assert "blocks.0.attn.a_to_qkv.weight" in saved and "single_blocks.0.to_qkv_mlp.weight" in saved
    assert "controlnet_mode_embedder.weight" in saved and "x_embedder.weight" in saved
    assert not any(k.startswith(("double_blocks.", "img_in.", "pipe.")) for k in saved)
    loaded = load_model(path, config=saved_controlnet_config(path), torch_dtype=torch.float32, kind="controlnet")
    assert saved_controlnet_config(path) == {"axes_dim": [4, 6, 6]}
    trained = cn.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)   # bit-exact
    original = load_model(world.tmp / "union", torch_dtype=torch.float32, kind="controlnet").state_dict()
    assert sum(not torch.equal(original[k], trained[k]) for k in trained) > 0.9 * len(trained)

    # DiffSynth's own FluxControlNet takes the file with load_state_dict(strict=True), as its validate_full script
    # does, and computes the trained module's residuals.
    theirs = tiny_diffsynth_controlnet(num_mode=10)
    theirs.load_state_dict({k: v.clone() for k, v in saved.items()}, strict=True)
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in saved} == controlnet_key_names(
        num_joint_blocks=2, num_single_blocks=2, num_mode=10, mode_dict={"canny": 0}, additional_input_dim=0)
    x = controlnet_inputs(seed=3)
    exp_double, exp_single = diffsynth_aligned(theirs, x, "depth")
    from flux_core.models.controlnet import spread_residuals
    with torch.no_grad():
        double, single = loaded(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                x["guidance"], x["control"], mode="depth")
    # Measured 2e-6 (float32 summation order); the untrained weights give residuals 0.1+ away.
    assert max_diff(spread_residuals(double, 19), exp_double) <= 1e-4
    assert max_diff(spread_residuals(single, 38), exp_single) <= 1e-4
    assert AXES["axes_dim"] == (4, 6, 6)


def test_controlnet_state_dict_names_read_back_through_the_loader(world):
    """Every name the writer gives reads back as the module's own name through the loader's DiffSynth table, for all
    three kinds of ControlNet, with and without the prefix removed."""
    from flux_core.loading.controlnet_kind import select_controlnet
    from flux_core.train.trainable import controlnet_state_dict

    for name in ("union", "plain", "inpaint"):
        model = load_model(world.tmp / name, torch_dtype=torch.float32, kind="controlnet")
        for prefix, kept in (("pipe.controlnet.models.0.", ""), ("pipe.dit.", "pipe.controlnet.models.0.")):
            sd = controlnet_state_dict(model, prefix)
            assert all(k.startswith(kept) for k in sd)
            layout, read = select_controlnet(sd)
            assert layout == "diffsynth" and set(read) == set(model.state_dict()), name


def test_renaming_rules_are_inverted_or_refused():
    from flux_core.loading.files import invert_rules as _inverse_rules
    assert _inverse_rules([(r"^blocks\.(\d+)\.ff_a\.(0|2)\.", r"double_blocks.\1.img_mlp.\2."),
                           (r"^x\.weight$", "img_in.weight")]) == \
        [(r"^double_blocks\.(\d+)\.img_mlp\.(0|2)\.", r"blocks.\1.ff_a.\2."), (r"^img_in\.weight$", "x.weight")]
    for rule in ((r"blocks\.", "b."), (r"^a|b\.", "c."), (r"^(\d+)\.(\d+)\.", r"\2.\1.")):
        with pytest.raises(ValueError, match="cannot invert"):
            _inverse_rules([rule])


@pytest.mark.parametrize("variant", ["union", "inpainting", "upscaler"])
def test_full_size_controlnets_are_written_with_diffsynths_names_and_shapes(variant):
    """At the published sizes (InstantX Union-alpha 5/10 blocks with 10 modes, alimama Inpainting-Beta 6/0 with a
    68-wide input, jasperai Upscaler 5/0), on the meta device: every parameter the writer names is the parameter of
    that name and shape in DiffSynth's own FluxControlNet built as its registry builds the variant."""
    from flux_core.models.controlnet import UNION_MODES, ControlNetParams, FluxControlNet
    from flux_core.loading.dit_layouts import bfl_to_diffsynth
    from tests.diffsynth_ref import diffsynth_controlnet

    cn, _ = diffsynth_controlnet()
    ours_params, theirs_kwargs = {
        "union": (dict(depth=5, depth_single_blocks=10, num_modes=10),
                  dict(num_joint_blocks=5, num_single_blocks=10, num_mode=10, mode_dict=dict(UNION_MODES))),
        "inpainting": (dict(depth=6, depth_single_blocks=0, extra_condition_channels=4),
                       dict(num_joint_blocks=6, num_single_blocks=0, additional_input_dim=4)),
        "upscaler": (dict(depth=5, depth_single_blocks=0), dict(num_joint_blocks=5, num_single_blocks=0)),
    }[variant]
    with torch.device("meta"):
        ours = FluxControlNet(ControlNetParams(**ours_params)).state_dict()
        theirs = cn.FluxControlNet(**theirs_kwargs).state_dict()
    names = bfl_to_diffsynth(list(ours))
    assert {names[k]: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.slow
def test_controlnet_resume_equals_an_uninterrupted_run(world, tmp_path):
    argv = lambda out, *x: cn_argv(world, out, "inpaint", None, "--num_epochs", "2", "--save_steps", "3",  # noqa
                                   "--gradient_accumulation_steps", "2", *x)
    start, whole = resumed_and_whole(argv, tmp_path, cut=5)
    assert start["start_step"] == 5 and start["mode"] == "controlnet"
    assert whole["path"].name == "step-8.safetensors"
    earlier, last = (load_file(tmp_path / "whole" / f"step-{n}.safetensors") for n in (6, 8))
    assert any(not torch.equal(earlier[k], last[k]) for k in last)   # the steps after the cut trained


# ------------------------------------------------------------------------------------------------ LoRA + control
@pytest.fixture(scope="module")
def lora_trainer(world, tmp_path_factory):
    trainer = Trainer(parse_args(cn_argv(world, tmp_path_factory.mktemp("lora") / "out", "union", lora=True)))
    trainer.setup()
    nonzero_lora(trainer)
    return trainer


def lora_gradient(trainer: Trainer, sample: dict) -> torch.Tensor:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss(sample, torch.Generator().manual_seed(7)).backward()
    grads = torch.cat([p.grad.flatten() for _, p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def test_the_control_image_reaches_the_loras_gradient(lora_trainer):
    sample = lora_trainer.dataset[0]
    assert isinstance(sample["controlnet_image"], Image.Image) and sample["controlnet_processor_id"] == "depth"
    other = dict(sample, controlnet_image=noise_image(999))
    other_mode = dict(sample, controlnet_processor_id="canny")
    base, moved, remoded = (lora_gradient(lora_trainer, s) for s in (sample, other, other_mode))
    assert lora_trainer.pipe.controlnet.models[0].controlnet_x_embedder.weight.grad is None   # frozen ControlNet
    scale = base.abs().max().item()
    print(f"LoRA gradient: max {scale:.3e}; moved by another control image {(base - moved).abs().max():.3e}, "
          f"by another mode {(base - remoded).abs().max():.3e}")
    # Measured: the gradient is up to 0.29; another control image moves it by 5.2e-2, another union mode by 3.6e-3
    # (bound: 2.9e-4). With the adapter dropped from the loss both differences are exactly 0.
    assert (base - moved).abs().max().item() > 1e-3 * scale
    assert (base - remoded).abs().max().item() > 1e-3 * scale
    assert torch.equal(base, lora_gradient(lora_trainer, sample))   # deterministic, so the differences are real


def test_conditioned_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path):
    """One sample's loss, with the union ControlNet: ours (trainer._loss, which draws the timestep and noise from a
    generator) against DiffSynth-Studio's own FlowMatchSFTLoss with its FlowMatchScheduler, model_fn_flux_image and
    MultiControlNet, drawing from the global generator seeded alike; latents, control latent and text from diffusers.
    A DiT of FLUX's 19/38 blocks: DiffSynth spreads the ControlNet's residuals over a literal 19 and 38."""
    from tests.diffsynth_ref import (diffsynth_flux, diffsynth_training_pipe, tiny_diffsynth_controlnet,
                                     tiny_diffsynth_dit)
    from tests.tiny_controlnet import diffsynth_state_dict as controlnet_diffsynth_sd
    from tests.tiny_dit import diffsynth_state_dict as dit_diffsynth_sd, make_diffusers_dit, write_diffusers_dit
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    deep = make_diffusers_dit(seed=21, num_layers=19, num_single_layers=38)
    dit_file = write_diffusers_dit(deep, tmp_path / "transformer")
    folder = world.setup.model
    models = [str(dit_file), str(folder / "vae"), str(folder / "text_encoder"), str(folder / "text_encoder_2"),
              str(world.tmp / "union")]
    trainer = Trainer(parse_args(cn_argv(world, tmp_path / "out", "union", None, "--tokenizer_1_path",
                                         str(folder / "tokenizer"), "--tokenizer_2_path", str(folder / "tokenizer_2"),
                                         lora=True, models=models)))
    trainer.setup()
    sample = trainer.dataset[2]   # mode "2" (depth, by id)
    seed = 1234
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    vae = ref.vae

    def encode(image):
        return reference_encode_image(vae, image)

    their_dit = tiny_diffsynth_dit(double=19, single=38)
    their_dit.load_state_dict(dit_diffsynth_sd(deep), strict=True)
    union = tiny_diffsynth_controlnet(num_mode=10)
    union.load_state_dict(controlnet_diffsynth_sd(world.nets["union"]), strict=True)
    pipe = diffsynth_training_pipe(model_fn, ("dit", "controlnet"), dit=their_dit,
                                   controlnet=MultiControlNet([union.eval()]))
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        inputs = dict(input_latents=encode(sample["image"]), prompt_emb=emb, pooled_prompt_emb=pooled,
                      guidance=torch.tensor([1.0]), text_ids=torch.zeros(1, emb.shape[1], 3),
                      controlnet_inputs=[TheirInput(image=sample["controlnet_image"], processor_id="depth")],
                      controlnet_conditionings=[encode(sample["controlnet_image"])], progress_id=0,
                      num_inference_steps=1)
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        # the same draw without the ControlNet: how much the control moves this loss
        torch.manual_seed(seed)
        plain = FlowMatchSFTLoss(pipe, **{**inputs, "controlnet_inputs": [], "controlnet_conditionings": []}).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f}, DiffSynth without the ControlNet {plain:.6f}")
    # Measured 6.364840 vs 6.364856 (2.5e-6 relative, float32 through 19 + 38 blocks); without the ControlNet the loss
    # is 4.83 (24% lower), a sigma one grid point off moves it by 4e-3 relative (test_train.py).
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(theirs - plain) > 100 * 1e-4 * abs(theirs)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.slow
def test_validation_images_get_the_control_input_and_validate_full_renders_the_controlnet(world, tmp_path):
    out = tmp_path / "out"
    argv = cn_argv(world, out, "union", None, "--max_steps", "2", "--validation_prompts", "a cat red",
                   "--validation_height", "32", "--validation_width", "32", "--validation_num_inference_steps", "2")
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(parse_args(argv))
    image = np.asarray(Image.open(out / "validation" / "step-2-0.png"), dtype=np.int16)
    base_only = ["--model_paths", json.dumps([str(world.setup.model)])]   # validate_full adds the trained ControlNet
    common = ["--height", "32", "--width", "32",
              "--num_inference_steps", "2", "--t5_sequence_length", "16", "--torch_dtype", "float32", "--device",
              "cpu", "--prompt", "a cat red", "--embedded_guidance", "3.5"]
    row = world.rows[0]   # the first data row's control inputs: what the validation run used
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate_full", "--checkpoint", str(result["path"]), "--output", str(tmp_path / "v.png"),
                     "--controlnet_image", str(world.data / row[2]), "--controlnet_processor_id", row[4],
                     *base_only, *common]) == 0
        assert main(["validate_full", "--checkpoint", str(result["path"]), "--output", str(tmp_path / "w.png"),
                     "--controlnet_image", str(world.data / "control 5.png"), "--controlnet_processor_id", row[4],
                     *base_only, *common]) == 0
    again = np.asarray(Image.open(tmp_path / "v.png"), dtype=np.int16)
    other = np.asarray(Image.open(tmp_path / "w.png"), dtype=np.int16)
    print(f"validation image vs validate_full: {np.abs(image - again).max()}, with another control image: "
          f"{np.abs(image - other).max()} levels")
    # Measured 0: the same pipeline call on the same weights. Another control image changes pixels by tens of levels.
    assert np.abs(image - again).max() <= 1
    assert np.abs(image - other).max() > 3
    # A LoRA trained with the ControlNet: its validation image (the first row's control) equals validate_lora's.
    lora_out = tmp_path / "lora"
    validation = ["--validation_prompts", "a cat red", "--validation_height", "32", "--validation_width", "32",
                  "--validation_num_inference_steps", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        lora = train(parse_args(cn_argv(world, lora_out, "union", None, "--max_steps", "1", *validation, lora=True)))
        with_cn = ["--model_paths", json.dumps([str(world.setup.model), str(world.tmp / "union")])]
        assert main(["validate_lora", "--lora_path", str(lora["path"]), "--output", str(tmp_path / "l.png"),
                     "--controlnet_image", str(world.data / row[2]), "--controlnet_processor_id", row[4],
                     *common, *with_cn]) == 0
    lora_image = np.asarray(Image.open(lora_out / "validation" / "step-1-0.png"), dtype=np.int16)
    assert np.abs(lora_image - np.asarray(Image.open(tmp_path / "l.png"), dtype=np.int16)).max() <= 1   # measured 0
    with pytest.raises(TrainError, match="is a ControlNet: give --controlnet_image"):
        with contextlib.redirect_stdout(io.StringIO()):
            from flux_core.train.validate import run
            run("validate_full", ["--checkpoint", str(result["path"]), "--output", str(tmp_path / "x.png"), *base_only,
                                  *common])


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["controlnet", "lora"])
def test_two_processes_equal_one_process_with_accumulation(world, tmp_path, lora):
    common = ("--max_steps", "3")
    launch = [python(), "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux_core.train",
              *cn_argv(world, tmp_path / "two", "union", None, *common, lora=lora)]
    two = subprocess.Popen(launch, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           encoding="utf-8")
    one = subprocess.run([python(), "-m", "flux_core.train",
                          *cn_argv(world, tmp_path / "one", "union", None, *common, "--gradient_accumulation_steps",
                                   "2", lora=lora)],
                         env=subprocess_env(), capture_output=True, text=True, encoding="utf-8")
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert read_log(tmp_path / "two")[0]["num_processes"] == 2
    a, b = load_file(tmp_path / "one" / "step-3.safetensors"), load_file(tmp_path / "two" / "step-3.safetensors")
    assert a.keys() == b.keys()
    print(f"2 processes vs 1 with accumulation: {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    # Measured 0 for both modes. The adapter running the bare ControlNet instead of its DDP wrapper (gradients not
    # synchronised) gave 2.0e-3; a gradient summed instead of averaged moves weights by a step (lr 1e-3 / 1e-2).
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


# ------------------------------------------------------------------------------------------------ errors
def failing_setup(argv) -> str:
    with pytest.raises(TrainError) as info:
        Trainer(parse_args(argv)).setup()
    return str(info.value)


def test_a_controlnet_run_without_a_controlnet_names_the_flags(world, tmp_path):
    message = failing_setup(cn_argv(world, tmp_path / "a", "union", models=[str(world.setup.model)]))
    assert message.startswith("--trainable_models controlnet and --extra_inputs controlnet_image,"
                              "controlnet_processor_id: no ControlNet is loaded; add the ControlNet")
    message = failing_setup(cn_argv(world, tmp_path / "b", "plain", lora=True, models=[str(world.setup.model)]))
    assert message.startswith("--extra_inputs controlnet_image: no ControlNet is loaded")
    two = [str(world.setup.model), str(world.tmp / "union"), str(world.tmp / "plain")]
    message = failing_setup(cn_argv(world, tmp_path / "c", "union", lora=True, models=two))
    assert "2 ControlNets are loaded (the 2nd entry of --model_paths, the 3rd entry of --model_paths)" in message


def test_columns_the_controlnet_needs_are_named_all_at_once(world, tmp_path):
    # the union ControlNet fed the inpainting columns: no mode, and a mask it cannot take
    argv = cn_argv(world, tmp_path / "a", "inpaint", models=[str(world.setup.model), str(world.tmp / "union")])
    message = failing_setup(argv)
    assert "is a union ControlNet: add controlnet_processor_id to --extra_inputs" in message
    assert "not an inpainting ControlNet" in message and "leave controlnet_inpaint_mask out" in message
    # the inpainting ControlNet without masks
    argv = cn_argv(world, tmp_path / "b", "plain", models=[str(world.setup.model), str(world.tmp / "inpaint")])
    assert "is an inpainting ControlNet: add controlnet_inpaint_mask" in failing_setup(argv)


def test_bad_control_rows_name_the_row_column_and_file(world, tmp_path):
    data = world.data
    write_rows(data / "missing.csv", ["image", "prompt", "controlnet_image", "controlnet_processor_id"],
               [("red é.png", "a cat", "control 0.png", "depth"), ("red é.png", "a cat", "gone.png", "depth")])
    message = failing_setup(cn_argv(world, tmp_path / "a", "union", "missing"))
    assert message.startswith("missing.csv row 2") and "'controlnet_image' image" in message
    assert str(data / "gone.png") in message and "does not exist" in message
    write_rows(data / "nomode.csv", ["image", "prompt", "controlnet_image", "controlnet_processor_id"],
               [("red é.png", "a cat", "control 0.png", "depth"), ("red é.png", "a cat", "control 1.png", "")])
    message = failing_setup(cn_argv(world, tmp_path / "b", "union", "nomode"))
    assert message.startswith("nomode.csv row 2") and "no 'controlnet_processor_id' value" in message
    write_rows(data / "badmode.csv", ["image", "prompt", "controlnet_image", "controlnet_processor_id"],
               [("red é.png", "a cat", "control 0.png", "sketch")])
    message = failing_setup(cn_argv(world, tmp_path / "c", "union", "badmode"))
    assert message.startswith("badmode.csv row 1") and "'sketch' is not a union ControlNet mode" in message


def test_control_images_are_cropped_like_the_image(world, tmp_path):
    """A control map of another size and aspect is cropped and resized exactly like its row's image, so control
    tokens cover the same pixels as image tokens."""
    from flux_core.train.dataset import ImageDataset, crop_and_resize
    data = tmp_path / "d"
    data.mkdir()
    picture = noise_image(1, (80, 48))
    picture.save(data / "wide.png")
    noise_image(2, (96, 96)).save(data / "wide control.png")   # on its own: 32x32
    write_rows(data / "m.csv", ["image", "prompt", "controlnet_image"], [("wide.png", "a cat", "wide control.png")])
    dataset = ImageDataset(data, data / "m.csv", ["controlnet_image", "image"], max_pixels=32 * 32,
                           required_keys=["controlnet_image"])
    summary = dataset.check()
    sample = dataset[0]
    assert sample["image"].size == sample["controlnet_image"].size == (32, 16)   # the image's size, not its own
    expected = crop_and_resize(Image.open(data / "wide control.png").convert("RGB"), 32, 16)
    assert np.array_equal(np.asarray(sample["controlnet_image"]), np.asarray(expected))
    assert summary["sizes"] == {(32, 16): 1}


def test_validation_control_flags_are_checked_against_the_controlnet(world, tmp_path):
    argv = cn_argv(world, tmp_path / "a", "union", None, "--validation_prompts", "a cat",
                   "--validation_controlnet_image", str(world.data / "control 0.png"))
    assert "--validation_controlnet_image: ControlNet 0 is a union ControlNet: set " \
           "--validation_controlnet_processor_id" in failing_setup(argv)


# ------------------------------------------------------------------------------------------------ memory options
def controlnet_gradient(trainer: Trainer, sample: dict) -> torch.Tensor:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss(sample, torch.Generator().manual_seed(3)).backward()
    grads = torch.cat([p.grad.flatten() for _, p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_of_the_trained_controlnet_gives_the_same_gradients(world, tmp_path, offload):
    flag = "--use_gradient_checkpointing_offload" if offload else "--use_gradient_checkpointing"
    trainer = Trainer(parse_args(cn_argv(world, tmp_path / "out", "union", None, flag)))
    trainer.setup()
    cn, dit = trainer.pipe.controlnet.models[0], trainer.pipe.dit
    assert cn.gradient_checkpointing and dit.gradient_checkpointing
    assert cn.gradient_checkpointing_offload == dit.gradient_checkpointing_offload == offload
    sample = trainer.dataset[1]
    checkpointed = controlnet_gradient(trainer, sample)
    for model in (cn, dit):
        model.gradient_checkpointing = model.gradient_checkpointing_offload = False
    plain = controlnet_gradient(trainer, sample)
    print(f"checkpointed vs plain: {(checkpointed - plain).abs().max():.2e} (gradient up to {plain.abs().max():.2e})")
    # Measured 0 (the same kernels run again in the backward pass) on gradients up to 0.25; a recomputed block that
    # misses its input or residual changes them by far more than the bound.
    assert plain.abs().max() > 1e-2 and torch.allclose(checkpointed, plain, atol=1e-6, rtol=0)


def test_a_frozen_controlnet_may_be_stored_in_fp8_but_not_the_trained_one(world, tmp_path):
    entry = str(world.tmp / "union")
    trainer = Trainer(parse_args(cn_argv(world, tmp_path / "lora", "union", None, "--fp8_models", entry,
                                         "--max_steps", "1", lora=True)))
    trainer.setup()
    cn = trainer.pipe.controlnet.models[0]
    matrices = [p for p in cn.parameters() if p.dim() >= 2]
    assert matrices and all(p.dtype == torch.float8_e4m3fn for p in matrices)
    result = run_quietly(trainer)
    assert result["step"] == 1 and np.isfinite(read_log(tmp_path / "lora")[1]["loss"])
    message = failing_setup(cn_argv(world, tmp_path / "cn", "union", None, "--fp8_models", entry))
    assert message.startswith("--fp8_models names the ControlNet, which --trainable_models controlnet trains")
    # The frozen DiT of a ControlNet run may be stored in FP8: the ControlNet's gradients flow through it.
    trainer = Trainer(parse_args(cn_argv(world, tmp_path / "dit8", "union", None, "--fp8_models", "dit",
                                         "--max_steps", "1")))
    trainer.setup()
    assert all(p.dtype == torch.float8_e4m3fn for p in trainer.pipe.dit.parameters() if p.dim() >= 2)
    before = {k: v.clone() for k, v in trainer.trained.state_dict().items()}
    assert run_quietly(trainer)["step"] == 1
    assert any(not torch.equal(v, before[k]) for k, v in trainer.trained.state_dict().items())
