"""The VRAM manager's prefetch of streamed units, on the CPU: the same logic as on CUDA, run synchronously on a
simulated device. Outputs bit-equal to streaming without prefetch, every prefetched copy used once and never made
twice, the byte count exact at every module call and within budget + one unit + the prefetch window, the order
relearned when calls differ (TeaCache's skipped steps), and the stream protocol (wait before use, never for a
dropped copy)."""
import gc
import weakref

import pytest
import torch

from flux_core.models.dit import DiTExtras
from flux_core.teacache import TeaCache
from flux_core.vram import ComputeDevice, SimulatedDevice, VRAMManager, store_model
from tests.test_vram import Audit, dit_inputs, make_dit, param_bytes


class CountingDevice(SimulatedDevice):
    """Counts the copies it makes, per source tensor (id of the stored data)."""

    def __init__(self):
        super().__init__()
        self.copies: dict[int, int] = {}

    def put(self, t, dtype):
        out = super().put(t, dtype)
        if out is not t and not self.holds(t):  # a transfer from the storage place (not a cast on the device)
            self.copies[id(t)] = self.copies.get(id(t), 0) + 1
        return out


def managed(dit, device, budget=0, **kw):
    vram = VRAMManager(device, budget, **kw)
    vram.add("dit", dit, torch.float32)
    vram.load_models_to_device(["dit"])
    return vram


def stats_delta(vram, before):
    now = vram.prefetch_stats
    return {k: getattr(now, k) - getattr(before, k) for k in ("issued", "used", "dropped", "missed")}


def snapshot(vram):
    from dataclasses import replace
    return replace(vram.prefetch_stats)


def streamed_calls(dit, vram, inputs, extras=None):
    """(output, number of streamed unit calls) of one forward."""
    before = snapshot(vram)
    out = dit(**inputs, extras=extras)
    d = stats_delta(vram, before)
    return out, d["used"] + d["missed"]


def test_defaults_prefetch_on_cuda_only():
    assert VRAMManager(ComputeDevice("cuda"), 0).prefetch            # where copies overlap compute
    assert not VRAMManager(SimulatedDevice(), 0).prefetch            # host memory: it would only add bytes
    assert VRAMManager(SimulatedDevice(), 0, prefetch=True).prefetch


@pytest.mark.parametrize("fraction", [0.0, 0.4])
def test_prefetch_is_bit_equal_exact_in_bytes_and_copies_each_tensor_once(fraction):
    inputs = dit_inputs()
    dit = make_dit()
    expected = dit(**inputs)
    budget = int(param_bytes(dit) * fraction)

    plain_device = CountingDevice()
    plain = managed(dit, plain_device, budget, prefetch=False)
    plain_device.copies.clear()  # count the calls' copies, not those that made units resident
    assert torch.equal(dit(**inputs), expected)
    copies_per_call = sum(plain_device.copies.values())
    plain.remove("dit")

    device = CountingDevice()
    vram = managed(dit, device, budget, prefetch=True)
    window = vram.prefetch_window_bytes()
    assert window > 0
    device.copies.clear()
    audit = Audit(dit, vram, device)  # resident_bytes == bytes alive on the device, before and after every module
    calls = 3
    for call in range(calls):
        before = snapshot(vram)
        assert torch.equal(dit(**inputs), expected), call
        d = stats_delta(vram, before)
        if call == 0:  # learning the order: nothing to predict from yet
            assert d["issued"] == d["used"] == 0
        if call == 2:  # learned: every streamed call found its copy ready (the first one prefetched by the last call)
            assert d["missed"] == 0 and d["dropped"] == 0 and d["used"] == d["issued"] > 0  # steady state
    audit.remove()
    # Every tensor was copied once per call, prefetched or not (a prefetched copy is used, not made again), plus the
    # copies the last call prefetched for the next one (the order wraps around from the final layer to img_in).
    ahead = {id(home) for p in vram._prefetched.values() for home in _homes(vram, p)}
    assert ahead and sum(device.copies.values()) == calls * copies_per_call + len(ahead)
    assert all(n == calls + (key in ahead) for key, n in device.copies.items())
    assert audit.max_seen <= budget + vram.largest_unit_bytes() + window
    assert audit.max_seen > budget + vram.largest_unit_bytes() // 4  # prefetches do hold memory
    vram.load_models_to_device([])  # the stage ends: prefetched copies are dropped and freed
    gc.collect()
    assert vram.resident_bytes == device.live_bytes == 0 and not vram._prefetched


def _homes(vram, fetched):
    """The stored tensors a prefetch copied."""
    stored = vram.models["dit"].stored
    return [stored[i] for i in fetched.copies]


def test_window_bounds_what_is_held_ahead():
    inputs = dit_inputs()
    dit = make_dit()
    small = managed(dit, SimulatedDevice(), 0, prefetch=True, prefetch_bytes=1)  # one unit ahead at a time
    held = []
    handles = [m.register_forward_pre_hook(lambda *a: held.append(
        (len(small._prefetched), sum(p.nbytes for p in small._prefetched.values())))) for m in dit.modules()]
    for _ in range(2):
        dit(**inputs)
    for h in handles:
        h.remove()
    largest = max(small._copy_bytes(u) for u in small.models["dit"].units)
    assert max(n for n, _ in held) == 1 and max(b for _, b in held) <= largest == small.prefetch_window_bytes()
    # Still ahead of every call: the first forward learns (53 streamed calls), the second misses only its first unit.
    assert small.prefetch_stats.missed == 53 + 1 and small.prefetch_stats.used == 52


def test_fp8_storage_prefetches_fp8_bytes_and_casts_on_the_device():
    inputs = dit_inputs(torch.bfloat16)
    reference = store_model(make_dit(dtype=torch.bfloat16), weight_dtype=torch.float8_e4m3fn)
    vram = VRAMManager(SimulatedDevice(), 0, prefetch=False)
    vram.add("dit", reference, torch.bfloat16)
    vram.load_models_to_device(["dit"])
    expected = reference(**inputs)
    vram.remove("dit")
    device = SimulatedDevice()
    vram = VRAMManager(device, 0, prefetch=True)
    vram.add("dit", reference, torch.bfloat16)
    vram.load_models_to_device(["dit"])
    for _ in range(3):
        assert torch.equal(reference(**inputs), expected)
    qkv = next(u for u in vram.models["dit"].units if u.name == "double_blocks.1.img_attn.qkv")
    assert vram._copy_bytes(qkv) == qkv.module.weight.numel() + qkv.module.bias.numel() * 2  # fp8 + bf16 bias
    assert vram.prefetch_stats.used > 0
    assert vram.peak_bytes <= vram.largest_unit_bytes() + vram.prefetch_window_bytes()


def test_order_is_relearned_when_calls_differ_teacache_skips():
    inputs = dit_inputs()
    dit = make_dit()
    expected = dit(**inputs)
    cache = TeaCache(num_inference_steps=10, rel_l1_thresh=100.0)
    dit(**inputs, extras=DiTExtras(tea_cache=cache))  # step 0 computes and stores the residual (unmanaged)
    skipped_expected = dit(**inputs, extras=DiTExtras(tea_cache=TeaCache(10, None)))  # what a skip reuses: the same
    device = SimulatedDevice()
    vram = managed(dit, device, 0, prefetch=True)

    def full():
        out, n = streamed_calls(dit, vram, inputs)
        assert torch.equal(out, expected)
        return n

    def skip():
        before = cache.stats.skipped_steps[:]
        out, n = streamed_calls(dit, vram, inputs, DiTExtras(tea_cache=cache))
        assert len(cache.stats.skipped_steps) == len(before) + 1  # the blocks were skipped
        assert torch.allclose(out, skipped_expected, atol=1e-5)
        return n

    n_skip = skip()        # the manager's first call runs only the embedders, one modulation and the final layer
    n_full = full()
    assert n_skip == 11 and n_full == 53  # 8 embedder layers, 1 modulation, 2 final-layer ones; and all 53 units
    before = snapshot(vram)
    full()                 # the whole order is known now
    d = stats_delta(vram, before)
    assert d["missed"] == 0 and d["dropped"] == 0 and d["used"] == n_full
    before = snapshot(vram)
    skip()                 # a skip after full calls: the predicted blocks are not called; dropped, not kept
    d = stats_delta(vram, before)
    assert d["missed"] >= 1 and d["dropped"] >= 1
    full()                 # relearns the full order at the one place it changed
    before = snapshot(vram)
    full()
    d = stats_delta(vram, before)
    assert d["missed"] == 0 and d["dropped"] == 0 and d["used"] == n_full
    vram.load_models_to_device([])
    gc.collect()
    assert vram.resident_bytes == device.live_bytes == 0


class StreamLikeDevice(SimulatedDevice):
    """Prefetches return a token that must be waited on (with every copy) before the copies are read."""

    def __init__(self):
        super().__init__()
        self.pending: dict[int, list] = {}   # token -> weak references to its copies, not yet waited on
        self.waited: list[int] = []
        self.tokens = 0

    def prefetch(self, tensors):
        copies, _ = super().prefetch(tensors)
        self.tokens += 1
        self.pending[self.tokens] = [weakref.ref(c) for c in copies]
        return copies, self.tokens

    def wait(self, copies, ready):
        assert ready in self.pending, "waited twice, or on a token never issued"
        refs = self.pending.pop(ready)
        copies = list(copies)
        assert len(copies) == len(refs) and all(r() is c for r, c in zip(refs, copies))  # all of its copies, exactly
        self.waited.append(ready)

    def put(self, t, dtype):
        for refs in self.pending.values():  # reading a prefetched copy before its wait: a race on CUDA
            assert all(r() is not t for r in refs)
        return super().put(t, dtype)


def test_copies_are_waited_on_once_before_use_and_dropped_ones_never():
    inputs = dit_inputs()
    dit = make_dit()
    expected = dit(**inputs)
    device = StreamLikeDevice()
    vram = managed(dit, device, 0, prefetch=True)
    cache = TeaCache(num_inference_steps=10, rel_l1_thresh=100.0)
    for extras in (None, None, DiTExtras(tea_cache=cache), DiTExtras(tea_cache=cache), None):
        dit(**inputs, extras=extras)
    assert torch.equal(dit(**inputs), expected)
    st = vram.prefetch_stats
    assert len(device.waited) == st.used > 0 and st.dropped > 0
    assert len(device.pending) == len(vram._prefetched) + st.dropped  # dropped copies were never waited on
