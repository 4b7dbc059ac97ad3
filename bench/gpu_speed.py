"""Seconds per denoising step of the full-size FLUX.1-dev DiT at 1024x1024: eager bf16 against the compiled forward,
FP8 compute, TeaCache and diffusers, on the same random weights. One prepared script for a lent GPU; no downloads.

    python bench/gpu_speed.py [--steps 10] [--budget-minutes 8] [--tea-cache 0.4]   # CUDA: FLUX.1-dev's shape
    python bench/gpu_speed.py --cpu [--threads N]       # no GPU: the same rows on a small model on the CPU

The DiT is FLUX.1-dev's shape (FluxParams(): 19 double + 38 single blocks, width 3072, 11.9 B parameters) with
random weights, built by bench/gpu_memory.py's `build_models` (diffusers' FluxTransformer2DModel materialised on
the device, ours loaded from its state dict through the real diffusers-layout converter). On the CPU (`--cpu`, and
whenever no CUDA device is there) the model is small (width 256, 2 heads of 128, 2 + 2 blocks, 256 image + 64 text
tokens) so the script runs in minutes; its numbers say nothing about a GPU.

Each row runs the same Euler loop over FLUX's schedule (--steps sigmas, shift 3) from the same noise with the same
random text embedding, pooled vector and embedded guidance 3.5: a batch of 1, no CFG. One untimed warm-up loop
first (it holds compilation), then --loops timed loops (1 on a GPU, 3 on the CPU); "s/step" = the fastest timed
loop / steps. "peak GB" is torch.cuda.max_memory_allocated() over the row (weights + activations; CUDA only).
"diff" compares the row's final latent with the eager bf16 row's: mean |a - b| / mean |b| (random weights make no
picture, so the final latent is what is compared). Rows:
- eager bf16: FluxDiT as loaded (the reference row), and again with torch's own attention kernel choice instead of
  flux_core.attention_backend's (every other FluxCore row uses the latter, as the pipeline does);
- eager bf16 + TeaCache: DiTExtras(tea_cache=TeaCache(steps, --tea-cache)); the note says how many steps ran;
- compiled bf16: flux_core.compile.compile_dit (each block compiled, fullgraph);
- FP8 compute eager / compiled / compiled + TeaCache: flux_core.fp8.enable_fp8_compute (weights float8_e4m3fn
  with per-row scales, activations quantized per token, torch._scaled_mm where the GPU has it; the note names
  the path taken). The conversion is lossy and in place, so these rows come after the bf16 ones;
- diffusers bf16: FluxTransformer2DModel on the same weights, eager, with torch's attention choice (as diffusers
  runs), so its difference to the first row also checks FluxCore's kernel choice against torch's default.
"speedup" = eager bf16 s/step / the row's; "vs diffusers" = diffusers' s/step / the row's. The issue's target:
FP8 compute + compile >= 2x over eager bf16.

The printed table is also written to bench/results/<date>-<device>-gpu_speed.txt (atomically). A row that fails
or runs out of memory says so and the table goes on; rows are skipped once --budget-minutes is spent.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_memory import FULL, build_models, diffusers_step  # noqa: E402

from flux_core.attention_backend import attention_backend, describe_attention  # noqa: E402
from flux_core.math import image_ids, text_ids  # noqa: E402
from flux_core.models.dit import DiTExtras, FluxParams  # noqa: E402
from flux_core.scheduler import euler_step, flux_sigmas, next_sigmas  # noqa: E402
from flux_core.teacache import TeaCache  # noqa: E402
from lora_tools.io import atomic_write  # noqa: E402

SMALL = FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=512, vec_in_dim=128)
RESULTS = ROOT / "bench" / "results"


def loop_inputs(params: FluxParams, device: torch.device, image_side: int, text_tokens: int) -> dict:
    """Noise, text, pooled vector and ids of one 1-image run: `image_side` latent patches per side."""
    g = torch.Generator().manual_seed(1)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    return dict(noise=t(1, image_side * image_side, params.in_channels),
                img_ids=image_ids(1, 2 * image_side, 2 * image_side, device=device),
                txt=t(1, text_tokens, params.context_in_dim).to(torch.bfloat16),
                txt_ids=text_ids(1, text_tokens, device=device),
                y=t(1, params.vec_in_dim).to(torch.bfloat16),
                guidance=torch.full((1,), 3.5, device=device))


def euler_loop(forward, x: dict, sigmas: torch.Tensor, pick_attention: bool = True) -> torch.Tensor:
    """The denoising loop on packed tokens, `forward(tokens_bf16, sigma_tensor, step)` giving the velocity; inside
    the attention kernels the pipeline picks for the device (flux_core.attention_backend), or with
    `pick_attention=False` torch's own choice."""
    latents = x["noise"].float()
    with attention_backend(latents.device, torch.bfloat16) if pick_attention else contextlib.nullcontext():
        for i, (sigma, nxt) in enumerate(zip(sigmas.tolist(), next_sigmas(sigmas).tolist())):
            v = forward(latents.to(torch.bfloat16), torch.full((1,), sigma, device=latents.device), i)
            latents = euler_step(latents, v, sigma, nxt)
    return latents


def ours(model, x: dict, tea_cache: float | None, steps: int):
    """A forward for `euler_loop` through FluxDiT; with TeaCache, a fresh cache per loop (made at step 0)."""
    state: dict = {}

    def forward(img, sigma, step):
        if step == 0:
            state["extras"] = None if tea_cache is None else DiTExtras(tea_cache=TeaCache(steps, tea_cache))
        return model(img=img, img_ids=x["img_ids"], txt=x["txt"], txt_ids=x["txt_ids"], timesteps=sigma, y=x["y"],
                     guidance=x["guidance"], extras=state["extras"])
    return forward, state


def theirs(model, x: dict):
    def forward(img, sigma, step):
        return diffusers_step(model, dict(img=img, txt=x["txt"], y=x["y"], timesteps=sigma, img_ids=x["img_ids"],
                                          txt_ids=x["txt_ids"], guidance=x["guidance"]))
    return forward


class Table:
    def __init__(self, device: torch.device, sigmas: torch.Tensor, deadline: float, loops: int):
        self.device, self.sigmas, self.deadline, self.loops = device, sigmas, deadline, loops
        self.rows: list[dict] = []
        self.reference: torch.Tensor | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clean(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    @torch.no_grad()
    def row(self, label: str, forward, x: dict, note=lambda: "", pick_attention: bool = True) -> None:
        """Warm-up loop, timed loop; the final latent is compared with the first row's."""
        if time.monotonic() > self.deadline:
            self.rows.append(dict(label=label, note="skipped: time budget spent"))
            print(f"  {label}: skipped (time budget)", flush=True)
            return
        self.clean()
        try:
            t0 = time.perf_counter()
            euler_loop(forward, x, self.sigmas, pick_attention)
            self.sync()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(self.loops):
                t0 = time.perf_counter()
                out = euler_loop(forward, x, self.sigmas, pick_attention)
                self.sync()
                times.append((time.perf_counter() - t0) / len(self.sigmas))
            per_step = min(times)   # the least disturbed loop (other processes only ever add time)
            peak = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else None
            if self.reference is None:
                self.reference = out
            diff = float((out - self.reference).abs().mean() / self.reference.abs().mean())
            self.rows.append(dict(label=label, s_step=per_step, peak=peak, diff=diff,
                                  note="; ".join(n for n in (f"warm-up loop {warm:.1f} s", note()) if n)))
        except torch.cuda.OutOfMemoryError:
            self.rows.append(dict(label=label, note="out of memory"))
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the table
            traceback.print_exc()
            self.rows.append(dict(label=label, note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
        self.clean()
        print(f"  {self.rows[-1]}", flush=True)

    def text(self, title: str) -> str:
        base = next((r["s_step"] for r in self.rows if "s_step" in r), None)
        theirs_s = next((r["s_step"] for r in self.rows if r["label"].startswith("diffusers") and "s_step" in r), None)
        head = ("configuration", "s/step", "speedup", "vs diffusers", "peak GB", "diff", "notes")
        lines = [title, "  ".join(f"{h:>12}" if i else f"{h:<44}" for i, h in enumerate(head))]
        for r in self.rows:
            if "s_step" not in r:
                lines.append(f"{r['label']:<44}  " + "  ".join(f"{'-':>12}" for _ in range(5)) + f"  {r['note']}")
                continue
            cells = (f"{r['s_step']:.4f}", f"{base / r['s_step']:.2f}x",
                     f"{theirs_s / r['s_step']:.2f}x" if theirs_s else "-",
                     f"{r['peak']:.2f}" if r["peak"] is not None else "-", f"{r['diff']:.2e}")
            lines.append(f"{r['label']:<44}  " + "  ".join(f"{c:>12}" for c in cells) + f"  {r['note']}")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per loop")
    ap.add_argument("--loops", type=int, default=None,
                    help="timed loops per row after the warm-up one; s/step from the fastest (default: 1 on a GPU, "
                         "3 on the CPU, whose timings other processes disturb)")
    ap.add_argument("--tea-cache", type=float, default=0.4, help="TeaCache threshold of the TeaCache rows")
    ap.add_argument("--budget-minutes", type=float, default=8.0, help="skip the remaining rows after this")
    ap.add_argument("--cpu", action="store_true", help="the small model on the CPU even when CUDA is there")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flux_core.compile import compile_dit, uncompile_dit
    from flux_core.fp8 import enable_fp8_compute

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    params, side, text_tokens = (FULL, 64, 512) if gpu else (SMALL, 16, 64)
    args.loops = args.loops or (1 if gpu else 3)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    if not gpu:
        print("No CUDA device (or --cpu): a small model on the CPU; these numbers say nothing about a GPU.", flush=True)
    print(f"Building a {'FLUX.1-dev-shaped' if gpu else 'small'} DiT with random weights on {name} ...", flush=True)
    ref, dit = build_models(params, device, diffusers_ok=True)
    ref.to("cpu")  # only the model under test on the device
    n_params = sum(p.numel() for p in dit.parameters())
    print(f"  {n_params / 1e9:.3f} B parameters; built in {time.monotonic() - start:.0f} s", flush=True)
    x = loop_inputs(params, device, side, text_tokens)
    sigmas = flux_sigmas(args.steps)
    table = Table(device, sigmas, start + args.budget_minutes * 60, args.loops)

    def tea_note(state):
        return lambda: f"TeaCache {args.tea_cache}: {state['extras'].tea_cache.stats}"

    forward, _ = ours(dit, x, None, args.steps)
    table.row("eager bf16", forward, x)
    table.row("eager bf16, torch's default attention", forward, x, pick_attention=False)
    forward, state = ours(dit, x, args.tea_cache, args.steps)
    table.row(f"eager bf16 + TeaCache {args.tea_cache}", forward, x, tea_note(state))
    compile_dit(dit)
    forward, _ = ours(dit, x, None, args.steps)
    table.row("compiled bf16", forward, x)
    uncompile_dit(dit)
    path = enable_fp8_compute(dit, device)  # lossy and in place: every bf16 row is done
    fp8_note = lambda: f"fp8 path: {path}"  # noqa: E731
    forward, _ = ours(dit, x, None, args.steps)
    table.row("FP8 compute, eager", forward, x, fp8_note)
    compile_dit(dit)
    table.row("FP8 compute, compiled", forward, x, fp8_note)
    forward, state = ours(dit, x, args.tea_cache, args.steps)
    table.row(f"FP8 compute, compiled + TeaCache {args.tea_cache}", forward, x,
              lambda: f"{fp8_note()}; {tea_note(state)()}")
    del dit, forward
    table.clean()
    ref.to(device)
    table.row("diffusers bf16, eager", theirs(ref, x), x, pick_attention=False)   # as diffusers runs

    title = (f"{'FLUX.1-dev-shaped' if gpu else 'Small'} DiT ({n_params / 1e9:.3f} B parameters, random weights), {side * side} image + "
             f"{text_tokens} text tokens, batch 1, no CFG, {args.steps} Euler steps, {name}, torch {torch.__version__}; "
             f"s/step the fastest of {args.loops} loop(s); {describe_attention(device, torch.bfloat16)}; total {time.monotonic() - start:.0f} s")
    report = table.text(title)
    print()
    print(report)
    if not args.no_save:
        tag = torch.cuda.get_device_name(device).split()[-1].lower() if gpu else "cpu"
        out = RESULTS / f"{datetime.date.today().isoformat()}-{tag}-gpu_speed.txt"
        atomic_write(out, lambda tmp: tmp.write_text(report + "\n", encoding="utf-8"))
        print(f"written to {out.relative_to(ROOT)}")
    return table.rows


if __name__ == "__main__":
    main()
