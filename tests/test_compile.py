"""The compiled DiT (flux_core.compile) against torch's eager execution of the same weights, on the CPU (inductor):
a forward and a true-CFG sampling run through flux_core's denoising loop within 1e-5 in float32 with no recompile
across steps and branches, one graph per block kind, TeaCache, LoRA in hook mode (against weights with the LoRA
delta added by hand), attention masks, attention hooks and autograd running eager, and the refusals.

Inductor compiles the two block graphs of a tiny DiT in tens of seconds on two cores: one compiled DiT is shared by
the module (`compiled`), and every test feeds it the same shapes so it compiles once."""
import copy

import pytest
import torch
from torch import nn

from flux_core.attention_backend import attention_backend
from flux_core.compile import (CompileFallbackWarning, CompileRefused, compile_dit, compile_settings, is_compiled,
                               uncompile_dit)
from flux_core.dit_inputs import PromptEmbeds
from flux_core.lora import clear_lora, load_lora
from flux_core.model_state import state_of
from flux_core.models.dit import AfterBlock, DiTExtras
from flux_core.models.layers import DoubleStreamBlock, SingleStreamBlock
from flux_core.sampling import denoise, guided_velocity, tea_cache_extras
from flux_core.vram import SimulatedDevice, VRAMManager
from tests.test_vram import dit_inputs, make_dit
from tests.tiny_lora import delta, random_pairs, write_kohya

STEPS = 4
TOKENS, TEXT = 16, 8   # dit_inputs' defaults: the shapes every compiled call here uses (a 8x8 latent = 16 tokens)
ATOL = 1e-5


@pytest.fixture(scope="module")
def eager():
    return make_dit()


@pytest.fixture(scope="module")
def compiled():
    dit = make_dit()   # the same weights as `eager` (same seed)
    compile_dit(dit)
    return dit


def graphs(block_class) -> int:
    """How many graphs dynamo holds for a block class's forward (the frame regional compilation compiles)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(block_class.forward.__code__))


def prompts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [PromptEmbeds(torch.randn(1, TEXT, 32, generator=g), torch.randn(1, 32, generator=g)) for _ in "pn"]


def sample(dit, tea_cache=None):
    """A true-CFG run (cfg 3, guidance 3.5) through flux_core's denoise loop; the TeaCache stats when asked."""
    positive, negative = prompts()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    extras, negative_extras, stats = tea_cache_extras(None, STEPS, tea_cache, cfg=True)
    sigmas = torch.linspace(1.0, 1.0 / STEPS, STEPS)
    with torch.no_grad():
        out = denoise(latents, sigmas, lambda lat, call: guided_velocity(
            dit, lat, call, positive, negative, 3.0, 3.5, extras=extras, negative_extras=negative_extras))
    return out, stats


def test_forward_equals_eager(eager, compiled):
    with torch.no_grad():
        expected, out = eager(**dit_inputs()), compiled(**dit_inputs())
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert is_compiled(compiled) and not is_compiled(eager)


def test_controlnet_residuals_are_added_between_compiled_blocks(eager, compiled):
    g = torch.Generator().manual_seed(8)
    extras = DiTExtras(double_residuals=[torch.randn(1, TOKENS, 64, generator=g), None],
                       single_residuals=[None, torch.randn(1, TOKENS, 64, generator=g)])
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        expected, out = eager(**dit_inputs(), extras=extras), compiled(**dit_inputs(), extras=extras)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)


def test_cfg_sampling_equals_eager_with_one_graph_per_block_kind_and_no_recompile(eager, compiled):
    expected, _ = sample(eager)
    before = graphs(DoubleStreamBlock), graphs(SingleStreamBlock)
    # Every step and both CFG branches (their prompts of the same length) through the same two graphs: dynamo
    # raises on any recompile. The CPU attention context is entered around the loop as the pipeline does.
    with torch._dynamo.config.patch(error_on_recompile=True), attention_backend("cpu", torch.float32):
        out, _ = sample(compiled)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    after = graphs(DoubleStreamBlock), graphs(SingleStreamBlock)
    assert after[0] == max(before[0], 1) and after[1] == max(before[1], 1)  # 2 double + 3 single blocks: 2 graphs


def test_tea_cache_skips_the_compiled_blocks_and_equals_eager(eager, compiled):
    expected, expected_stats = sample(eager, tea_cache=1e9)   # skips every step but the first and the last
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, stats = sample(compiled, tea_cache=1e9)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert {b: s.skipped_steps for b, s in stats.items()} == {b: s.skipped_steps for b, s in expected_stats.items()}
    assert stats["positive"].skipped_steps == list(range(1, STEPS - 1)) == stats["negative"].skipped_steps


def test_attention_hooks_and_autograd_run_the_blocks_eagerly(eager, compiled):
    g = torch.Generator().manual_seed(4)
    extra = {"double": torch.randn(1, TOKENS, 64, generator=g), "single": torch.randn(1, TEXT + TOKENS, 64, generator=g)}

    def hook(site, q):   # an IP-Adapter-like hook: before the projection in double blocks, after single blocks
        return extra["double"] if site.kind == "double" else AfterBlock(extra["single"])

    extras = DiTExtras(attention_hooks=(hook,))
    with torch.no_grad():
        expected = eager(**dit_inputs(), extras=extras)
        with pytest.warns(CompileFallbackWarning, match="attention hooks"), \
                torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(**dit_inputs(), extras=extras)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)

    compiled.gradient_checkpointing = eager.gradient_checkpointing = True
    try:
        x = dit_inputs()
        x["img"].requires_grad_(True)
        before = graphs(DoubleStreamBlock), graphs(SingleStreamBlock)
        out = compiled(**x)
        (grad,) = torch.autograd.grad(out.square().sum(), x["img"])
        assert (graphs(DoubleStreamBlock), graphs(SingleStreamBlock)) == before   # nothing compiled for autograd
        y = dit_inputs()
        y["img"].requires_grad_(True)
        (expected_grad,) = torch.autograd.grad(eager(**y).square().sum(), y["img"])
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=ATOL)
    finally:
        compiled.gradient_checkpointing = eager.gradient_checkpointing = False


def block_linears(dit) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in dit.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.slow
def test_lora_hook_mode_is_compiled_and_equals_the_delta_added_by_hand(eager, tmp_path):
    """Traced with aot_eager (the hooks' guards and graphs are dynamo's, whatever the backend; inductor's numerics are
    the other tests'): three inductor compiles of the block graphs cost a minute of CI on two cores."""
    compiled = make_dit()
    compile_dit(compiled, backend="aot_eager")
    pairs = random_pairs(block_linears(eager), seed=5, rank=4, alpha=2.0)
    path = write_kohya(tmp_path / "lora.safetensors", pairs)
    by_hand = copy.deepcopy(eager)
    with torch.no_grad():
        for name, (down, up, alpha) in pairs.items():
            by_hand.get_submodule(name).weight += delta(down, up, alpha).float()
        expected, base = by_hand(**dit_inputs()), eager(**dit_inputs())
        compiled(**dit_inputs())   # the graphs without hooks first
        report = load_lora(compiled, path, hotload=True)
        try:
            assert report.mode == "hook"
            double_graphs = graphs(DoubleStreamBlock)
            # The hooks recompile (dynamo guards on hooks): once, and once more because the first trace fills the
            # hooks' per-dtype cache of LoRA matrices (flux_core.lora._LoraHook._cache), which the graph guards on.
            out = compiled(**dit_inputs())
            filled = compiled(**dit_inputs())
            assert double_graphs < graphs(DoubleStreamBlock) <= double_graphs + 2
            with torch._dynamo.config.patch(error_on_recompile=True):
                again = compiled(**dit_inputs())
        finally:
            clear_lora(compiled)
        with torch._dynamo.config.patch(error_on_recompile=True):   # back to the graph without hooks
            cleared = compiled(**dit_inputs())
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert torch.equal(filled, out) and torch.equal(again, out)
    assert (out - base).abs().max() > 0.1   # the LoRA matters
    torch.testing.assert_close(cleared, base, rtol=0, atol=ATOL)


def test_fused_lora_changes_the_weights_the_graphs_read_without_recompiling(eager, compiled, tmp_path):
    pairs = random_pairs(block_linears(eager), seed=9, rank=4, alpha=2.0)
    path = write_kohya(tmp_path / "fused.safetensors", pairs)
    with torch.no_grad():
        base = compiled(**dit_inputs())   # compiled before the LoRA is fused
        load_lora(eager, path, hotload=False)
        load_lora(compiled, path, hotload=False)
        try:
            expected = eager(**dit_inputs())
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = compiled(**dit_inputs())
        finally:
            clear_lora(eager)
            clear_lora(compiled)
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (out - base).abs().max() > 0.1


@pytest.mark.slow
def test_attention_mask_is_compiled_and_equals_eager(eager, compiled):
    length = TEXT + TOKENS
    mask = torch.rand(1, 1, length, length, generator=torch.Generator().manual_seed(6)) > 0.3
    mask |= torch.eye(length, dtype=torch.bool)   # every query attends somewhere
    before = graphs(DoubleStreamBlock), graphs(SingleStreamBlock)
    with torch.no_grad():
        expected = eager(**dit_inputs(), extras=DiTExtras(attention_mask=mask))
        out = compiled(**dit_inputs(), extras=DiTExtras(attention_mask=mask))
        unmasked = eager(**dit_inputs())
    assert (graphs(DoubleStreamBlock), graphs(SingleStreamBlock)) == (before[0] + 1, before[1] + 1)  # compiled
    torch.testing.assert_close(out, expected, rtol=0, atol=ATOL)
    assert (expected - unmasked).abs().max() > 1e-2


def test_compile_is_idempotent_and_undone(eager):
    dit = copy.deepcopy(eager)
    compile_dit(dit)
    calls = [b._compiled_call_impl for b in [*dit.double_blocks, *dit.single_blocks]]
    compile_dit(dit)
    assert [b._compiled_call_impl for b in [*dit.double_blocks, *dit.single_blocks]] == calls
    assert compile_settings(dit).mode is None
    compile_dit(dit, mode="max-autotune-no-cudagraphs")
    assert compile_settings(dit).mode == "max-autotune-no-cudagraphs"
    uncompile_dit(dit)
    assert not is_compiled(dit) and all(b._compiled_call_impl is None for b in dit.double_blocks)
    for mode in ("fast", "reduce-overhead"):
        with pytest.raises(ValueError, match=f"mode '{mode}' is not one of"):
            compile_dit(dit, mode=mode)


def test_a_vram_managed_dit_is_refused_with_what_to_do(eager):
    dit = copy.deepcopy(eager)
    manager = VRAMManager(SimulatedDevice(), budget=0)
    manager.add("dit", dit, torch.float32)
    with pytest.raises(CompileRefused) as refused:
        compile_dit(dit)
    message = str(refused.value)
    assert "VRAM manager" in message and "vram_limit" in message and "fp8_compute=True" in message
    assert "run without compile" in message
    manager.remove("dit")
    assert state_of(dit).compute is None

    compile_dit(dit)   # compiled first, managed afterwards: the first block call refuses (before any tracing)
    manager.add("dit", dit, torch.float32)
    with torch.no_grad(), pytest.raises(CompileRefused, match="uncompile_dit"):
        dit(**dit_inputs())
    uncompile_dit(dit)
    with torch.no_grad():   # eager under the manager, as before
        torch.testing.assert_close(dit(**dit_inputs()), eager(**dit_inputs()), rtol=0, atol=0)
    manager.remove("dit")


def test_an_offloaded_dit_is_refused(eager):
    dit = copy.deepcopy(eager)
    state_of(dit).offloaded = True
    with pytest.raises(CompileRefused, match="offloaded"):
        compile_dit(dit)


def test_fp8_compute_layers_trace_into_the_block_graphs(eager):
    """flux_core.fp8's Fp8Linear (torch._scaled_mm, on the CPU too) inside compiled blocks: one graph per block kind
    without graph breaks (fullgraph) or recompiles. Traced with aot_eager (the same aten ops, no kernel generation):
    bit-equal to the eager FP8 forward. (With inductor the fused ops round differently, which moves some activations
    across FP8 code boundaries: README gives the measured difference.)"""
    from flux_core.fp8 import enable_fp8_compute

    dit = copy.deepcopy(eager)
    enable_fp8_compute(dit, "cpu")
    with torch.no_grad():
        expected = dit(**dit_inputs())
        compile_dit(dit, backend="aot_eager")
        out = dit(**dit_inputs())
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = dit(**dit_inputs())
    assert torch.equal(out, expected) and torch.equal(again, expected)


@pytest.mark.parametrize("qtype", ["Q8_0", pytest.param("Q4_K", marks=pytest.mark.slow)])
def test_gguf_blocks_trace_into_the_block_graphs(qtype, tmp_path):
    """A GGUF DiT resident on its device (not offloaded): the blocks' dequantisation traces (fullgraph, aot_eager),
    bit-equal to the eager GGUF forward. A file whose blocks mix quantisation types gets a graph per combination."""
    from flux_core.loading.loader import load_model
    from tests.test_gguf import forward, tiny_weights, write_gguf

    path = tmp_path / f"dit-{qtype}.gguf"
    write_gguf(tiny_weights(), path, qtype)
    dit = load_model(path, torch_dtype=torch.float32)
    expected = forward(dit)
    compile_dit(dit, backend="aot_eager")
    out = forward(dit)   # a graph per block kind and quantisation type (guards read each layer's qtype)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = forward(dit)
    assert torch.equal(out, expected) and torch.equal(again, expected)
