"""ControlNets under low-VRAM running (issue 10, "Low VRAM"): the pipeline puts each ControlNet in the VRAM manager as
slot `controlnet.models.<i>`, loads it with the DiT for the denoise stage and moves it out for the VAE stages. On a
simulated compute device: its bytes are counted (resident and peak, against what is alive on the device), a budget
bounds DiT + ControlNet together, a second ControlNet is a second slot, num_persistent_param_in_dit limits the DiT
only, the result equals the unmanaged run, and FP8 storage of a ControlNet
(ModelConfig(offload_dtype=torch.float8_e4m3fn)) computes through the manager like the same fp8-rounded weights run
plainly, and like diffusers' FluxControlNetPipeline on those weights."""
from __future__ import annotations

import copy
import gc
import types

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import ControlNetInput
from flux_core.math import pack_latents
from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from flux_core.vram import GiB, SimulatedDevice, compute_place
from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline

E4M3 = torch.float8_e4m3fn
H, W = 48, 64
SIGMAS = [1.0, 0.75, 0.5]
SLOT = "controlnet.models.0"
PROMPT = "a cat sitting on a red chair"


def control_image(seed=1):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))


def call_args(**overrides) -> dict:
    """A run with true CFG (the ControlNet runs in both branches), its control map encoded by the VAE (the encode
    stage) and the image decoded (the decode stage)."""
    latents = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    args = dict(prompt=PROMPT, negative_prompt="blurry", cfg_scale=2.0, height=H, width=W, sigmas=SIGMAS,
                latents=latents, embedded_guidance=3.5, t5_sequence_length=16, progress_bar_cmd=None,
                output_type="np", controlnet_inputs=[ControlNetInput(image=control_image(), scale=0.8,
                                                                     processor_id="depth")])
    return {**args, **overrides}


def stored_bytes(model) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])


def rounded_through(model, dtype):
    """A copy of a diffusers model with its weight matrices rounded through `dtype` (torch's own cast), as FP8
    storage holds them; biases and norm scales are not stored in fp8 (flux_core.vram.is_matrix)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() >= 2:
                p.copy_(p.to(dtype).float())
    return rounded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnvram")
    ref = make_diffusers_pipeline(tmp)
    union = make_diffusers_controlnet(seed=11, num_mode=10)
    union_fp8 = rounded_through(union, E4M3)
    write_diffusers_controlnet(union, tmp / "union")
    write_diffusers_controlnet(union_fp8, tmp / "union-fp8-rounded")
    write_diffusers_controlnet(make_diffusers_controlnet(seed=12, num_layers=1, num_single_layers=0), tmp / "plain")
    folder = str(tmp / FOLDER_NAME)

    def pipeline(*controlnets: str, **config) -> FluxImagePipeline:
        """The tiny FLUX folder and the named ControlNets (default: the union one); `config` for the first."""
        first, *others = controlnets or ("union",)
        return FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=folder), ModelConfig(path=str(tmp / first), **config),
            *(ModelConfig(path=str(tmp / name)) for name in others)])

    unmanaged = pipeline()(**call_args())
    return types.SimpleNamespace(ref=ref, union=union, union_fp8=union_fp8, pipeline=pipeline, unmanaged=unmanaged)


class StageProbe:
    """Records, at the start of every ControlNet call, DiT block call and VAE encoder/decoder call, what the manager
    counts and what is alive on the simulated device, and checks the two agree before and after every module call of
    the DiT and the ControlNet (the manager's own units are placed by then: these hooks are registered after its)."""

    def __init__(self, pipe: FluxImagePipeline, device: SimulatedDevice):
        self.pipe, self.vram, self.device = pipe, pipe.vram, device
        self.at_controlnet, self.at_vae, self.max_seen, self.checks = [], [], 0, 0
        nets = list(pipe.controlnet.models)
        self.handles = [pipe.vae.encoder.register_forward_pre_hook(lambda *a: self.at_vae.append(self.snapshot())),
                        pipe.vae.decoder.register_forward_pre_hook(lambda *a: self.at_vae.append(self.snapshot()))]
        self.handles += [net.register_forward_pre_hook(lambda *a: self.at_controlnet.append(self.snapshot()))
                         for net in nets]
        for module in [m for net in nets for m in net.modules()] + list(pipe.dit.modules()):
            self.handles.append(module.register_forward_pre_hook(lambda *a: self.check()))
            self.handles.append(module.register_forward_hook(lambda *a: self.check()))

    def snapshot(self) -> dict:
        """The counts now; the controlnet_* entries are those of the first ControlNet (slot SLOT)."""
        placed = self.vram.models[SLOT]
        net = self.pipe.controlnet.models[0]
        return dict(resident_bytes=self.vram.resident_bytes, live_bytes=self.device.live_bytes,
                    controlnet_resident=len(placed.resident), controlnet_streamed=len(placed.streamed),
                    controlnet_on_device=sum(t.untyped_storage().nbytes() for t in placed.resident.values())
                    + sum(t.untyped_storage().nbytes() for t in net.parameters() if self.device.holds(t)),
                    resident_models={n for n, m in self.vram.models.items() if m.resident})

    def check(self):
        assert self.vram.resident_bytes == self.device.live_bytes
        self.max_seen = max(self.max_seen, self.vram.resident_bytes)
        self.checks += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def run_managed(pipe, device, **args):
    probe = StageProbe(pipe, device)
    try:
        return pipe(**call_args(**args)), probe
    finally:
        probe.remove()


def test_controlnet_slot_is_managed_and_loaded_with_the_dit(tiny):
    """No budget limit: DiT and ControlNet are wholly resident for the denoise stage, and the count is their bytes."""
    pipe = tiny.pipeline()
    dit_bytes, net_bytes = stored_bytes(pipe.dit), stored_bytes(pipe.controlnet.models[0])
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(device=device)  # budget: the device's 16 GiB less 0.5
    assert SLOT in vram.models and vram.models[SLOT].model is pipe.controlnet.models[0]
    assert compute_place(pipe.controlnet.models[0]) == (torch.device("cpu"), torch.float32)
    assert f"  {SLOT}: " in vram.summary()
    got, probe = run_managed(pipe, device)
    # Measured 0 (the same float32 weights, only moved). The bound catches one ControlNet layer run with its weights
    # rounded to bfloat16 (moves the image by 1.9e-4); the ControlNet left out moves it by 1.0.
    assert abs(got - tiny.unmanaged).max() <= 1e-5
    assert len(probe.at_controlnet) == 2 * len(SIGMAS)  # both CFG branches, every step
    for seen in probe.at_controlnet:
        assert seen["resident_models"] == {"dit", SLOT}
        # Exactly the DiT's and the ControlNet's stored bytes: nothing else on the device, nothing missing.
        assert seen["resident_bytes"] == seen["live_bytes"] == dit_bytes + net_bytes
    assert vram.peak_bytes >= dit_bytes + net_bytes and probe.checks > 500
    gc.collect()
    assert vram.resident_bytes == device.live_bytes == 0


def test_budget_bounds_dit_and_controlnet_together(tiny):
    """A budget that holds the DiT and half of the ControlNet: the rest of the ControlNet streams per call, the count
    stays exact and within budget + one layer, and the result is the unmanaged one."""
    pipe = tiny.pipeline()
    dit_bytes, net_bytes = stored_bytes(pipe.dit), stored_bytes(pipe.controlnet.models[0])
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=(dit_bytes + net_bytes // 2) / GiB, vram_buffer=0.0, device=device)
    got, probe = run_managed(pipe, device)
    assert abs(got - tiny.unmanaged).max() <= 1e-5  # measured 0, as above
    for seen in probe.at_controlnet:
        assert seen["resident_models"] == {"dit", SLOT}
        assert seen["controlnet_resident"] and seen["controlnet_streamed"]  # partly resident, partly streamed
        assert dit_bytes < seen["resident_bytes"] == seen["live_bytes"] <= vram.budget
    limit = vram.budget + vram.largest_unit_bytes()
    assert probe.max_seen <= limit and vram.peak_bytes <= limit and device.peak_bytes <= limit


def test_minimum_memory_streams_the_controlnet_layer_by_layer(tiny):
    pipe = tiny.pipeline()
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=0, device=device)
    got, probe = run_managed(pipe, device)
    assert abs(got - tiny.unmanaged).max() <= 1e-5  # measured 0, as above
    units = len(vram.models[SLOT].units)
    for seen in probe.at_controlnet:
        assert seen["resident_bytes"] == seen["live_bytes"] == 0 and seen["controlnet_streamed"] == units
    assert probe.checks > 500 and probe.max_seen > 0  # the ControlNet's layers were counted while they ran
    # One layer at a time; CLIP's embeddings module also holds its position-id buffer (616 bytes) while its child runs.
    assert vram.peak_bytes <= vram.largest_unit_bytes() + 77 * 8


def test_two_controlnets_are_two_slots_loaded_with_the_dit(tiny):
    """A second ControlNet is slot controlnet.models.1: managed, named, counted and loaded with the DiT as the first."""
    args = dict(controlnet_inputs=[*call_args()["controlnet_inputs"],
                                   ControlNetInput(controlnet_id=1, image=control_image(3), scale=1.2)])
    expected = tiny.pipeline("union", "plain")(**call_args(**args))
    pipe = tiny.pipeline("union", "plain")
    slots = {SLOT, "controlnet.models.1"}
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(device=device)
    assert all(f"  {slot}: " in vram.summary() for slot in slots)
    weights = stored_bytes(pipe.dit) + sum(stored_bytes(net) for net in pipe.controlnet.models)
    got, probe = run_managed(pipe, device, **args)
    # Measured 0; the second ControlNet left out moves the image by 0.70.
    assert abs(got - expected).max() <= 1e-5
    assert len(probe.at_controlnet) == 2 * 2 * len(SIGMAS)  # two nets, both CFG branches, every step
    for seen in probe.at_controlnet:
        assert seen["resident_models"] == {"dit", *slots}
        assert seen["resident_bytes"] == seen["live_bytes"] == weights


def test_persistent_dit_params_leave_the_controlnet_resident(tiny):
    """num_persistent_param_in_dit limits the DiT only (DiffSynth's meaning): with 0 the DiT streams layer by layer
    while the ControlNet, like the other models, is wholly resident in its stage."""
    pipe = tiny.pipeline()
    net_bytes = stored_bytes(pipe.controlnet.models[0])
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(num_persistent_param_in_dit=0, device=device)
    got, probe = run_managed(pipe, device)
    assert abs(got - tiny.unmanaged).max() <= 1e-5  # measured 0, as above
    for seen in probe.at_controlnet:
        assert seen["resident_models"] == {SLOT}
        assert seen["resident_bytes"] == seen["live_bytes"] == net_bytes
    assert probe.max_seen <= net_bytes + vram.largest_unit_bytes(["dit"])  # denoising: one DiT layer in flight


def test_controlnet_moves_out_for_the_vae_stages(tiny):
    """The control map is encoded before the denoise stage and the image decoded after it: in both VAE stages the
    ControlNet holds nothing on the device, although it was resident in between."""
    pipe = tiny.pipeline()
    device = SimulatedDevice()
    pipe.enable_vram_management(device=device)
    _, probe = run_managed(pipe, device)
    assert all(seen["controlnet_resident"] for seen in probe.at_controlnet)  # resident while denoising
    assert len(probe.at_vae) == 2  # the control map's encode, the image's decode
    for seen in probe.at_vae:
        assert seen["resident_models"] == {"vae"}
        assert seen["controlnet_resident"] == 0 and seen["controlnet_on_device"] == 0
        assert seen["resident_bytes"] == seen["live_bytes"] == stored_bytes(pipe.vae)


def diffusers_controlnet_run(tiny, controlnet, monkeypatch):
    """diffusers' FluxControlNetPipeline on the same components and call without true CFG (diffusers' true CFG reuses
    the positive branch's residuals in the negative branch; DiffSynth and FluxCore rerun the ControlNet there);
    control latent from the posterior mean (diffusers samples it; DiffSynth and FluxCore use the mean)."""
    from diffusers import FluxControlNetPipeline
    from diffusers.pipelines.flux import pipeline_flux_controlnet
    monkeypatch.setattr(pipeline_flux_controlnet, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    pipe = FluxControlNetPipeline(**tiny.ref.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    args = call_args()
    return pipe(prompt=PROMPT, control_image=args["controlnet_inputs"][0].image, control_mode=2,
                controlnet_conditioning_scale=0.8, height=H, width=W, sigmas=SIGMAS, num_inference_steps=len(SIGMAS),
                latents=pack_latents(args["latents"]), guidance_scale=3.5, max_sequence_length=16,
                output_type="np").images


@pytest.mark.slow  # 16 s: six pipeline runs (one of them diffusers') and two loads
def test_fp8_stored_controlnet_computes_through_the_manager(tiny, monkeypatch):
    """ModelConfig(offload_dtype=float8_e4m3fn): the ControlNet's weight matrices rest in fp8 (its bytes counted as
    stored), compute in float32 through the manager, and give what the fp8-rounded weights give run plainly: by
    FluxCore without a manager, and by diffusers."""
    pipe = tiny.pipeline(offload_dtype=E4M3)
    net = pipe.controlnet.models[0]
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    assert matrices and all(p.dtype == E4M3 for p in matrices)
    assert SLOT in pipe.vram.models and "dit" not in pipe.vram.models  # only the offloaded model is managed
    assert compute_place(net) == (torch.device("cpu"), torch.float32)
    got = pipe(**call_args())

    plain = tiny.pipeline("union-fp8-rounded")(**call_args())
    # Measured 0: fp8 -> float32 is exact, so the manager's per-call cast gives the rounded weights themselves. The
    # bound catches one ControlNet layer rounded further to bfloat16 (1.9e-4, as above).
    assert abs(got - plain).max() <= 1e-5
    # The rounding mattered (measured 0.056 from the unrounded run), so the fp8 weights are what ran.
    assert abs(got - tiny.unmanaged).max() > 1e-3

    expected = diffusers_controlnet_run(tiny, tiny.union_fp8, monkeypatch)
    # Measured 1.0e-6 (float32 summation order); the pipeline bound is 1e-3.
    assert abs(pipe(**call_args(cfg_scale=1.0)) - expected).max() <= 1e-3

    # Also streamed from a simulated device: the count is the fp8 bytes as stored, the result the same.
    device = SimulatedDevice()
    pipe.enable_vram_management(device=device)
    assert all(p.dtype == E4M3 for p in matrices)  # the storage dtype survives enable_vram_management
    dit_bytes, net_bytes = stored_bytes(pipe.dit), stored_bytes(net)
    # Measured 0.268 of the float32 ControlNet (fp8 matrices, float32 biases); bfloat16 storage would be 0.5.
    assert net_bytes < 0.3 * stored_bytes(tiny.union)
    managed, probe = run_managed(pipe, device)
    assert abs(managed - got).max() <= 1e-5  # measured 0
    assert all(seen["resident_bytes"] == seen["live_bytes"] == dit_bytes + net_bytes for seen in probe.at_controlnet)
    vram_min = pipe.enable_vram_management(vram_limit=0, device=SimulatedDevice())
    assert abs(pipe(**call_args()) - got).max() <= 1e-5  # measured 0
    assert vram_min.peak_bytes <= vram_min.largest_unit_bytes() + 77 * 8
