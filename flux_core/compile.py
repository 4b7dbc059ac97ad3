"""A compiled DiT forward: each double and single block through `torch.compile`, the rest of the forward eager.

    compile_dit(dit)            # blocks compile on their first call (tens of seconds), then run compiled
    is_compiled(dit)            # True
    uncompile_dit(dit)          # back to eager (free: nothing is undone but a pointer per block)

Regional compilation, as diffusers' `compile_repeated_blocks` and DiffSynth's `compilable_models` do it: every block
of a kind runs the same code on parameters of the same shapes, and dynamo treats a module's parameters as graph
inputs (`inline_inbuilt_nn_modules`, always on since torch 2.6), so ONE graph serves all 19 double blocks and one
all 38 single blocks; compiling costs two blocks, not 57. Each block is compiled with `fullgraph=True` (a graph
break inside a block is an error, not a silent slowdown) and `dynamic=False` (the shapes of one generation never
change: the CFG branches share their padded text length).

What stays eager, and why:
- the forward around the blocks: input embedding, RoPE tables, TeaCache's skip decision (a Python `float`
  comparison per call), ControlNet residuals (`add_to_span`), reference tokens, the final layer;
- block calls with attention hooks (IP-Adapter): a hook closes over its block's index, so a compiled graph would
  be specialised (and recompiled) per block; those calls run the same block eagerly (`CompileFallbackWarning`, once);
- block calls under autograd (training, gradient checkpointing): the graphs are compiled for inference only.

What is compiled with the blocks: LoRAs in hook mode (their forward hooks on the blocks' nn.Linear layers are traced
into the graph; loading LoRAs compiles new graphs: two per block kind, as the first trace fills flux_core.lora's
per-dtype cache of LoRA matrices, which the next call's guards then see; clearing them goes back to the graphs
without hooks, and reloading the same LoRAs reuses theirs), an attention mask (EliGen: a graph input; the first
masked call compiles one more graph per block kind), GGUF and FP8-compute (flux_core.fp8) layers.

What is refused (`CompileRefused`): a DiT under the VRAM manager or with offloaded weights (flux_core.vram swaps
each layer's `param.data` in forward pre-hooks, which dynamo cannot trace). The check runs again before every
compiled block call, so managing a DiT after compiling it gets the same message. GGUF blocks resident on the device
compile (their dequantisation is plain tensor code, traced into the graph); so do FP8-compute layers (their
`torch._scaled_mm` path; tests/test_compile.py).

Recompiles: once per new input shape (another image size, batch or text length), per LoRA set (hooks added or
removed; another rank), and per mask kind (none / bool / float). `tests/test_compile.py` proves none happen across
the steps and CFG branches of a generation. Each variant is one more cached graph per block kind; dynamo's default
limit of 8 per function (after which it silently runs eager) is raised to COMPILED_VARIANTS for the blocks' calls,
as a ComfyUI session that changes sizes and LoRAs reaches 8 quickly. `uncompile_dit` makes the blocks eager again;
the cached graphs stay in dynamo's cache (per block class) until `torch._dynamo.reset()`.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .model_state import peek_state

if TYPE_CHECKING:  # flux_core.models.dit imports this module (FluxDiT.run_block)
    from .models.dit import FluxDiT

# torch.compile's modes offered: None is its default ("default"); "max-autotune-no-cudagraphs" benchmarks matmul
# kernels while compiling (minutes on a full-size DiT). The CUDA-graph modes ("reduce-overhead", "max-autotune") are
# left out: all blocks of a kind replay ONE graph, whose static output buffers each replay overwrites while the
# previous block's outputs are still in use (and no GPU test has shown otherwise).
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
_SETTINGS_ATTR = "fluxcore_compile"   # set on each block's compiled call: the settings it was compiled with
COMPILED_VARIANTS = 64                  # graphs kept per block kind (dynamo's recompile_limit, 8 by default)


class CompileRefused(RuntimeError):
    """`compile_dit` cannot compile this DiT as it is set up (the message says why and what to do)."""


class CompileFallbackWarning(UserWarning):
    """A compiled DiT ran some block calls eagerly (attention hooks)."""


@dataclass(frozen=True)
class CompileSettings:
    mode: str | None = None        # torch.compile's mode (COMPILE_MODES)
    backend: str = "inductor"      # "aot_eager" traces without generating kernels (tests of tracing only)


def compile_dit(dit: "FluxDiT", mode: str | None = None, *, backend: str = "inductor") -> None:
    """Compile every double and single block of `dit` (regional compilation, see the module docstring); the blocks
    compile on their first call. Calling it again with the same settings does nothing; with other settings the
    blocks are compiled anew. Raises CompileRefused for a DiT under the VRAM manager or offloaded."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_dit: mode {mode!r} is not one of {COMPILE_MODES}; the CUDA-graph modes "
                         f"(reduce-overhead, max-autotune) are not offered for blocks that share one graph.")
    refusal = compile_refusal(dit)
    if refusal:
        raise CompileRefused(refusal)
    settings = CompileSettings(mode, backend)
    if compile_settings(dit) == settings:
        return
    owner = weakref.ref(dit)
    for block in blocks(dit):
        block._compiled_call_impl = None  # a previous compile with other settings
        block.compile(fullgraph=True, dynamic=False, mode=mode, backend=backend)
        block._compiled_call_impl = _checked_call(block._compiled_call_impl, owner, settings)


def uncompile_dit(dit: "FluxDiT") -> None:
    """Back to the eager blocks (the cached graphs stay in dynamo's cache, see the module docstring)."""
    for block in blocks(dit):
        block._compiled_call_impl = None


def is_compiled(dit: "FluxDiT") -> bool:
    return compile_settings(dit) is not None


def compile_settings(dit: "FluxDiT") -> CompileSettings | None:
    """The settings every block of `dit` is compiled with; None when not compiled (or only partly)."""
    found = {getattr(b._compiled_call_impl, _SETTINGS_ATTR, None) for b in blocks(dit)}
    return found.pop() if len(found) == 1 else None


def blocks(dit: "FluxDiT") -> list[nn.Module]:
    return [*dit.double_blocks, *dit.single_blocks]


def compile_refusal(dit: "FluxDiT") -> str | None:
    """Why `dit` cannot run compiled, all reasons in one message; None when it can."""
    reasons = _placement_reasons(dit)
    if not reasons:
        return None
    return ("compile_dit: cannot compile this DiT: " + "; ".join(reasons) + ". The VRAM manager places each "
            "layer's weights in forward hooks (assigning `param.data`), which torch.compile cannot trace. Either load the DiT resident on "
            "the compute device without a VRAM limit (no vram_limit, offload_device or offload_dtype for the DiT), "
            "storing its weights in FP8 with fp8_compute=True if bf16 does not fit (half the memory, computed in "
            "FP8 without the VRAM manager), or keep the VRAM limit and run without compile.")


def _placement_reasons(dit: "FluxDiT") -> list[str]:
    """The VRAM manager's marks on `dit` (two attribute reads: checked before every compiled block call)."""
    state = peek_state(dit)
    reasons = []
    if state is not None and state.compute is not None:
        reasons.append("it is managed by the VRAM manager (vram_limit / enable_vram_management / an offload_device "
                       "or offload_dtype in its ModelConfig, including FP8 storage through offload_dtype)")
    elif state is not None and state.offloaded:
        reasons.append("its weights are offloaded (stored off the compute device and streamed in per layer)")
    return reasons


def block_runner(block: nn.Module, hook: object) -> Callable:
    """What FluxDiT.run_block calls for one block call: the block (compiled when it is), or the same block eager for
    a call with an attention hook or under autograd (see the module docstring)."""
    if block._compiled_call_impl is None or (hook is None and not torch.is_grad_enabled()):
        return block
    if hook is not None:
        warnings.warn("compiled DiT: blocks with attention hooks (IP-Adapter) run eagerly; the other blocks stay "
                      "compiled.", CompileFallbackWarning, stacklevel=3)
    return block._call_impl


def _checked_call(compiled: Callable, owner: "weakref.ref[FluxDiT]", settings: CompileSettings) -> Callable:
    """The block's compiled call, refusing a DiT that came under the VRAM manager after it was compiled, and with
    dynamo guarding the modules' hooks (see `_hook_guards`)."""
    def call(*args, **kwargs):
        dit = owner()
        if dit is not None and _placement_reasons(dit):
            raise CompileRefused(compile_refusal(dit) + " (It came under the VRAM manager after compile_dit: "
                                 "call flux_core.compile.uncompile_dit(dit) to run it eagerly.)")
        with _hook_guards():
            return compiled(*args, **kwargs)
    setattr(call, _SETTINGS_ATTR, settings)
    return call


class _hook_guards:
    """Dynamo settings for the blocks' calls only (the process-wide ones are restored after each call):
    - dynamo skips guards on nn.Module hooks by default (`skip_nnmodule_hook_guards`): a LoRA hooked after the first
      compiled call would be silently left out of the graph; with the guards, adding or removing hooks recompiles;
    - `recompile_limit` raised to COMPILED_VARIANTS (see the module docstring).
    Plain attribute swaps: a few microseconds per block call."""
    _config = torch._dynamo.config

    def __enter__(self):
        self.before = self._config.skip_nnmodule_hook_guards, self._config.recompile_limit
        self._config.skip_nnmodule_hook_guards = False
        self._config.recompile_limit = max(self.before[1], COMPILED_VARIANTS)

    def __exit__(self, *exc):
        self._config.skip_nnmodule_hook_guards, self._config.recompile_limit = self.before
