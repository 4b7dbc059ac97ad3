"""The SDPA kernel choice per device (flux_core.attention_backend): the table as data, the CPU context bit-equal to
plain SDPA (it must not change numerics), no graph break or recompile around a compiled attention, the report."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from flux_core.attention_backend import attention_backend, backends_for, describe_attention, sdpa_backends
from flux_core.math import attention

CUDNN, FLASH, EFFICIENT, MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

TABLE = [  # device type, compute capability, dtype, masked -> allowed kernels, best first
    ("cuda", (9, 0), BF16, False, (CUDNN, FLASH, EFFICIENT, MATH)),     # H100 / H200
    ("cuda", (10, 0), FP16, False, (CUDNN, FLASH, EFFICIENT, MATH)),    # B200
    ("cuda", (9, 0), BF16, True, (CUDNN, EFFICIENT, MATH)),             # EliGen mask: flash takes none
    ("cuda", (8, 0), BF16, False, (FLASH, EFFICIENT, MATH)),            # A100
    ("cuda", (8, 9), FP16, False, (FLASH, EFFICIENT, MATH)),            # L40S / RTX 4090
    ("cuda", (8, 6), BF16, True, (EFFICIENT, MATH)),
    ("cuda", (9, 0), FP32, False, (EFFICIENT, MATH)),                   # fp32: no flash, no cuDNN
    ("cuda", (7, 5), FP16, False, (EFFICIENT, MATH)),                   # T4: before Ampere
    ("cpu", None, FP32, False, (FLASH, MATH)),
    ("cpu", None, BF16, True, (FLASH, MATH)),
    ("mps", None, FP16, False, None),                                   # torch's own choice
]


@pytest.mark.parametrize("device_type, capability, dtype, masked, expected", TABLE)
def test_choice_table(device_type, capability, dtype, masked, expected):
    assert sdpa_backends(device_type, capability, dtype, masked) == expected


def qkv(dtype, seed=0, length=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, length, 16, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_context_leaves_sdpa_bit_equal(dtype, masked):
    q, k, v = qkv(dtype)
    mask = (torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.3) | torch.eye(24, dtype=bool) \
        if masked else None
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with attention_backend("cpu", dtype, masked):
        inside = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        allowed = enabled_kernels()
    assert torch.equal(inside, plain)
    assert backends_for(torch.device("cpu"), dtype, masked) == (FLASH, MATH)
    assert allowed == {FLASH, MATH} and enabled_kernels() == {CUDNN, FLASH, EFFICIENT, MATH}   # set, then restored


def enabled_kernels() -> set:
    flags = {CUDNN: torch.backends.cuda.cudnn_sdp_enabled, FLASH: torch.backends.cuda.flash_sdp_enabled,
             EFFICIENT: torch.backends.cuda.mem_efficient_sdp_enabled, MATH: torch.backends.cuda.math_sdp_enabled}
    return {kernel for kernel, enabled in flags.items() if enabled()}


def test_no_graph_break_or_recompile_around_compiled_attention():
    q, k, v = qkv(FP32)
    fn = torch.compile(lambda q, k, v: attention(q, k, v, pe=None), fullgraph=True, dynamic=False,
                       backend="aot_eager")
    with attention_backend("cpu", FP32):
        first = fn(q, k, v)   # traced inside the context, as the pipeline's first compiled call is
    with torch._dynamo.config.patch(error_on_recompile=True):
        outside = fn(q, k, v)
        with attention_backend("cpu", FP32):
            inside = fn(q, k, v)
    expected = attention(q, k, v, pe=None)
    assert torch.equal(first, outside) and torch.equal(inside, outside)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)


def test_report_line(monkeypatch):
    assert describe_attention("cpu", FP32) == "attention: flash > math on cpu, float32"
    assert describe_attention(torch.device("cpu"), BF16, masked=True) == \
        "attention: flash > math on cpu, bfloat16, with an attention mask"
    # A CUDA device, as torch.cuda reports an H200 (the CPU test machine has none).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert describe_attention("cuda", BF16) == \
        "attention: cuDNN > flash > efficient > math on cuda:0 (NVIDIA H200, sm_90), bfloat16"
    assert describe_attention("cuda:1", FP32) == "attention: efficient > math on cuda:1 (NVIDIA H200, sm_90), float32"
    assert describe_attention("mps", FP16) == "attention: torch's default on mps, float16"
