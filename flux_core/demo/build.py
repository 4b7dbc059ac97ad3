"""Regenerate the bundled demo model from a seed: dataset, tokenizers, text encoders, VAE, DiT and the stripes LoRA.

    python -m flux_core.demo.build --threads 1           # into flux_core/demo/models (+ datasets/), ~30 min, 2 cores
    python -m flux_core.demo.build --out /tmp/demo --dit_steps 200 --vae_steps 50   # a quick, barely trained set

Stages (each logged with its time into <out>/build_log.json):
1. dataset: every training scene (flux_core.demo.scenes: all combinations but the held-out ones) drawn
   --images_per_scene times with random size and jitter, each with its prompt (flux_core.demo.scenes.TEMPLATE);
   PNG files + metadata.csv in <work>/dataset (not shipped).
2. tokenizers learned from the prompts' words (flux_core.demo.tokenizers; T5's model_max_length = --t5_length, the
   prompt length the DiT trains and generates with) and the text encoders: CLIP-L and T5 v1.1 at small widths,
   random (seeded; T5's position bias set to look at the neighbouring words, `look_at_neighbours`) and frozen: the
   DiT learns to read them. Written in ComfyUI's single-file layouts.
3. VAE: FLUX.1's autoencoder at small widths trained here as an autoencoder (pixel L1 + MSE, latent noise so the
   decoder tolerates the DiT's errors) on the dataset's pictures and striped ones (the LoRA's look must be
   decodable); its latent scale and shift measured on the dataset, into its config.json.
4. DiT: FLUX.1's DiT at small widths, initialised here, then trained from scratch by FluxCore's own trainer
   (`python -m flux_core.train --trainable_models dit`) on the VAE's latents; the result, in BFL names, is the
   shipped file.
5. LoRA: the striped-circle dataset (shipped: datasets/fluxcore_demo_stripes) and a rank-8 LoRA trained on it by
   `python -m flux_core.train --lora_base_model dit`, saved in kohya format.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lora_tools.io import atomic_write, write_state_dict

from . import FILES, LORA_FILE, MODELS_DIR, STRIPES_DATASET
from .scenes import COLOURS, POSITION_WORDS, SHAPES, SIZE, TEMPLATE, Scene, draw, training_scenes
from .tokenizers import t5_pieces, write_clip_tokenizer, write_t5_tokenizer

# Sizes. The DiT: 2 heads of 64 (RoPE axes 8/28/28 over FLUX's 3 position axes), 3 double + 3 single blocks.
DIT = dict(hidden_size=128, num_heads=2, depth=3, depth_single_blocks=3, axes_dim=(8, 28, 28))
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1)
T5 = dict(d_model=64, d_kv=32, num_heads=2, d_ff=128, num_layers=2)
# The VAE: widths 16/32/32/32. 4 GroupNorm groups, so a group holds 4 or 8 channels: over a flat picture a group
# of 2 normalises to +-1 and cannot carry its colour (8 groups left the colours wrong after 600 steps).
VAE = dict(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4)
VAE_BATCH, VAE_CROP, VAE_LR = 8, 64, 3e-3
STRIPES_IMAGES = 48


def log(message: str) -> None:
    print(f"[flux_core.demo.build {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ dataset

def scene_prompt(scene: Scene, rng: random.Random) -> str:
    """A training prompt: a centred shape is said to be "in the center" half of the time."""
    return scene.prompt(say_center=rng.random() < 0.5)


def write_dataset(folder: Path, scenes: list[Scene], per_scene: int, rng: random.Random, stripes: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        for k in range(per_scene):
            name = f"{i:04d}_{k}.png"
            draw(scene, rng, stripes=stripes).save(folder / name)
            rows.append({"image": name, "prompt": scene_prompt(scene, rng)})
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def corpus() -> str:
    """Every word a training prompt can hold."""
    words = TEMPLATE.format(colour="", shape="", where="", background="")
    return " ".join([words, *SHAPES, *COLOURS, *POSITION_WORDS.values()])


# ---------------------------------------------------------------------------------------- text encoders

def write_text_encoders(folder: Path, t5_length: int, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_dir = write_clip_tokenizer(folder / "tokenizer", corpus())
    pieces = t5_pieces(corpus())
    write_t5_tokenizer(folder / "tokenizer_2", pieces, model_max_length=t5_length)
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, hidden_act="quick_gelu",
                                        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                                        projection_dim=CLIP["hidden_size"], **CLIP))
    t5 = T5EncoderModel(T5Config(vocab_size=-(-len(pieces) // 8) * 8, relative_attention_num_buckets=32,
                                 relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, **T5))
    look_at_neighbours(t5)
    # ComfyUI's single files: clip_l.safetensors keeps transformers' `text_model.` names, t5xxl_fp16 the encoder's.
    clip_sd = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    t5_sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_state_dict(clip_sd, folder / Path(FILES["clip"]).name)
    write_state_dict(t5_sd, folder / Path(FILES["t5"]).name)


def look_at_neighbours(t5) -> None:
    """Set T5's relative position bias (one table, shared by every layer) so head 0 attends to the token before and
    head 1 to the token after. The DiT reads text tokens without positions, as a set: from a randomly initialised
    T5, "a red circle ... on a blue background" and "a blue circle ... on a red background" gave nearly the same set
    (0.2 apart against 4.0 for other colours), and which colour is the background's could not be learned. With
    neighbours mixed in, "background" carries its colour and the shape's word its own."""
    attention = t5.encoder.block[0].layer[0].SelfAttention
    table = attention.relative_attention_bias.weight           # (buckets, heads)

    def bucket(distance: int) -> int:
        return int(attention._relative_position_bucket(torch.tensor(distance), bidirectional=True,
                                                       num_buckets=attention.relative_attention_num_buckets,
                                                       max_distance=attention.relative_attention_max_distance))

    with torch.no_grad():
        table.fill_(-8.0)
        table[bucket(-1), 0] = 8.0
        table[bucket(1), 1] = 8.0


def write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


# ------------------------------------------------------------------------------------------------ VAE

def train_vae(folder: Path, steps: int, seed: int) -> dict:
    from ..models.vae import AutoEncoderParams, FluxVAE
    from ..image import pil_to_tensor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = AutoEncoderParams(**VAE, scale_factor=1.0, shift_factor=0.0)
    vae = FluxVAE(params)
    scenes = training_scenes()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def batch(n: int, crop: int = SIZE) -> torch.Tensor:
        """n pictures (30 % striped), each a random crop x crop window: a convolutional autoencoder learns the
        same from windows, at a quarter of the cost for 64 of 128 pixels."""
        out = []
        for _ in range(n):
            x, y = rng.randrange(0, SIZE - crop + 1, 8), rng.randrange(0, SIZE - crop + 1, 8)
            image = draw(rng.choice(scenes), rng, stripes=rng.random() < 0.3).crop((x, y, x + crop, y + crop))
            out.append(pil_to_tensor(image))
        return torch.cat(out)

    vae.train()
    for step in range(steps):
        x = batch(VAE_BATCH, crop=VAE_CROP)
        z = vae.encode_raw(x)
        noisy = z + 0.1 * z.detach().std() * torch.randn_like(z)
        y = vae.decode_raw(noisy)
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 1e-4 * z.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"VAE step {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = torch.cat([vae.encode_raw(batch(16)) for _ in range(8)])
        x = batch(16)
        error = (vae.decode_raw(vae.encode_raw(x)) - x).abs().mean().item()
    shift, scale = sample.mean().item(), 1.0 / sample.std().item()
    sd = vae.state_dict()
    # The encoder's second half (the log-variance) is not trained here and FluxCore never reads it: zero it.
    for name in ("encoder.conv_out.weight", "encoder.conv_out.bias"):
        sd[name][sd[name].shape[0] // 2:] = 0
    write_vae(folder, sd, scale, shift)
    return {"reconstruction_l1": round(error, 5), "scaling_factor": scale, "shift_factor": shift}


def write_vae(folder: Path, state_dict: dict[str, torch.Tensor], scale: float, shift: float) -> None:
    """The VAE file and the config.json its shapes cannot tell (GroupNorm groups, latent scale and shift)."""
    write_state_dict(state_dict, folder / Path(FILES["vae"]).name)
    write_json({"_class_name": "AutoencoderKL", "latent_channels": 16, "norm_num_groups": VAE["norm_groups"],
                "scaling_factor": round(scale, 6), "shift_factor": round(shift, 6)}, folder / "config.json")


# ------------------------------------------------------------------------------------------------ DiT

def init_dit(folder: Path, clip_width: int, t5_width: int, seed: int) -> Path:
    from ..models.dit import FluxDiT, FluxParams

    torch.manual_seed(seed)
    dit = FluxDiT(FluxParams(in_channels=64, out_channels=64, vec_in_dim=clip_width, context_in_dim=t5_width,
                             guidance_embed=False, **DIT))
    with torch.no_grad():  # the velocity starts at zero (DiT's adaLN-zero practice): a calm start from scratch
        dit.final_layer.linear.weight.zero_()
        dit.final_layer.linear.bias.zero_()
    path = folder / Path(FILES["dit"]).name
    write_state_dict(dit.state_dict(), path)
    write_json({"_class_name": "FluxTransformer2DModel", "attention_head_dim": DIT["hidden_size"] // DIT["num_heads"],
                "num_attention_heads": DIT["num_heads"], "num_layers": DIT["depth"],
                "num_single_layers": DIT["depth_single_blocks"], "axes_dims_rope": list(DIT["axes_dim"]),
                "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": t5_width,
                "pooled_projection_dim": clip_width}, folder / "config.json")
    return path


def run_trainer(args: list[str]) -> None:
    command = [sys.executable, "-m", "flux_core.train", *args, "--progress_bar", "off"]
    log("running " + " ".join(command))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(command, check=True, env=env)


def newest_checkpoint(run: Path) -> Path:
    files = sorted(run.glob("step-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise FileNotFoundError(f"the training run in {run} saved no step-N.safetensors")
    return files[-1]


def trainer_args(models: Path, dataset: Path, run: Path, steps: int, save_steps: int, seed: int,
                 t5_length: int) -> list[str]:
    """What the DiT's and the LoRA's training runs share: the demo's files and tokenizers, its size, float32,
    learning rate 1e-3, and the dataset repeated so `steps` optimizer steps fit in one epoch."""
    text = models / "text_encoders"
    return ["--dataset_base_path", str(dataset),
            "--model_paths", json.dumps([str(models / FILES[slot]) for slot in ("dit", "vae", "clip", "t5")]),
            "--tokenizer_1_path", str(text / "tokenizer"), "--tokenizer_2_path", str(text / "tokenizer_2"),
            "--height", str(SIZE), "--width", str(SIZE), "--torch_dtype", "float32", "--learning_rate", "1e-3",
            "--dataset_repeat", "1000", "--max_steps", str(steps), "--save_steps", str(save_steps),
            "--t5_sequence_length", str(t5_length), "--seed", str(seed), "--output_path", str(run)]


def train_dit(models: Path, dataset: Path, work: Path, steps: int, seed: int, t5_length: int, save_steps: int,
              resume: bool = False) -> None:
    run = work / "dit_run"
    run_trainer([*trainer_args(models, dataset, run, steps, save_steps, seed, t5_length),
                 "--trainable_models", "dit", "--weight_decay", "0", "--gradient_accumulation_steps", "4",
                 "--resume" if resume else "--overwrite"])
    trained = load_file(str(newest_checkpoint(run)))
    write_state_dict(trained, models / FILES["dit"])


def train_lora(models: Path, dataset: Path, work: Path, steps: int, seed: int, t5_length: int) -> None:
    run = work / "lora_run"
    run_trainer([*trainer_args(models, dataset, run, steps, steps, seed, t5_length),
                 "--lora_base_model", "dit", "--lora_rank", "8", "--overwrite"])
    target = models / LORA_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(newest_checkpoint(run), target)


# ------------------------------------------------------------------------------------------------ main

# The arguments each stage reads (recorded with its time in build_log.json).
STAGE_ARGUMENTS = {"dataset": ("seed", "images_per_scene"), "text": ("seed", "t5_length"),
                   "vae": ("seed", "vae_steps"), "dit": ("seed", "dit_steps", "t5_length", "resume"),
                   "lora": ("seed", "lora_steps", "t5_length")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flux_core.demo.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(MODELS_DIR.parent), help="folder receiving models/ and datasets/ "
                   "(default: the package's flux_core/demo)")
    p.add_argument("--work", default=None, help="scratch folder for the dataset and training runs (default: <out>/work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_scene", type=int, default=4)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--dit_steps", type=int, default=6000, help="optimizer steps of the DiT (4 images each)")
    p.add_argument("--dit_save_steps", type=int, default=None,
                   help="also keep the DiT every N steps in <work>/dit_run (default: only the last)")
    p.add_argument("--resume", action="store_true",
                   help="continue the DiT's training in <work>/dit_run from its newest checkpoint up to --dit_steps "
                        "(the trainer's resume: the same result as one uninterrupted run); the DiT file it started "
                        "from must still be in <out>/models")
    p.add_argument("--lora_steps", type=int, default=1000)
    p.add_argument("--t5_length", type=int, default=32, help="T5 tokens per prompt (the tokenizer's model_max_length)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every stage (default: torch's, one per core); 1 when other work shares the cores")
    p.add_argument("--stages", default="dataset,text,vae,dit,lora", help="comma list of the stages to run")
    args = p.parse_args(argv)
    out = Path(args.out)
    models, work = out / "models", Path(args.work) if args.work else out / "work"
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # the trainer's processes
    log_path = out / "build_log.json"
    # A partial rebuild (--stages) updates its stages' entries and keeps the others', so each stage records the
    # arguments it ran with beside its time.
    record = json.loads(log_path.read_text()) if log_path.is_file() else {}
    record.setdefault("seconds", {})
    record.setdefault("stages", {})

    def stage(name: str, fn) -> None:
        if name not in stages:
            return
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if name == "dit" and args.resume:   # the interrupted run's time counts too
            elapsed += record["seconds"].get(name, 0.0)
        record["seconds"][name] = round(elapsed, 1)
        record["stages"][name] = {"arguments": {key: getattr(args, key) for key in STAGE_ARGUMENTS[name]},
                                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        if isinstance(result, dict):
            record[name] = result
        log(f"{name}: {record['seconds'][name]} s")
        write_json(record, log_path)

    stage("dataset", lambda: {"images": write_dataset(work / "dataset", training_scenes(), args.images_per_scene,
                                                      random.Random(args.seed))})
    stage("text", lambda: write_text_encoders(models / "text_encoders", args.t5_length, args.seed))
    stage("vae", lambda: train_vae(models / "vae", args.vae_steps, args.seed))

    def dit_stage():
        if not args.resume:
            init_dit(models / "diffusion_models", CLIP["hidden_size"], T5["d_model"], args.seed)
        train_dit(models, work / "dataset", work, args.dit_steps, args.seed, args.t5_length,
                  args.dit_save_steps or args.dit_steps, args.resume)

    stage("dit", dit_stage)

    def lora_stage():
        circles = [s for s in training_scenes() if s.shape == "circle"]
        chosen = random.Random(args.seed + 1).sample(circles, STRIPES_IMAGES)
        dataset = out / "datasets" / STRIPES_DATASET
        if dataset.exists():
            shutil.rmtree(dataset)
        write_dataset(dataset, chosen, 1, random.Random(args.seed + 2), stripes=True)
        train_lora(models, dataset, work, args.lora_steps, args.seed, args.t5_length)

    stage("lora", lora_stage)
    record["seconds"]["total"] = round(sum(v for k, v in record["seconds"].items() if k != "total"), 1)
    write_json(record, log_path)
    log(f"done in {record['seconds']['total']} s; log: {log_path}")


if __name__ == "__main__":
    main()
