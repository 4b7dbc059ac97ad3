"""One DiT forward: FluxCore's FluxDiT against diffusers' FluxTransformer2DModel, same weights.

    python bench/dit_step.py [--device cuda] [--runs 5] [--dtypes float32 bfloat16] [--profile]
                             [--heads 6] [--blocks 4 8] [--tokens 1024 256] [--threads N]

A mid-size random FLUX (768 wide = 6 heads x 128 head dim, RoPE axes (16, 56, 56), 4 double + 8 single
blocks, T5 width 4096, CLIP width 768, guidance embedder; 1024 image + 256 text tokens) is built with
diffusers (on a GPU, `--heads 24 --blocks 2 4 --tokens 4096 512` gives FLUX's real width and a 1024x1024
image, where the kernels rather than the Python overhead set the time), saved as a diffusers `transformer/` folder, and loaded into our DiT through the real loader
(`load_model`: diffusers layout -> BFL names, fused q/k/v). Outputs are checked to match before anything is
timed. Prints time and peak memory per forward, and the ratios ours / diffusers (target: <= 1.0).

Time: --runs forwards of each model after one warm-up, under torch.no_grad, the two models run alternately;
the table shows each model's median wall time and the median of the per-pair ratios, so load from other
processes (which comes and goes) hits both alike. On CPU it also shows the ratio of process CPU time, which
other processes on a shared machine disturb far less than wall time; `--threads 1` makes it steadier still.

Peak memory of a forward (memory beyond the resident weights):
- CUDA: torch.cuda.max_memory_allocated() during the forward minus memory_allocated() before it.
- CPU: tracemalloc does not see torch's allocations, and sampling RSS from a thread misses short peaks,
  so each (model, dtype) is measured in a fresh subprocess through the kernel's own high-water mark:
  `/proc/self/clear_refs` (5) resets VmHWM to the current RSS just before the forward, VmHWM is read after
  it, and the RSS before is subtracted. The subprocess runs with glibc's MALLOC_MMAP_THRESHOLD_=65536, so
  every tensor buffer is its own mapping returned to the system when freed: the high-water mark is then
  the live tensors' peak, not an artefact of heap caching left by the warm-up or by the other model.
  (Timings come from the parent process with the default allocator.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _measure import dit_forward, status_kb, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flux_core.dtypes import DTYPES  # noqa: E402

WORK = ROOT / "bench" / "_work" / "dit_step"


@dataclass(frozen=True)
class Size:
    heads: int = 6              # x 128 head dim = width
    double: int = 4
    single: int = 8
    img_tokens: int = 1024      # a 512x512 image: 64x64 latent -> 32x32 patches (must be a square number)
    txt_tokens: int = 256

    def diffusers_config(self) -> dict:
        return dict(in_channels=64, num_layers=self.double, num_single_layers=self.single, attention_head_dim=128,
                    num_attention_heads=self.heads, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))

    def argv(self) -> list[str]:
        return ["--heads", str(self.heads), "--blocks", str(self.double), str(self.single),
                "--tokens", str(self.img_tokens), str(self.txt_tokens)]


# sigma 0.5 and guidance 4.0 are exact in bf16 after diffusers' `* 1000` in the model dtype, so the two
# models see the same time embedding input in bf16 too.
SIGMA, GUIDANCE = 0.5, 4.0
BENCH_DTYPES = ("float32", "bfloat16")  # DTYPES names the benches compare


# ----------------------------------------------------------------------------------------------- setup
def make_checkpoint(folder: Path, size: Size) -> int:
    """A random diffusers FLUX transformer saved as a diffusers folder; returns its parameter count."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**size.diffusers_config())
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def load(impl: str, folder: Path, dtype: torch.dtype, device: str):
    if impl == "ours":
        from flux_core.loading.loader import load_model
        return load_model(folder, torch_dtype=dtype, device=device, kind="dit")
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)


def make_inputs(size: Size, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    side = int(size.img_tokens ** 0.5)
    config = size.diffusers_config()
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return dict(img=t(1, side * side, config["in_channels"]), txt=t(1, size.txt_tokens, config["joint_attention_dim"]),
                y=t(1, config["pooled_projection_dim"]), img_ids=img_ids.reshape(-1, 3).to(device),
                txt_ids=torch.zeros(size.txt_tokens, 3, device=device),
                sigma=torch.full((1,), SIGMA, device=device), guidance=torch.full((1,), GUIDANCE, device=device))



# ---------------------------------------------------------------------------------------------- memory

def measure_peak(impl: str, folder: Path, size: Size, dtype: torch.dtype, device: str) -> int:
    """Peak bytes one forward needs beyond what was allocated before it. In the subprocess (CPU) or in-process (CUDA)."""
    x = make_inputs(size, dtype, device)
    model = load(impl, folder, dtype, device)
    with torch.no_grad():
        if device.startswith("cuda"):
            dit_forward(impl, model, x)  # warm-up
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            dit_forward(impl, model, x)
            sync(device)
            peak = torch.cuda.max_memory_allocated() - before
            del model
            torch.cuda.empty_cache()
            return peak
        dit_forward(impl, model, x)  # warm-up: one-time kernel/primitive caches are not the forward's memory
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
        dit_forward(impl, model, x)
        return (status_kb("VmHWM") - before) * 1024


def peak_in_subprocess(impl: str, folder: Path, size: Size, dtype_name: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--_worker", impl, "--_dtype", dtype_name, "--_folder", str(folder),
           "--threads", str(torch.get_num_threads()), *size.argv()]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory worker for {impl}/{dtype_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- checks
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def check_outputs(models: dict, x: dict, ref: torch.Tensor | None, dtype_name: str) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        out = {impl: dit_forward(impl, m, x).float().cpu() for impl, m in models.items()}
    diff = rel_err(out["ours"], out["diffusers"])
    report = {"ours vs diffusers": diff}
    if ref is not None:  # bf16: each against the fp32 diffusers output
        report.update({f"{impl} vs fp32": rel_err(o, ref) for impl, o in out.items()})
    limit = 1e-4 if dtype_name == "float32" else 3e-2
    if not diff < limit:
        raise SystemExit(f"{dtype_name}: outputs differ (relative L2 {diff:.2e} >= {limit:.0e}); not timing.")
    if ref is not None and report["ours vs fp32"] > 1.5 * report["diffusers vs fp32"] + 1e-3:
        raise SystemExit(f"{dtype_name}: ours is further from fp32 than diffusers: {report}")
    return report, out["diffusers"]


def time_forwards(models: dict, x: dict, runs: int, device: str) -> dict:
    """Median wall seconds per forward of each model, and the medians of the per-run ratios ours / diffusers
    of wall time and of process CPU time."""
    wall = {impl: [] for impl in models}
    cpu = {impl: [] for impl in models}
    with torch.no_grad():
        for impl, m in models.items():  # warm-up
            dit_forward(impl, m, x)
        sync(device)
        for _ in range(runs):
            for impl, m in models.items():
                t0, c0 = time.perf_counter(), time.process_time()
                dit_forward(impl, m, x)
                sync(device)
                wall[impl].append(time.perf_counter() - t0)
                cpu[impl].append(time.process_time() - c0)
    out = {impl: statistics.median(ts) for impl, ts in wall.items()}
    out["ratio"] = statistics.median(o / d for o, d in zip(wall["ours"], wall["diffusers"]))
    out["cpu_ratio"] = statistics.median(o / d for o, d in zip(cpu["ours"], cpu["diffusers"]))
    return out


def profile(models: dict, x: dict, device: str, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    for impl, m in models.items():
        with torch.no_grad(), tprofile(activities=acts) as prof:
            dit_forward(impl, m, x)
            sync(device)
        print(f"\n--- profile: {impl} ---")
        print(prof.key_averages().table(sort_by=key, row_limit=rows))


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--dtypes", nargs="+", default=list(BENCH_DTYPES), choices=list(BENCH_DTYPES))
    ap.add_argument("--heads", type=int, default=Size.heads, help="width = heads x 128")
    ap.add_argument("--blocks", type=int, nargs=2, default=(Size.double, Size.single), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--tokens", type=int, nargs=2, default=(Size.img_tokens, Size.txt_tokens), metavar=("IMAGE", "TEXT"))
    ap.add_argument("--profile", action="store_true", help="print the top ops of one forward of each model")
    ap.add_argument("--keep", action="store_true", help=f"keep the checkpoint in {WORK}")
    ap.add_argument("--_worker"), ap.add_argument("--_dtype"), ap.add_argument("--_folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = Size(args.heads, *args.blocks, *args.tokens)
    if int(size.img_tokens ** 0.5) ** 2 != size.img_tokens:
        ap.error(f"--tokens: the image token count {size.img_tokens} must be a square number (e.g. 1024, 4096)")

    if args._worker:  # memory subprocess (CPU)
        print(json.dumps(measure_peak(args._worker, Path(args._folder), size, DTYPES[args._dtype], "cpu")))
        return

    dev = args.device
    folder = WORK / "transformer"
    shutil.rmtree(WORK, ignore_errors=True)
    try:
        n_params = make_checkpoint(folder, size)
        print(f"DiT: {n_params / 1e6:.0f}M params, hidden {size.heads * 128} ({size.heads} x 128), {size.double} double "
              f"+ {size.single} single blocks; {size.img_tokens} image + {size.txt_tokens} text tokens; device {dev}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        rows, ref = [], None
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            models = {impl: load(impl, folder, dtype, dev) for impl in ("ours", "diffusers")}
            x = make_inputs(size, dtype, dev)
            check, ref_out = check_outputs(models, x, ref, dtype_name)
            if dtype_name == "float32":
                ref = ref_out
            print(f"{dtype_name}: outputs match: " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + " (rel. L2)")
            times = time_forwards(models, x, args.runs, dev)
            if args.profile:
                profile(models, x, dev)
            if dev.startswith("cuda"):
                del models
                torch.cuda.empty_cache()
                mem = {impl: measure_peak(impl, folder, size, dtype, dev) for impl in ("ours", "diffusers")}
            else:
                del models
                mem = {impl: peak_in_subprocess(impl, folder, size, dtype_name) for impl in ("ours", "diffusers")}
            rows.append((dtype_name, times, mem))
        print_table(rows, args.runs, dev)
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


def print_table(rows, runs: int, dev: str) -> None:
    mib = 2 ** 20
    cpu = not dev.startswith("cuda")
    how = "VmHWM in a fresh subprocess" if cpu else "cuda max_memory_allocated"
    print(f"\ntime: median wall seconds of {runs} alternating runs after warm-up; ratios: median of per-run ratios"
          + (" (wall, and process CPU time)" if cpu else ""))
    print(f"peak: memory one forward needs beyond the loaded weights ({how})")
    head = (f"{'dtype':9} {'ours s':>8} {'diffusers s':>11} {'time':>6}" + (f" {'cpu':>6}" if cpu else "")
            + f" | {'ours peak':>10} {'diffusers peak':>14} {'peak':>6}")
    print(head)
    print("-" * len(head))
    for dtype_name, t, m in rows:
        print(f"{dtype_name:9} {t['ours']:8.3f} {t['diffusers']:11.3f} {t['ratio']:6.2f}"
              + (f" {t['cpu_ratio']:6.2f}" if cpu else "")
              + f" | {m['ours'] / mib:7.1f}MiB {m['diffusers'] / mib:11.1f}MiB {m['ours'] / m['diffusers']:6.2f}")
    print("ratios are ours / diffusers (target <= 1.00)")


if __name__ == "__main__":
    main()
