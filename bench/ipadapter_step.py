"""Step-time overhead of the image-prompt adapters (InstantX and XLabs IP-Adapters, InfiniteYou), and the memory of
their encoders at the published shapes.

    python bench/ipadapter_step.py [--device cuda] [--dtype float32|bfloat16] [--runs 10] [--threads 1]
                                   [--heads 1] [--blocks 19 38] [--infusenet-blocks 4 10] [--tokens 256 64]
                                   [--images 1]

1. Step time. One denoising step (one call of FluxCore's DiT with its adapters, no CFG, through the pipeline's own
   `flux_core.sampling.guided_velocity`) in four configurations, timed in the same process, round after round:
     dit          the DiT alone;
     +instantx    the InstantX IP-Adapter (keys/values in all double + single blocks, 128 tokens per reference image);
     +xlabs       the XLabs IP-Adapter (double blocks only, 4 tokens per image, added after the block);
     +infiniteyou InfuseNet (a ControlNet: 4 double + 10 single blocks) taking the 8 identity tokens as its text.
   As the pipeline does, each adapter's per-run work (image features -> keys/values; face embedding -> identity tokens)
   happens once before the loop and is not in the step. The models are FLUX-shaped, random, narrow by default (1 head x
   128, RoPE axes (16, 56, 56), T5 width 4096) at FLUX.1-dev's real depths; at a narrow width the IP-Adapters'
   attention to their image tokens weighs more against the blocks' matrix products than at FLUX's 3072, so the
   measured IP-Adapter ratios are upper bounds: the FLOP ratios printed beside them, at this size and at FLUX.1's
   (3072 wide, 4096 image + 512 text tokens: a 1024x1024 image), tell how much. On a GPU,
   `--device cuda --dtype bfloat16 --heads 24 --tokens 4096 512` times the real width.
   Before timing, each adapter is checked to change the step's output. Printed: the median seconds per step and the
   overhead ratio (step with the adapter / DiT-alone step: the median of the per-round ratios, on a CPU of wall time
   and of process CPU time, which other processes on a shared machine disturb far less).

2. Encoder memory, always at the published shapes, built on the meta device (no weights are made or read): SigLIP
   so400m-patch14-384 (InstantX's encoder), CLIP ViT-L/14 with projection (XLabs'), the InstantX and XLabs adapters,
   InfiniteYou's projector and InfuseNet; bytes stored in bfloat16 and with FP8 storage (weight matrices in
   float8_e4m3fn, the rest bfloat16: flux_core.vram.storage_dtype), and the keys/values one reference image keeps on the
   device per CFG branch (flux_core.run_cost.ipadapter_kv_bytes).
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _measure import sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flux_core.dtypes import DTYPES  # noqa: E402

CONFIGS = ("dit", "+instantx", "+xlabs", "+infiniteyou")
SIGMA, GUIDANCE = 0.5, 4.0
FACE_TOKENS = 8                 # InfiniteYou's identity tokens
MOVED = 1e-3                    # relative L2 an adapter must move the step's output by before it is timed
# The published shapes (google/siglip-so400m-patch14-384, openai/clip-vit-large-patch14; reference notes §3.3, §3.7).
SIGLIP_SO400M = dict(family="siglip", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, patch_size=14, image_size=384)
CLIP_VIT_L = dict(family="clip", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, patch_size=14, image_size=224, projection_dim=768)


@dataclass(frozen=True)
class Size:
    heads: int = 1                  # x 128 head dim = width
    double: int = 19
    single: int = 38
    infusenet: tuple[int, int] = (4, 10)
    img_tokens: int = 256           # a square number: 256 = a 256x256 image
    txt_tokens: int = 64
    images: int = 1                 # reference images of the IP-Adapters

    @property
    def hidden(self) -> int:
        return self.heads * 128


FLUX_SIZE = Size(heads=24, img_tokens=4096, txt_tokens=512)


# ----------------------------------------------------------------------------------------------- models
def build_models(size: Size, dtype: torch.dtype, device: str | torch.device) -> dict:
    """FluxCore's DiT, the two IP-Adapters, InfiniteYou's projector and InfuseNet at `size` (random weights; on the
    meta device nothing is allocated)."""
    from flux_core.models.controlnet import ControlNetParams, FluxControlNet
    from flux_core.models.dit import FluxDiT, FluxParams
    from flux_core.models.infiniteyou import InfiniteYouProjector
    from flux_core.models.ipadapter import INSTANTX, XLABS, FluxIPAdapter, IPAdapterParams

    torch.manual_seed(0)
    width = dict(hidden_size=size.hidden, num_heads=size.heads)
    with torch.device(device):
        models = dict(
            dit=FluxDiT(FluxParams(depth=size.double, depth_single_blocks=size.single, **width)),
            instantx=FluxIPAdapter(IPAdapterParams(INSTANTX, 1152, 4096, 128, size.hidden, size.double + size.single)),
            xlabs=FluxIPAdapter(IPAdapterParams(XLABS, 768, 4096, 4, size.hidden, size.double)),
            projector=InfiniteYouProjector(),
            infusenet=FluxControlNet(ControlNetParams(depth=size.infusenet[0], depth_single_blocks=size.infusenet[1],
                                                      **width)))
    if device != "meta":
        with torch.no_grad():  # ControlNet heads trained from zero: random ones so InfuseNet's residuals matter
            for name, p in models["infusenet"].named_parameters():
                if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                    p.normal_(0.0, 0.02)
    return {k: m.to(dtype=dtype).eval().requires_grad_(False) for k, m in models.items()}


def make_steps(models: dict, size: Size, dtype: torch.dtype, device: str) -> dict:
    """One step per configuration, each adapter bound as the pipeline binds it (per-run work done here, once)."""
    from flux_core.adapters import DiTCall
    from flux_core.controlnet import ControlNetAdapter
    from flux_core.infiniteyou import identity_tokens
    from flux_core.ipadapter import bind_ipadapter
    from flux_core.sampling import PromptEmbeds, guided_velocity

    g = torch.Generator().manual_seed(1)
    side = math.isqrt(size.img_tokens)
    latent = torch.randn(1, 16, 2 * side, 2 * side, generator=g).to(device)
    prompt = PromptEmbeds(torch.randn(1, size.txt_tokens, 4096, generator=g).to(device, dtype),
                          torch.randn(1, 768, generator=g).to(device, dtype))
    dit = models["dit"]
    depth = (size.double, size.single)
    with torch.no_grad():
        adapters = {
            "dit": [],
            "+instantx": [bind_ipadapter(models["instantx"], torch.randn(size.images, 1152, generator=g), dit.num_heads,
                                         depth, branches=("positive",))],
            "+xlabs": [bind_ipadapter(models["xlabs"], torch.randn(size.images, 768, generator=g), dit.num_heads,
                                      depth, branches=("positive",))],
            "+infiniteyou": [ControlNetAdapter(
                name="controlnet_inputs[0]", model=models["infusenet"], control=torch.zeros_like(latent),
                dit_depth=depth, identity=identity_tokens(models["projector"], torch.randn(512, generator=g)))],
        }
    call = DiTCall(step=0, num_steps=1, sigma=SIGMA)

    def step(config: str):
        return lambda: guided_velocity(dit, latent, call, prompt, None, 1.0, GUIDANCE, adapters=adapters[config])
    return {c: step(c) for c in CONFIGS}


def check_outputs(steps: dict) -> dict[str, float]:
    """How far each adapter moves the step's output (relative L2 from the DiT alone); refuses to time one that does
    not move it."""
    with torch.no_grad():
        out = {c: steps[c]().float().cpu() for c in CONFIGS}
    moved = {c: ((out[c] - out["dit"]).norm() / out["dit"].norm()).item() for c in CONFIGS[1:]}
    still = {c: m for c, m in moved.items() if not m > MOVED}
    if still:
        raise SystemExit(f"{still}: these adapters move the output by less than {MOVED:.0e} (relative L2); not timing.")
    return moved


def time_steps(steps: dict, runs: int, device: str) -> dict:
    wall = {c: [] for c in steps}
    cpu = {c: [] for c in steps}
    with torch.no_grad():
        for step in steps.values():  # warm-up
            step()
        sync(device)
        for _ in range(runs):
            for c, step in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                sync(device)
                wall[c].append(time.perf_counter() - t0)
                cpu[c].append(time.process_time() - c0)
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(a, b))  # noqa: E731
    return dict(seconds={c: statistics.median(v) for c, v in wall.items()},
                overhead={c: ratio(wall[c], wall["dit"]) for c in CONFIGS[1:]},
                cpu_overhead={c: ratio(cpu[c], cpu["dit"]) for c in CONFIGS[1:]})


# ----------------------------------------------------------------------------------------------- FLOPs
def flop_ratios(size: Size) -> dict[str, float]:
    """Per configuration, the step's FLOPs over the DiT's alone (meta-device models; flux_core.run_cost's count for the
    DiT and InfuseNet, plus the IP-Adapters' attention: 4 x query tokens x image tokens x width per block, double
    blocks' queries the image tokens, single blocks' the whole sequence)."""
    from flux_core.run_cost import dit_forward_flops

    m = build_models(size, torch.float32, "meta")
    dit = dit_forward_flops(m["dit"], size.img_tokens, size.txt_tokens)
    seq = size.img_tokens + size.txt_tokens
    ip = lambda tokens, single: 4.0 * tokens * size.images * size.hidden * (  # noqa: E731
        size.double * size.img_tokens + single * seq)
    return {"+instantx": 1 + ip(128, size.single) / dit, "+xlabs": 1 + ip(4, 0) / dit,
            "+infiniteyou": 1 + dit_forward_flops(m["infusenet"], size.img_tokens, FACE_TOKENS) / dit}


# ----------------------------------------------------------------------------------------------- memory
def stored_bytes(model: torch.nn.Module, weight_dtype: torch.dtype | None) -> int:
    """Bytes of a (meta) model stored in bfloat16, weight matrices in `weight_dtype` when given (FP8 storage)."""
    from flux_core.vram import storage_dtype
    return sum(t.numel() * storage_dtype(t, weight_dtype, torch.bfloat16).itemsize
               for t in [*model.parameters(), *model.buffers()])


@functools.lru_cache(maxsize=1)  # the same numbers every time; building the meta models takes seconds
def encoder_memory() -> dict[str, dict]:
    """{name: {params, bf16, fp8, kv}} at the published shapes, from meta-device models."""
    from flux_core.models.image_encoders import VisionParams, build_vision_encoder
    from flux_core.run_cost import ipadapter_kv_bytes

    m = build_models(FLUX_SIZE, torch.float32, "meta")
    with torch.device("meta"):
        encoders = {"SigLIP so400m-patch14-384": build_vision_encoder(VisionParams(**SIGLIP_SO400M)),
                    "CLIP ViT-L/14 (+projection)": build_vision_encoder(VisionParams(**CLIP_VIT_L))}
    models = {**encoders, "InstantX IP-Adapter": m["instantx"], "XLabs IP-Adapter": m["xlabs"],
              "InfiniteYou projector": m["projector"], "InfuseNet (4 + 10 blocks)": m["infusenet"]}
    out = {}
    for name, model in models.items():
        params = getattr(model, "params", None)
        kv = (ipadapter_kv_bytes(params.num_blocks, params.num_tokens, params.hidden_size, 1, 1, torch.bfloat16)
              if name.endswith("IP-Adapter") else None)
        out[name] = dict(params=sum(p.numel() for p in model.parameters()), bf16=stored_bytes(model, None),
                         fp8=stored_bytes(model, torch.float8_e4m3fn), kv=kv)
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on a CPU device, steadier on a shared machine)")
    ap.add_argument("--heads", type=int, default=Size.heads, help="width = heads x 128")
    ap.add_argument("--blocks", type=int, nargs=2, default=(Size.double, Size.single), metavar=("DOUBLE", "SINGLE"),
                    help="the DiT's depth (FLUX.1: 19 38)")
    ap.add_argument("--infusenet-blocks", type=int, nargs=2, default=Size.infusenet, metavar=("DOUBLE", "SINGLE"),
                    help="InfuseNet's depth (published: 4 10)")
    ap.add_argument("--tokens", type=int, nargs=2, default=(Size.img_tokens, Size.txt_tokens),
                    metavar=("IMAGE", "TEXT"))
    ap.add_argument("--images", type=int, default=Size.images, help="reference images of the IP-Adapters")
    args = ap.parse_args(argv)
    problems = []
    if math.isqrt(args.tokens[0]) ** 2 != args.tokens[0]:
        problems.append(f"--tokens: the image token count {args.tokens[0]} must be a square number (e.g. 256, 1024)")
    if args.runs < 1 or args.images < 1:
        problems.append("--runs and --images must be at least 1")
    if problems:
        ap.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns {"moved", "seconds", "overhead", "cpu_overhead", "flops", "flux_flops", "memory"}
    (the printed numbers) for callers such as the smoke test."""
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    size = Size(args.heads, *args.blocks, tuple(args.infusenet_blocks), *args.tokens, args.images)
    dev, dtype = args.device, DTYPES[args.dtype]
    print(f"DiT {size.double} double + {size.single} single blocks, width {size.hidden} ({size.heads} x 128); "
          f"InfuseNet {size.infusenet[0]} + {size.infusenet[1]}; {size.img_tokens} image + {size.txt_tokens} text "
          f"tokens, {size.images} reference image(s); {args.dtype} on {dev}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    steps = make_steps(build_models(size, dtype, dev), size, dtype, dev)
    moved = check_outputs(steps)
    print("each adapter moves the output: " + ", ".join(f"{c} {m:.1e}" for c, m in moved.items()) + " (rel. L2)")
    result = dict(moved=moved, **time_steps(steps, args.runs, dev), flops=flop_ratios(size),
                  flux_flops=flop_ratios(FLUX_SIZE), memory=encoder_memory())
    print_tables(result, args.runs, dev)
    return result


def print_tables(r: dict, runs: int, dev: str) -> None:
    cpu = not dev.startswith("cuda")
    print(f"\nstep time: median wall seconds over {runs} rounds after a warm-up; overhead = step with the adapter / "
          f"DiT-alone step (median of per-round ratios{', wall / process CPU time' if cpu else ''})")
    head = f"{'config':13} {'s/step':>8} | {'overhead':>13} | {'FLOPs, this size':>16} | {'FLOPs, FLUX.1 1024px':>20}"
    print(head)
    print("-" * len(head))
    for c in CONFIGS:
        over = "1.00x" if c == "dit" else f"{r['overhead'][c]:.2f}x" + (f" / {r['cpu_overhead'][c]:.2f}x" if cpu else "")
        flops = "1.000x" if c == "dit" else f"{r['flops'][c]:.3f}x"
        flux = "1.000x" if c == "dit" else f"{r['flux_flops'][c]:.3f}x"
        print(f"{c:13} {r['seconds'][c]:8.4f} | {over:>13} | {flops:>16} | {flux:>20}")
    print("\nencoder and adapter memory at the published shapes (meta device; GiB = 2^30 bytes)")
    head = f"{'model':28} {'params':>8} | {'bf16':>9} | {'FP8 storage':>11} | {'k/v per image+branch':>20}"
    print(head)
    print("-" * len(head))
    for name, m in r["memory"].items():
        kv = f"{m['kv'] / 2 ** 20:.1f} MiB" if m["kv"] is not None else "-"
        print(f"{name:28} {m['params'] / 1e6:7.0f}M | {m['bf16'] / 2 ** 30:5.2f} GiB | {m['fp8'] / 2 ** 30:7.2f} GiB | "
              f"{kv:>20}")


if __name__ == "__main__":
    main()
