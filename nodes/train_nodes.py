"""The LoRA trainer node: runs `flux_core.train` in a subprocess through `accelerate launch`, shows its progress,
loss curve and latest validation image, and stops it cleanly on Cancel. Training needs accelerate and peft
(FluxCore's `train` extra); without them the node says what to install before starting anything.

The training runs outside ComfyUI's process, so its memory is its own and a crash cannot take ComfyUI down.
Its JSON progress lines drive the progress bar; each step's loss and each validation image go to the
browser (`fluxcore.train` events, drawn by js/fluxcore_train.js). Cancel writes the run's STOP file (and, if
the run does not end within `stop_timeout` seconds, interrupts then terminates the process group): the
trainer finishes its step and saves a resumable checkpoint, which the next run with `resume` continues.

Files: the run folder is <ComfyUI output>/fluxcore_train/<output_name>/ (checkpoints, train_log.jsonl,
validation images, which ComfyUI can show); the trained LoRA is copied to <loras>/<output_name>.safetensors
and its name returned, ready for a LoRA loader.
"""
from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

from flux_core.demo import DATASETS_DIR
from flux_core.train.packages import missing_packages_message, missing_training_packages
from flux_core.train.run_folder import earlier_run
from lora_tools.io import atomic_write

from . import comfy_bridge as bridge
from .loaders import NodeInputError, tokenizer_dirs

ROOT = Path(__file__).resolve().parents[1]   # the pack: flux_core is importable from here
EVENT = "fluxcore.train"
RUNS_FOLDER = "fluxcore_train"
STOP_FILE = "STOP"


def require_training_packages() -> None:
    """The engine's check (flux_core.train.packages), phrased for the node: the packages go into ComfyUI's
    Python, and ComfyUI must restart to see them."""
    missing = missing_training_packages()
    if missing:
        message = missing_packages_message(missing, python="ComfyUI's Python")
        raise RuntimeError(f"FluxCoreTrainLoRA: {message} Then restart ComfyUI.")


def build_command(train_args: list[str], num_processes: int) -> list[str]:
    """`accelerate launch` of the trainer; --multi_gpu for several processes (on a machine without GPUs too:
    without it accelerate's plain launcher starts one process)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        launch.append("--multi_gpu")
    return [*launch, "-m", "flux_core.train", *train_args]


def demo_datasets() -> list[str]:
    """The datasets that ship with the pack (flux_core.demo.DATASETS_DIR: fluxcore_demo_stripes)."""
    return sorted(p.name for p in DATASETS_DIR.iterdir() if p.is_dir()) if DATASETS_DIR.is_dir() else []


def dataset_folder(node: str, dataset_path: str) -> Path:
    """The training set's folder: a full path as given; a relative one in ComfyUI's input folder, else among the
    pack's demo datasets (so a workflow can name "fluxcore_demo_stripes" on any machine)."""
    text = dataset_path.strip().strip('"')
    given = Path(text).expanduser()
    places = [given] if given.is_absolute() else [bridge.input_directory() / given, DATASETS_DIR / given]
    found = next((p for p in places if p.is_dir()), None) if text else None
    if found is None:
        where = ("" if given.is_absolute() or not text else
                 f" (a relative path is looked up in ComfyUI's input folder, {bridge.input_directory()}, then among "
                 f"FluxCore's demo datasets in {DATASETS_DIR}: {', '.join(demo_datasets()) or 'none installed'})")
        raise NodeInputError(f"{node}, input 'dataset_path': '{dataset_path}' is not a folder{where}; give the folder "
                             f"holding the images and their captions.")
    return found


class TrainingProcess:
    """The trainer subprocess: its JSON events through a queue, stderr kept for error messages, clean stop."""

    def __init__(self, command: list[str], run_dir: Path):
        self.run_dir = run_dir
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONIOENCODING"] = "utf-8"
        env["PYTHONUNBUFFERED"] = "1"
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        self.proc = subprocess.Popen(command, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                     errors="replace", **group)
        self.events: queue.Queue = queue.Queue()
        self.stderr_tail: list[str] = []
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self.events.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self.events.put(None)  # end of output: the trainer (and its launcher's children) are gone

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + [line.rstrip()])[-40:]

    def stop(self, timeout: float) -> None:
        """STOP file (the trainer saves and exits after its step), then an interrupt, then terminate."""
        (self.run_dir / STOP_FILE).touch()
        if self._wait(timeout):
            return
        self._signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)
        if self._wait(30):
            return
        self._signal(signal.SIGTERM)
        if not self._wait(10):
            self.proc.kill()
            self.proc.wait()

    def _signal(self, sig) -> None:
        try:
            if os.name == "nt":
                self.proc.send_signal(sig)
            else:
                os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        for t in self._threads:
            t.join(timeout=5)
        return True


class FluxCoreTrainLoRA:
    CATEGORY = "FluxCore/training"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_NODE = True
    FUNCTION = "train"
    DESCRIPTION = ("Trains a FLUX LoRA on a folder of images with captions (metadata.csv, or image + same-name .txt) "
                   "with FluxCore's trainer (DiffSynth-Studio's recipe) in a separate process. Shows progress, the "
                   "loss curve and validation images; Cancel saves a checkpoint that 'resume' continues. The LoRA "
                   "(kohya format) is saved into models/loras and its name returned.")

    @classmethod
    def INPUT_TYPES(cls):
        def models(folder):
            return bridge.list_models(folder) or ["(none found)"]
        return {
            "required": {
                "dit_name": (models("diffusion_models"), {"tooltip": "Base FLUX DiT from models/diffusion_models."}),
                "clip_name": (models("text_encoders"), {"tooltip": "CLIP-L text encoder from models/text_encoders."}),
                "t5_name": (models("text_encoders"), {"tooltip": "T5-XXL text encoder from models/text_encoders."}),
                "vae_name": (models("vae"), {"tooltip": "FLUX VAE (ae.safetensors) from models/vae."}),
                "dataset_path": ("STRING", {"default": "", "tooltip": "Folder of images (jpg/png/webp) with "
                                            "captions: a metadata.csv (image,prompt columns) or one same-name .txt "
                                            "per image. A full path, or a folder name in ComfyUI's input folder, "
                                            "else among FluxCore's demo datasets (fluxcore_demo_stripes)."}),
                "output_name": ("STRING", {"default": "my_flux_lora", "tooltip": "Name of the LoRA file in "
                                           "models/loras and of the run folder in output/fluxcore_train."}),
                "lora_rank": ("INT", {"default": 32, "min": 1, "max": 256, "tooltip": "LoRA rank (alpha = rank)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                                            "round": False, "tooltip": "AdamW learning rate."}),
                "num_epochs": ("INT", {"default": 5, "min": 1, "max": 10000, "tooltip": "Passes over the "
                                       "(repeated) dataset."}),
                "dataset_repeat": ("INT", {"default": 50, "min": 1, "max": 100000, "tooltip": "Each epoch "
                                           "shows every image this many times."}),
                "max_pixels": ("INT", {"default": 1024 * 1024, "min": 256, "max": 4096 * 4096, "step": 1024,
                                       "tooltip": "Larger images are scaled down to about this many pixels; "
                                       "sides become multiples of 16."}),
                "save_steps": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Save a checkpoint "
                                       "every N steps (0: at the end of each epoch)."}),
                "validation_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "Rendered at each "
                                                 "save (or every validation_steps) and shown here; one prompt per "
                                                 "line; empty: none."}),
                "validation_steps": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Render the "
                                             "validation prompts every N steps (0: at each save)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute activations in the "
                                                       "backward pass: much less memory, ~30% slower."}),
                "fp8_frozen_models": ("BOOLEAN", {"default": False, "tooltip": "Store the frozen DiT and text "
                                                  "encoders in FP8 (half the memory, slightly lower precision)."}),
                "resume": ("BOOLEAN", {"default": True, "tooltip": "Continue this output_name's newest complete "
                                       "checkpoint if there is one (same settings), else start a new run. Off: "
                                       "always a new run, refused if output_name already holds one (an earlier "
                                       "run is never overwritten; choose another name)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the LoRA init, "
                                 "data order, timesteps and noise."}),
            },
            "optional": {
                "num_processes": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "GPUs to train on "
                                          "(data parallel through accelerate)."}),
                "max_steps": ("INT", {"default": 0, "min": 0, "max": 10000000, "tooltip": "Stop after this many "
                                      "steps (0: no limit)."}),
                "extra_arguments": ("STRING", {"default": "", "tooltip": "More flux_core.train arguments, e.g. "
                                               "--lora_target_modules a_to_qkv,b_to_qkv --height 512 --width 512."}),
                "stop_timeout": ("INT", {"default": 300, "min": 5, "max": 36000, "tooltip": "Seconds Cancel waits "
                                         "for the trainer to save before interrupting it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # -------------------------------------------------------------------- arguments
    def command(self, dit_name, clip_name, t5_name, vae_name, dataset_path, output_name, lora_rank, learning_rate,
                num_epochs, dataset_repeat, max_pixels, save_steps, validation_prompt, validation_steps,
                gradient_checkpointing, fp8_frozen_models, resume, seed, num_processes=1, max_steps=0,
                extra_arguments="") -> tuple[list[str], Path]:
        node = "FluxCoreTrainLoRA"
        paths = []
        for input_name, folder, name in (("dit_name", "diffusion_models", dit_name), ("clip_name", "text_encoders",
                                         clip_name), ("t5_name", "text_encoders", t5_name), ("vae_name", "vae", vae_name)):
            try:
                paths.append(bridge.model_path(folder, name))
            except (FileNotFoundError, bridge.UnsafeModelName) as e:
                raise NodeInputError(f"{node}, input '{input_name}': {e}") from None
        dataset = dataset_folder(node, dataset_path)
        name = output_name.strip()
        if not name or any(c in name for c in '/\\:*?"<>|') or name in (".", ".."):
            raise NodeInputError(f"{node}, input 'output_name': '{output_name}' cannot be a file name; use letters, "
                                 f"digits, spaces, '-' or '_'.")
        run_dir = bridge.output_directory() / RUNS_FOLDER / name
        found = earlier_run(run_dir)
        if found and not resume:
            raise NodeInputError(f"{node}, input 'resume': off, but {run_dir} holds an earlier run of "
                                 f"'{name}' ({', '.join(found[:4])}), which a new run would overwrite. Turn "
                                 f"'resume' on to continue it, or choose another 'output_name'.")
        args = ["--dataset_base_path", str(dataset), "--model_paths", json.dumps(paths, ensure_ascii=False),
                "--output_path", str(run_dir), "--lora_base_model", "dit", "--lora_rank", str(lora_rank),
                "--learning_rate", repr(float(learning_rate)), "--num_epochs", str(num_epochs),
                "--dataset_repeat", str(dataset_repeat), "--max_pixels", str(max_pixels), "--seed", str(seed),
                "--torch_dtype", "bfloat16" if torch.cuda.is_available() else "float32"]
        clip_tok, t5_tok = tokenizer_dirs(paths[1], paths[2])  # the loader node's rule
        if clip_tok is not None:
            args += ["--tokenizer_1_path", str(clip_tok)]
        if t5_tok is not None:
            args += ["--tokenizer_2_path", str(t5_tok)]
        if save_steps:
            args += ["--save_steps", str(save_steps)]
        prompts = [p.strip() for p in validation_prompt.splitlines() if p.strip()]
        if prompts:
            args += ["--validation_prompts", *prompts]
            if validation_steps:
                args += ["--validation_steps", str(validation_steps)]
        if gradient_checkpointing:
            args.append("--use_gradient_checkpointing")
        if fp8_frozen_models:
            args += ["--fp8_models", "dit,text_encoder_1,text_encoder_2"]
        if resume:
            args.append("--resume")
        if max_steps:
            args += ["--max_steps", str(max_steps)]
        try:
            args += shlex.split(extra_arguments or "", posix=os.name != "nt")
        except ValueError as e:
            raise NodeInputError(f"{node}, input 'extra_arguments': {e}") from None
        return build_command(args, num_processes), run_dir

    # -------------------------------------------------------------------- run
    def train(self, dit_name, clip_name, t5_name, vae_name, dataset_path, output_name, lora_rank, learning_rate,
              num_epochs, dataset_repeat, max_pixels, save_steps, validation_prompt, validation_steps,
              gradient_checkpointing, fp8_frozen_models, resume, seed, num_processes=1, max_steps=0,
              extra_arguments="", stop_timeout=300, unique_id=None):
        require_training_packages()
        command, run_dir = self.command(dit_name, clip_name, t5_name, vae_name, dataset_path, output_name, lora_rank,
                                        learning_rate, num_epochs, dataset_repeat, max_pixels, save_steps,
                                        validation_prompt, validation_steps, gradient_checkpointing,
                                        fp8_frozen_models, resume, seed, num_processes, max_steps, extra_arguments)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        process = TrainingProcess(command, run_dir)
        state = {"progress": None, "losses": [], "image": None, "path": None, "error": None, "stopped": False}
        try:
            while True:
                try:
                    event = process.events.get(timeout=0.25)
                except queue.Empty:
                    bridge.check_interrupt()
                    continue
                if event is None:
                    break
                self._on_event(event, state, unique_id)
                bridge.check_interrupt()
        except BaseException:
            process.stop(stop_timeout)  # Cancel (or anything else): save, stop, then let ComfyUI know
            raise
        process._wait(60)
        if state["error"] or process.proc.returncode:
            detail = state["error"] or "\n".join(process.stderr_tail[-15:])
            raise RuntimeError(f"FluxCoreTrainLoRA: training failed (exit status {process.proc.returncode}): {detail}")
        if state["path"] is None:
            raise RuntimeError("FluxCoreTrainLoRA: the trainer ended without saving a LoRA.\n" +
                               "\n".join(process.stderr_tail[-15:]))
        lora_name = publish_lora(Path(state["path"]), output_name.strip())
        ui = {"text": [f"{lora_name}: {len(state['losses'])} steps, last loss "
                       f"{state['losses'][-1]:.4f}" if state["losses"] else lora_name]}
        if state["image"]:
            ui["images"] = [state["image"]]
        return {"ui": ui, "result": (lora_name,)}

    def _on_event(self, event: dict, state: dict, unique_id) -> None:
        kind = event.get("event")
        message = {"node": unique_id, "event": kind}
        if kind == "start":
            state["progress"] = bridge.Progress(max(1, event["total_steps"]))
            state["progress"].update(event["start_step"])
            message.update(total_steps=event["total_steps"], start_step=event["start_step"])
        elif kind == "step":
            if state["progress"] is not None:
                state["progress"].update(event["step"])
            state["losses"].append(event["loss"])
            message.update({k: event[k] for k in ("step", "total_steps", "loss", "lr", "eta_s", "images_per_s")})
        elif kind == "validation":
            images = [view_entry(Path(p)) for p in event["images"]]
            state["image"] = images[-1] if images else state["image"]
            message.update(step=event["step"], images=images)
        elif kind in ("checkpoint", "done", "stopped"):
            state["path"] = event.get("path") or state["path"]
            state["stopped"] = kind == "stopped"
            message.update(step=event.get("step"), path=event.get("path"))
        elif kind == "error":
            state["error"] = event.get("message")
            message.update(message=event.get("message"))
        bridge.send_ui_event(EVENT, message)


def view_entry(path: Path) -> dict:
    """How ComfyUI's /view serves a file of the output folder: {"filename", "subfolder", "type": "output"}."""
    try:
        relative = path.resolve().relative_to(bridge.output_directory().resolve())
    except ValueError:
        return {"filename": path.name, "subfolder": "", "type": "output"}
    parent = relative.parent.as_posix()
    return {"filename": relative.name, "subfolder": "" if parent == "." else parent, "type": "output"}


def publish_lora(weights: Path, name: str) -> str:
    """Copy the trained LoRA into the first loras folder (atomically) and return its name there."""
    folder = bridge.folder_paths_for("loras")[0]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    atomic_write(target, lambda tmp: shutil.copyfile(weights, tmp))
    return target.name


NODE_CLASS_MAPPINGS = {"FluxCoreTrainLoRA": FluxCoreTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxCoreTrainLoRA": "Train FLUX LoRA (FluxCore)"}
