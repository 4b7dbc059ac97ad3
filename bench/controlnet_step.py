"""Step-time overhead of one and of two ControlNets: FluxCore against diffusers, same weights.

    python bench/controlnet_step.py [--device cuda] [--dtype float32|bfloat16] [--runs 10] [--threads 1]
                                    [--heads 1] [--blocks 19 38] [--union-blocks 5 10] [--upscaler-blocks 5 0]
                                    [--tokens 256 64]

One denoising step (one DiT call with its ControlNets, no CFG) in three configurations, by each implementation:
  dit          the DiT alone;
  +1 cn        the DiT and a union ControlNet (InstantX Union-alpha's shape: 5 double + 10 single blocks, 10 modes;
               mode "depth");
  +2 cn        the DiT, the union ControlNet and a second one shaped like jasperai's Upscaler (5 double, 0 single).
All models are FLUX-shaped but narrow by default (1 head x 128 = 128 wide, RoPE axes (16, 56, 56), T5 width 4096,
CLIP width 768) at FLUX.1-dev's real depths (19 double + 38 single), so the ratio of ControlNet work to DiT work is
about the real models' one at these token counts (by weight-matrix work: +26% for the union net, +39% for both);
256 image tokens (a 256x256 image) + 64 text tokens. About a minute on 2 CPU cores. On a GPU,
`--device cuda --dtype bfloat16 --heads 24 --tokens 4096 512` gives the real width and a 1024x1024 image.

diffusers: FluxTransformer2DModel, FluxControlNetModel (one) and FluxMultiControlNetModel (two), called per step as
FluxControlNetPipeline calls them (latents and control latents packed once, outside the loop). FluxCore: the
pipeline's own step, `flux_core.sampling.guided_velocity` with one `flux_core.controlnet.ControlNetAdapter` per
ControlNet (inputs prepared, the control latent packed and each net's residuals spread over the DiT's blocks on every
call). The weights are built by diffusers (random; the ControlNets' zero-initialised heads randomised so their
residuals matter), saved as diffusers folders and loaded into FluxCore through `flux_core.loading.loader.load_model`.
Before anything is timed the outputs are checked to match (relative L2 < 1e-4 in float32, 3e-2 in bfloat16) and
each ControlNet is checked to change them. With the union net first, diffusers' raw-list sum of the two nets and
FluxCore's (DiffSynth's) spread-then-sum agree: both nets have 5 double blocks, and only the union net has single
blocks.

Time: --runs rounds after one warm-up round; each round runs the six (implementation, configuration) steps one after
the other, so load from other processes hits all of them alike; on a CPU one torch thread by default (--threads).
Printed: the median wall seconds per step, the overhead ratios (step with ControlNets / DiT-alone step) of each
implementation, and the ratio ours / diffusers per configuration; each ratio is the median of the per-round ratios,
on a CPU of wall time and of process CPU time (which other processes on a shared machine disturb far less).
"""
from __future__ import annotations

import argparse
import math
import shutil
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

WORK = ROOT / "bench" / "_work" / "controlnet_step"
IMPLS = ("ours", "diffusers")
CONFIGS = ("dit", "+1 cn", "+2 cn")
UNION_MODE = 2            # "depth" (InstantX Union-alpha: canny 0, tile 1, depth 2, ...)
SCALES = (0.7, 0.5)       # union, upscaler
# As in bench/dit_step.py: sigma 0.5 and guidance 4.0 are exact in bf16 after diffusers' `* 1000` in the model dtype.
SIGMA, GUIDANCE = 0.5, 4.0
LIMITS = {"float32": 1e-4, "bfloat16": 3e-2}   # relative L2, ours vs diffusers, before timing


@dataclass(frozen=True)
class Size:
    heads: int = 1                  # x 128 head dim = width
    double: int = 19
    single: int = 38
    union: tuple[int, int] = (5, 10)
    upscaler: tuple[int, int] = (5, 0)
    img_tokens: int = 256           # a square number: 256 = a 256x256 image (16x16 patches)
    txt_tokens: int = 64

    @property
    def side(self) -> int:
        return math.isqrt(self.img_tokens)

    def common(self) -> dict:
        return dict(in_channels=64, attention_head_dim=128, num_attention_heads=self.heads, joint_attention_dim=4096,
                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


# ----------------------------------------------------------------------------------------------- setup
def make_checkpoints(folder: Path, size: Size) -> dict[str, int]:
    """Random diffusers DiT and ControlNets saved as diffusers folders; returns their parameter counts."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(0)
    models = {
        "transformer": FluxTransformer2DModel(num_layers=size.double, num_single_layers=size.single, **size.common()),
        "union": FluxControlNetModel(num_layers=size.union[0], num_single_layers=size.union[1], num_mode=10,
                                     **size.common()),
        "upscaler": FluxControlNetModel(num_layers=size.upscaler[0], num_single_layers=size.upscaler[1],
                                        **size.common()),
    }
    for name in ("union", "upscaler"):  # zero-initialised heads would make every residual zero
        with torch.no_grad():
            for key, p in models[name].named_parameters():
                if key.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                    p.normal_(0.0, 0.02)
    for name, model in models.items():
        model.save_pretrained(folder / name, safe_serialization=True)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def load(impl: str, folder: Path, dtype: torch.dtype, device: str) -> dict:
    names = ("transformer", "union", "upscaler")
    if impl == "ours":
        from flux_core.loading.loader import load_model
        kinds = {"transformer": "dit", "union": "controlnet", "upscaler": "controlnet"}
        return {n: load_model(folder / n, torch_dtype=dtype, device=device, kind=kinds[n]) for n in names}
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    classes = {"transformer": FluxTransformer2DModel, "union": FluxControlNetModel, "upscaler": FluxControlNetModel}
    return {n: classes[n].from_pretrained(folder / n, torch_dtype=dtype).to(device).eval().requires_grad_(False)
            for n in names}


def make_inputs(size: Size, dtype: torch.dtype, device: str) -> dict:
    """The step's inputs for both implementations: unpacked latents (FluxCore's loop keeps them so) and packed ones
    (diffusers' pipeline keeps them so), the two control latents likewise, text embeddings, ids."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(1)
    h = w = 2 * size.side  # latent pixels: 2x2 per token
    latent, union_control, upscaler_control = (torch.randn(1, 16, h, w, generator=g) for _ in range(3))
    pack = lambda z: FluxPipeline._pack_latents(z, 1, 16, h, w).to(device, dtype)  # noqa: E731  (diffusers' own)
    ids = FluxPipeline._prepare_latent_image_ids(1, size.side, size.side, device, dtype)
    return dict(latent=latent.to(device), controls=(union_control.to(device), upscaler_control.to(device)),
                img=pack(latent), packed_controls=(pack(union_control), pack(upscaler_control)),
                txt=torch.randn(1, size.txt_tokens, 4096, generator=g).to(device, dtype),
                y=torch.randn(1, 768, generator=g).to(device, dtype), img_ids=ids,
                txt_ids=torch.zeros(size.txt_tokens, 3, device=device, dtype=dtype),
                sigma=torch.full((1,), SIGMA, device=device, dtype=dtype),
                guidance=torch.full((1,), GUIDANCE, device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------------- steps
def ours_step(models: dict, x: dict, nets: int):
    """FluxCore's step: the pipeline's guided_velocity with one ControlNetAdapter per ControlNet (no CFG)."""
    from flux_core.adapters import DiTCall
    from flux_core.controlnet import ControlNetAdapter
    from flux_core.sampling import PromptEmbeds, guided_velocity

    dit = models["transformer"]
    depth = (dit.params.depth, dit.params.depth_single_blocks)
    adapters = [ControlNetAdapter(name=f"controlnet_inputs[{i}]", model=models[name], control=x["controls"][i],
                                  dit_depth=depth, scale=SCALES[i], mode=UNION_MODE if name == "union" else None)
                for i, name in enumerate(("union", "upscaler")[:nets])]
    prompt = PromptEmbeds(x["txt"], x["y"])
    call = DiTCall(step=0, num_steps=1, sigma=SIGMA)

    def step() -> torch.Tensor:
        return guided_velocity(dit, x["latent"], call, prompt, None, 1.0, GUIDANCE, adapters=adapters)
    return step


def diffusers_step(models: dict, x: dict, nets: int):
    """diffusers' step as FluxControlNetPipeline runs it: the ControlNet (or FluxMultiControlNetModel for two) on the
    packed latents, then the transformer with the residual lists; the velocity unpacked for the comparison only."""
    from diffusers import FluxMultiControlNetModel

    dit = models["transformer"]
    common = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                  timestep=x["sigma"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                  return_dict=False)
    mode = torch.full((1, 1), UNION_MODE, dtype=torch.long, device=x["img"].device)
    multi = FluxMultiControlNetModel([models["union"], models["upscaler"]]) if nets == 2 else None

    def step() -> torch.Tensor:
        if nets == 0:
            residuals = {}
        else:
            if nets == 1:
                double, single = models["union"](controlnet_cond=x["packed_controls"][0], controlnet_mode=mode,
                                                 conditioning_scale=SCALES[0], **common)
            else:  # the pipeline's multi-ControlNet modes: (B,) each, -1 for a net without modes
                double, single = multi(controlnet_cond=list(x["packed_controls"]),
                                       controlnet_mode=[mode[:, 0], torch.full_like(mode[:, 0], -1)],
                                       conditioning_scale=list(SCALES), **common)
            residuals = dict(controlnet_block_samples=double, controlnet_single_block_samples=single)
        return dit(**common, **residuals)[0]
    return step


def unpack(out: torch.Tensor, size: Size) -> torch.Tensor:
    from diffusers import FluxPipeline
    return FluxPipeline._unpack_latents(out, 16 * size.side, 16 * size.side, 8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def check_outputs(steps: dict, size: Size, dtype_name: str) -> dict[str, float]:
    """Relative L2 ours vs diffusers per configuration; refuses to time a mismatch or a ControlNet that does
    nothing."""
    with torch.no_grad():
        out = {(impl, c): steps[impl, c]().float().cpu() for impl in IMPLS for c in CONFIGS}
    for c in CONFIGS:
        out["diffusers", c] = unpack(out["diffusers", c], size)
    errors = {c: rel_err(out["ours", c], out["diffusers", c]) for c in CONFIGS}
    bad = {c: e for c, e in errors.items() if not e < LIMITS[dtype_name]}
    if bad:
        raise SystemExit(f"{dtype_name}: outputs differ (relative L2 {bad} >= {LIMITS[dtype_name]:.0e}); not timing.")
    for a, b in zip(CONFIGS, CONFIGS[1:]):
        moved = rel_err(out["diffusers", b], out["diffusers", a])
        if not moved > 2 * LIMITS[dtype_name]:  # else ours could drop that ControlNet and still pass the check
            raise SystemExit(f"{b} changes the output by only {moved:.1e} (relative L2) from {a}: the ControlNet does "
                             f"nothing measurable, so its parity is not checked; not timing.")
    return errors


def time_steps(steps: dict, runs: int, device: str) -> dict:
    """Per (impl, config): wall and process-CPU seconds of each round (after a warm-up round)."""
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    with torch.no_grad():
        for step in steps.values():  # warm-up
            step()
        sync(device)
        for _ in range(runs):
            for key, step in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                sync(device)
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def summarise(times: dict) -> dict:
    """Medians: seconds per step; overhead ratios config / dit per implementation, and ours / diffusers per config,
    each the median of the per-round ratios, of wall time and of process CPU time."""
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(a, b))  # noqa: E731
    out = dict(seconds={k: statistics.median(v) for k, v in times["wall"].items()})
    for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
        t = times[clock]
        out[prefix + "overhead"] = {(impl, c): ratio(t[impl, c], t[impl, "dit"]) for impl in IMPLS for c in CONFIGS[1:]}
        out[prefix + "ours_vs_diffusers"] = {c: ratio(t["ours", c], t["diffusers", c]) for c in CONFIGS}
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(LIMITS))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on a CPU device: with several threads, a thread descheduled by "
                         "another process stalls the others, and a shared machine's timings swing by 10x; "
                         "torch's own choice on a GPU)")
    ap.add_argument("--heads", type=int, default=Size.heads, help="width = heads x 128")
    ap.add_argument("--blocks", type=int, nargs=2, default=(Size.double, Size.single), metavar=("DOUBLE", "SINGLE"),
                    help="the DiT's depth (FLUX.1: 19 38)")
    ap.add_argument("--union-blocks", type=int, nargs=2, default=Size.union, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--upscaler-blocks", type=int, nargs=2, default=Size.upscaler, metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--tokens", type=int, nargs=2, default=(Size.img_tokens, Size.txt_tokens),
                    metavar=("IMAGE", "TEXT"))
    ap.add_argument("--work", type=Path, default=WORK, help="folder for the checkpoints (deleted afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    args = ap.parse_args(argv)
    problems = []
    if math.isqrt(args.tokens[0]) ** 2 != args.tokens[0]:
        problems.append(f"--tokens: the image token count {args.tokens[0]} must be a square number (e.g. 256, 1024)")
    if args.upscaler_blocks[1] or args.union_blocks[0] != args.upscaler_blocks[0]:
        problems.append(f"--upscaler-blocks {args.upscaler_blocks[0]} {args.upscaler_blocks[1]}: give the union net's "
                        f"double-block count ({args.union_blocks[0]}) and 0 single blocks, as jasperai's Upscaler has "
                        f"(diffusers sums the two nets' raw residual lists, FluxCore and DiffSynth sum them after "
                        f"spreading: the two agree, and the outputs can be checked, only for such a pair)")
    if args.runs < 1:
        problems.append("--runs must be at least 1")
    if problems:
        ap.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns {"params", "errors", "seconds", "overhead", "ours_vs_diffusers", ...} (the printed
    numbers) for callers such as the smoke test."""
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    size = Size(args.heads, *args.blocks, tuple(args.union_blocks), tuple(args.upscaler_blocks), *args.tokens)
    dev, dtype = args.device, DTYPES[args.dtype]
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        params = make_checkpoints(args.work, size)
        print(f"DiT {params['transformer'] / 1e6:.0f}M params ({size.double} double + {size.single} single blocks), "
              f"union ControlNet {params['union'] / 1e6:.0f}M ({size.union[0]} + {size.union[1]}), upscaler-shaped "
              f"{params['upscaler'] / 1e6:.0f}M ({size.upscaler[0]} + {size.upscaler[1]}); hidden {size.heads * 128} "
              f"({size.heads} x 128); {size.img_tokens} image + {size.txt_tokens} text tokens; {args.dtype} on {dev}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        x = make_inputs(size, dtype, dev)
        steps = {}
        for impl in IMPLS:
            models = load(impl, args.work, dtype, dev)
            make = ours_step if impl == "ours" else diffusers_step
            steps.update({(impl, c): make(models, x, n) for n, c in enumerate(CONFIGS)})
        errors = check_outputs(steps, size, args.dtype)
        print("outputs match: " + ", ".join(f"{c} {e:.1e}" for c, e in errors.items())
              + " (ours vs diffusers, rel. L2)")
        result = summarise(time_steps(steps, args.runs, dev))
        print_table(result, args.runs, dev)
        return dict(params=params, errors=errors, **result)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


def print_table(r: dict, runs: int, dev: str) -> None:
    """One row per configuration; on CPU each ratio cell is "wall / cpu"."""
    clocks = ("",) if dev.startswith("cuda") else ("", "cpu_")

    def cell(key: str, index, unit: str = "") -> str:
        return " / ".join(f"{r[clock + key][index]:.2f}{unit}" for clock in clocks)

    width = 18
    print(f"\ntime: median wall seconds per step over {runs} rounds after a warm-up; ratios: medians of per-round "
          f"ratios" + (", wall time / process CPU time" if len(clocks) == 2 else ""))
    head = (f"{'config':7} {'ours s':>8} {'diffusers s':>11} | {'ours overhead':>{width}} | "
            f"{'diffusers overhead':>{width}} | {'ours/diffusers':>{width}}")
    print(head)
    print("-" * len(head))
    for c in CONFIGS:
        s = r["seconds"]
        over = [" / ".join(["1.00x"] * len(clocks)) if c == "dit" else cell("overhead", (impl, c), "x")
                for impl in IMPLS]
        print(f"{c:7} {s['ours', c]:8.3f} {s['diffusers', c]:11.3f} | {over[0]:>{width}} | {over[1]:>{width}} | "
              f"{cell('ours_vs_diffusers', c):>{width}}")
    print("overhead = step with ControlNets / DiT-alone step of the same implementation; ours/diffusers target <= 1.00")


if __name__ == "__main__":
    main()
