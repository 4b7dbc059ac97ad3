"""Low-VRAM running on the CPU: FP8 and GGUF storage sizes, weight bytes on the compute device at several budgets, and
the time cost of streaming versus keeping layers resident.

    python bench/memory.py [--runs 3] [--tokens 512]

A mid-size random FLUX DiT (768 wide = 6 heads x 128, RoPE (16, 56, 56), 4 double + 8 single blocks, T5 width
4096, CLIP width 768, guidance embedder), built with flux_core.

On a CPU the compute device and the offload place are the same memory, so "VRAM" is simulated: the manager
runs against `flux_core.vram.SimulatedDevice`, which makes a real copy of every tensor put "on the device"
and tracks its storage's lifetime. "device peak" is the high-water mark of those copies (it equals the
manager's exact count, which the bench checks); it is what a GPU would hold in weights. "RSS peak" is the
process's resident memory high-water mark during the forwards (Linux VmHWM, reset before them; the bench
re-runs itself with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS): the stored weights (host
RAM), plus the simulated device's copies, plus activations and the runtime (and the reference model).
Timings: each configuration's forward alternates with an unmanaged reference forward (a second copy of the
same weights), --runs times after a warm-up; "CPU s" is the process's CPU time per forward (one thread by
default, --threads; unlike wall time it hardly moves when other work shares the machine), "vs ref" the ratio of the smallest
CPU times of each (alternating cancels drift), "wall s" the fastest wall time; computed in float32 (bf16 matmuls are slow and erratic on CPUs without bf16 units); on a CPU streaming costs a
memory copy (and an fp8 upcast) per layer per call, a lower bound of the PCIe transfer on a GPU machine.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux_core.math import image_ids, text_ids  # noqa: E402
from flux_core.models.dit import FluxDiT, FluxParams  # noqa: E402
from flux_core.loading.loader import load_model  # noqa: E402
from flux_core.quantized import BLOCK_FORMATS, bytes_per_value  # noqa: E402
from flux_core.vram import GiB, SimulatedDevice, VRAMManager, store_model  # noqa: E402

PARAMS = FluxParams(hidden_size=768, num_heads=6, depth=4, depth_single_blocks=8)
MiB = 1024 ** 2


def make_dit(dtype: torch.dtype) -> FluxDiT:
    torch.manual_seed(0)
    with torch.device("meta"):
        dit = FluxDiT(PARAMS)
    dit = dit.to_empty(device="cpu").eval().requires_grad_(False)
    for p in dit.parameters():
        p.data.normal_(0.0, 0.02)
    return dit.to(dtype)


def make_inputs(tokens: int, text: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    return dict(img=torch.randn(1, side * side, 64, generator=g).to(dtype),
                img_ids=image_ids(1, 2 * side, 2 * side), txt=torch.randn(1, text, 4096, generator=g).to(dtype),
                txt_ids=text_ids(1, text), timesteps=torch.tensor([0.5]),
                y=torch.randn(1, 768, generator=g).to(dtype), guidance=torch.tensor([3.5]))


def nbytes(model) -> int:
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


def rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@torch.no_grad()
def timed(dit, reference, inputs, runs: int) -> tuple[float, float, float, int, torch.Tensor]:
    """(least CPU seconds of dit, of reference, fastest wall seconds of dit, RSS peak of one forward, output)."""
    gc.collect()
    has_rss = rss_reset()
    out = dit(**inputs)  # warm-up, and the RSS peak of a forward
    rss = rss_peak() if has_rss else 0
    reference(**inputs)
    times, ref_times, walls = [], [], []
    for _ in range(runs):
        for model, into in ((reference, ref_times), (dit, times)):
            t0, w0 = time.process_time(), time.perf_counter()
            model(**inputs)
            into.append(time.process_time() - t0)
            if model is dit:
                walls.append(time.perf_counter() - w0)
    return min(times), min(ref_times), min(walls), rss, out


# GGUF types of the published FLUX files (city96): file type -> the block type of its weight matrices.
GGUF_TYPES = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_S": "Q5_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0"}


def storage_bytes(model: torch.nn.Module, matrix_bytes) -> int:
    """Weight bytes of `model` (any device, meta too) when each nn.Linear weight takes `matrix_bytes(out, in)`
    bytes and every other tensor 2 (bf16)."""
    total = 0
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            is_matrix = isinstance(module, torch.nn.Linear) and name == "weight"
            total += matrix_bytes(*t.shape) if is_matrix else t.numel() * 2
    return total


def gguf_matrix(qtype: str):
    """Bytes of an (out, in) matrix in `qtype`; rows that are not whole blocks stay 16-bit, as in city96's files."""
    block = BLOCK_FORMATS[qtype].block_size
    return lambda out, n_in: int(out * n_in * bytes_per_value(qtype)) if n_in % block == 0 else out * n_in * 2


def write_gguf_dit(model: FluxDiT, path: Path, qtype: str) -> Path:
    """`model` as a GGUF file the way city96's converter makes one: weight matrices whose rows are whole blocks in
    `qtype`, the rest F16. Only the types gguf's own quantizer writes (Q8_0, Q4_0, ...; it has no K-quants)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(path), "flux")
    for key, value in model.state_dict().items():
        array = value.float().numpy()
        if value.dim() == 2 and value.shape[1] % BLOCK_FORMATS[qtype].block_size == 0:
            writer.add_tensor(key, quants.quantize(array, GGMLQuantizationType[qtype]), raw_dtype=GGMLQuantizationType[qtype])
        else:
            writer.add_tensor(key, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def print_storage_table(mid: FluxDiT, tmp: Path) -> None:
    """Weight bytes per storage format: FLUX.1-dev's shapes (computed on the meta device) and the bench's DiT
    (computed, and measured on the model loaded from a GGUF file written here)."""
    with torch.device("meta"):
        dev = FluxDiT(FluxParams())
    formats = {"bf16": lambda o, i: o * i * 2, "fp8 (e4m3fn)": lambda o, i: o * i,
               **{f"GGUF {name}": gguf_matrix(q) for name, q in GGUF_TYPES.items()}}
    measured = {f"GGUF {name}": nbytes(load_model(write_gguf_dit(mid, tmp / f"mid-{name}.gguf", name),
                                                  torch_dtype=torch.bfloat16))
                for name in ("Q8_0", "Q4_0")}
    measured["bf16"] = nbytes(mid.to(torch.bfloat16))
    measured["fp8 (e4m3fn)"] = nbytes(store_model(mid, weight_dtype=torch.float8_e4m3fn))
    params = sum(p.numel() for p in dev.parameters())
    print(f"Weight bytes per storage format (matrices in the format; biases, norms and matrices whose rows are not "
          f"whole blocks in 16 bits):")
    print(f"{'format':<14} {'FLUX.1-dev':>11} {'bytes/param':>11} {'vs bf16':>8} {'bench DiT':>10} {'measured':>10}")
    dev_bf16 = storage_bytes(dev, formats["bf16"])
    for name, matrix in formats.items():
        size, mid_size = storage_bytes(dev, matrix), storage_bytes(mid, matrix)
        got = measured.get(name)
        if got is not None:
            assert got == mid_size, f"{name}: loaded model holds {got} bytes, computed {mid_size}"
        print(f"{name:<14} {size / GiB:>7.2f} GiB {size / params:>11.3f} {size / dev_bf16:>7.3f}x "
              f"{mid_size / MiB:>6.1f} MiB {'-' if got is None else f'{got / MiB:.1f} MiB':>10}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256, help="image tokens (a square number); text tokens = 1/4")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 (default) keeps CPU times honest on a shared machine (no spin-waiting)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed tensors go back to the system: RSS peaks mean something
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    compute = torch.float32
    inputs = make_inputs(args.tokens, args.tokens // 4, compute)

    bf16 = make_dit(torch.bfloat16)
    fp8 = store_model(make_dit(torch.bfloat16), weight_dtype=torch.float8_e4m3fn)
    n_params = sum(p.numel() for p in bf16.parameters())
    print(f"Mid-size random FLUX DiT: {n_params / 1e6:.1f} M parameters ({PARAMS.depth} double + "
          f"{PARAMS.depth_single_blocks} single blocks, width {PARAMS.hidden_size}); {args.tokens} image + "
          f"{args.tokens // 4} text tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"Parameter bytes: bf16 {nbytes(bf16) / MiB:.1f} MiB, fp8 storage (e4m3fn matrices, bf16 biases/norms) "
          f"{nbytes(fp8) / MiB:.1f} MiB -> {nbytes(fp8) / nbytes(bf16):.3f}x")
    del bf16, fp8
    print()
    tmp = Path(tempfile.mkdtemp(prefix="fluxcore-bench-"))
    print_storage_table(make_dit(torch.float32), tmp)

    reference = make_dit(torch.float32)
    full = make_dit(torch.float32)
    fp8 = store_model(make_dit(torch.float32), weight_dtype=torch.float8_e4m3fn)
    q4 = load_model(tmp / "mid-Q4_0.gguf", torch_dtype=torch.float32)  # Q4_0 blocks, dequantized per call
    base_time, ref_time, base_wall, base_rss, expected = timed(full, reference, inputs, args.runs)
    rows = [("fp32, unmanaged", "-", None, None, base_time, base_time / ref_time, base_wall, base_rss, 0.0)]
    total = nbytes(full)
    for label, model, fraction in [("fp32, resident (no limit)", full, None), ("fp32, budget 50%", full, 0.5),
                                   ("fp32, budget 25%", full, 0.25), ("fp32, budget 0 (stream all)", full, 0.0),
                                   ("fp8, resident (no limit)", fp8, None), ("fp8, budget 25%", fp8, 0.25),
                                   ("fp8, budget 0 (stream all)", fp8, 0.0),
                                   ("GGUF Q4_0, resident (no limit)", q4, None), ("GGUF Q4_0, budget 0", q4, 0.0)]:
        budget = None if fraction is None else int(total * fraction)
        device = SimulatedDevice()
        vram = VRAMManager(device, budget)
        vram.add("dit", model, compute)
        vram.load_models_to_device(["dit"])
        vram.reset_peak()
        device.reset_peak()
        seconds, ref_seconds, wall, rss, out = timed(model, reference, inputs, args.runs)
        assert vram.peak_bytes == device.peak_bytes, "manager count differs from the simulated device"
        diff = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        budget_text = "none" if budget is None else f"{budget / MiB:.0f} MiB"
        rows.append((label, budget_text, vram.resident_bytes, vram.peak_bytes, seconds, seconds / ref_seconds, wall,
                     rss, diff))
        vram.remove("dit")
        del device, vram
        gc.collect()

    print(f"Offload on a simulated device (compute float32; fp8 = e4m3fn matrices, fp32 biases/norms, upcast per "
          f"call; GGUF Q4_0 = blocks moved as they are, dequantized per call; budgets are fractions of the fp32 model's {total / MiB:.0f} MiB):")
    print(f"{'configuration':<31} {'budget':>9} {'resident':>10} {'device peak':>12} {'RSS peak':>10} "
          f"{'CPU s':>7} {'vs ref':>7} {'wall s':>7} {'rel. diff':>9}")
    for label, budget_text, resident, peak, seconds, ratio, wall, rss, diff in rows:
        res = "-" if resident is None else f"{resident / MiB:.1f} MiB"
        pk = "-" if peak is None else f"{peak / MiB:.1f} MiB"
        print(f"{label:<31} {budget_text:>9} {res:>10} {pk:>12} {rss / MiB:>6.0f} MiB {seconds:>7.2f} "
              f"{ratio:>6.2f}x {wall:>7.2f} {diff:>9.2e}")
    probe = VRAMManager(SimulatedDevice())
    probe.add("dit", full, compute)
    largest = probe.largest_unit_bytes()
    probe.remove("dit")
    shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("resident = weight bytes kept on the (simulated) device once the stage starts; device peak = the most "
          "weight bytes on it during a forward (resident + the layer in flight, in float32), the manager's exact "
          f"count, checked against the simulated device; bound: budget + largest layer ({largest / MiB:.1f} MiB). "
          "RSS peak = the whole process: stored weights + device copies + activations + the Python/torch runtime. "
          "rel. diff = |out - reference| / |reference| of the DiT output. GGUF layers count their blocks; the "
          "weight a layer dequantizes for its call (at most the largest layer in float32) is a temporary of the "
          "call, like an activation, and not counted.")

if __name__ == "__main__":
    main()
