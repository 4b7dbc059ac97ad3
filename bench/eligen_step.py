"""EliGen's step time and peak memory against the plain step, at the token counts of a 1024x1024 image.

    python bench/eligen_step.py [--device cuda] [--dtype float32|bfloat16] [--runs 5] [--threads 1]
                                [--heads 1] [--blocks 2 4] [--tokens 4096 512] [--entities 2 4]

One denoising step (FluxCore's DiT through the pipeline's `flux_core.sampling.guided_velocity`, no CFG) with the
prompt alone and with N EliGen entities (each entity prompt as long as the prompt, each mask a vertical stripe of the
image), timed in the same process round after round. EliGen lengthens the text sequence by N prompts and adds an
additive attention mask (1, 1, S, S) in the compute dtype to every block's attention; its mask is made once per run
(before the loop, as the pipeline's adapter caches it) and is not in the step.

Defaults: FLUX.1's token counts at 1024x1024 (4096 image + 512 text tokens), a narrow DiT (1 head x 128) of 2 double
+ 4 single blocks, so a CPU step takes seconds; attention then weighs more against the matrix products than at FLUX's
3072 width, and the FLOP ratios printed beside the measured ones, at this size and at FLUX.1-dev's (24 heads, 19 + 38
blocks), tell how much. On a GPU: `--device cuda --dtype bfloat16 --heads 24 --blocks 19 38`.

Printed per configuration: the median seconds per step, the overhead ratio against the plain step (median of the
per-round ratios; on a CPU also of process CPU time, which other processes disturb far less), the FLOP ratio, the
mask's bytes (flux_core.eligen.eligen_mask_bytes), and the peak memory of a run's first step (the mask is made in it
and kept) above the memory held before it: on CUDA from torch.cuda.max_memory_allocated, on a CPU the growth of the
process's peak resident set (VmHWM) over that step, in a fresh process per configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _measure import status_kb, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flux_core.dtypes import DTYPES  # noqa: E402

SIGMA, GUIDANCE = 0.5, 3.5
MOVED = 1e-3          # relative L2 the entities must move the step's output by before it is timed


def build(args, entities: int):
    """The DiT, the latent, the prompt and (for entities > 0) the EliGen adapter, as the pipeline binds it."""
    from flux_core.eligen import eligen_adapter
    from flux_core.models.dit import FluxDiT, FluxParams
    from flux_core.sampling import PromptEmbeds

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        dit = FluxDiT(FluxParams(depth=args.blocks[0], depth_single_blocks=args.blocks[1],
                                 hidden_size=128 * args.heads, num_heads=args.heads))
    dit = dit.to(dtype).eval().requires_grad_(False)
    side = int(args.tokens[0] ** 0.5)
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, 2 * side, 2 * side, generator=g).to(args.device)
    prompt = PromptEmbeds(torch.randn(1, args.tokens[1], 4096, generator=g).to(args.device, dtype),
                          torch.randn(1, 768, generator=g).to(args.device, dtype))
    adapters = []
    if entities:
        masks = []
        for i in range(entities):  # vertical stripes, one per entity
            m = torch.zeros(16 * side, 16 * side)
            m[:, i * 16 * side // entities:(i + 1) * 16 * side // entities] = 1.0
            masks.append(m)
        embeds = torch.randn(entities, args.tokens[1], 4096, generator=g).to(args.device, dtype)
        adapters = [eligen_adapter(embeds, masks, 16 * side, 16 * side)]
    return dit, latent, prompt, adapters


def step_fn(args, entities: int, warm: bool = True):
    from flux_core.adapters import DiTCall
    from flux_core.sampling import guided_velocity
    dit, latent, prompt, adapters = build(args, entities)
    call = DiTCall(sigma=SIGMA)
    step = lambda: guided_velocity(dit, latent, call, prompt, None, 1.0, GUIDANCE, adapters=adapters)  # noqa: E731
    if warm:
        with torch.no_grad():
            step()  # the mask is made here, once, as in a run
    return step


def peak_bytes(args, entities: int, argv: list[str]) -> int:
    """Memory one step needs above what is held before it (see the module docstring)."""
    if args.device.startswith("cuda"):
        step = step_fn(args, entities, warm=False)
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            step()
        sync(args.device)
        return torch.cuda.max_memory_allocated() - base
    child = [sys.executable, __file__, "--peak-child", str(entities), *argv]
    out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak"])


def child_peak(args, entities: int) -> None:
    step = step_fn(args, entities, warm=False)  # the first step: the mask is made in it, as in a run
    before = status_kb("VmHWM")
    with torch.no_grad():
        step()
    print(json.dumps({"peak": (status_kb("VmHWM") - before) * 1024}))


def flop_ratio(heads: int, blocks: tuple[int, int], image: int, text: int, entities: int) -> float:
    from flux_core.models.dit import FluxDiT, FluxParams
    from flux_core.run_cost import dit_forward_flops
    with torch.device("meta"):
        dit = FluxDiT(FluxParams(depth=blocks[0], depth_single_blocks=blocks[1], hidden_size=128 * heads,
                                 num_heads=heads))
    return dit_forward_flops(dit, image, text * (entities + 1)) / dit_forward_flops(dit, image, text)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--heads", type=int, default=1, help="width = heads x 128")
    ap.add_argument("--blocks", type=int, nargs=2, default=(2, 4), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--tokens", type=int, nargs=2, default=(4096, 512), metavar=("IMAGE", "TEXT"),
                    help="image tokens (a square number) and prompt tokens (each entity prompt has as many)")
    ap.add_argument("--entities", type=int, nargs="+", default=(2, 4))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--peak-child", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns the printed numbers (for the smoke test)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child is not None:
        child_peak(args, args.peak_child)
        return {}
    from flux_core.eligen import eligen_mask_bytes

    configs = [0, *args.entities]
    steps = {n: step_fn(args, n) for n in configs}
    with torch.no_grad():
        out = {n: steps[n]().float().cpu() for n in configs}
    moved = {n: ((out[n] - out[0]).norm() / out[0].norm()).item() for n in configs[1:]}
    if not all(m > MOVED for m in moved.values()):
        raise SystemExit(f"{moved}: the entities do not move the output by {MOVED:.0e}; not timing.")
    wall, cpu = {n: [] for n in configs}, {n: [] for n in configs}
    with torch.no_grad():
        for _ in range(args.runs):
            for n in configs:
                t0, c0 = time.perf_counter(), time.process_time()
                steps[n]()
                sync(args.device)
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
    ratio = lambda a, b: statistics.median(p / q for p, q in zip(a, b))  # noqa: E731
    image, text = args.tokens
    dtype = DTYPES[args.dtype]
    result = dict(
        seconds={n: statistics.median(wall[n]) for n in configs},
        overhead={n: ratio(wall[n], wall[0]) for n in configs[1:]},
        cpu_overhead={n: ratio(cpu[n], cpu[0]) for n in configs[1:]},
        flops={n: flop_ratio(args.heads, tuple(args.blocks), image, text, n) for n in configs[1:]},
        flux_flops={n: flop_ratio(24, (19, 38), 4096, 512, n) for n in configs[1:]},
        mask_bytes={n: eligen_mask_bytes(image + text * (n + 1), dtype) for n in configs[1:]},
        peak={} if args.no_memory else {n: peak_bytes(args, n, argv) for n in configs},
        moved=moved)
    print(f"DiT {args.blocks[0]} double + {args.blocks[1]} single blocks, width {128 * args.heads}; {image} image + "
          f"{text} prompt tokens per prompt; {args.device} {args.dtype}; {args.runs} rounds")
    head = (f"{'config':12} {'s/step':>8} | {'overhead (cpu)':>15} | {'FLOPs here':>10} | {'FLOPs FLUX.1':>12} | "
            f"{'mask MiB':>8} | {'step peak MiB':>13}")
    print(head + "\n" + "-" * len(head))
    for n in configs:
        name = "plain" if n == 0 else f"+{n} entities"
        peak = f"{result['peak'][n] / 2 ** 20:13.1f}" if result["peak"] else f"{'-':>13}"
        if n == 0:
            print(f"{name:12} {result['seconds'][n]:8.4f} | {'1.00':>15} | {'1.00':>10} | {'1.00':>12} | {'0':>8} | "
                  f"{peak}")
            continue
        over = f"{result['overhead'][n]:.2f} ({result['cpu_overhead'][n]:.2f})"
        print(f"{name:12} {result['seconds'][n]:8.4f} | {over:>15} | {result['flops'][n]:10.2f} | "
              f"{result['flux_flops'][n]:12.2f} | {result['mask_bytes'][n] / 2 ** 20:8.1f} | {peak}")
    return result


if __name__ == "__main__":
    main()
