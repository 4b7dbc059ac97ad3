"""The bundled demo model's package size and its generate time on a CPU: absolute figures of the demo itself.

    python bench/demo.py [--steps 30] [--runs 3] [--threads N] [--prompt "..."] [--seed 0]

Size: every file under flux_core/demo/models (per file) and flux_core/demo/datasets (per dataset folder), in MB
(10^6 bytes, the unit of the issue's "at most 25 MB in all"), and their total: what `pip install` ships for the demo.

Time, in this process, on the CPU, float32 (what `python -m flux_core generate --demo` does):
- load: `FluxImagePipeline.from_demo()` (files read, models built; torch and flux_core already imported, the
  first load also imports transformers' CLIP and T5 model code, as a fresh `generate --demo` does); then a second
  load in the same process, which shows what reading and building alone take;
- first image: the first `pipe(prompt=..., seed=...)` at the demo's size (its first call pays one-off costs:
  kernels chosen, memory allocated);
- steady image: the median of --runs further calls, same prompt and seed.
Printed with the steps, the image size and torch's thread count. Nothing is compared: there is no other model this
small to run against, so the numbers stand alone (a machine's load from other processes shows in them).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flux_core import demo  # noqa: E402

MB = 1e6


def package_files() -> dict[str, int]:
    """{path relative to flux_core/demo: bytes} of every shipped demo file (models and datasets)."""
    here = demo.MODELS_DIR.parent
    return {path.relative_to(here).as_posix() if path.is_relative_to(here) else str(path): path.stat().st_size
            for path in demo.shipped_files()}


def size_report(files: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """(printed lines, {row: bytes}): each model file, each dataset folder (its files summed), the total."""
    rows: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name, size in files.items():
        parts = name.split("/")
        row = "/".join(parts[:2]) + "/" if parts[0] == "datasets" and len(parts) > 2 else name
        rows[row] = rows.get(row, 0) + size
        counts[row] = counts.get(row, 0) + 1
    width = max(len(r) for r in rows) if rows else 10
    lines = [f"{'file':{width}}  {'MB':>8}", "-" * (width + 10)]
    for row, size in rows.items():
        note = f"  ({counts[row]} files)" if row.endswith("/") else ""
        lines.append(f"{row:{width}}  {size / MB:8.3f}{note}")
    total = sum(files.values())
    lines += ["-" * (width + 10), f"{'total (' + str(len(files)) + ' files)':{width}}  {total / MB:8.3f}"]
    return lines, rows


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="denoising steps per image (the pipeline's default)")
    ap.add_argument("--runs", type=int, default=3, help="steady-state images timed after the first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--prompt", default=demo.PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns the printed numbers (for the smoke test)."""
    from flux_core.pipeline import FluxImagePipeline

    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = demo.missing_files()
    if missing:
        raise SystemExit(demo.missing_files_message(missing))
    files = package_files()
    lines, rows = size_report(files)
    print("Demo model package size (flux_core/demo/models and datasets):")
    print("\n".join(lines))

    t0 = time.perf_counter()
    pipe = FluxImagePipeline.from_demo(device="cpu")
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = FluxImagePipeline.from_demo(device="cpu")
    reload = time.perf_counter() - t0

    def image() -> float:
        start = time.perf_counter()
        pipe(prompt=args.prompt, seed=args.seed, num_inference_steps=args.steps, progress_bar_cmd=None)
        return time.perf_counter() - start

    first = image()
    steady = [image() for _ in range(args.runs)]
    height, width = pipe.default_size
    result = {"files": files, "rows": rows, "total_bytes": sum(files.values()), "load_s": load, "reload_s": reload,
              "first_s": first, "steady_s": statistics.median(steady), "steps": args.steps, "size": (height, width),
              "threads": torch.get_num_threads(), "t5_tokens": pipe.t5_sequence_length()}
    print(f"\nGenerate on the CPU (float32, {width}x{height}, {args.steps} steps, {result['t5_tokens']} T5 tokens, "
          f"{result['threads']} threads, torch {torch.__version__}):")
    for label, seconds in (("load (from_demo)", load), ("load again (warm)", reload), ("first image", first),
                           (f"steady image (median of {args.runs})", result["steady_s"])):
        print(f"  {label:30} {seconds:8.3f} s")
    print(f"  ({result['steady_s'] / args.steps * 1000:.1f} ms per step, the text encoding and the VAE decode included)")
    return result


if __name__ == "__main__":
    main()
