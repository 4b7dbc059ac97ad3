"""Peak GPU memory and seconds per step of the full-size FLUX.1-dev DiT: FluxCore's low-VRAM modes against
diffusers' offloading, on the same random weights. Needs one CUDA GPU (written for an H200); no downloads.

    python bench/gpu_memory.py [--steps 3] [--budget-minutes 7.5]
    python bench/gpu_memory.py --cpu-dry-run      # checks the script's logic on a tiny model, on the CPU

The DiT is FLUX.1-dev's shape (FluxParams() defaults: 19 double + 38 single blocks, width 3072, 11.9 B
parameters) with random weights: diffusers' FluxTransformer2DModel is built on the meta device, materialised
directly on the GPU in bf16 and filled with random numbers; FluxCore's FluxDiT gets the same weights through
the real diffusers-layout converter (flux_core.loading). One "step" is one DiT forward at 1024x1024: 4096
image tokens + 512 text tokens, batch 1 (no CFG). Each row: one warm-up step, then --steps timed steps;
"s/step" is their mean, and "30 steps" extrapolates to a 30-step generation (for the model-offload row:
the one transfer of the whole model plus 30 steps). "peak GB" = torch.cuda.max_memory_allocated() over the
warm-up and timed steps (weights + activations), "weights GB" = memory allocated before the first step.
Rows:
- FluxCore bf16 resident: the plain model on the GPU.
- FluxCore fp8 storage: weight matrices in float8_e4m3fn on the GPU, each layer cast to bf16 when it runs.
- FluxCore fp8 + offload, vram_limit 8: weights in pinned CPU memory (fp8); `enable_vram_management(
  vram_limit=8)` semantics: 7.5 GiB of weights (8 - vram_buffer 0.5) resident, the rest streamed per call, with
  the streamed layers prefetched on a side CUDA stream (the default on CUDA), and once more without prefetch
  (each layer copied in its own call, as before prefetch existed); the notes give the ratios to the bf16 resident
  row (the issue's target: at most 1.2x) and to the fp8 storage row (the same computation, resident) and the
  prefetcher's counts.
- FluxCore fp8 + offload, vram_limit 0: every layer streamed (the minimum-memory mode), with prefetch.
- FluxCore fp8 compute (flux_core.fp8.enable_fp8_compute: the blocks' layers multiply in FP8 through
  torch._scaled_mm where the GPU has it, else storage-only; the path is in the label), resident, and + offload
  vram_limit 8 with prefetch. The weights here are the fp8 storage rows' codes (scale 1): these rows time the
  computation; its accuracy is bench/gpu_speed.py's.
- diffusers bf16 resident.
- diffusers model CPU offload: the whole model moved to the GPU for the denoising stage (what
  `enable_model_cpu_offload` does per pipeline call), timed including that transfer.
- diffusers group offload, block level (1 block per group) and leaf level, both with CUDA streams
  (`enable_group_offload(..., use_stream=True)`).
A row that runs out of memory prints OOM; rows are skipped once the time budget is spent.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux_core.loading.dit_layouts import dit_to_bfl  # noqa: E402
from flux_core.loading.lazy import lazy_from_tensor  # noqa: E402
from flux_core.loading.loader import assign_weights  # noqa: E402
from flux_core.math import image_ids, text_ids  # noqa: E402
from flux_core.fp8 import enable_fp8_compute  # noqa: E402
from flux_core.models.dit import FluxDiT, FluxParams  # noqa: E402
from flux_core.vram import GiB, ComputeDevice, SimulatedDevice, VRAMManager, store_model  # noqa: E402

GB = 1e9
FULL = FluxParams()
TINY = FluxParams(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)  # head dim 128: FLUX's RoPE axes


def diffusers_config(p: FluxParams) -> dict:
    return dict(patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim)


@torch.no_grad()
def build_models(params: FluxParams, device: torch.device, diffusers_ok: bool):
    """(diffusers model or None, our FluxDiT), both on `device` in bf16 with the same random weights."""
    gen = torch.Generator(device).manual_seed(0)
    if diffusers_ok:
        from diffusers import FluxTransformer2DModel
        with torch.device("meta"):
            ref = FluxTransformer2DModel(**diffusers_config(params)).to(torch.bfloat16)  # no float32 copy, ever
        ref = ref.to_empty(device=device).eval().requires_grad_(False)
        for name, t in ref.named_parameters():
            if t.dim() >= 2:
                t.normal_(0.0, 0.02, generator=gen)
            else:
                t.fill_(1.0 if "norm" in name else 0.0)
        source = {k: lazy_from_tensor(v) for k, v in ref.state_dict().items()}
        bfl = dit_to_bfl(source, "diffusers")
    else:  # no diffusers: our model alone, random weights in our own layout
        ref, bfl = None, None
    with torch.device("meta"):
        ours = FluxDiT(params).to(torch.bfloat16)
    if bfl is None:
        ours = ours.to_empty(device=device)
        for name, t in ours.named_parameters():
            t.normal_(0.0, 0.02, generator=gen) if t.dim() >= 2 else t.fill_(1.0 if "norm" in name else 0.0)
    else:
        assign_weights(ours, bfl, torch.bfloat16, device, "random FLUX.1-dev weights")
    return ref, ours.eval().requires_grad_(False)


def inputs(params: FluxParams, device: torch.device, image_tokens: int, text_tokens: int) -> dict:
    g = torch.Generator().manual_seed(1)
    side = int(image_tokens ** 0.5)
    t = lambda *shape: torch.randn(*shape, generator=g).to(device, torch.bfloat16)  # noqa: E731
    return dict(img=t(1, side * side, params.in_channels), img_ids=image_ids(1, 2 * side, 2 * side, device=device),
                txt=t(1, text_tokens, params.context_in_dim), txt_ids=text_ids(1, text_tokens, device=device),
                timesteps=torch.full((1,), 0.5, device=device), y=t(1, params.vec_in_dim),
                guidance=torch.full((1,), 3.5, device=device))


def ours_step(model, x):
    return model(**x)


def diffusers_step(model, x):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                 return_dict=False)[0]


class Runner:
    def __init__(self, device: torch.device, steps: int, deadline: float):
        self.device, self.steps, self.deadline = device, steps, deadline
        self.rows: list[tuple[str, str, str, str, str, str]] = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self) -> tuple[float, float]:
        if self.device.type != "cuda":
            return 0.0, 0.0
        return torch.cuda.memory_allocated(self.device) / GB, torch.cuda.max_memory_allocated(self.device) / GB

    def cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    @torch.no_grad()
    def row(self, label: str, setup, step, x, teardown=None, transfer_once: bool = False, describe=None,
            ratio_to: tuple[str, ...] = ()):
        """setup() -> model placed; step(model, x) one forward; teardown(model) after. OOM is caught.
        describe() -> text added to the row's notes (before teardown); ratio_to: labels of earlier rows whose
        s/step this row's is divided by, in the notes."""
        if time.monotonic() > self.deadline:
            self.rows.append((label, "-", "-", "-", "-", "skipped: time budget spent"))
            print(f"  {label}: skipped (time budget)", flush=True)
            return
        self.cleanup()
        model, note = None, ""
        try:
            t_setup = time.perf_counter()
            model = setup()
            self.sync()
            t_setup = time.perf_counter() - t_setup
            weights, _ = self.memory()
            t0 = time.perf_counter()
            step(model, x)  # warm-up (for model offload: includes moving the model in)
            self.sync()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(self.steps):
                step(model, x)
            self.sync()
            per_step = (time.perf_counter() - t0) / self.steps
            _, peak = self.memory()
            total30 = (first - per_step) + 30 * per_step if transfer_once else 30 * per_step
            note = f"setup {t_setup:.1f} s" + (f"; first step {first:.2f} s" if transfer_once else "")
            for label_to in ratio_to:
                base = next((r[3] for r in self.rows if r[0] == label_to), None)
                if base is not None and base != "-":
                    note += f"; {per_step / float(base):.2f}x '{label_to}'"
            if describe is not None:
                note += f"; {describe()}"
            self.rows.append((label, f"{weights:.2f}", f"{peak:.2f}", f"{per_step:.3f}", f"{total30:.1f}", note))
        except torch.cuda.OutOfMemoryError:
            self.rows.append((label, "-", "OOM", "-", "-", "out of memory"))
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the table
            traceback.print_exc()
            self.rows.append((label, "-", "-", "-", "-", f"failed: {type(e).__name__}: {str(e)[:80]}"))
        finally:
            if teardown is not None and model is not None:
                try:
                    teardown(model)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            del model
            self.cleanup()
        print(f"  {self.rows[-1]}", flush=True)

    def table(self, title: str) -> str:
        head = ("configuration", "weights GB", "peak GB", "s/step", "30 steps s", "notes")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [title]
        for r in rows:
            lines.append(f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:5], widths[1:])) +
                         f"  {r[5]}")
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up)")
    ap.add_argument("--budget-minutes", type=float, default=6.5, help="skip the remaining rows after this")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model on the CPU: checks the script only")
    args = ap.parse_args()
    start = time.monotonic()
    if args.cpu_dry_run:
        device, params, image_tokens, text_tokens = torch.device("cpu"), TINY, 64, 16
    elif not torch.cuda.is_available():
        print("SKIP: bench/gpu_memory.py measures GPU memory and needs a CUDA device; none is available here. "
              "(Use --cpu-dry-run to check the script on a tiny model.)")
        return 0
    else:
        device, params, image_tokens, text_tokens = torch.device("cuda", torch.cuda.current_device()), FULL, 4096, 512
    try:
        import diffusers  # noqa: F401
        diffusers_ok = True
    except ImportError:
        diffusers_ok = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"Building FLUX.1-dev-shaped DiTs with random weights on {name} ...", flush=True)
    ref, ours = build_models(params, device, diffusers_ok)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"  {n_params / 1e9:.2f} B parameters; built in {time.monotonic() - start:.0f} s", flush=True)
    if ref is not None:
        ref.to("cpu")  # only the model under test on the device
    x = inputs(params, device, image_tokens, text_tokens)
    run = Runner(device, args.steps, start + args.budget_minutes * 60)
    # The dry run streams to a device simulated in host memory, so the offload rows run the manager's streaming and
    # prefetch logic (a CPU ComputeDevice holds the CPU weights already: nothing would stream).
    compute = ComputeDevice(device) if device.type == "cuda" else SimulatedDevice()
    state: dict = {}

    def manage(budget, prefetch=None):
        def setup():
            vram = VRAMManager(compute, budget, prefetch=prefetch)
            vram.add("dit", ours, torch.bfloat16)
            vram.load_models_to_device(["dit"])
            state["vram"] = vram
            return ours
        return setup

    def unmanage(model):
        state.pop("vram").remove_all()

    def prefetched():
        st = state["vram"].prefetch_stats
        return f"prefetch: {st.used} used, {st.missed} calls without, {st.dropped} dropped"

    pinned = device.type == "cuda"
    resident_row = "FluxCore bf16, resident"   # the baseline for offload: at most 1.2x at vram_limit 8
    run.row(resident_row, lambda: ours, ours_step, x)
    store_model(ours, device, torch.float8_e4m3fn)  # lossy from here on: the bf16 rows come first
    storage_row = "FluxCore fp8 storage (e4m3fn), bf16 compute"
    run.row(storage_row, manage(None), ours_step, x, unmanage)
    store_model(ours, "cpu", pin_memory=pinned)
    run.row("FluxCore fp8 + offload, vram_limit 8 (7.5 GiB resident), prefetch", manage(int(7.5 * GiB), True),
            ours_step, x, unmanage, describe=prefetched, ratio_to=(resident_row, storage_row))
    run.row("FluxCore fp8 + offload, vram_limit 8 (7.5 GiB resident), no prefetch", manage(int(7.5 * GiB), False),
            ours_step, x, unmanage, ratio_to=(resident_row, storage_row))
    run.row("FluxCore fp8 + offload, vram_limit 0 (all streamed), prefetch", manage(0, True), ours_step, x, unmanage,
            describe=prefetched, ratio_to=(resident_row, storage_row))
    path = enable_fp8_compute(ours, device)  # the fp8 codes stay (scale 1), pinned on the CPU
    store_model(ours, device)
    compute_row = f"FluxCore fp8 compute ({path}), resident"
    run.row(compute_row, manage(None), ours_step, x, unmanage)
    store_model(ours, "cpu", pin_memory=pinned)
    run.row("FluxCore fp8 compute + offload, vram_limit 8, prefetch", manage(int(7.5 * GiB), True), ours_step, x,
            unmanage, describe=prefetched, ratio_to=(resident_row, compute_row))
    del ours
    state.clear()
    run.cleanup()

    if ref is None:
        run.rows.append(("diffusers rows", "-", "-", "-", "-", "diffusers is not installed"))
    else:
        def to_device():
            return ref.to(device)

        def to_cpu(model):
            model.to("cpu")

        run.row("diffusers bf16, resident", to_device, diffusers_step, x, to_cpu)
        # enable_model_cpu_offload: the whole model moves in when the denoising stage starts, out at its end.
        run.row("diffusers model CPU offload (enable_model_cpu_offload)", lambda: ref,
                lambda m, xx: diffusers_step(m.to(device), xx), x, to_cpu, transfer_once=True)
        if True:  # on the CPU dry run the same calls run without CUDA streams
            from diffusers.hooks import apply_group_offloading

            def group(kind, **kw):
                def setup():
                    apply_group_offloading(ref, onload_device=device, offload_device=torch.device("cpu"),
                                           offload_type=kind, use_stream=device.type == "cuda", **kw)
                    return ref
                return setup

            def ungroup(model):
                from diffusers.hooks import HookRegistry
                for module in model.modules():
                    registry = getattr(module, "_diffusers_hook", None)
                    if registry is not None:
                        for hook in ("lazy_prefetch_group_offloading", "layer_execution_tracker", "group_offloading"):
                            registry.remove_hook(hook, recurse=False)
                torch.nn.Module.to(model, "cpu")  # diffusers' own .to() refuses group-offloaded models

            run.row("diffusers group offload, block level (1 block, stream)",
                    group("block_level", num_blocks_per_group=1), diffusers_step, x, ungroup)
            # Last row: left in place (the script ends), so nothing depends on removing leaf-level hooks.
            run.row("diffusers group offload, leaf level (stream)", group("leaf_level"), diffusers_step, x)

    title = (f"FLUX.1-dev DiT ({n_params / 1e9:.2f} B parameters, random weights), {image_tokens} image + "
             f"{text_tokens} text tokens, batch 1, bf16 compute, {name}, torch {torch.__version__}; "
             f"{args.steps} timed steps per row after a warm-up, '30 steps' extrapolated; "
             f"total {time.monotonic() - start:.0f} s")
    print()
    print(run.table(title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
