"""The trainer node standalone: it launches flux_core.train (through accelerate), streams progress to the
progress bar and the front end, publishes the LoRA into the loras folder, and stops cleanly on Cancel."""
import json
import sys
import threading
import time

import pytest
from PIL import Image

from lora_tools import read_lora
from nodes import comfy_bridge as bridge
from nodes.loaders import NodeInputError
from nodes.train_nodes import EVENT, FluxCoreTrainLoRA
from tests.tiny_comfy import NAMES, make_models_dir
from tests.tiny_train import COLOURS, SUBJECTS, read_log

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train node")
    models, _ = make_models_dir(tmp)
    data = tmp / "my dätaset"  # image + same-name .txt captions
    data.mkdir()
    for (name, rgb), subject in zip(COLOURS.items(), SUBJECTS):
        Image.new("RGB", (32, 32), rgb).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"{subject} {name}", encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models))
    mp.setenv("FLUXCORE_OUTPUT_DIR", str(tmp / "öutput"))
    mp.setenv("OMP_NUM_THREADS", "1")
    yield dict(models=models, data=data, output=tmp / "öutput")
    mp.undo()


def inputs(env, name, **overrides):
    values = dict(dit_name=NAMES["dit"], clip_name=NAMES["clip"], t5_name=NAMES["t5"], vae_name=NAMES["vae"],
                  dataset_path=str(env["data"]), output_name=name, lora_rank=4, learning_rate=1e-2, num_epochs=2,
                  dataset_repeat=1, max_pixels=1024 * 1024, save_steps=0, validation_prompt="a cat red\na dog",
                  validation_steps=0, gradient_checkpointing=True, fp8_frozen_models=False, resume=True, seed=0,
                  extra_arguments="--t5_sequence_length 16 --validation_height 32 --validation_width 32 "
                                  "--validation_num_inference_steps 2", unique_id="17")
    values.update(overrides)
    return values


def test_node_trains_streams_progress_and_publishes_the_lora(env, monkeypatch):
    progress = []
    real = bridge.Progress

    class Recording(real):
        def update(self, value, preview=None):
            progress.append((value, self.total))
            super().update(value, preview)
    monkeypatch.setattr(bridge, "Progress", Recording)
    bridge.sent_events.clear()
    out = FluxCoreTrainLoRA().train(**inputs(env, "my lora ü"))
    assert out["result"] == ("my lora ü.safetensors",)
    lora = read_lora(env["models"] / "loras" / "my lora ü.safetensors")
    assert lora.format == "kohya" and len(lora.layers) == 26
    assert progress[0] == (0, 16) and progress[-1] == (16, 16) and len(progress) == 17
    events = [data for name, data in bridge.sent_events if name == EVENT]
    assert all(e["node"] == "17" for e in events)
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 16 and all(isinstance(e["loss"], float) for e in steps)
    validation = [e for e in events if e["event"] == "validation"]
    assert [v["step"] for v in validation] == [8, 16]   # at each epoch's save
    image = validation[-1]["images"][-1]
    assert image["type"] == "output" and image["subfolder"] == "fluxcore_train/my lora ü/validation"
    assert (env["output"] / image["subfolder"] / image["filename"]).is_file()
    assert out["ui"]["images"] == [image]


def test_cancel_stops_the_subprocess_and_leaves_a_resumable_checkpoint(env):
    run_dir = env["output"] / "fluxcore_train" / "cancelled"

    def cancel_after_step_two():
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(e.get("step", 0) >= 2 for e in read_log(run_dir) if e["event"] == "step"):
                bridge.request_interrupt()
                return
            time.sleep(0.1)
    watcher = threading.Thread(target=cancel_after_step_two, daemon=True)
    watcher.start()
    started = time.time()
    with pytest.raises(bridge.Interrupted):
        FluxCoreTrainLoRA().train(**inputs(env, "cancelled", num_epochs=200, validation_prompt=""))
    watcher.join()
    assert time.time() - started < 120
    log = read_log(run_dir)
    assert log[-1]["event"] == "stopped"
    stopped_at = log[-1]["step"]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{stopped_at}" and not (run_dir / "STOP").exists()
    assert json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())["step"] == stopped_at


def test_bad_inputs_name_the_input(env):
    with pytest.raises(NodeInputError, match="'dataset_path'"):
        FluxCoreTrainLoRA().command(**{k: v for k, v in inputs(env, "x", dataset_path=str(env["data"] / "nope")).items()
                                       if k != "unique_id"})
    with pytest.raises(NodeInputError, match="'output_name'"):
        FluxCoreTrainLoRA().command(**{k: v for k, v in inputs(env, "a/b").items() if k != "unique_id"})


def test_trainer_errors_reach_the_node(env, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.txt").write_text("caption")
    with pytest.raises(RuntimeError, match=r"bad\.png cannot be read"):
        FluxCoreTrainLoRA().train(**inputs(env, "broken", dataset_path=str(tmp_path)))


def test_missing_training_packages_name_the_train_extra(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)   # `import accelerate` now raises ImportError
    with pytest.raises(RuntimeError) as e:
        FluxCoreTrainLoRA().train(**inputs(env, "no packages"))
    message = str(e.value)
    assert "not installed in ComfyUI's Python: accelerate" in message
    assert "pip install accelerate peft" in message and 'pip install ".[train]"' in message
    assert not (env["output"] / "fluxcore_train" / "no packages").exists()   # nothing started


def test_resume_off_never_overwrites_an_earlier_run(env):
    import torch
    from flux_core.train import checkpoint as ckpt

    run_dir = env["output"] / "fluxcore_train" / "earlier"
    ckpt.save_state(run_dir, {"w": torch.zeros(1)}, {"state": {}, "param_groups": []}, {}, {"step": 3, "epoch": 0,
                    "position": 3, "weights": "step-3.safetensors"})
    args = {k: v for k, v in inputs(env, "earlier", resume=False).items() if k != "unique_id"}
    with pytest.raises(NodeInputError, match=r"input 'resume': off, but .*earlier.* holds an earlier run"):
        FluxCoreTrainLoRA().command(**args)
    command, _ = FluxCoreTrainLoRA().command(**{**args, "resume": True})
    assert "--resume" in command
