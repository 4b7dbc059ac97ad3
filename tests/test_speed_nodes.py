"""FLUX Speed Options (FluxCore): FP8 compute and compile through the sampler node on the tiny models, against the
library's own conversion (flux_core.fp8.enable_fp8_compute on a second copy of the DiT, sampled by the plain node)
and against eager execution; the refusals naming both nodes; the attention-kernel context around the loop.

Compile runs the node's real path (inductor): the tiny DiT's two block graphs compile in about 20 s on two cores
with a cold inductor cache (tests/test_compile.py checks inductor against eager in depth)."""
import contextlib
import logging
from dataclasses import replace

import pytest
import torch

from flux_core.attention_backend import describe_attention
from flux_core.compile import is_compiled
from flux_core.dtypes import FP8_COMPUTE_DTYPE
from flux_core.fp8 import Fp8Linear, enable_fp8_compute
from flux_core.model_state import state_of
from flux_core.models.layers import DoubleStreamBlock, SingleStreamBlock
from flux_core.vram import SimulatedDevice
from nodes import sampler as sampler_nodes
from nodes.sampler import FLUX_LATENT
from nodes import vram_nodes
from nodes.loaders import FluxCoreDiTLoader, FluxCoreTextEncoderLoader, NodeInputError
from nodes.vram_nodes import SPEED_NODE, VRAM_NODE, FluxCoreSpeedOptions, FluxCoreVRAMOptions, VRAMOptions
from tests.test_vram import sample_with
from tests.tiny_comfy import NAMES, make_models_dir


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    models_dir, _ = make_models_dir(tmp_path_factory.mktemp("speed_nodes"))
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    encoders, = FluxCoreTextEncoderLoader().load(NAMES["clip"], NAMES["t5"])
    yield encoders
    mp.undo()


def load_dit():
    """A fresh copy of the tiny DiT (the loader reads the file again: conversions in place stay per copy)."""
    return FluxCoreDiTLoader().load(NAMES["dit"])[0]


def library_fp8(te, cfg=2.0):
    """The reference: the library's conversion on another copy of the DiT, sampled through a plain handle."""
    reference = load_dit()
    assert enable_fp8_compute(reference.model.module, "cpu") == "scaled_mm"
    return sample_with(reference, te, cfg=cfg)


def graphs(block_class) -> int:
    """How many graphs dynamo holds for a block class's forward (what regional compilation compiles)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(block_class.forward.__code__))


def test_fp8_compute_through_the_sampler_equals_the_library_conversion(te, caplog):
    dit = load_dit()
    plain = sample_with(dit, te, cfg=2.0)
    fast, = FluxCoreSpeedOptions().apply(dit, fp8_compute=True, compile=False)
    assert fast.model is dit.model and not dit.fp8_compute  # a new handle on the same module; upstream unchanged
    with caplog.at_level(logging.INFO, logger="FluxCore"):
        got = sample_with(fast, te, cfg=2.0)
    module = dit.model.module
    qkv = module.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == FP8_COMPUTE_DTYPE
    assert module.img_in.weight.dtype == torch.float32  # outside the blocks: kept in its dtype
    assert state_of(module).vram_placement is None       # resident, no VRAMManager
    assert "compute in FP8" in caplog.text and "scaled_mm on cpu" in caplog.text
    assert torch.equal(got, library_fp8(te))
    # FP8 rounding of weights and activations: measured 0.049 relative to float32 (FP8 storage alone by the VRAM
    # node: 0.053, tests/test_vram.py; cfg 1.5 instead of 2 moves it by 0.115).
    relative = ((got - plain).norm() / plain.norm()).item()
    assert 1e-3 < relative < 0.08, relative


def test_fp8_compute_converts_a_managed_dit_outside_its_manager_and_supersedes_fp8_storage(te, monkeypatch):
    device = SimulatedDevice()  # counts the bytes placed "on the device" (the CPU computes)
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    dit = load_dit()
    module = dit.model.module
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=0.0)
    sample_with(offloaded, te)  # now under a VRAMManager
    assert state_of(module).vram_placement is not None
    # fp8 storage asked for too: FP8 compute supersedes it (the blocks are FP8 codes with row scales, the rest stays)
    fp8_offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="fp8_e4m3fn", offload=True, vram_limit=0.0)
    fast, = FluxCoreSpeedOptions().apply(fp8_offloaded, fp8_compute=True, compile=False)
    got = sample_with(fast, te)
    assert isinstance(module.single_blocks[0].linear1, Fp8Linear)
    assert module.img_in.weight.dtype == module.final_layer.linear.weight.dtype == torch.float32
    options, manager = state_of(module).vram_placement
    assert options == VRAMOptions("default", True, 0.0) and manager.resident_bytes == 0
    assert 0 < manager.peak_bytes <= manager.largest_unit_bytes()  # streamed one layer at a time
    # The streamed FP8 layers compute exactly as the resident ones converted by the library.
    expected = library_fp8(te, cfg=1.0)
    assert (got - expected).abs().max() <= 1e-6


def test_compile_through_the_sampler_equals_eager_and_never_leaks_to_another_handle(te, caplog):
    torch._dynamo.reset()  # graphs() counts this test's graphs only
    dit = load_dit()
    module = dit.model.module
    torch.manual_seed(0)
    eager = sample_with(dit, te, cfg=2.0)
    compiled, = FluxCoreSpeedOptions().apply(dit, fp8_compute=False, compile=True)
    # No recompile across the steps and the CFG branches (one graph per block kind).
    with caplog.at_level(logging.INFO, logger="FluxCore"), torch._dynamo.config.patch(error_on_recompile=True):
        got = sample_with(compiled, te, cfg=2.0)
    assert is_compiled(module) and "blocks are compiled" in caplog.text
    assert graphs(DoubleStreamBlock) == graphs(SingleStreamBlock) == 1
    # Compared in the DiT's latent space (the sampler returns raw VAE latents, that / 0.3611 + 0.1159: 2.8x larger
    # numbers). Measured 2.5e-6 in float32 (6.9e-6 in raw units), on a latent of max |x| 5.9.
    difference = (FLUX_LATENT.raw_to_scaled(got) - FLUX_LATENT.raw_to_scaled(eager)).abs().max()
    assert difference <= 1e-5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="FluxCore"):
        again = sample_with(dit, te, cfg=2.0)  # the upstream handle, without compile, on the same module: eager
    assert not is_compiled(module) and torch.equal(again, eager) and "runs eagerly" in caplog.text


def test_compile_with_offload_or_fp8_storage_is_refused_naming_both_nodes(te):
    dit = load_dit()
    module = dit.model.module
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="fp8_e4m3fn", offload=True, vram_limit=4.0)
    with pytest.raises(NodeInputError) as refused:
        FluxCoreSpeedOptions().apply(offloaded, fp8_compute=False, compile=True)
    message = str(refused.value)
    # Every problem at once, both nodes named, and what to change.
    for part in (SPEED_NODE, VRAM_NODE, "input 'compile'", "offload is on", "weight_dtype fp8_e4m3fn",
                 "set compile to false", "turn offload off", "fp8_compute"):
        assert part in message, part
    compiled, = FluxCoreSpeedOptions().apply(dit, fp8_compute=False, compile=True)
    with pytest.raises(NodeInputError, match="offload is on"):  # the other order: VRAM options after Speed
        FluxCoreVRAMOptions().apply(compiled, weight_dtype="default", offload=True, vram_limit=4.0)
    with pytest.raises(NodeInputError, match="weight_dtype fp8_e5m2"):
        FluxCoreVRAMOptions().apply(compiled, weight_dtype="fp8_e5m2", offload=False, vram_limit=0.0)
    # FP8 compute supersedes FP8 storage, so that combination compiles.
    both, = FluxCoreSpeedOptions().apply(dit, fp8_compute=True, compile=True)
    FluxCoreVRAMOptions().apply(both, weight_dtype="fp8_e4m3fn", offload=False, vram_limit=0.0)
    # A handle made without the nodes (an old workflow's options, edited): refused at sampling, nothing placed.
    handle = replace(dit, vram=VRAMOptions("default", True, 4.0), compile=True)
    with pytest.raises(NodeInputError, match="offload is on"):
        sample_with(handle, te)
    assert state_of(module).vram_placement is None and not is_compiled(module)


def test_a_dit_stored_in_fp8_in_place_names_the_reload_when_compiled(te):
    dit = load_dit()
    stored, = FluxCoreVRAMOptions().apply(dit, weight_dtype="fp8_e4m3fn", offload=False, vram_limit=0.0)
    sample_with(stored, te, steps=1)  # converts the module's weight matrices to FP8 in place
    compiled, = FluxCoreSpeedOptions().apply(dit, fp8_compute=False, compile=True)  # options: none in the handle
    with pytest.raises(NodeInputError, match="load the DiT again with weight_dtype default"):
        sample_with(compiled, te, steps=1)


def test_the_denoising_loop_runs_inside_the_attention_backend_logged_once(te, monkeypatch, caplog):
    real = sampler_nodes.attention_backend
    entered, loops = [], []

    @contextlib.contextmanager
    def recording(device, dtype, masked=False):
        with real(device, dtype, masked):
            entered.append((torch.device(device).type, dtype, masked))
            yield
            entered.append("exit")

    def denoise(*args, **kwargs):
        loops.append(len(entered))  # 1: inside the context, before its exit
        return run_denoise(*args, **kwargs)

    run_denoise = sampler_nodes.run_denoise
    monkeypatch.setattr(sampler_nodes, "attention_backend", recording)
    monkeypatch.setattr(sampler_nodes, "run_denoise", denoise)
    monkeypatch.setattr(sampler_nodes, "_REPORTED_ATTENTION", set())
    dit = load_dit()
    with caplog.at_level(logging.INFO, logger="FluxCore"):
        sample_with(dit, te, steps=1)
        sample_with(dit, te, steps=1)
        sample_masked(dit, te)
    assert entered == [("cpu", torch.float32, False), "exit"] * 2 + [("cpu", torch.float32, True), "exit"]
    assert loops == [1, 3, 5]
    logged = [r.getMessage() for r in caplog.records]
    for masked in (False, True):  # once per distinct line
        assert logged.count(f"FluxCoreSampler: {describe_attention('cpu', torch.float32, masked)}") == 1


def sample_masked(dit, te):
    """One step with an EliGen entity on the left half of the image: the run has an attention mask."""
    from nodes.conditioning import FluxCoreTextEncode
    from nodes.eligen_nodes import FluxCoreEliGenEntity
    from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
    latent, = FluxCoreEmptyLatent().generate(64, 48, 1)
    positive, = FluxCoreTextEncode().encode(te, "a cat", 3.5, t5_sequence_length=16)
    mask = torch.zeros(1, 48, 64)
    mask[:, :, :32] = 1
    positive, = FluxCoreEliGenEntity().add(positive, te, "a red cat", mask)
    return FluxCoreSampler().sample(dit, positive, positive, latent, seed=3, steps=1)[0]["samples"]
