"""GGUF DiT files (city96's ComfyUI-GGUF format): our torch dequantization against the ggml project's reference
(`gguf.quants.dequantize`) for every block type, a tiny DiT read from GGUF against the same DiT given the reference-
dequantized weights, weights kept quantized in memory (and through the VRAM manager), LoRA in hook mode."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import save_file

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model
from flux_core.lora import load_lora
from flux_core.model_state import state_of
from flux_core.models.dit import FluxDiT, FluxParams
from flux_core.quantized import BLOCK_FORMATS, QuantizedLinear, dequantize
from flux_core.vram import SimulatedDevice, VRAMManager
from lora_tools import LoraError
from tests.tiny_dit import dit_inputs
from tests.tiny_lora import write_kohya

# hidden 256 so that every hidden-sized row holds whole K-quant super-blocks; head dim 128 = FLUX's RoPE axes.
PARAMS = FluxParams(in_channels=64, vec_in_dim=256, context_in_dim=256, hidden_size=256, num_heads=2, depth=1,
                    depth_single_blocks=1, axes_dim=(16, 56, 56))
# Types gguf 0.19 can quantize; for the others (K-quants) the blocks are random bytes with sane float16 scales.
QUANTIZABLE = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"}
# Byte offsets of each K-quant block's float16 scale fields, and a size for them that keeps weights near 0.05.
F16_FIELDS = {"Q2_K": ((80, 82), 1e-3), "Q3_K": ((108,), 4e-4), "Q4_K": ((0, 2), 8e-5), "Q5_K": ((0, 2), 4e-5),
              "Q6_K": ((208,), 2e-5)}


def blocks_for(values: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """Raw GGML bytes (rows, bytes per row) of `values` in `qtype`: quantized by gguf where it can, else random
    valid blocks of the same size."""
    if qtype in QUANTIZABLE:
        return quants.quantize(values.astype(np.float32), GGMLQuantizationType[qtype])
    fmt = BLOCK_FORMATS[qtype]
    raw = rng.integers(0, 256, (values.shape[0], values.shape[1] // fmt.block_size * fmt.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.type_size)
    offsets, size = F16_FIELDS[qtype]
    for at in offsets:
        blocks[:, at:at + 2] = rng.uniform(-size, size, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", sorted(BLOCK_FORMATS))
def test_dequantize_equals_the_ggml_reference(qtype):
    rng = np.random.default_rng(len(qtype))
    raw = blocks_for(rng.standard_normal((3, 512)), qtype, rng)
    expected = quants.dequantize(raw, GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw.copy()), qtype, (3, 512))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(expected))  # same float32 operations in the same order: bit-exact


def tiny_weights(seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = FluxDiT(PARAMS).state_dict()
    return {k: torch.randn(v.shape) * 0.05 for k, v in sd.items()}


def write_gguf(sd, path, qtype, arch="flux", prefix="model.diffusion_model."):
    """A GGUF file as city96's converter makes it: weight matrices whose rows hold whole blocks in `qtype`, the rest
    F32 (qtype "F16": every tensor F16). Returns the weights as the reference dequantizer reads them."""
    rng = np.random.default_rng(1)
    writer = GGUFWriter(str(path), arch)
    reference = {}
    for name, value in sd.items():
        array = value.numpy()
        if qtype == "F16":
            writer.add_tensor(prefix + name, array.astype(np.float16))
            reference[name] = torch.from_numpy(array.astype(np.float16).astype(np.float32))
        elif value.dim() == 2 and value.shape[1] % BLOCK_FORMATS[qtype].block_size == 0:
            raw = blocks_for(array, qtype, rng)
            writer.add_tensor(prefix + name, raw, raw_dtype=GGMLQuantizationType[qtype])
            reference[name] = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[qtype]).copy())
        else:
            writer.add_tensor(prefix + name, array)
            reference[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def inputs():
    return dit_inputs(256)


def forward(dit):
    with torch.no_grad():
        return dit(**inputs())


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def weights():
    return tiny_weights()


@pytest.fixture(scope="module")
def original_output(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "dit.safetensors"
    save_file(weights, str(path))
    return forward(load_model(path, torch_dtype=torch.float32))


# Relative output error of the GGUF DiT against the unquantized weights, measured for the types gguf can quantize
# (the K-quant files hold random blocks, so only the comparison above applies to them): Q8_0 0.011, Q5_1 0.080,
# Q5_0 0.088, Q4_1 0.167, Q4_0 0.184, F16 0.00044 (the weights' own rounding is 0.4% for Q8_0 and 7% for Q4_0; two
# blocks deep, the tiny DiT amplifies it about 2.5x). Bounds are 1.5x the measured values; weights read in the
# wrong block order or with wrong scales are unrelated weights: a relative error of about 1.0.
QUANTIZATION_ERROR = {"Q8_0": 0.016, "Q5_1": 0.12, "Q5_0": 0.13, "Q4_1": 0.25, "Q4_0": 0.28, "F16": 7e-4}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q2_K", "F16"])
def test_gguf_dit_matches_the_reference_dequantized_dit(qtype, weights, original_output, tmp_path):
    path = tmp_path / f"flux-{qtype}.gguf"
    reference = write_gguf(weights, path, qtype)
    ours = load_model(path, torch_dtype=torch.float32, kind="dit")
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    if qtype == "F16":
        assert not quantized
    else:
        assert "double_blocks.0.img_attn.qkv" in quantized and quantized["double_blocks.0.img_attn.qkv"].qtype == qtype
        assert all(m.weight.dtype == torch.uint8 for m in quantized.values())  # kept in blocks, not dequantized
        for name, m in quantized.items():
            assert torch.equal(m.dequantized_weight(), reference[name + ".weight"]), name

    plain_path = tmp_path / "dequantized.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(plain_path))
    expected = forward(load_model(plain_path, torch_dtype=torch.float32))
    out = forward(ours)
    # Same weights, same float32 math: measured 0 difference on the CPU (every type). 1e-6 relative allows kernel
    # reordering elsewhere; one wrong block (of hundreds) changes the output by more than 1e-3.
    assert relative(out, expected) <= 1e-6
    if qtype in QUANTIZATION_ERROR:
        assert relative(out, original_output) <= QUANTIZATION_ERROR[qtype]


@pytest.mark.parametrize("qtype, ratio", [("Q4_K", 144 / 256 / 2), ("Q4_0", 18 / 32 / 2), ("Q8_0", 34 / 32 / 2)])
def test_quantized_weights_stay_quantized_in_memory(qtype, ratio, weights, tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(weights, path, qtype)
    ours = load_model(path, torch_dtype=torch.bfloat16, kind="dit")
    quantized = [m for m in ours.modules() if isinstance(m, QuantizedLinear)]
    stored = sum(m.weight.nbytes for m in quantized)
    as_bf16 = sum(m.in_features * m.out_features * 2 for m in quantized)
    assert stored == as_bf16 * ratio  # Q4: 0.281x of bf16, Q8_0: 0.531x

    # Through the VRAM manager the resident count is the quantized bytes (nothing cast on the way in).
    device = SimulatedDevice()
    manager = VRAMManager(device, budget=None)
    manager.add("dit", ours, compute_dtype=torch.bfloat16)
    manager.load_models_to_device(["dit"])
    total = sum(t.nbytes for t in [*ours.parameters(), *ours.buffers()])
    assert manager.resident_bytes == device.live_bytes == total
    plain = load_model(write_plain(weights, tmp_path), torch_dtype=torch.bfloat16)
    # The whole tiny DiT (biases, norms and the few layers whose rows are not whole blocks stay bf16): measured
    # 0.287x of bf16 for Q4_K, 0.284x for Q4_0, 0.533x for Q8_0; dequantizing on load would give 1.0x.
    assert total / sum(t.nbytes for t in plain.parameters()) <= ratio + 0.01
    manager.remove_all()


def write_plain(weights, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(weights, str(path))
    return path


def test_streamed_gguf_dit_computes_the_same(weights, tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(weights, path, "Q4_K")
    ours = load_model(path, torch_dtype=torch.float32)
    expected = forward(ours)
    device = SimulatedDevice()
    manager = VRAMManager(device, budget=0)  # everything streamed: raw blocks copied per call
    manager.add("dit", ours, compute_dtype=torch.float32)
    manager.load_models_to_device(["dit"])
    assert torch.equal(forward(ours), expected)
    assert manager.resident_bytes == device.live_bytes == 0
    manager.remove("dit")
    assert all(m.weight.dtype == torch.uint8 for m in ours.modules() if isinstance(m, QuantizedLinear))


def test_lora_on_gguf_dit_is_hooked_and_exact(weights, tmp_path):
    path = tmp_path / "q.gguf"
    reference = write_gguf(weights, path, "Q8_0")
    ours = load_model(path, torch_dtype=torch.float32)
    manager = VRAMManager(SimulatedDevice(), budget=None)  # managed then released: the layers stay marked
    manager.add("dit", ours, compute_dtype=torch.float32)
    manager.remove("dit")
    g = torch.Generator().manual_seed(5)
    layers = {"double_blocks.0.img_attn.qkv": (768, 256), "single_blocks.0.linear1": (1792, 256)}
    pairs = {n: (torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1, 2.0)
             for n, (o, i) in layers.items()}
    report = load_lora(ours, write_kohya(tmp_path / "lora.safetensors", pairs), alpha=0.8)
    assert report.mode == "hook"
    # The oracle: the dequantized weights plus 0.8 * up @ down * alpha / rank, fused here by hand.
    fused = dict(reference)
    for name, (down, up, alpha) in pairs.items():
        fused[name + ".weight"] = reference[name + ".weight"] + 0.8 * (up @ down) * (alpha / 4)
    plain_path = tmp_path / "fused.safetensors"
    save_file({k: v.contiguous() for k, v in fused.items()}, str(plain_path))
    # measured 3e-8 relative (float32 reassociation of the low-rank path); a missing LoRA differs by ~0.05.
    assert relative(forward(ours), forward(load_model(plain_path, torch_dtype=torch.float32))) <= 1e-6


def test_lora_is_never_fused_into_gguf_blocks(weights, tmp_path):
    # Without the loader's offloaded mark the layers are still hooked (their weights are not floating point),
    # and forcing fusion is refused by name instead of failing inside a matrix product.
    path = tmp_path / "q.gguf"
    write_gguf(weights, path, "Q8_0")
    ours = load_model(path, torch_dtype=torch.float32)
    for m in ours.modules():
        state_of(m).offloaded = False
    g = torch.Generator().manual_seed(6)
    lora = write_kohya(tmp_path / "lora.safetensors",
                       {"double_blocks.0.img_attn.qkv": (torch.randn(4, 256, generator=g), torch.randn(768, 4, generator=g), 4.0)})
    with pytest.raises(LoraError, match="block-quantized"):
        load_lora(ours, lora, hotload=False)
    assert load_lora(ours, lora).mode == "hook"


def test_gguf_of_another_architecture_is_refused(weights, tmp_path):
    path = tmp_path / "t5.gguf"
    write_gguf({"enc.blk.0.attn_q.weight": torch.zeros(4, 32)}, path, "Q8_0", arch="t5encoder", prefix="")
    with pytest.raises(CheckpointError, match="architecture 't5encoder'"):
        load_model(path)


def test_unsupported_gguf_types_are_listed(weights, tmp_path):
    path = tmp_path / "iq.gguf"
    writer = GGUFWriter(str(path), "flux")
    writer.add_tensor("img_in.weight", np.zeros((256, 18 * 2), np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.add_tensor("txt_in.weight", np.zeros((256, 18 * 8), np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"IQ4_NL: 2 tensor\(s\), e.g. img_in.weight"):
        load_model(path)


def test_truncated_gguf_is_refused(weights, tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(weights, path, "Q4_0")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(path)


def test_original_shape_metadata_gives_the_shape(tmp_path):
    # city96's converter flattens some tensors and records the shape as comfy.gguf.orig_shape.<name> (INT32 array).
    from flux_core.loading.files import open_file
    path = tmp_path / "shaped.gguf"
    writer = GGUFWriter(str(path), "flux")
    writer.add_array("comfy.gguf.orig_shape.x.weight", [2, 3, 4])
    writer.add_tensor("x.weight", np.arange(24, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    lazy = open_file(path)["x.weight"]
    assert lazy.shape == (2, 3, 4)
    assert torch.equal(lazy.load(), torch.arange(24, dtype=torch.float32).reshape(2, 3, 4))


def test_pipeline_takes_a_gguf_dit(tmp_path):
    # The path the CLI's --dit and ModelConfig(path=...) take: from_pretrained detects the GGUF file as the DiT.
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    make_diffusers_pipeline(tmp_path)
    folder = tmp_path / FOLDER_NAME
    torch.manual_seed(0)
    params = FluxParams(in_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=256, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=(16, 56, 56))  # text widths of the tiny encoders
    weights = {k: torch.randn(v.shape) * 0.05 for k, v in FluxDiT(params).state_dict().items()}
    reference = write_gguf(weights, tmp_path / "flux1-dev-Q4_K_S.gguf", "Q4_K")
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "dequantized.safetensors"))
    others = [ModelConfig(path=str(folder / part)) for part in ("vae", "text_encoder", "text_encoder_2")]
    tokenizers = dict(tokenizer_1_config=ModelConfig(path=str(folder / "tokenizer")),
                      tokenizer_2_config=ModelConfig(path=str(folder / "tokenizer_2")))
    call = dict(prompt="a cat", height=48, width=64, seed=0, num_inference_steps=2, t5_sequence_length=16,
                progress_bar_cmd=None, output_type="np")
    images = []
    for name in ("flux1-dev-Q4_K_S.gguf", "dequantized.safetensors"):
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", **tokenizers,
                                                 model_configs=[ModelConfig(path=str(tmp_path / name)), *others])
        quantized = isinstance(pipe.dit.double_blocks[0].img_attn.qkv, QuantizedLinear)
        assert quantized == name.endswith(".gguf")
        images.append(pipe(**call))
    assert abs(images[0] - images[1]).max() == 0  # measured: identical (same weights, same float32 math)


def test_streamed_units_of_a_gguf_dit_are_listed(weights, tmp_path):
    # The loader marks quantized layers for LoRA hook mode before any manager sees them; the manager still lists
    # every unit it streams, and leaves those marks in place when the model is removed.
    from flux_core.model_state import state_of
    path = tmp_path / "q.gguf"
    write_gguf(weights, path, "Q4_0")
    ours = load_model(path, torch_dtype=torch.float32)
    manager = VRAMManager(SimulatedDevice(), budget=0)
    placed = manager.add("dit", ours, compute_dtype=torch.float32)
    manager.load_models_to_device(["dit"])
    assert "double_blocks.0.img_attn.qkv" in placed.streamed and len(placed.streamed) == len(placed.units)
    manager.remove("dit")
    assert state_of(ours.double_blocks[0].img_attn.qkv).offloaded
    assert not state_of(ours.double_blocks[0].img_attn.norm.query_norm).offloaded and not state_of(ours).offloaded


def test_dit_loader_node_lists_and_loads_gguf_files(weights, tmp_path, monkeypatch):
    from nodes import comfy_bridge
    from nodes.loaders import FluxCoreDiTLoader

    folder = tmp_path / "models" / "diffusion_models"
    folder.mkdir(parents=True)
    write_gguf(weights, folder / "flux-Q8_0.gguf", "Q8_0")
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(tmp_path / "models"))
    assert comfy_bridge.list_models("diffusion_models") == ["flux-Q8_0.gguf"]
    handle = FluxCoreDiTLoader().load("flux-Q8_0.gguf")[0]
    assert any(isinstance(m, QuantizedLinear) for m in handle.model.module.modules())

    class ComfyFolderPaths:  # ComfyUI's listing filters by its own extensions, which have no .gguf
        def get_filename_list(self, name):
            return []

        def get_folder_paths(self, name):
            return [str(folder)]

    monkeypatch.setattr(comfy_bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(comfy_bridge, "_folder_paths", ComfyFolderPaths())
    assert comfy_bridge.list_models("diffusion_models") == ["flux-Q8_0.gguf"]
    assert comfy_bridge.list_models("loras") == []
