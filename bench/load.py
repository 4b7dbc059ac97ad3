"""Loading a ~1.5 GB DiT checkpoint: time and peak resident memory, ours against a plain load.

    python bench/load.py [--cold] [--keep]

Writes a random BFL-layout DiT in bf16 to bench/_work/load/ (FLUX's real width, 3072 = 24 heads x 128, so
the tensors have FLUX's sizes; 1 double + 3 single blocks make ~1.56 GB), then loads it in a fresh
subprocess per method:
- ours:  `load_model(path, torch_dtype=torch.bfloat16)` (meta-device build, lazy reads, one tensor at a time);
- plain: the model built in bf16, `safetensors.torch.load_file(path)`, `model.load_state_dict(sd)`;
- mmap+assign: the model built on the meta device, `load_file`, `load_state_dict(sd, assign=True)`: with
  safetensors >= 0.8 the parameters are then views of the memory-mapped file (no copy; a dtype cast would
  make one), i.e. page-cache pages rather than the process's own memory.
Every method ends by touching one byte of every 4 KiB page of every weight (inside the timed region), so
lazily mapped weights are really resident before time and memory are read. Each subprocess imports torch, safetensors and flux_core first; its RSS then is the baseline, subtracted from
its peak RSS (VmHWM, the kernel's high-water mark, = getrusage maxrss). Peak / file size is the figure of
merit: target <= 1.3. Resident pages of a memory-mapped file (safetensors' load_file maps the file) count in
RSS, as they do for the system. The file is read from the page cache (it was just written); `--cold` drops
the file's cached pages before each load (posix_fadvise DONTNEED) to include disk reads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from _measure import status_kb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "_work" / "load"
# FLUX.1's widths; depth cut down to reach ~1.5 GB in bf16.
PARAMS = dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=3)
METHODS = ("ours", "plain", "mmap+assign")


def write_checkpoint(path: Path) -> int:
    """A random BFL-layout DiT (bf16) at `path`; returns the file size in bytes."""
    from safetensors.torch import save_file

    from flux_core.models.dit import FluxDiT, FluxParams

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxDiT(FluxParams(**PARAMS)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.stat().st_size


def drop_cached_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- the subprocess side

def load_once(method: str, path: Path) -> dict:
    import safetensors.torch  # noqa: F401 - imported before the baseline by every method alike

    from flux_core.loading.loader import load_model
    from flux_core.models.dit import FluxDiT, FluxParams

    baseline, baseline_file = status_kb("VmRSS"), status_kb("RssFile")
    t0 = time.perf_counter()
    if method == "ours":
        model = load_model(path, torch_dtype=torch.bfloat16)
    else:
        from safetensors.torch import load_file
        if method == "plain":
            torch.set_default_dtype(torch.bfloat16)  # build the model in bf16 directly, as a careful user would
            model = FluxDiT(FluxParams(**PARAMS))
            torch.set_default_dtype(torch.float32)
            model.load_state_dict(load_file(path))
        else:
            with torch.device("meta"):
                model = FluxDiT(FluxParams(**PARAMS))
            model.load_state_dict(load_file(path), assign=True)
    check = sum(float(_touch(t)) for t in model.state_dict().values())
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak=(status_kb("VmHWM") - baseline) * 1024,
                after=(status_kb("VmRSS") - baseline) * 1024, after_file=(status_kb("RssFile") - baseline_file) * 1024, check=check)


def _touch(t: torch.Tensor) -> torch.Tensor:
    """Read one byte of every 4 KiB page (makes lazily mapped weights resident); a checksum of those bytes."""
    return t.reshape(-1).view(torch.uint8)[::4096].sum(dtype=torch.int64)


def run_method(method: str, path: Path, cold: bool) -> dict:
    if cold:
        drop_cached_pages(path)
    out = subprocess.run([sys.executable, __file__, "--_worker", method, "--_path", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"load worker '{method}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold", action="store_true", help="drop the file's cached pages before each load")
    ap.add_argument("--keep", action="store_true", help=f"keep the checkpoint in {WORK}")
    ap.add_argument("--_worker"), ap.add_argument("--_path")
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(load_once(args._worker, Path(args._path))))
        return

    path = WORK / "dit_bf16.safetensors"
    shutil.rmtree(WORK, ignore_errors=True)
    try:
        size = write_checkpoint(path)
        gb, mib = 1e9, 2 ** 20
        print(f"checkpoint: {path.relative_to(ROOT)}, {size / gb:.2f} GB, BFL layout, bf16, "
              f"{PARAMS}; page cache: {'dropped before each load' if args.cold else 'warm'}")
        results = {m: run_method(m, path, args.cold) for m in METHODS}
        if len({r['check'] for r in results.values()}) != 1:
            raise SystemExit(f"the methods loaded different weights: {[r['check'] for r in results.values()]}")
        print("peak = peak RSS of the loading subprocess minus its RSS after importing torch, safetensors and "
              "flux_core;\nafter = RSS once loaded, same baseline; of which file = file-backed (mapped) pages.\n"
              "Target for ours: peak <= 1.30 x file size.")
        head = (f"{'method':13} {'load s':>7} {'GB/s':>6} | {'peak MiB':>9} {'peak/file':>9} | {'after MiB':>9} "
                f"{'after/file':>10} {'file MiB':>9}")
        print(head)
        print("-" * len(head))
        for m, r in results.items():
            print(f"{m:13} {r['seconds']:7.2f} {size / gb / r['seconds']:6.2f} | {r['peak'] / mib:9.0f} "
                  f"{r['peak'] / size:9.2f} | {r['after'] / mib:9.0f} {r['after'] / size:10.2f} "
                  f"{r['after_file'] / mib:9.0f}")
        ours, plain = results["ours"], results["plain"]
        print(f"ours / plain: time {ours['seconds'] / plain['seconds']:.2f}, peak {ours['peak'] / plain['peak']:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
