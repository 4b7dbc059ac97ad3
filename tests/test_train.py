"""flux_core.train pieces on their own: the objective, LoRA targets, dataset reading and its errors, argument
checks, atomic checkpoints, the data plan, gradient checkpointing. (End to end runs: test_train_e2e.py.)"""
import io
import json
import math
import os
import sys

import pytest
import torch
from PIL import Image

from flux_core.loading.loader import load_model
from flux_core.math import image_ids, pack_latents, text_ids
from flux_core.sampling import PromptEmbeds
from flux_core.scheduler import SIGMA_MIN
from flux_core.train import checkpoint as ckpt
from flux_core.train.__main__ import main
from flux_core.train.args import FLUX_LORA_TARGETS, TrainError, parse_args
from flux_core.train.dataset import ImageDataset, crop_and_resize, target_size
from flux_core.train.loss import flow_matching_loss, sample_generator, training_schedule
from flux_core.train.trainable import DIFFSYNTH_ALIASES, resolve_targets
from flux_core.train.trainer import epoch_order, make_plan, model_configs
from tests.tiny_dit import make_diffusers_dit, write_diffusers_dit

DIFFSYNTH_TARGETS = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
                     "norm1_a.linear,norm1_b.linear,to_qkv_mlp")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = write_diffusers_dit(make_diffusers_dit(seed=1), tmp_path_factory.mktemp("dit") / "transformer")
    return load_model(folder, torch_dtype=torch.float32, kind="dit")


def base_argv(data, *extra):
    return ["--dataset_base_path", str(data), "--model_paths", '["unused"]', "--lora_base_model", "dit", *extra]


# ------------------------------------------------------------------------------------------------ objective
def test_training_schedule_is_the_shifted_1000_point_grid_with_a_bell_weight_of_mean_1():
    s = training_schedule()
    assert s.sigmas.shape == s.weights.shape == (1000,)
    shifted_min = 3 * SIGMA_MIN / (1 + 2 * SIGMA_MIN)
    # Measured 0 and 4.5e-8 relative; sigma_min 0.003 for 0.003 / 1.002 (DiffSynth's) is 2e-3 off.
    assert s.sigmas[0].item() == pytest.approx(1.0) and s.sigmas[-1].item() == pytest.approx(shifted_min, rel=1e-5)
    # uniform in the unshifted sigma, then shifted by 3: sigma' = 3 s / (1 + 2 s)
    raw = torch.linspace(1.0, SIGMA_MIN, 1000, dtype=torch.float64)
    # Measured 3e-8 (float32); the grid off by one point moves sigmas by >= 3.3e-4 (spacing 1e-3, slope >= 1/3).
    assert torch.allclose(s.sigmas.double(), 3 * raw / (1 + 2 * raw), atol=1e-6, rtol=0)
    assert s.weights.mean().item() == pytest.approx(1.0, abs=1e-5)  # measured 6e-8; a sum over 999 points: 1e-3
    t = s.sigmas.double() * 1000
    y = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    # Measured 6e-8 (weights up to 1.8); y.min() not subtracted (weights 0.7 to 1.15, not 0 to 1.8) moves them by
    # ~0.7, the bell over the unshifted sigma by more.
    assert torch.allclose(s.weights.double(), (y - y.min()) * 1000 / (y - y.min()).sum(), atol=1e-6, rtol=0)
    peak = int(s.weights.argmax())
    # Bell centred at sigma 0.5: measured 6.6e-4 off (one grid point); centred at the unshifted 0.5 it would peak at
    # the shifted 0.75, 0.25 off.
    assert abs(s.sigmas[peak].item() - 0.5) < 0.01
    assert s.weights[0].item() < 0.05 * s.weights.max().item()  # near zero at the ends (measured 0; no offset: 0.61)


def test_loss_is_weighted_mse_of_velocity_against_noise_minus_x0():
    class Echo(torch.nn.Module):  # predicts its (packed) input: the loss is then computable by hand
        def forward(self, img, **kw):
            return img
    x0 = torch.randn(1, 16, 4, 6)
    prompt = PromptEmbeds(torch.zeros(1, 3, 8), torch.zeros(1, 8))
    schedule = training_schedule()
    loss, sigma = flow_matching_loss(Echo(), x0, prompt, schedule, sample_generator(0, 0, 5), 1.0, torch.float32)
    g = sample_generator(0, 0, 5)
    index = int(torch.randint(0, 1000, (1,), generator=g))
    noise = torch.randn(x0.shape, generator=g)
    assert sigma == pytest.approx(schedule.sigmas[index].item())  # measured 0; the next grid point is 1e-3 away
    x_t = (1 - sigma) * x0 + sigma * noise
    expected = ((x_t - (noise - x0)) ** 2).mean() * schedule.weights[index]
    # Measured 0 relative; the neighbouring grid point's sigma and weight give 4e-3, the weight left out 1.2e-2
    # (the weight here is 1.01), the target x0 - noise 0.65.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sample_generators_depend_only_on_seed_epoch_and_place():
    draw = lambda *k: torch.randn(4, generator=sample_generator(*k))  # noqa: E731
    assert torch.equal(draw(3, 1, 7), draw(3, 1, 7))
    assert not torch.equal(draw(3, 1, 7), draw(3, 1, 8))
    assert not torch.equal(draw(3, 1, 7), draw(3, 2, 7))
    assert not torch.equal(draw(3, 1, 7), draw(4, 1, 7))


# ------------------------------------------------------------------------------------------------ targets
def test_bfl_and_diffsynth_target_names_select_the_same_layers(dit):
    bfl = resolve_targets(FLUX_LORA_TARGETS, dit)
    assert len(bfl) == 10 * dit.params.depth + 3 * dit.params.depth_single_blocks
    assert sorted(resolve_targets(DIFFSYNTH_TARGETS, dit)) == sorted(bfl)
    assert "final_layer.linear" not in bfl and "single_blocks.0.linear2" in bfl
    assert resolve_targets("proj_out", dit) == [f"single_blocks.{i}.linear2" for i in range(2)]
    assert resolve_targets("attn.a_to_qkv", dit) == ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv"]
    assert set(DIFFSYNTH_ALIASES) == set(DIFFSYNTH_TARGETS.split(","))


@pytest.mark.parametrize("spec, named", [("img_attn.qkv,to_q", "'to_q'"), ("a_to_qkv,bogus", "'bogus'"),
                                         ("", "automatically")])
def test_targets_that_match_nothing_are_an_error_naming_them(dit, spec, named):
    with pytest.raises(TrainError, match=named):
        resolve_targets(spec, dit)


# ------------------------------------------------------------------------------------------------ dataset
def test_dynamic_and_fixed_sizes():
    assert target_size(1000, 700, None, 1024 * 1024) == (992, 688)        # under the limit: floor to 16
    w, h = target_size(4000, 3000, None, 1024 * 1024)                      # scaled down to ~1M pixels
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 and w * h > 0.9 * 1024 * 1024
    assert (w, h) == (int(4000 / math.sqrt(12e6 / 2**20)) // 16 * 16, int(3000 / math.sqrt(12e6 / 2**20)) // 16 * 16)
    assert target_size(4000, 3000, (512, 256), 1024 * 1024) == (512, 256)
    image = Image.new("RGB", (100, 50))
    image.paste((255, 0, 0), (0, 0, 25, 50))   # red left quarter is cropped away at 48x48
    out = crop_and_resize(image, 48, 48)
    assert out.size == (48, 48) and out.getpixel((0, 24))[0] < 128


def write_csv(folder, rows, header="image,prompt"):
    (folder / "metadata.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return folder / "metadata.csv"


def test_metadata_formats_and_folder_captions(tmp_path):
    Image.new("RGB", (40, 24), (9, 9, 9)).save(tmp_path / "a b.png")
    Image.new("RGB", (40, 24)).save(tmp_path / "c.jpg")
    (tmp_path / "a b.txt").write_text("first caption\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("second", encoding="utf-8")
    folder = ImageDataset(tmp_path)
    assert folder.check()["rows"] == 2 and folder[0]["prompt"] == "first caption" and folder[0]["image"].size == (32, 16)
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a b.png", "prompt": "x"}]), encoding="utf-8")
    (tmp_path / "m.jsonl").write_text('{"image": "c.jpg", "prompt": "y"}\n\n{"image": "a b.png", "prompt": "z"}\n',
                                      encoding="utf-8")
    assert [r["prompt"] for r in ImageDataset(tmp_path, tmp_path / "m.jsonl", repeat=2)] == ["y", "z", "y", "z"]
    assert ImageDataset(tmp_path, tmp_path / "m.json", height=64, width=32)[0]["image"].size == (32, 64)


@pytest.mark.parametrize("case, message", [
    ("empty", "dataset is empty"),
    ("missing_image", r"metadata.csv row 2 .*gone\.png does not exist"),
    ("unreadable", r"metadata.csv row 1 .*broken\.png cannot be read"),
    ("gif", r"row 1 .*not a supported image type"),
    ("no_prompt_column", r"row 1 .*no 'prompt'"),
    ("tiny_image", r"row 1 .*too small"),
    ("no_caption_file", r"lonely\.png: no caption file lonely\.txt"),
    ("missing_kontext", r"row 1 .*no 'kontext_images'"),
])
def test_bad_datasets_fail_before_training_naming_the_row(tmp_path, case, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    kwargs = {}
    if case == "empty":
        write_csv(tmp_path, [])
    elif case == "missing_image":
        write_csv(tmp_path, ["ok.png,fine", "gone.png,missing"])
    elif case == "unreadable":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        write_csv(tmp_path, ["broken.png,damaged"])
    elif case == "gif":
        Image.new("RGB", (32, 32)).save(tmp_path / "x.gif")
        write_csv(tmp_path, ["x.gif,a gif"])
    elif case == "no_prompt_column":
        write_csv(tmp_path, ["ok.png"], header="image")
    elif case == "tiny_image":
        Image.new("RGB", (8, 40)).save(tmp_path / "thin.png")
        write_csv(tmp_path, ["thin.png,thin"])
    elif case == "no_caption_file":
        (tmp_path / "ok.txt").write_text("ok")
        Image.new("RGB", (32, 32)).save(tmp_path / "lonely.png")
    elif case == "missing_kontext":
        write_csv(tmp_path, ["ok.png,a prompt"])
        kwargs = dict(file_keys=["image", "kontext_images"], required_keys=["kontext_images"])
    with pytest.raises(TrainError, match=message):
        ImageDataset(tmp_path, **kwargs).check()


def test_cli_reports_a_bad_dataset_before_loading_models(tmp_path, capsys):
    write_csv(tmp_path, ["gone.png,missing"])
    assert main(base_argv(tmp_path, "--output_path", str(tmp_path / "out"))) == 2
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]) == {"event": "error", "message": json.loads(out.splitlines()[-1])["message"]}
    assert "row 1" in err and "gone.png" in err


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("extra, message", [
    (["--height", "520", "--width", "512"], r"--height 520 is not a positive multiple of 16 .*use 512 or 528"),
    (["--height", "512"], "both --height and --width"),
    (["--trainable_models", "dit"], "--trainable_models dit and --lora_base_model dit together: choose full"),
    (["--lora_base_model", "text_encoder"], "adds LoRAs to the DiT only"),
    (["--extra_inputs", "insert_anything_ref_image"], "insert_anything_ref_image: not supported"),
    (["--lora_base_model", "", "--trainable_models", "text_encoder"],
     "trains the DiT, a ControlNet, an IP-Adapter or InfiniteYou"),
    (["--lora_base_model", "", "--trainable_models", "dit,controlnet"], "train one model per run"),
    # a ControlNet run: the control column is required, and each problem of --extra_inputs is named at once
    (["--lora_base_model", "", "--trainable_models", "controlnet"],
     r"--trainable_models controlnet needs the control images: add --extra_inputs controlnet_image"),
    (["--extra_inputs", "controlnet_inputs,controlnet_processor_id"],
     r"'controlnet_inputs' is not a column.*; controlnet_processor_id without controlnet_image"),
    (["--extra_inputs", "controlnet_image", "--data_file_keys", "image,controlnet_processor_id"],
     r"--data_file_keys controlnet_processor_id: that column holds a union mode name"),
    (["--validation_controlnet_image", "x.png"], r"--validation_controlnet_image: validation control inputs are"),
    (["--validation_steps", "5"], "needs --validation_prompts"),
    (["--gradient_accumulation_steps", "0"], "at least 1"),
])
def test_argument_errors_name_the_argument(tmp_path, extra, message):
    with pytest.raises(TrainError, match=message):
        parse_args(base_argv(tmp_path, *extra))


def test_model_paths_must_be_json(tmp_path):
    with pytest.raises(TrainError, match="--model_paths is not valid JSON"):
        parse_args(["--dataset_base_path", str(tmp_path), "--model_paths", "[a.safetensors]",
                    "--lora_base_model", "dit"])
    with pytest.raises(TrainError, match="nothing to train"):
        parse_args(["--dataset_base_path", str(tmp_path), "--model_paths", '["a"]'])


# ------------------------------------------------------------------------------------------------ checkpoints
def save(tmp_path, step, keep=1):
    return ckpt.save_state(tmp_path, {"w": torch.full((2,), float(step))},
                           {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, {"last_epoch": step},
                           {"step": step, "epoch": 0, "position": step, "weights": f"step-{step}.safetensors"},
                           keep=keep)


def test_checkpoints_are_atomic_and_latest_always_loads(tmp_path, monkeypatch):
    save(tmp_path, 2)
    save(tmp_path, 4, keep=2)
    root = ckpt.checkpoints_dir(tmp_path)
    assert (root / "latest").read_text().strip() == "step-4"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2", "step-4"]

    real_save = torch.save

    def crash_on_scheduler(obj, path, *a, **k):  # a kill in the middle of writing step 6
        if str(path).endswith("lr_scheduler.pt"):
            raise KeyboardInterrupt("killed")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", crash_on_scheduler)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 6, keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    latest = ckpt.find_resumable(tmp_path, "latest")
    assert latest.folder.name == "step-4" and not latest.skipped
    assert latest.state["step"] == 4 and torch.equal(latest.trainable["w"], torch.full((2,), 4.0))
    assert latest.scheduler["last_epoch"] == 4

    (root / "latest").unlink()  # even without the pointer, the newest complete state is found
    assert ckpt.find_resumable(tmp_path, "latest").folder.name == "step-4"
    save(tmp_path, 8)           # the next save cleans the half-written temp folder and prunes to `keep`
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-8"]
    assert ckpt.find_resumable(tmp_path / "nowhere", "latest") is None


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated safetensors": lambda f: truncate(f / "trainable.safetensors"),
    "garbage optimizer": lambda f: (f / "optimizer.pt").write_bytes(b"\x00garbage" * 50),
    "truncated scheduler": lambda f: truncate(f / "lr_scheduler.pt"),
    "empty state.json": lambda f: (f / "state.json").write_bytes(b""),
    "non-UTF-8 state.json": lambda f: (f / "state.json").write_bytes(b'{"step": 4, "x": "\xff\xfe"}'),
    "state.json without a step": lambda f: (f / "state.json").write_text('{"epoch": 0}'),
    "missing optimizer": lambda f: (f / "optimizer.pt").unlink(),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_resume_falls_back_from_a_corrupt_latest_checkpoint_naming_it(tmp_path, damage):
    save(tmp_path, 2, keep=3)
    newest = save(tmp_path, 4, keep=3)
    CORRUPTIONS[damage](newest)
    loaded = ckpt.find_resumable(tmp_path, "latest")
    assert loaded.folder.name == "step-2" and loaded.state["step"] == 2
    assert [p for p, _ in loaded.skipped] == [newest]
    with pytest.raises(TrainError, match=r"--resume .*step-4: not a usable training state"):
        ckpt.find_resumable(tmp_path, str(newest))      # named explicitly: an error, no silent substitute


@pytest.mark.parametrize("pointer", [b"step-9\n", b"", b"\xff\xfe\n", b"../elsewhere\n"])
def test_a_pointer_to_nothing_usable_falls_back_to_the_newest_complete_state(tmp_path, pointer):
    save(tmp_path, 2, keep=3)
    save(tmp_path, 4, keep=3)
    (ckpt.checkpoints_dir(tmp_path) / "latest").write_bytes(pointer)
    loaded = ckpt.find_resumable(tmp_path, "latest")
    assert loaded.folder.name == "step-4"
    assert len(loaded.skipped) == 1  # the pointer (or the missing folder it names) is reported


def test_resume_with_only_corrupt_checkpoints_stops_with_every_reason(tmp_path):
    for step in (2, 4):
        folder = save(tmp_path, step, keep=3)
    CORRUPTIONS["garbage optimizer"](ckpt.checkpoints_dir(tmp_path) / "step-2")
    CORRUPTIONS["empty state.json"](folder)
    with pytest.raises(TrainError) as e:
        ckpt.find_resumable(tmp_path, "latest")
    message = str(e.value)
    assert "no usable checkpoint" in message and "step-4" in message and "step-2" in message
    assert "optimizer.pt" in message and "state.json" in message
    assert "--overwrite" in message and "--output_path" in message and "starting" not in message


def test_stale_temporary_files_of_a_killed_save_are_removed_at_start_and_at_save(tmp_path):
    from lora_tools.io import temp_path
    from flux_core.train.run_folder import prepare_output

    root = ckpt.checkpoints_dir(tmp_path)
    root.mkdir(parents=True)

    def litter():
        stale = [temp_path(tmp_path / "step-3.safetensors"), temp_path(root / "latest"),
                 temp_path(tmp_path / "validation" / "step-3-0.png")]
        for f in stale:
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(b"half")
        for d in (root / ".tmp-step-3-999", root / ".old-step-1-999"):
            d.mkdir()
            (d / "optimizer.pt").write_bytes(b"half")
        return stale + [root / ".tmp-step-3-999", root / ".old-step-1-999"]
    keep = tmp_path / "notes.tmp"                      # not a hidden temp name: the user's file stays
    keep.write_text("mine")
    stale = litter()
    prepare_output(tmp_path, resume="latest", overwrite=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    stale = litter()
    save(tmp_path, 4)
    assert not any(p.exists() for p in stale) and keep.exists()


# ------------------------------------------------------------------------------------------------ run folder
def run_argv(data, output, *extra):
    return base_argv(data, "--output_path", str(output), *extra)


def test_output_path_that_cannot_be_written_is_refused_before_models_load(tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    for output in (blocker / "out", blocker):
        assert main(run_argv(tmp_path, output)) == 2   # --model_paths '["unused"]' would fail if it got that far
        err = capsys.readouterr().err
        assert f"--output_path {output}" in err and ("cannot write" in err or "is a file" in err)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_path_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(run_argv(tmp_path, locked / "run")) == 2
        assert f"--output_path {locked / 'run'}: cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path, capsys):
    output = tmp_path / "run"
    save(output, 3)
    (output / "epoch-0.safetensors").write_bytes(b"an earlier LoRA")
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert main(run_argv(tmp_path, output)) == 2
    err = capsys.readouterr().err
    assert f"--output_path {output} holds an earlier run" in err
    assert "checkpoints/step-3" in err and "epoch-0.safetensors" in err
    assert "--resume" in err and "--overwrite" in err and "new --output_path" in err
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


def test_resume_problems_are_reported_before_models_load(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "ok.png")
    (data / "ok.txt").write_text("a caption")
    only_corrupt, only_weights = tmp_path / "corrupt", tmp_path / "weights"
    CORRUPTIONS["truncated safetensors"](save(only_corrupt, 3))
    only_weights.mkdir()
    (only_weights / "epoch-0.safetensors").write_bytes(b"a LoRA")
    # --model_paths '["unused"]' fails if loading is reached: exit 2 with these messages shows it was not
    assert main(run_argv(data, only_corrupt, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step-3" in err and "starting a new run" not in err
    assert main(run_argv(data, only_weights, "--resume")) == 2
    err = capsys.readouterr().err
    assert "epoch-0.safetensors" in err and "no resumable checkpoint" in err and "--lora_checkpoint" in err


def test_overwrite_deletes_the_earlier_run_and_nothing_else(tmp_path):
    from flux_core.train.run_folder import check_output, prepare_output

    output = tmp_path / "run"
    save(output, 3)
    for name in ("epoch-0.safetensors", "step-3.safetensors", "train_log.jsonl", "training_args.json",
                 "validation/step-3-0.png", "my notes.txt", "dataset.safetensors"):
        (output / name).parent.mkdir(exist_ok=True)
        (output / name).write_bytes(b"x")
    check_output(output, resume=None, overwrite=True)
    removed = prepare_output(output, resume=None, overwrite=True)
    assert "checkpoints/step-3" in removed and "epoch-0.safetensors" in removed
    assert sorted(p.name for p in output.iterdir()) == ["dataset.safetensors", "my notes.txt"]
    with pytest.raises(TrainError, match="--resume and --overwrite together"):
        parse_args(run_argv(tmp_path, output, "--resume", "--overwrite"))


def test_missing_training_packages_name_the_train_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)   # `import peft` now raises ImportError
    assert main(run_argv(tmp_path, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "training needs accelerate and peft; not installed: peft." in err
    assert "pip install accelerate peft" in err and 'pip install ".[train]"' in err and "fluxcore[train]" not in err


def test_single_process_accelerate_launch_is_detected_from_its_environment():
    from flux_core.train.trainer import single_process_launch
    # Environments measured with accelerate 1.15 on a CPU machine (a script printing os.environ):
    plain_two = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "False",
                 "ACCELERATE_MIXED_PRECISION": "no"}                      # --num_processes 2: one process
    multi_gpu_two = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "no"}   # --multi_gpu: two processes
    plain_one = {"ACCELERATE_USE_CPU": "False", "ACCELERATE_MIXED_PRECISION": "no"}   # --num_processes 1
    assert single_process_launch(plain_two)
    assert not single_process_launch(multi_gpu_two)
    assert not single_process_launch(plain_one) and not single_process_launch({})


def test_progress_bar_only_on_a_terminal_unless_forced():
    from flux_core.train.progress import wants_bar

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty
    assert wants_bar("auto", Stream(True)) and not wants_bar("auto", Stream(False))
    assert wants_bar("on", Stream(False)) and not wants_bar("off", Stream(True))
    assert not wants_bar("auto", object())   # a stream without isatty (some IDE consoles) gets no bar


def test_resume_mismatch_names_each_setting_by_its_flag(tmp_path):
    from flux_core.train.trainer import SETTING_NAMES, Trainer

    trainer = Trainer(parse_args(run_argv(tmp_path, tmp_path / "out")))
    trainer.plan, trainer.targets = make_plan(8, 1, 1, 1, None), []
    trainer.accelerator = accelerator("NO", 1)
    assert set(trainer.settings()) <= set(SETTING_NAMES)
    assert trainer.settings()["strategy"] == "ddp"   # a single process saves as DDP does
    assert all("--" in name for name in SETTING_NAMES.values())


def accelerator(kind: str, processes: int):
    """What Trainer.settings / find_resumable read of an Accelerator, of a launch of `kind` (DistributedType)."""
    from types import SimpleNamespace
    from accelerate.utils import DistributedType
    return SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes, is_main_process=True)


def test_resume_under_another_strategy_is_refused_before_models_load(tmp_path):
    from flux_core.train.trainer import Trainer

    torch_layout = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    fsdp_layout = {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    for name, settings, optimizer, launch, message in (
            ("single", {"strategy": "ddp"}, torch_layout, accelerator("FSDP", 2),
             "saved under a single process or DDP, this run is FSDP"),
            ("fsdp", {"strategy": "fsdp"}, fsdp_layout, accelerator("NO", 1),
             "saved under FSDP, this run is a single process or DDP"),
            ("fsdp, not recorded", {}, fsdp_layout, accelerator("MULTI_CPU", 2),   # read from the optimizer state
             "saved under FSDP, this run is a single process or DDP")):
        output = tmp_path / name
        ckpt.save_state(output, {"w": torch.zeros(2)}, optimizer, {"last_epoch": 3},
                        {"step": 3, "epoch": 0, "position": 3, "weights": "step-3.safetensors", "settings": settings})
        trainer = Trainer(parse_args(run_argv(tmp_path, output, "--resume")))
        trainer.accelerator = launch
        with pytest.raises(TrainError) as refused:
            trainer.find_resumable()
        text = str(refused.value)
        assert text.startswith(f"--resume {ckpt.checkpoints_dir(output) / 'step-3'}: ") and message in text, name
        assert f"start a new run from its weights {output / 'step-3.safetensors'}" in text
        assert "--lora_checkpoint" in text and "a new --output_path" in text
    # a single process resumes DDP's checkpoint (and the other way round): the same optimizer state
    output = tmp_path / "ddp"
    ckpt.save_state(output, {"w": torch.zeros(2)}, torch_layout, {"last_epoch": 3},
                    {"step": 3, "epoch": 0, "position": 3, "weights": "step-3.safetensors",
                     "settings": {"strategy": "ddp"}})
    trainer = Trainer(parse_args(run_argv(tmp_path, output, "--resume")))
    trainer.accelerator = accelerator("NO", 1)
    assert trainer.find_resumable().state["step"] == 3


# ------------------------------------------------------------------------------------------------ plan
def test_plan_windows_and_data_order():
    plan = make_plan(samples=10, processes=2, accumulation=2, epochs=3, max_steps=None)
    assert (plan.per_process, plan.steps_per_epoch, plan.total_steps) == (5, 3, 9)
    assert [plan.window(k) for k in range(5)] == [(0, 2), (0, 2), (2, 2), (2, 2), (4, 1)]
    assert make_plan(10, 1, 1, 3, max_steps=7).total_steps == 7
    assert sorted(epoch_order(0, 1, 10)) == list(range(10))
    assert epoch_order(0, 1, 10) == epoch_order(0, 1, 10) != epoch_order(0, 2, 10)
    with pytest.raises(TrainError, match="at least one"):
        make_plan(1, 2, 1, 1, None)


# ------------------------------------------------------------------------------------------------ DiT
@pytest.mark.parametrize("offload", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(dit, offload):
    torch.manual_seed(0)
    b, h, w = 1, 4, 4
    inputs = dict(img=torch.randn(b, h * w // 4, 64), img_ids=image_ids(b, h, w), txt=torch.randn(b, 5, 32),
                  txt_ids=text_ids(b, 5), timesteps=torch.tensor([0.4]), y=torch.randn(b, 32),
                  guidance=torch.tensor([1.0]))

    def grads(checkpointing):
        dit.gradient_checkpointing, dit.gradient_checkpointing_offload = checkpointing, offload
        dit.zero_grad(set_to_none=True)
        dit.requires_grad_(True)
        dit(**inputs).square().mean().backward()
        out = {n: p.grad.clone() for n, p in dit.named_parameters()}
        dit.requires_grad_(False)
        dit.gradient_checkpointing = dit.gradient_checkpointing_offload = False
        return out
    plain, checkpointed = grads(False), grads(True)
    # Measured 0 (the same operations recomputed); activations kept in bfloat16 under offload would move gradients
    # (up to 0.5) by ~1e-3, a block left out of the backward pass by its whole gradient.
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=0), name
    assert pack_latents(torch.zeros(1, 16, h, w)).shape == inputs["img"].shape


def test_model_arguments_become_model_configs(tmp_path):
    local = tmp_path / "ae.safetensors"
    local.write_bytes(b"")
    args = parse_args(["--dataset_base_path", str(tmp_path), "--lora_base_model", "dit",
                       "--model_paths", json.dumps(["dit.safetensors", ["t5-1.safetensors", "t5-2.safetensors"]]),
                       "--model_id_with_origin_paths",
                       f"black-forest-labs/FLUX.1-dev:text_encoder_2/,{local},black-forest-labs/FLUX.1-dev:ae.safetensors"])
    configs = [c for _, c in model_configs(args)]
    assert [c.path for c in configs[:2]] == ["dit.safetensors", ["t5-1.safetensors", "t5-2.safetensors"]]
    assert (configs[2].model_id, configs[2].origin_file_pattern) == ("black-forest-labs/FLUX.1-dev", "text_encoder_2/")
    assert configs[3].path == str(local)
    assert (configs[4].model_id, configs[4].origin_file_pattern) == ("black-forest-labs/FLUX.1-dev", "ae.safetensors")
    bad = parse_args(["--dataset_base_path", str(tmp_path), "--lora_base_model", "dit",
                      "--model_id_with_origin_paths", "no-colon-here"])
    with pytest.raises(TrainError, match="model_id:origin_file_pattern"):
        model_configs(bad)
