"""flux_core.train with InfiniteYou (DiffSynth-Studio's commands for the InfiniteYou row):
- `--trainable_models controlnet,image_proj_model --remove_prefix_in_ckpt pipe.`: InfuseNet and the image projector
  learn with the DiT frozen; the one checkpoint holds DiffSynth's `controlnet.models.0.*` beside `image_proj_model.*`,
  loads back through load_model as both kinds (equal to the trained modules) and from_pretrained fills both slots
  from it; DiffSynth's own projector and ControlNet load their halves strictly and compute the same outputs;
- the face as a precomputed embedding column (.safetensors or .npy, never unpickled) or as a photo embedded once per
  row before any model loads (a missing insightface stops the run then, naming the alternative);
- `--lora_base_model dit` with the InfiniteYou columns: the identity reaches the LoRA's gradient;
- resume across an epoch boundary, validation images with the first row's identity, errors naming the flag/row/file.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_core.loading.loader import load_model
from flux_core.train.args import TrainError, parse_args
from flux_core.train.trainer import Trainer
from tests.tiny_ipadapter import PROJECTOR, face_embedding
from tests.tiny_train import adapter_argv, make_adapter_setup, nonzero_lora, read_log, resumed_and_whole
from tests.tiny_train import one_thread  # noqa: F401 (a module-wide autouse fixture)
from tests.tiny_vae import reference_encode_image

EXTRAS = "controlnet_image,infinityou_id_embedding,infinityou_guidance"
FULL = ("--trainable_models", "controlnet,image_proj_model", "--remove_prefix_in_ckpt", "pipe.", "--learning_rate",
        "1e-3")
LORA = ("--lora_base_model", "dit", "--lora_rank", "4", "--learning_rate", "1e-2")
MODELS = ("projector", "infusenet")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """make_adapter_setup's world, plus infiniteyou one.csv: its row 2 alone."""
    world = make_adapter_setup(tmp_path_factory.mktemp("iy train"))
    (world.data / "infiniteyou one.csv").write_text(
        "image,prompt,controlnet_image,infinityou_id_embedding,infinityou_guidance\n"
        "green é.png,a dog green,black 1.png,face 1.npy,1.25\n", encoding="utf-8")
    return world


def iy_argv(world, output, *extra, lora=False, models=MODELS, metadata="infiniteyou.csv", extras=EXTRAS):
    return adapter_argv(world, output, metadata, models, *(LORA if lora else FULL), "--extra_inputs", extras, *extra)


def run_quietly(trainer: Trainer) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return trainer._run()


def fixed_loss(trainer: Trainer, sample: dict, draws: int = 6) -> float:
    with torch.no_grad():
        return float(np.mean([trainer._loss(sample, torch.Generator().manual_seed(50 + k)).item()
                              for k in range(draws)]))


def gradient(trainer: Trainer, sample: dict, names: str = "") -> torch.Tensor:
    """The trained parameters' gradient (those whose name starts with `names`) for one sample on a fixed draw."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._loss(sample, torch.Generator().manual_seed(7)).backward()
    grads = torch.cat([p.grad.flatten() for n, p in trainer.params if n.startswith(names)])
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def failing_setup(argv) -> str:
    with pytest.raises(TrainError) as info:
        Trainer(parse_args(argv)).setup()
    return str(info.value)


def states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ full training
def test_infiniteyou_training_learns_and_writes_diffsynths_file(world, tmp_path):
    from flux_core.pipeline_models import detect_components
    from tests.diffsynth_ref import diffsynth_infiniteyou, tiny_diffsynth_controlnet
    from tests.test_controlnet_model import diffsynth_aligned, max_diff
    from tests.tiny_controlnet import controlnet_inputs

    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "out", "--dataset_repeat", "16",
                                         metadata="infiniteyou one.csv")))
    trainer.setup()
    pipe = trainer.pipe
    net, projector = pipe.controlnet.models[0], pipe.image_proj_model
    dit_before, net_before, projector_before = states(pipe.dit), states(net), states(projector)
    assert trainer.mode == "infiniteyou" and net.gradient_checkpointing is False
    assert {n for n, _ in trainer.params} == ({f"controlnet.{k}" for k in net.state_dict()} |
                                              {f"image_proj_model.{k}" for k in projector.state_dict()})
    assert not any(p.requires_grad for m in (pipe.dit, pipe.vae, pipe.text_encoder_2) for p in m.parameters())
    sample = trainer.dataset[0]
    assert sample["infinityou_guidance"] == 1.25 and torch.equal(sample["infinityou_id_embedding"], face_embedding(1))
    before = fixed_loss(trainer, sample)
    result = run_quietly(trainer)
    after = fixed_loss(trainer, sample)
    print(f"fixed-sample loss {before:.4f} -> {after:.4f}")
    # Measured 1.688 -> 1.040 (ratio 0.62) over 16 steps at lr 1e-3; an optimizer that never steps leaves it at 1.
    assert after < 0.85 * before
    assert all(torch.equal(v, dit_before[k]) for k, v in pipe.dit.state_dict().items())   # frozen DiT
    for module, start in ((net, net_before), (projector, projector_before)):   # both trained, every tensor
        now = module.state_dict()
        assert sum(not torch.equal(now[k], start[k]) for k in now) == len(now)

    saved = load_file(result["path"])
    assert result["path"].name == "epoch-0.safetensors"
    assert {k.split(".", 1)[0] for k in saved} == {"controlnet", "image_proj_model"}
    assert "controlnet.models.0.blocks.0.attn.a_to_qkv.weight" in saved and "image_proj_model.latents" in saved
    loaded_net = load_model(result["path"], torch_dtype=torch.float32, kind="controlnet",
                            config={"axes_dim": [4, 6, 6]})
    loaded_projector = load_model(result["path"], torch_dtype=torch.float32, kind="infiniteyou")
    for loaded, trained in ((loaded_net, net), (loaded_projector, projector)):
        assert loaded.state_dict().keys() == trained.state_dict().keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())   # bit-exact
    # from_pretrained (its detection) fills both slots from the one file
    assert sorted(kind for _, kind, _, _ in detect_components(str(result["path"]))) == ["controlnet", "infiniteyou"]

    # DiffSynth's own modules load their halves strictly (as its validate_full script does) and compute the same.
    projector_class, _ = diffsynth_infiniteyou()
    theirs = projector_class(**PROJECTOR)
    theirs.load_state_dict({k[len("image_proj_model."):]: v.clone() for k, v in saved.items()
                            if k.startswith("image_proj_model.")}, strict=True)
    embedding = face_embedding(5).reshape(1, 1, 512)
    with torch.no_grad():
        difference = (theirs(embedding) - loaded_projector(embedding)).abs().max().item()
    print(f"projector vs DiffSynth's: {difference:.2e}")
    assert difference <= 1e-5   # measured 0 (the same float32 operations); untrained weights give tokens 1e-1+ away
    their_net = tiny_diffsynth_controlnet()
    their_net.load_state_dict({k[len("controlnet.models.0."):]: v.clone() for k, v in saved.items()
                               if k.startswith("controlnet.models.0.")}, strict=True)
    x = controlnet_inputs(seed=3)
    exp_double, exp_single = diffsynth_aligned(their_net, x, None)
    from flux_core.models.controlnet import spread_residuals
    with torch.no_grad():
        double, single = loaded_net(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                    x["guidance"], x["control"])
    # Measured 2e-6 (float32 summation order, as in test_train_controlnet); untrained weights are 0.1+ away.
    assert max_diff(spread_residuals(double, 19), exp_double) <= 1e-4
    assert max_diff(spread_residuals(single, 38), exp_single) <= 1e-4


def test_the_identity_reaches_the_projectors_and_infusenets_gradients(world, tmp_path):
    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "out")))
    trainer.setup()
    sample = trainer.dataset[0]
    base = gradient(trainer, sample, "image_proj_model.")
    other_face = gradient(trainer, dict(sample, infinityou_id_embedding=face_embedding(77)), "image_proj_model.")
    net_base = gradient(trainer, sample, "controlnet.")
    net_guided = gradient(trainer, dict(sample, infinityou_guidance=3.0), "controlnet.")
    print(f"projector gradient: max {base.abs().max():.3e}, another face moves it by "
          f"{(base - other_face).abs().max():.3e}; InfuseNet gradient: max {net_base.abs().max():.3e}, guidance 3 "
          f"moves it by {(net_base - net_guided).abs().max():.3e}")
    # Measured: projector gradient max 0.93, another face moves it by 0.88; InfuseNet's max 2.8, moved by 2.8 by the
    # guidance. A projector run without autograd has no gradient at all; guidance ignored gives exactly 0.
    assert base.abs().max() > 1e-4 and (base - other_face).abs().max() > 1e-3 * base.abs().max()
    assert (net_base - net_guided).abs().max() > 1e-3 * net_base.abs().max()
    assert all(p.grad is None for p in trainer.pipe.dit.parameters())


def test_the_projector_alone_may_train_with_infusenet_frozen(world, tmp_path):
    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "out", "--trainable_models", "image_proj_model",
                                         "--max_steps", "2")))
    trainer.setup()
    net, projector = trainer.pipe.controlnet.models[0], trainer.pipe.image_proj_model
    net_before, projector_before = states(net), states(projector)
    assert {n.split(".")[0] for n, _ in trainer.params} == {"image_proj_model"}
    result = run_quietly(trainer)
    assert all(torch.equal(v, net_before[k]) for k, v in net.state_dict().items())
    assert any(not torch.equal(v, projector_before[k]) for k, v in projector.state_dict().items())
    assert {k.split(".", 1)[0] for k in load_file(result["path"])} == {"image_proj_model"}


@pytest.mark.slow
def test_infiniteyou_resume_across_an_epoch_equals_an_uninterrupted_run(world, tmp_path):
    argv = lambda out, *x: iy_argv(world, out, "--num_epochs", "2", "--save_steps", "3",  # noqa: E731
                                   "--gradient_accumulation_steps", "2", *x)
    start, whole = resumed_and_whole(argv, tmp_path, cut=3)   # cut in epoch 0 (4 steps an epoch)
    assert start["start_step"] == 3 and start["mode"] == "infiniteyou"
    assert whole["path"].name == "step-8.safetensors"
    earlier, last = (load_file(tmp_path / "whole" / f"step-{n}.safetensors") for n in (3, 8))
    assert any(not torch.equal(earlier[k], last[k]) for k in last if k.startswith("image_proj_model."))


# ------------------------------------------------------------------------------------------------ LoRA
def test_the_identity_reaches_the_loras_gradient(world, tmp_path):
    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "out", lora=True)))
    trainer.setup()
    nonzero_lora(trainer)
    sample = trainer.dataset[0]
    base, moved = gradient(trainer, sample), gradient(trainer, dict(sample, infinityou_id_embedding=face_embedding(77)))
    assert not any(p.requires_grad for p in trainer.pipe.image_proj_model.parameters())
    assert all(p.grad is None for p in trainer.pipe.controlnet.models[0].parameters())
    scale = base.abs().max().item()
    print(f"LoRA gradient: max {scale:.3e}; another face moves it by {(base - moved).abs().max():.3e}")
    # Measured: max 0.17, moved by 2.2e-2; an identity that does not reach InfuseNet gives exactly 0.
    assert (base - moved).abs().max().item() > 1e-3 * scale


# ------------------------------------------------------------------------------------------------ the face columns
def test_embedding_files_of_both_kinds_are_read(world):
    from flux_core.train.dataset import ImageDataset
    dataset = ImageDataset(world.data, world.data / "infiniteyou.csv", ["image", "controlnet_image"],
                           required_keys=EXTRAS.split(","))
    dataset.check()
    for i in (0, 1):   # .safetensors, .npy
        sample = dataset[i]
        assert torch.equal(sample["infinityou_id_embedding"], face_embedding(i))
        assert sample["infinityou_guidance"] == 1.0 + 0.25 * i


@pytest.mark.parametrize("name, write, message", [
    ("pickled.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
     "cannot be read without unpickling"),
    ("short.npy", lambda p: np.save(p, np.zeros(511, dtype=np.float32)),
     r"must be the 512-d ArcFace embedding of one face .*got \(511,\)"),
    ("two.safetensors", lambda p: save_file({"a": torch.zeros(512), "b": torch.zeros(512)}, str(p)),
     "holds 2 tensors"),
    ("face.pt", lambda p: torch.save(torch.zeros(512), p), r"is not an embedding file; use .safetensors or .npy"),
    ("gone.npy", None, "does not exist"),
])
def test_bad_embedding_files_name_the_row_and_file(world, tmp_path, name, write, message):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    if write:
        write(data / name)
    (data / "m.csv").write_text(f"image,prompt,controlnet_image,infinityou_id_embedding\na.png,a cat,a.png,a.png\n"
                                f"a.png,a cat,a.png,{name}\n", encoding="utf-8")
    argv = iy_argv(world, tmp_path / "out", "--dataset_base_path", str(data), "--dataset_metadata_path",
                   str(data / "m.csv"), extras="controlnet_image,infinityou_id_embedding")
    text = failing_setup(argv)
    assert text.startswith("m.csv row 1") and "a.png is not an embedding file" in text   # the first bad row
    (data / "m.csv").write_text(f"image,prompt,controlnet_image,infinityou_id_embedding\na.png,a cat,a.png,{name}\n",
                                encoding="utf-8")
    text = failing_setup(argv)
    assert text.startswith("m.csv row 1 (line 2): 'infinityou_id_embedding' ") and name in text
    assert __import__("re").search(message, text), text


def test_a_guidance_that_is_not_a_number_names_the_row(world, tmp_path):
    (world.data / "bad guidance.csv").write_text(
        "image,prompt,controlnet_image,infinityou_id_embedding,infinityou_guidance\n"
        "red é.png,a cat,black 0.png,face 0.safetensors,strong\n", encoding="utf-8")
    text = failing_setup(iy_argv(world, tmp_path / "out", metadata="bad guidance.csv"))
    assert text.startswith("bad guidance.csv row 1") and "column 'infinityou_guidance' must be a number" in text


class FakeEmbedder:
    """Stands in for flux_core.face_embedding.FaceEmbedder: the embedding of an image is made from its pixels; an
    all-black image has no face."""
    calls = 0

    def embed(self, image):
        FakeEmbedder.calls += 1
        return self.embedding(image)

    @staticmethod
    def embedding(image):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).flatten()
        if not pixels.any():
            raise ValueError("no face found in the image")
        return pixels[:512] / pixels[:512].norm()


def test_face_photos_are_embedded_once_per_row_before_the_models_load(world, tmp_path, monkeypatch):
    import flux_core.train.infiniteyou as iy
    from flux_core.train.dataset import crop_and_resize
    monkeypatch.setattr(iy, "face_embedder", FakeEmbedder)
    FakeEmbedder.calls = 0
    argv = iy_argv(world, tmp_path / "out", "--max_steps", "3", "--dataset_repeat", "2", metadata="faces.csv",
                   extras="controlnet_image,infinityou_id_image")
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    assert FakeEmbedder.calls == 8   # once per row
    sample = trainer.dataset[9]      # row 1 (8 rows)
    face = crop_and_resize(Image.open(world.data / "face 1.png").convert("RGB"), 32, 32)
    assert torch.equal(sample["infinityou_id_embedding"], FakeEmbedder.embedding(face))
    assert "infinityou_id_image" not in sample   # the photo is not read again
    run_quietly(trainer)
    assert FakeEmbedder.calls == 8   # no more embedding while training

    # --validation_infinityou_id_image: that photo's embedding (computed at setup) for the validation images
    photo = world.data / "face 5.png"
    trainer = Trainer(parse_args(argv[:argv.index("--output_path") + 1] + [str(tmp_path / "validation")] +
                                 argv[argv.index("--output_path") + 2:] +
                                 ["--validation_prompts", "a cat", "--validation_infinityou_id_image", str(photo)]))
    trainer.setup()
    expected = FakeEmbedder.embedding(Image.open(photo).convert("RGB"))
    assert torch.equal(torch.as_tensor(trainer.validation_inputs["infinityou_id_embedding"]).reshape(512), expected)
    assert trainer.validation_inputs["infinityou_guidance"] == 1.0

    from flux_core.pipeline import FluxImagePipeline

    def not_called(*a, **k):
        raise AssertionError("the models loaded before the faces were embedded")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", not_called)
    (world.data / "faceless.csv").write_text("image,prompt,controlnet_image,infinityou_id_image\n"
                                             "red é.png,a cat,black 0.png,face 0.png\n"
                                             "red é.png,a cat,black 0.png,black 1.png\n", encoding="utf-8")
    text = failing_setup(iy_argv(world, tmp_path / "b", metadata="faceless.csv",
                                 extras="controlnet_image,infinityou_id_image"))
    assert text.startswith("faceless.csv row 2 (line 3): 'infinityou_id_image' image ") and "black 1.png" in text
    assert "no face found in the image" in text and "--extra_inputs infinityou_id_embedding" in text


def test_face_photos_without_insightface_stop_the_run_before_the_models_load(world, tmp_path, monkeypatch):
    """The real FaceEmbedder, where insightface is not installed: its message, with the precomputed alternative."""
    pytest.importorskip("flux_core.face_embedding")
    import importlib.util
    if importlib.util.find_spec("insightface") is not None:
        pytest.skip("insightface is installed")
    from flux_core.pipeline import FluxImagePipeline

    def not_called(*a, **k):
        raise AssertionError("the models loaded before the faces were embedded")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", not_called)
    text = failing_setup(iy_argv(world, tmp_path / "out", metadata="faces.csv",
                                 extras="controlnet_image,infinityou_id_image"))
    assert text.startswith("--extra_inputs infinityou_id_image: ") and "insightface" in text
    assert "--extra_inputs infinityou_id_embedding" in text


# ------------------------------------------------------------------------------------------------ validation
def test_validation_images_get_the_first_rows_identity(world, tmp_path):
    from flux_core.controlnet import ControlNetInput
    out = tmp_path / "out"
    trainer = Trainer(parse_args(iy_argv(world, out, "--max_steps", "1", "--validation_prompts", "a cat red",
                                         "--validation_height", "32", "--validation_width", "32",
                                         "--validation_num_inference_steps", "2")))
    trainer.setup()
    run_quietly(trainer)
    image = np.asarray(Image.open(out / "validation" / "step-1-0.png"), dtype=np.int16)
    control = [ControlNetInput(image=Image.open(world.data / "black 0.png").convert("RGB"), processor_id="None")]
    common = dict(prompt="a cat red", height=32, width=32, seed=0, num_inference_steps=2, embedded_guidance=3.5,
                  t5_sequence_length=16, progress_bar_cmd=None, controlnet_inputs=control)
    again = np.asarray(trainer.pipe(**common, infinityou_id_embedding=face_embedding(0), infinityou_guidance=1.0),
                       dtype=np.int16)
    other = np.asarray(trainer.pipe(**common, infinityou_id_embedding=face_embedding(77), infinityou_guidance=1.0),
                       dtype=np.int16)
    print(f"validation image vs the pipeline with the first row's identity: {np.abs(image - again).max()}, with "
          f"another face: {np.abs(image - other).max()} levels")
    # Measured 0 (the same call on the same weights) and 26 levels with another face.
    assert np.abs(image - again).max() == 0
    assert np.abs(image - other).max() > 1

    # --validation_infinityou_id_embedding / _guidance replace the first row's identity
    flagged = Trainer(parse_args(iy_argv(world, tmp_path / "flagged", "--max_steps", "1", "--validation_prompts",
                                         "a cat red", "--validation_height", "32", "--validation_width", "32",
                                         "--validation_num_inference_steps", "2",
                                         "--validation_infinityou_id_embedding", str(world.data / "face 3.npy"),
                                         "--validation_infinityou_guidance", "2")))
    flagged.setup()
    run_quietly(flagged)
    flagged_image = np.asarray(Image.open(tmp_path / "flagged" / "validation" / "step-1-0.png"), dtype=np.int16)
    expected = np.asarray(flagged.pipe(**common, infinityou_id_embedding=face_embedding(3), infinityou_guidance=2.0),
                          dtype=np.int16)
    print(f"with --validation_infinityou_*: {np.abs(flagged_image - image).max()} levels from the first row's")
    # Measured 0 from the pipeline given that identity, and 143 levels from the first row's.
    assert np.abs(flagged_image - expected).max() == 0 and np.abs(flagged_image - image).max() > 1

    # validate_full renders the trained InfuseNet and projector from the one checkpoint, with the FLUX models alone
    # in the model flags
    from flux_core.train.__main__ import main
    from flux_core.train.validate import run
    common_flags = ["--height", "32", "--width", "32", "--num_inference_steps", "2", "--t5_sequence_length", "16",
                    "--torch_dtype", "float32", "--device", "cpu", "--prompt", "a cat red",
                    "--embedded_guidance", "3.5", "--model_paths", world.model_paths(),
                    "--controlnet_image", str(world.data / "black 0.png")]
    checkpoint = str(out / "step-1.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate_full", "--checkpoint", checkpoint, "--output", str(tmp_path / "v.png"),
                     "--infinityou_id_embedding", str(world.data / "face 0.safetensors"), *common_flags]) == 0
    rendered = np.asarray(Image.open(tmp_path / "v.png"), dtype=np.int16)
    assert np.abs(image - rendered).max() == 0   # measured 0: the same weights, inputs and call
    with pytest.raises(TrainError, match="holds InfiniteYou's image projector: give --infinityou_id_embedding"):
        run("validate_full", ["--checkpoint", checkpoint, "--output", str(tmp_path / "w.png"), *common_flags])
    with pytest.raises(TrainError, match=r"--infinityou_id_embedding: face 0.png is not an embedding file"):
        run("validate_full", ["--checkpoint", checkpoint, "--output", str(tmp_path / "w.png"), *common_flags,
                              "--infinityou_id_embedding", str(world.data / "face 0.png")])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("extra, message", [
    (("--trainable_models", "image_proj_model", "--extra_inputs", "controlnet_image"),
     r"--trainable_models image_proj_model needs the faces: add --extra_inputs infinityou_id_image .* or "
     r"infinityou_id_embedding"),
    (("--trainable_models", "controlnet,image_proj_model", "--extra_inputs", "infinityou_id_embedding"),
     r"--trainable_models controlnet needs the control images.*infinityou_id_embedding without controlnet_image: the "
     r"identity reaches the DiT only through InfuseNet"),
    (("--lora_base_model", "dit", "--extra_inputs", "controlnet_image,infinityou_id_image,infinityou_id_embedding"),
     r"infinityou_id_image and infinityou_id_embedding together: give one"),
    (("--lora_base_model", "dit", "--extra_inputs", "controlnet_image,infinityou_guidance"),
     r"infinityou_guidance without infinityou_id_image or infinityou_id_embedding"),
    (("--trainable_models", "dit,image_proj_model", "--extra_inputs", EXTRAS),
     r"--trainable_models dit,image_proj_model: train one model per run .* or InfiniteYou's pair "
     r"controlnet,image_proj_model"),
    (("--lora_base_model", "dit", "--extra_inputs", EXTRAS, "--data_file_keys", "image,infinityou_id_embedding"),
     r"--data_file_keys infinityou_id_embedding: that column holds a face embedding file"),
    (("--lora_base_model", "dit", "--extra_inputs", "controlnet_image", "--validation_prompts", "a cat",
      "--validation_infinityou_guidance", "2"),
     r"--validation_infinityou_guidance: validation identities are for runs with --extra_inputs infinityou_id_image "
     r"or infinityou_id_embedding"),
    (("--lora_base_model", "dit", "--extra_inputs", EXTRAS, "--validation_prompts", "a cat",
      "--validation_infinityou_id_image", "a.png", "--validation_infinityou_id_embedding", "a.npy"),
     r"--validation_infinityou_id_image and --validation_infinityou_id_embedding together: give one"),
])
def test_argument_errors_name_the_flag(world, tmp_path, extra, message):
    with pytest.raises(TrainError, match=message):
        parse_args(adapter_argv(world, tmp_path / "out", "infiniteyou.csv", MODELS, *extra))


def test_missing_models_are_named_before_any_weights_load(world, tmp_path, monkeypatch):
    from flux_core.pipeline import FluxImagePipeline

    def not_called(*a, **k):
        raise AssertionError("from_pretrained ran before the model flags were checked")
    monkeypatch.setattr(FluxImagePipeline, "from_pretrained", not_called)
    text = failing_setup(iy_argv(world, tmp_path / "a", models=("infusenet",)))
    assert text.startswith("--extra_inputs infinityou_id_embedding: no InfiniteYou image projector is loaded; add "
                           "ByteDance/InfiniteYou's image_proj_model.bin")
    text = failing_setup(iy_argv(world, tmp_path / "b", models=("projector",)))
    assert text.startswith("--trainable_models controlnet,image_proj_model and --extra_inputs controlnet_image: no "
                           "ControlNet is loaded")


def test_frozen_infiniteyou_models_may_be_stored_in_fp8_but_not_trained_ones(world, tmp_path):
    text = failing_setup(iy_argv(world, tmp_path / "a", "--fp8_models", str(world.projector)))
    assert text.startswith("--fp8_models names InfiniteYou's image projector, which --trainable_models "
                           "controlnet,image_proj_model trains")
    text = failing_setup(iy_argv(world, tmp_path / "b", "--fp8_models", json.dumps(str(world.infusenet))[1:-1]))
    assert text.startswith("--fp8_models names the ControlNet")
    # LoRA runs: the frozen projector and InfuseNet stored in float8, computed in the training dtype
    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "lora", "--fp8_models",
                                         f"{world.projector},{world.infusenet}", "--max_steps", "2", lora=True)))
    trainer.setup()
    for model in (trainer.pipe.image_proj_model, trainer.pipe.controlnet.models[0]):
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        assert matrices and all(p.dtype == torch.float8_e4m3fn for p in matrices)
    assert run_quietly(trainer)["step"] == 2
    assert all(np.isfinite(e["loss"]) for e in read_log(tmp_path / "lora") if e["event"] == "step")


# ------------------------------------------------------------------------------------------------ processes
@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(world, tmp_path):
    """InfuseNet and the projector run inside the one forward of the module accelerate wraps, so DDP averages the
    gradients of both."""
    from tests.tiny_train import two_processes_and_one
    a, b = two_processes_and_one(lambda out, *extra: iy_argv(world, out, *extra), tmp_path)
    assert a.keys() == b.keys()
    print(f"2 processes vs 1 with accumulation: {max((a[k] - b[k]).abs().max().item() for k in a):.2e}")
    # Measured 0. The modules called outside the DDP-wrapped forward (gradients not synchronised) gave 2.0e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


# ------------------------------------------------------------------------------------------------ DiffSynth's loss
def test_infiniteyou_training_loss_equals_diffsynths_flowmatch_sft_loss(world, tmp_path):
    """One sample's loss with InfiniteYou: ours (trainer._loss) against DiffSynth-Studio's own FlowMatchSFTLoss with
    its FlowMatchScheduler, model_fn_flux_image (InfuseNet given `id_emb` and `infinityou_guidance`), MultiControlNet
    and InfiniteYouImageProjector (its converter reading image_proj_model.bin), drawing from the global generator
    seeded alike; latents and text from diffusers. A DiT of FLUX's 19/38 blocks: DiffSynth spreads the ControlNet's
    residuals over a literal 19 and 38."""
    from tests.diffsynth_ref import (diffsynth_flux, diffsynth_infiniteyou, diffsynth_training_pipe,
                                     tiny_diffsynth_controlnet, tiny_diffsynth_dit)
    from tests.tiny_controlnet import diffsynth_state_dict as controlnet_diffsynth_sd, make_diffusers_controlnet
    from tests.tiny_dit import diffsynth_state_dict as dit_diffsynth_sd, make_diffusers_dit, write_diffusers_dit
    from tests.tiny_pipeline import make_diffusers_pipeline

    model_fn, _, _ = diffsynth_flux()
    projector_class, converter = diffsynth_infiniteyou()
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet

    ref = make_diffusers_pipeline(tmp_path / "ref")   # the same seeds as world's folder: the same weights
    deep = make_diffusers_dit(seed=21, num_layers=19, num_single_layers=38)
    folder = world.setup.model
    models = [str(write_diffusers_dit(deep, tmp_path / "transformer")), str(folder / "vae"),
              str(folder / "text_encoder"), str(folder / "text_encoder_2"), str(world.infusenet), str(world.projector)]
    argv = adapter_argv(world, tmp_path / "out", "infiniteyou.csv", (), *FULL, "--extra_inputs", EXTRAS,
                        "--tokenizer_1_path", str(folder / "tokenizer"),
                        "--tokenizer_2_path", str(folder / "tokenizer_2"))
    argv[argv.index("--model_paths") + 1] = json.dumps(models)
    trainer = Trainer(parse_args(argv))
    trainer.setup()
    sample = trainer.dataset[2]   # guidance 1.5
    assert sample["infinityou_guidance"] == 1.5
    seed = 1234
    with torch.no_grad():
        ours = trainer._loss(sample, torch.Generator().manual_seed(seed)).item()

    vae = ref.vae

    def encode(image):
        return reference_encode_image(vae, image)

    their_dit = tiny_diffsynth_dit(double=19, single=38)
    their_dit.load_state_dict(dit_diffsynth_sd(deep), strict=True)
    infusenet = tiny_diffsynth_controlnet()
    infusenet.load_state_dict(controlnet_diffsynth_sd(make_diffusers_controlnet(seed=6)), strict=True)
    projector = projector_class(**PROJECTOR).eval()
    projector.load_state_dict(converter(torch.load(world.projector, weights_only=True)), strict=True)
    pipe = diffsynth_training_pipe(model_fn, ("dit", "controlnet"), dit=their_dit,
                                   controlnet=MultiControlNet([infusenet.eval()]))
    with torch.no_grad():
        emb, pooled, _ = ref.encode_prompt(prompt=sample["prompt"], prompt_2=None, max_sequence_length=16)
        inputs = dict(input_latents=encode(sample["image"]), prompt_emb=emb, pooled_prompt_emb=pooled,
                      guidance=torch.tensor([1.0]), text_ids=torch.zeros(1, emb.shape[1], 3),
                      controlnet_inputs=[TheirInput(image=sample["controlnet_image"], processor_id="None")],
                      controlnet_conditionings=[encode(sample["controlnet_image"])], progress_id=0,
                      num_inference_steps=1, id_emb=projector(face_embedding(2).reshape(1, 1, 512)),
                      infinityou_guidance=torch.tensor([1.5]))
        torch.manual_seed(seed)
        theirs = FlowMatchSFTLoss(pipe, **inputs).item()
        torch.manual_seed(seed)   # the same draw with another face: how much the identity moves this loss
        other = FlowMatchSFTLoss(pipe, **{**inputs, "id_emb": projector(face_embedding(9).reshape(1, 1, 512))}).item()
    print(f"loss: ours {ours:.6f}, DiffSynth {theirs:.6f}, DiffSynth with another face {other:.6f}")
    # Measured 4.243216 vs 4.243224 (2e-6 relative, float32 through 19 + 38 blocks); another face moves DiffSynth's
    # loss by 3.4e-3 relative (34 times the bound).
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert abs(theirs - other) > 10 * 1e-4 * abs(theirs)


# ------------------------------------------------------------------------------------------------ memory options
def test_gradient_checkpointing_gives_infusenet_and_the_projector_the_same_gradients(world, tmp_path):
    trainer = Trainer(parse_args(iy_argv(world, tmp_path / "out", "--use_gradient_checkpointing")))
    trainer.setup()
    net, dit = trainer.pipe.controlnet.models[0], trainer.pipe.dit
    assert net.gradient_checkpointing and dit.gradient_checkpointing
    sample = trainer.dataset[1]
    checkpointed = gradient(trainer, sample)
    net.gradient_checkpointing = dit.gradient_checkpointing = False
    plain = gradient(trainer, sample)
    print(f"checkpointed vs plain: {(checkpointed - plain).abs().max():.2e} (gradient up to {plain.abs().max():.2e})")
    # Measured 0 (the same kernels run again in the backward pass); an identity lost in InfuseNet's recomputation
    # would change the gradients far beyond the bound.
    assert plain.abs().max() > 1e-3 and torch.allclose(checkpointed, plain, atol=1e-6, rtol=0)
