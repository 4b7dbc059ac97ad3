"""One LoRA training step: FluxCore's trainer path against diffusers + peft, same base weights, same step; with
--cache, FluxCore's whole trainer step with the VAE and text encoding (--task sft) against the step from cached
encodings (--task sft:train).

    python bench/train_step.py [--device cuda] [--runs 3] [--dtype float32|bfloat16] [--gradient-checkpointing]
                               [--img-side 16] [--txt-tokens 128] [--blocks 4 8] [--cache]

A mid-size random FLUX DiT (768 wide = 6 heads x 128, RoPE axes (16, 56, 56), 4 double + 8 single blocks,
T5 width 4096, CLIP width 768, guidance embedder) is built with diffusers and saved as a diffusers
`transformer/` folder. Ours is loaded from it with `load_model` and gets its LoRA exactly as `flux_core.train`
adds it (`resolve_targets` + `add_lora`: rank 32, alpha 32, the 13 FLUX target layers of DiffSynth's scripts,
LoRA weights in float32). diffusers' FluxTransformer2DModel gets a peft LoRA (`add_adapter`, rank 32, alpha 32,
default init) on the same layers under diffusers' names (q, k and v are separate Linears there, so its LoRA
has 3 A matrices where ours has one on the fused qkv; the layers and the rank are the same), also in float32.

One step = forward at sigma 0.6 on fixed inputs (default 256 image + 128 text tokens; on a GPU use e.g.
--img-side 64 --txt-tokens 512, a 1024x1024 image with 512 T5 tokens), MSE against a fixed
target, backward, AdamW step on the LoRA weights, zero_grad. Before timing, the first step's losses are
checked to agree (B starts at zero, so both LoRAs start as no-ops on the same base: the same function).

Time: median over --runs steps after one warm-up step each, the two models stepping alternately in this
process, so drift in machine speed hits both alike; the ratio of process CPU time is printed too (it is
what a busy shared machine distorts least).
Peak RSS: each model in a fresh subprocess (glibc MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back
to the system); "peak" is the kernel's VmHWM over the whole worker (model load + LoRA + steps), "step" is
the high-water mark of one training step beyond the RSS before it (`/proc/self/clear_refs` 5 resets VmHWM).

--cache: a diffusers FLUX folder with the same DiT, a VAE, CLIP-L and T5 at reduced sizes in about FLUX.1's
proportions (T5 67M, 0.4x the default DiT's 163M parameters as FLUX.1's T5-XXL is of its DiT; CLIP and the VAE are
small there too)
and a one-image dataset (an --img-side x 16 pixel square, its caption encoded to --txt-tokens T5 tokens). The trainer
itself runs (`python -m flux_core.train`'s Trainer, LoRA rank 32, each mode in a fresh subprocess): uncached = --task
sft, which loads every model and encodes the image and caption at each step; cached = --task sft:train from the cache
that --task data_process wrote first (its time and peak are printed too: a one-off cost), which loads the DiT alone.
Step time: median of the logged optimizer steps after the first (data loading, encoding, forward, backward, AdamW).
Peak: the worker's VmHWM (CPU; model loading included) or torch.cuda.max_memory_allocated (CUDA).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _measure import dit_forward, status_kb, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flux_core.dtypes import DTYPES  # noqa: E402

WORK = ROOT / "bench" / "_work" / "train_step"
CONFIG = dict(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=6,
              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
IMG_SIDE, TXT_TOKENS = 16, 128     # a 256x256 image: 32x32 latent -> 16x16 = 256 tokens
SIGMA, GUIDANCE, RANK, LR = 0.6, 1.0, 32, 1e-4
BENCH_DTYPES = ("float32", "bfloat16")  # DTYPES names the benches compare
# Our 13 FLUX targets under diffusers' module names (double blocks, then single blocks).
DIFFUSERS_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "norm1.linear", "norm1_context.linear")
DIFFUSERS_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")


def make_checkpoint(folder: Path) -> int:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-inits gates and output layers: make every path matter
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def build(impl: str, folder: Path, dtype: torch.dtype, device: str, checkpointing: bool):
    """(model, LoRA parameters) ready to train."""
    torch.manual_seed(1)
    if impl == "ours":
        from flux_core.loading.loader import load_model
        from flux_core.train.args import FLUX_LORA_TARGETS
        from flux_core.train.trainable import add_lora, resolve_targets
        model = load_model(folder, torch_dtype=dtype, device=device, kind="dit")
        add_lora(model, resolve_targets(FLUX_LORA_TARGETS, model), RANK)
        model.gradient_checkpointing = checkpointing
    else:
        from diffusers import FluxTransformer2DModel
        from peft import LoraConfig
        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        model.requires_grad_(False)
        names = [n for n, _ in model.named_modules()
                 if any(n.startswith("transformer_blocks.") and n.endswith("." + s) for s in DIFFUSERS_DOUBLE)
                 or any(n.startswith("single_transformer_blocks.") and n.endswith("." + s) for s in DIFFUSERS_SINGLE)]
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=names, init_lora_weights=True))
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        if checkpointing:
            model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def make_inputs(dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    side = IMG_SIDE
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    n = side * side
    return dict(img=t(1, n, CONFIG["in_channels"]), txt=t(1, TXT_TOKENS, CONFIG["joint_attention_dim"]),
                y=t(1, CONFIG["pooled_projection_dim"]), img_ids=ids.reshape(-1, 3).to(device),
                txt_ids=torch.zeros(TXT_TOKENS, 3, device=device), target=t(1, n, CONFIG["in_channels"]).float(),
                sigma=torch.full((1,), SIGMA, device=device), guidance=torch.full((1,), GUIDANCE, device=device))


def train_step(impl: str, model, optimizer, x: dict) -> float:
    from flux_core.train.loss import training_attention
    with training_attention() if impl == "ours" else contextlib.nullcontext():  # as flux_core.train runs it
        loss = torch.nn.functional.mse_loss(dit_forward(impl, model, x).float(), x["target"])
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()



# ---------------------------------------------------------------------------------------------- memory

def worker(impl: str, folder: Path, dtype: torch.dtype, device: str, checkpointing: bool) -> dict:
    x = make_inputs(dtype, device)
    model, _, optimizer = build(impl, folder, dtype, device, checkpointing)
    train_step(impl, model, optimizer, x)  # warm-up; AdamW state allocated
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(impl, model, optimizer, x)
        sync(device)
        return {"step": torch.cuda.max_memory_allocated() - before, "peak": torch.cuda.max_memory_allocated()}
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kb("VmRSS")
    train_step(impl, model, optimizer, x)
    step = (status_kb("VmHWM") - before) * 1024
    return {"step": step, "peak": None}


def worker_in_subprocess(impl: str, folder: Path, args) -> dict:
    """Run `--_worker impl` (a memory worker, or a trainer mode) in a fresh process; its JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if not args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""   # the trainer takes accelerate's device: the GPU when there is one
    cmd = [sys.executable, __file__, "--_worker", impl, "--_folder", str(folder), "--dtype", args.dtype,
           "--device", args.device, "--threads", str(args.threads), "--img-side", str(args.img_side),
           "--txt-tokens", str(args.txt_tokens), "--runs", str(args.runs), "--blocks", *map(str, args.blocks)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    # VmHWM of the whole worker: `time -v` is not everywhere, so the worker reports it on exit.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker for {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- cached vs uncached
TRAINER_MODES = ("data_process", "uncached", "cached")
CAPTION = "a photo of a red cat sitting on a chair in the sun"   # the tokenizers are learned from it
# Encoders at about FLUX.1's proportions to the DiT (see the module doc); T5's width is the DiT's text width.
T5_CONFIG = dict(d_model=CONFIG["joint_attention_dim"], d_kv=64, num_heads=16, d_ff=4096, num_layers=1,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP_CONFIG = dict(hidden_size=CONFIG["pooled_projection_dim"], intermediate_size=3072, num_hidden_layers=1,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
VAE_CHANNELS = (32, 64, 128, 128)


def make_pipeline_folder(work: Path) -> dict[str, int]:
    """work/flux: a diffusers FLUX folder (the DiT of make_checkpoint, the encoders above, random weights) and
    work/data: one image with its caption. Returns each model's parameter count."""
    import numpy as np
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from flux_core.demo.tokenizers import clip_bpe, t5_pieces, write_clip_tokenizer, write_t5_tokenizer

    make_checkpoint(work / "transformer")
    clip_dir = write_clip_tokenizer(work / "tokenizers" / "tokenizer", CAPTION)
    t5_dir = write_t5_tokenizer(work / "tokenizers" / "tokenizer_2", t5_pieces(CAPTION))
    torch.manual_seed(2)
    clip_vocab = len(clip_bpe(CAPTION)[0])
    components = dict(
        transformer=FluxTransformer2DModel.from_pretrained(work / "transformer"),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=VAE_CHANNELS,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                          use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, bos_token_id=clip_vocab - 2,
                                                  eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
                                                  **CLIP_CONFIG)),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=256, **T5_CONFIG)),
        tokenizer=CLIPTokenizer.from_pretrained(clip_dir), tokenizer_2=T5TokenizerFast.from_pretrained(t5_dir),
        scheduler=FlowMatchEulerDiscreteScheduler())
    FluxPipeline(**components).save_pretrained(work / "flux")
    shutil.rmtree(work / "transformer")
    side = IMG_SIDE * 16
    (work / "data").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "data" / "image.png")
    (work / "data" / "metadata.csv").write_text(f"image,prompt\nimage.png,{CAPTION}\n", encoding="utf-8")
    return {name: sum(p.numel() for p in components[name].parameters())
            for name in ("transformer", "text_encoder_2", "text_encoder", "vae")}


def trainer_argv(mode: str, work: Path, args) -> list[str]:
    """`python -m flux_core.train` arguments of a mode: runs + 1 optimizer steps over the one image, LoRA rank 32."""
    steps = str(args.runs + 1)
    argv = ["--model_paths", json.dumps([str(work / "flux")]), "--torch_dtype", args.dtype,
            "--t5_sequence_length", str(TXT_TOKENS), "--lora_base_model", "dit", "--lora_rank", str(RANK),
            "--learning_rate", str(LR), "--max_steps", steps, "--dataset_repeat", steps, "--progress_bar", "off",
            "--output_path", str(work / mode), "--overwrite"]
    if args.gradient_checkpointing:
        argv.append("--use_gradient_checkpointing")
    data = ["--dataset_base_path", str(work / "data"), "--dataset_metadata_path", str(work / "data" / "metadata.csv")]
    if mode == "data_process":
        return [*data, *argv, "--task", "data_process", "--output_path", str(work / "cache")]
    if mode == "cached":
        return ["--dataset_base_path", str(work / "cache"), *argv, "--task", "sft:train"]
    return [*data, *argv]


class StepClock:
    """Wraps a Trainer's log: the wall and process CPU time at each optimizer step's "step" event, so a step's time is
    the difference between two events (all of the trainer's loop: data, encoding, forward, backward, AdamW)."""

    def __init__(self, log):
        self.log, self.marks = log, []

    def __call__(self, event: str, **fields) -> None:
        if event == "step":
            self.marks.append((time.perf_counter(), time.process_time()))
        self.log(event, **fields)

    def __getattr__(self, name):
        return getattr(self.log, name)

    def steps(self) -> tuple[list[float], list[float]]:
        """(wall, CPU) seconds of every step after the first."""
        pairs = list(zip(self.marks, self.marks[1:]))
        return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]


def trainer_worker(mode: str, work: Path, args) -> dict:
    """One mode of the trainer in this (fresh) process: its step times and the peak memory."""
    import io
    from flux_core.train.args import parse_args
    from flux_core.train.packages import require_training_packages
    from flux_core.train.trainer import Trainer, train
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    wall = cpu = []
    with contextlib.redirect_stdout(io.StringIO()):
        if mode == "data_process":
            train(parse_args(trainer_argv(mode, work, args)))
        else:   # Trainer.run without its signal handlers, the log timed
            require_training_packages()
            trainer = Trainer(parse_args(trainer_argv(mode, work, args)))
            trainer.setup()
            trainer.log = clock = StepClock(trainer.log)
            trainer._run()
            wall, cpu = clock.steps()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else status_kb("VmHWM") * 1024
    return {"seconds": seconds, "wall": wall, "cpu": cpu, "peak": peak}


def compare_cached(args) -> dict:
    work = WORK / "cache"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = make_pipeline_folder(work)
    result = {mode: worker_in_subprocess(mode, work, args) for mode in TRAINER_MODES}
    step = {mode: statistics.median(result[mode]["wall"]) for mode in ("uncached", "cached")}
    cpu = {mode: statistics.median(result[mode]["cpu"]) for mode in ("uncached", "cached")}
    peak = {mode: result[mode]["peak"] for mode in TRAINER_MODES}
    where = "GPU memory" if args.device.startswith("cuda") else "RSS"
    mb = lambda b: b / 2**20  # noqa: E731
    print(f"LoRA training step of the trainer with and without cached encodings: DiT "
          f"{params['transformer'] / 1e6:.0f}M "
          f"({CONFIG['num_layers']} double + {CONFIG['num_single_layers']} single blocks, hidden 768), T5 "
          f"{params['text_encoder_2'] / 1e6:.0f}M, CLIP {params['text_encoder'] / 1e6:.1f}M, VAE "
          f"{params['vae'] / 1e6:.1f}M parameters; a {IMG_SIDE * 16}x{IMG_SIDE * 16} image ({IMG_SIDE * IMG_SIDE} "
          f"image tokens), {TXT_TOKENS} T5 tokens, rank {RANK}, {args.dtype}, device {args.device}, {args.threads} "
          f"thread(s), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, median of "
          f"the {args.runs} steps after the first")
    print(f"data_process (once, 1 row): {result['data_process']['seconds']:.2f} s including model loading, peak "
          f"{where} {mb(peak['data_process']):.0f} MB")
    print(f"{'':10} {'s/step':>8} {'CPU s/step':>11} {'peak ' + where + ' MB':>16}")
    for mode in ("uncached", "cached"):
        print(f"{mode:10} {step[mode]:8.4f} {cpu[mode]:11.4f} {mb(peak[mode]):16.0f}")
    ratio = {"time": step["cached"] / step["uncached"], "cpu": cpu["cached"] / cpu["uncached"],
             "peak": peak["cached"] / peak["uncached"]}
    print(f"ratio cached/uncached: time {ratio['time']:.3f}, CPU time {ratio['cpu']:.3f}, peak {where} "
          f"{ratio['peak']:.3f}")
    return {"params": params, "step": step, "cpu": cpu, "peak": peak, "ratio": ratio,
            "data_process_seconds": result["data_process"]["seconds"]}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    global IMG_SIDE, TXT_TOKENS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(BENCH_DTYPES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both (default 1: on a small shared machine more threads mostly spin)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--img-side", type=int, default=16, help="image tokens per side (16: a 256x256 image)")
    p.add_argument("--txt-tokens", type=int, default=128)
    p.add_argument("--blocks", type=int, nargs=2, default=(CONFIG["num_layers"], CONFIG["num_single_layers"]),
                   metavar=("DOUBLE", "SINGLE"), help="the DiT's double and single blocks (default 4 8)")
    p.add_argument("--cache", action="store_true",
                   help="compare the trainer's step with text + VAE encoding (--task sft) against the step from "
                        "cached encodings (--task sft:train) instead of ours against diffusers")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    IMG_SIDE, TXT_TOKENS = args.img_side, args.txt_tokens
    CONFIG.update(num_layers=args.blocks[0], num_single_layers=args.blocks[1])
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    if args._worker in TRAINER_MODES:
        print(json.dumps(trainer_worker(args._worker, Path(args._folder), args)))
        return {}
    if args._worker:
        result = worker(args._worker, Path(args._folder), dtype, args.device, args.gradient_checkpointing)
        if result["peak"] is None:
            result["peak"] = status_kb("VmHWM") * 1024
        print(json.dumps(result))
        return result
    if args.cache:
        return compare_cached(args)

    folder = WORK / "transformer"
    shutil.rmtree(WORK, ignore_errors=True)
    n_params = make_checkpoint(folder)
    x = make_inputs(dtype, args.device)
    models = {impl: build(impl, folder, dtype, args.device, args.gradient_checkpointing) for impl in ("ours", "diffusers")}
    lora_params = {impl: sum(q.numel() for q in m[1]) for impl, m in models.items()}

    # The same function before any update: base outputs and first losses agree.
    with torch.no_grad():
        outs = {impl: dit_forward(impl, m[0], x).float() for impl, m in models.items()}
    rel = ((outs["ours"] - outs["diffusers"]).norm() / outs["diffusers"].norm()).item()
    if rel > (1e-4 if dtype == torch.float32 else 3e-2):
        raise SystemExit(f"outputs differ before training (relative L2 {rel:.2e}); not timing.")
    first = {impl: train_step(impl, m[0], m[2], x) for impl, m in models.items()}  # also the warm-up

    wall = {impl: [] for impl in models}
    cpu = {impl: [] for impl in models}
    for _ in range(args.runs):
        for impl, (model, _, optimizer) in models.items():
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(impl, model, optimizer, x)
            sync(args.device)
            wall[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
    del models, outs
    memory = {impl: worker_in_subprocess(impl, folder, args) for impl in ("ours", "diffusers")}

    mb = lambda b: b / 2**20  # noqa: E731
    print(f"LoRA training step, mid-size FLUX DiT ({n_params / 1e6:.0f}M parameters, {CONFIG['num_layers']} double + "
          f"{CONFIG['num_single_layers']} single blocks, "
          f"hidden 768), {IMG_SIDE * IMG_SIDE} image + {TXT_TOKENS} text tokens, rank {RANK}, {args.dtype}, "
          f"device {args.device}, {args.threads} thread(s), gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, median of {args.runs} steps")
    print(f"check: base outputs relative L2 {rel:.1e}; first-step loss ours {first['ours']:.6f} "
          f"diffusers {first['diffusers']:.6f}; LoRA parameters ours {lora_params['ours'] / 1e6:.2f}M "
          f"diffusers {lora_params['diffusers'] / 1e6:.2f}M")
    where = "GPU memory" if args.device.startswith("cuda") else "RSS"
    print(f"{'':10} {'s/step':>8} {'CPU s/step':>11} {'peak ' + where + ' MB':>16} {'step ' + where + ' MB':>16}")
    for impl in ("ours", "diffusers"):
        print(f"{impl:10} {statistics.median(wall[impl]):8.4f} {statistics.median(cpu[impl]):11.4f} "
              f"{mb(memory[impl]['peak']):16.0f} {mb(memory[impl]['step']):16.0f}")
    ratio = lambda d: statistics.median(d["ours"]) / statistics.median(d["diffusers"])  # noqa: E731
    print(f"ratio ours/diffusers: time {ratio(wall):.3f}, CPU time {ratio(cpu):.3f}, "
          f"peak {where} {memory['ours']['peak'] / memory['diffusers']['peak']:.3f}, "
          f"step {where} {memory['ours']['step'] / max(memory['diffusers']['step'], 1):.3f} (target <= 1.0)")
    return {"wall": wall, "cpu": cpu, "memory": memory, "rel": rel, "first": first}


if __name__ == "__main__":
    main()
