"""IP-Adapter, its image encoder and InfiniteYou's projector under low-VRAM running (issue 11 §3: "Both go through the
VRAM manager (offload/FP8) with their bytes accounted; the image encoder is freed after encoding when memory is
short").

On a simulated compute device (flux_core.vram.SimulatedDevice, whose byte count follows what is actually alive):
enable_vram_management manages the slots `ipadapter_image_encoder`, `ipadapter` and `image_proj_model`; each is moved
in only for its own stage (encode the reference images; make the keys/values; project the face embedding) and holds
nothing on the device in the stages after it (the image encoder is freed before the IP-Adapter's stage and the DiT's);
the manager's count equals what is alive at every module call; a budget bounds them and streams the rest; results
equal the unmanaged run. Per-config FP8 storage (ModelConfig(offload_dtype=torch.float8_e4m3fn)) computes like the
same fp8-rounded weights run plainly, for SigLIP + InstantX, CLIP + XLabs and the InfiniteYou projector."""
from __future__ import annotations

import copy
import gc
import types

import pytest
import torch
from PIL import Image

from flux_core import ControlNetInput
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.vram import GiB, SimulatedDevice, compute_place
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_ipadapter import (face_embedding, instantx_state_dict, make_clip_vision, make_siglip,
                                  projector_state_dict, reference_image, write_instantx, write_projector, write_siglip,
                                  write_xlabs, xlabs_state_dict)
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

E4M3 = torch.float8_e4m3fn
H, W = 48, 64
SIGMAS = [1.0, 0.6, 0.3]
ENCODER, ADAPTER, PROJECTOR, INFUSENET = "ipadapter_image_encoder", "ipadapter", "image_proj_model", "controlnet.models.0"
ADAPTER_SLOTS = (ENCODER, ADAPTER, PROJECTOR)


def run_args(**overrides) -> dict:
    """True CFG (the adapter makes keys/values for both branches), two reference images, decoded to an image."""
    latents = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    args = dict(prompt="a cat", negative_prompt="blurry", cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS,
                latents=latents, embedded_guidance=3.5, t5_sequence_length=16, progress_bar_cmd=None,
                output_type="np", ipadapter_images=[reference_image(1), reference_image(2, (30, 50))],
                ipadapter_scale=0.8)
    return {**args, **overrides}


def identity_args(**overrides) -> dict:
    args = run_args(ipadapter_images=None, controlnet_inputs=[ControlNetInput(image=Image.new("RGB", (W, H)),
                                                                              processor_id="None")],
                    infinityou_id_embedding=face_embedding(4), infinityou_guidance=1.5)
    return {**args, **overrides}


def stored_bytes(model) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])


def round_matrices(sd: dict, dtype=E4M3) -> dict:
    """Tensors of 2+ dims rounded through `dtype` (torch's cast), as FP8 storage holds them (flux_core.vram.is_matrix:
    biases and norm scales keep the compute dtype)."""
    return {k: (round_matrices(v, dtype) if isinstance(v, dict) else
                v.to(dtype).float() if v.is_floating_point() and v.dim() >= 2 else v) for k, v in sd.items()}


def rounded_model(model, dtype=E4M3):
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dtype).float())
    return rounded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ipvram")
    make_diffusers_pipeline(tmp)
    siglip, clip = make_siglip(seed=5), make_clip_vision(seed=6)
    write_siglip(siglip, tmp / "siglip")
    write_siglip(rounded_model(siglip), tmp / "siglip-fp8-rounded")
    clip.save_pretrained(tmp / "clip-vision")
    rounded_model(clip).save_pretrained(tmp / "clip-vision-fp8-rounded")
    instantx, xlabs, projector = instantx_state_dict(seed=7), xlabs_state_dict(seed=8), projector_state_dict(seed=9)
    write_instantx(instantx, tmp / "ip-adapter.bin")
    write_instantx(round_matrices(instantx), tmp / "ip-adapter-fp8-rounded.bin")
    write_xlabs(xlabs, tmp / "flux-ip-adapter.safetensors")
    write_xlabs(round_matrices(xlabs), tmp / "flux-ip-adapter-fp8-rounded.safetensors")
    write_projector(projector, tmp / "image_proj_model.bin")
    write_projector(round_matrices(projector), tmp / "image_proj_model-fp8-rounded.bin")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=10, num_layers=1, num_single_layers=1), tmp / "infusenet")

    def pipeline(*names, fp8=()) -> FluxImagePipeline:
        """The tiny FLUX folder and the named adapter files; those also in `fp8` stored as float8_e4m3fn."""
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(tmp / FOLDER_NAME)),
            *[ModelConfig(path=str(tmp / n), offload_dtype=E4M3 if n in fp8 else None) for n in names]])

    instantx_files, identity_files = ("ip-adapter.bin", "siglip"), ("image_proj_model.bin", "infusenet")
    return types.SimpleNamespace(
        pipeline=pipeline, instantx_files=instantx_files, identity_files=identity_files,
        unmanaged=pipeline(*instantx_files)(**run_args()),
        unmanaged_identity=pipeline(*identity_files)(**identity_args()))


def placed_on_device(vram, slot) -> int:
    """Bytes a managed model has on the compute device now: resident copies and copies in flight for a call."""
    placed = vram.models[slot]
    return (sum(t.untyped_storage().nbytes() for t in placed.resident.values())
            + sum(u.in_flight for u in placed.units))


class StageProbe:
    """Snapshots of the manager at the start of the image encoder's, the IP-Adapter's (its projector, then its block
    layers), the InfiniteYou projector's, the ControlNet's and every DiT block's calls; at every module call of those
    models, checks that the manager's count equals what is alive on the simulated device, and that the tensors a
    running module reads are on the device (for modules that read a child's weights themselves, the child's too).
    These hooks are registered after the manager's, so its placement is done when they run."""

    READS_CHILDREN = ("MultiheadAttention", "SiglipVisionEmbeddings", "CLIPVisionEmbeddings")

    def __init__(self, pipe: FluxImagePipeline, device: SimulatedDevice):
        self.pipe, self.vram, self.device = pipe, pipe.vram, device
        self.seen: dict[str, list[dict]] = {}
        self.max_seen, self.checks, self.handles = 0, 0, []
        watched = {ENCODER: pipe.ipadapter_image_encoder, ADAPTER: pipe.ipadapter, PROJECTOR: pipe.image_proj_model,
                   "dit": pipe.dit, INFUSENET: pipe.controlnet.models[0] if len(pipe.controlnet) else None}
        if pipe.ipadapter is not None:
            self.stage("ipadapter.projector", pipe.ipadapter.image_proj)
            self.stage("ipadapter.blocks", pipe.ipadapter.ipadapter_modules[0].to_k_ip)
        for name, model in watched.items():
            if model is None:
                continue
            if name == "dit":
                for block in [*model.double_blocks, *model.single_blocks]:
                    self.stage("dit", block)
            elif name != ADAPTER:
                self.stage(name, model)
            for module in model.modules():
                self.handles.append(module.register_forward_pre_hook(lambda m, a: self.check(m)))
                self.handles.append(module.register_forward_hook(lambda m, a, o: self.check(None)))

    def stage(self, name, module):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, a: self.seen.setdefault(name, []).append(self.snapshot())))

    def snapshot(self) -> dict:
        return dict(resident_bytes=self.vram.resident_bytes, live_bytes=self.device.live_bytes,
                    on_device={slot: placed_on_device(self.vram, slot) for slot in self.vram.models},
                    resident_models={n for n, m in self.vram.models.items() if m.resident})

    def check(self, module):
        assert self.vram.resident_bytes == self.device.live_bytes
        if module is not None:
            reads = module.parameters(recurse=type(module).__name__ in self.READS_CHILDREN)
            assert all(self.device.holds(p) for p in reads), f"{type(module).__name__} runs on weights off the device"
        self.max_seen = max(self.max_seen, self.vram.resident_bytes)
        self.checks += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def run_managed(pipe, device, **args):
    probe = StageProbe(pipe, device)
    try:
        return pipe(**args), probe
    finally:
        probe.remove()


# --------------------------------------------------------------------------------------------------- IP-Adapter
def test_ipadapter_and_encoder_are_managed_and_each_moves_in_only_for_its_stage(tiny):
    """No budget limit: the encoder is wholly resident while it encodes, then freed (nothing of it on the device)
    before the IP-Adapter's stage; the IP-Adapter is resident while it makes the keys/values, then moved out for the
    DiT. The counts are exactly each model's stored bytes."""
    pipe = tiny.pipeline(*tiny.instantx_files)
    encoder_bytes, adapter_bytes = stored_bytes(pipe.ipadapter_image_encoder), stored_bytes(pipe.ipadapter)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(device=device)
    assert {ENCODER, ADAPTER} <= set(vram.models)
    for slot, model in ((ENCODER, pipe.ipadapter_image_encoder), (ADAPTER, pipe.ipadapter)):
        assert vram.models[slot].model is model and f"  {slot}: " in vram.summary()
        assert compute_place(model) == (torch.device("cpu"), torch.float32)
    got, probe = run_managed(pipe, device, **run_args())
    # Measured 0 (the same float32 weights, only moved). The bound catches the IP-Adapter at scale 0.8 vs 0.81
    # (moves the image by 1.6e-4 here); leaving it out moves it by 0.1.
    assert abs(got - tiny.unmanaged).max() <= 1e-5

    (encoding,) = probe.seen[ENCODER]  # one call for both reference images
    assert encoding["resident_models"] == {ENCODER}
    assert encoding["resident_bytes"] == encoding["live_bytes"] == encoder_bytes
    for seen in probe.seen["ipadapter.projector"] + probe.seen["ipadapter.blocks"]:
        assert seen["resident_models"] == {ADAPTER}
        assert seen["on_device"][ENCODER] == 0  # the encoder is freed after encoding
        assert seen["resident_bytes"] == seen["live_bytes"] == adapter_bytes
    assert len(probe.seen["ipadapter.projector"]) == 2  # positive images and the negative branch's zero encoding
    for seen in probe.seen["dit"]:
        assert seen["resident_models"] == {"dit"}
        assert seen["on_device"][ENCODER] == seen["on_device"][ADAPTER] == 0
    assert len(probe.seen["dit"]) == 2 * len(SIGMAS) * 4  # both CFG branches, every step, 2 double + 2 single blocks
    assert probe.checks > 500
    gc.collect()
    assert vram.resident_bytes == device.live_bytes == 0


def test_a_budget_smaller_than_the_encoder_streams_it_and_frees_it(tiny):
    """Memory short: a budget of half the encoder. The encoder is partly resident, partly streamed, within budget +
    one layer; after encoding it holds nothing on the device; the result is the unmanaged one."""
    pipe = tiny.pipeline(*tiny.instantx_files)
    encoder_bytes = stored_bytes(pipe.ipadapter_image_encoder)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=(encoder_bytes // 2) / GiB, vram_buffer=0.0, device=device)
    got, probe = run_managed(pipe, device, **run_args())
    assert abs(got - tiny.unmanaged).max() <= 1e-5  # measured 0, as above
    (encoding,) = probe.seen[ENCODER]
    placed = vram.models[ENCODER]
    assert 0 < encoding["resident_bytes"] == encoding["live_bytes"] <= vram.budget
    assert placed.streamed  # the rest streamed (listed now: nothing of it is resident after its stage)
    for seen in probe.seen["ipadapter.blocks"] + probe.seen["dit"]:
        assert seen["on_device"][ENCODER] == 0
    limit = vram.budget + vram.largest_unit_bytes()
    assert probe.max_seen <= limit and vram.peak_bytes <= limit and device.peak_bytes <= limit


def test_minimum_memory_streams_encoder_and_adapter_layer_by_layer(tiny):
    pipe = tiny.pipeline(*tiny.instantx_files)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=0, device=device)
    got, probe = run_managed(pipe, device, **run_args())
    assert abs(got - tiny.unmanaged).max() <= 1e-5  # measured 0, as above
    for stage in (ENCODER, "ipadapter.projector"):  # modules owning no weights: nothing is on the device
        assert all(seen["resident_bytes"] == seen["live_bytes"] == 0 for seen in probe.seen[stage]), stage
    first_block = pipe.ipadapter.ipadapter_modules[0].to_k_ip.weight
    for seen in probe.seen["ipadapter.blocks"]:  # a streamed layer: only its own weight, in flight for its call
        assert seen["resident_bytes"] == seen["live_bytes"] == first_block.numel() * 4
    # One layer at a time; CLIP's text embeddings module also holds its position-id buffer (616 bytes) while its child
    # runs, as SigLIP's vision embeddings hold theirs.
    assert 0 < vram.peak_bytes <= vram.largest_unit_bytes() + 77 * 8


# --------------------------------------------------------------------------------------------------- InfiniteYou
def test_infiniteyou_projector_is_managed_and_moved_out_before_the_dit(tiny):
    pipe = tiny.pipeline(*tiny.identity_files)
    projector_bytes = stored_bytes(pipe.image_proj_model)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(device=device)
    assert PROJECTOR in vram.models and f"  {PROJECTOR}: " in vram.summary()
    got, probe = run_managed(pipe, device, **identity_args())
    # Measured 0; the identity left out (embedding of another face) moves the image by more than 1e-3.
    assert abs(got - tiny.unmanaged_identity).max() <= 1e-5
    (projecting,) = probe.seen[PROJECTOR]
    assert projecting["resident_models"] == {PROJECTOR}
    assert projecting["resident_bytes"] == projecting["live_bytes"] == projector_bytes
    for seen in probe.seen[INFUSENET] + probe.seen["dit"]:
        assert seen["resident_models"] == {"dit", INFUSENET} and seen["on_device"][PROJECTOR] == 0
    other = pipe(**identity_args(infinityou_id_embedding=face_embedding(5)))
    assert abs(other - got).max() > 1e-3


# --------------------------------------------------------------------------------------------------- FP8 storage
@pytest.mark.slow  # 30 s: nine pipeline loads and runs
@pytest.mark.parametrize("files, rounded, args", [
    (("ip-adapter.bin", "siglip"), ("ip-adapter-fp8-rounded.bin", "siglip-fp8-rounded"), run_args),
    (("flux-ip-adapter.safetensors", "clip-vision"),
     ("flux-ip-adapter-fp8-rounded.safetensors", "clip-vision-fp8-rounded"), run_args),
    (("image_proj_model.bin",), ("image_proj_model-fp8-rounded.bin",), identity_args),
], ids=["instantx-siglip", "xlabs-clip", "infiniteyou-projector"])
def test_fp8_storage_computes_like_the_rounded_weights(tiny, files, rounded, args):
    """ModelConfig(offload_dtype=float8_e4m3fn) on the adapter files: their weight matrices rest in fp8 (counted as
    stored), compute in float32 through the manager, and give what the fp8-rounded weights give run plainly; then the
    same through enable_vram_management on a simulated device, streamed (vram_limit=0)."""
    extra = ("infusenet",) if args is identity_args else ()
    pipe = tiny.pipeline(*files, *extra, fp8=files)
    slots = [s for s in ADAPTER_SLOTS if getattr(pipe, s) is not None]
    assert set(pipe.vram.models) == set(slots)  # only the offloaded models are managed
    for slot in slots:
        matrices = [p for p in getattr(pipe, slot).parameters() if p.dim() >= 2]
        assert matrices and all(p.dtype == E4M3 for p in matrices)
    got = pipe(**args())

    plain = tiny.pipeline(*rounded, *extra)(**args())
    # Measured 0: fp8 -> float32 is exact, so the per-call cast gives the rounded weights themselves. The bound catches
    # one layer rounded further to bfloat16 (moves the image by about 1e-4 here).
    assert abs(got - plain).max() <= 1e-5
    unrounded = tiny.pipeline(*files, *extra)(**args())
    assert abs(got - unrounded).max() > 1e-4  # the rounding mattered (measured 2.7e-3 for InstantX), so fp8 ran

    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=0, device=device)
    for slot in slots:  # the storage dtype survives enable_vram_management; fp8 bytes are what is counted
        assert all(p.dtype == E4M3 for p in getattr(pipe, slot).parameters() if p.dim() >= 2)
    managed, probe = run_managed(pipe, device, **args())
    assert abs(managed - got).max() <= 1e-5  # measured 0
    # One layer at a time, plus what a module holds while its children run: CLIP's text position ids (77 int64), and
    # the projector's learned latents (a parameter of the projector itself, in flight for its whole call).
    nested = 77 * 8 + (pipe.image_proj_model.latents.numel() * 4 if pipe.image_proj_model is not None else 0)
    assert probe.checks > 100 and vram.peak_bytes <= vram.largest_unit_bytes() + nested


# --------------------------------------------------------------------------------------------------- run cost
def test_ipadapter_keys_values_bytes_match_what_the_adapter_holds(tiny):
    """run_cost.ipadapter_kv_bytes against the keys/values bind_ipadapter actually makes (2 images, both branches);
    and the published InstantX size: 57 blocks x (k, v) x 128 tokens x 3072 x bf16 = 89,653,248 bytes per image and
    branch."""
    from flux_core.ipadapter import bind_ipadapter
    from flux_core.run_cost import ipadapter_kv_bytes
    pipe = tiny.pipeline(*tiny.instantx_files)
    p = pipe.ipadapter.params
    features = torch.randn(2, p.image_embed_dim)
    bound = bind_ipadapter(pipe.ipadapter, features, pipe.dit.num_heads,
                           (pipe.dit.params.depth, pipe.dit.params.depth_single_blocks), branches=("positive", "negative"))
    held = sum(t.untyped_storage().nbytes() for kv in bound.keys_values.values() for pair in kv for t in pair)
    assert ipadapter_kv_bytes(p.num_blocks, p.num_tokens, p.hidden_size, 2, 2, torch.float32) == held
    assert ipadapter_kv_bytes(57, 128, 3072, 1, 1, torch.bfloat16) == 89_653_248


def test_held_bytes_count_with_the_activations(tiny):
    """check_run_cost(held_bytes=...) refuses a run whose activations fit only without the keys/values."""
    from flux_core.run_cost import check_run_cost, dit_activation_bytes
    dit = tiny.pipeline().dit
    tokens = (16, 16)
    activations = dit_activation_bytes(1, sum(tokens), dit.params.hidden_size, dit.params.mlp_ratio, torch.float32)
    device = SimulatedDevice(total_memory=activations + 100)
    args = (dit, device, 1, *tokens, 1, 1, "height=64, width=64", "1 step")
    with pytest.warns(UserWarning):  # over half the (tiny) device: warned, not refused
        check_run_cost(*args, held_bytes=100)
    with pytest.raises(ValueError, match="need about"):
        check_run_cost(*args, held_bytes=101)
