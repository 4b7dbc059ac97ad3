"""LoRA-Fusion-Preview (flux_core.lora.enable_lora_merger, flux_core.models.lora_patcher) against DiffSynth-Studio
2.1.12's own path: its FluxLoraPatcher on a DiT whose linears are its AutoWrappedLinear (enable_lora_hot_loading),
LoRAs hot-loaded by its pipe.load_lora, pipe.enable_lora_merger, and model_fn_flux_image; detection, the pipeline
run, and every refusal."""
from __future__ import annotations

import types
import warnings

import pytest
import torch
from einops import rearrange

from flux_core.loading.files import open_state_dict
from flux_core.loading.loader import detect, load_model
from flux_core.lora import (LoraError, LoraMergerWarning, clear_lora, disable_lora_merger, enable_lora_merger,
                            load_lora, lora_merger_enabled)
from flux_core.models.lora_patcher import FluxLoraPatcher
from flux_core.models.lora_sites import dit_lora_sites
from lora_tools import LoraShapeError
from tests.tiny_dit import diffsynth_state_dict, make_diffusers_dit, write_bfl_dit
from tests.tiny_lora import random_pairs, write_kohya
from tests.tiny_lora_models import diffsynth_patcher, site_pairs, write_site_lora, write_state_dict

FORMATS = ("kohya", "diffusers", "diffsynth")
STRENGTHS = (0.7, -0.4, 1.2)
B, H, W, LT = 1, 6, 8, 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.diffsynth_ref import diffsynth_lora_models
    diffsynth_lora_models()  # skips without diffsynth
    tmp = tmp_path_factory.mktemp("lora_fusion")
    ref = make_diffusers_dit(seed=1)
    their_patcher = diffsynth_patcher(seed=0)
    loras = [write_site_lora(tmp / f"{fmt}.safetensors", fmt, seed=20 + i, alpha=2.0) for i, fmt in enumerate(FORMATS)]
    return types.SimpleNamespace(tmp=tmp, ref=ref, their_patcher=their_patcher, loras=loras,
                                 dit_path=write_bfl_dit(ref, tmp / "dit.safetensors"),
                                 patcher_path=write_state_dict(their_patcher, tmp / "model.safetensors"))


def our_dit(tiny):
    return load_model(tiny.dit_path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")


def our_patcher(tiny):
    return load_model(tiny.patcher_path, torch_dtype=torch.float32, kind="lora_patcher")


def their_pipe(tiny, transformer=None, merger=True, loras=None, strengths=STRENGTHS):
    """DiffSynth's own LoRA-Fusion path: its pipeline's enable_lora_hot_loading (AutoWrappedLinear everywhere),
    load_lora(hotload=True) per LoRA (FluxLoRALoader conversion, alpha into A), enable_lora_merger."""
    from diffsynth.pipelines.flux_image import FluxImagePipeline as TheirPipeline
    from tests.diffsynth_ref import tiny_diffsynth_dit
    dit = tiny_diffsynth_dit()
    dit.load_state_dict(diffsynth_state_dict(transformer or tiny.ref), strict=True)
    pipe = TheirPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = pipe.enable_lora_hot_loading(dit)
    pipe.lora_patcher = tiny.their_patcher
    for path, strength in zip(loras or tiny.loras, strengths):
        pipe.load_lora(pipe.dit, str(path), alpha=strength, hotload=True, verbose=0)
    if merger:
        pipe.enable_lora_merger()
    return pipe


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_layer_merges_three_loras_as_diffsynths_merger_and_lora_forward(tiny):
    """Each of the 26 sites, given the same input: DiffSynth's AutoWrappedLinear (base + its LoraMerger over the three
    hot-loaded LoRAs, kohya / diffusers / DiffSynth files at strengths 0.7, -0.4, 1.2) vs our hooked layer."""
    theirs = their_pipe(tiny)
    dit = our_dit(tiny)
    load_lora(dit, [str(p) for p in tiny.loras], alpha=list(STRENGTHS), hotload=True)
    summed = {}
    g = torch.Generator().manual_seed(0)
    inputs = {s.layer: torch.randn(2, 5, s.in_features, generator=g) for s in dit_lora_sites(dit)}
    with torch.no_grad():
        for site in dit_lora_sites(dit):
            summed[site.layer] = dit.get_submodule(site.layer)(inputs[site.layer])
        enable_lora_merger(dit, our_patcher(tiny))
        worst, moved = 0.0, float("inf")
        for site in dit_lora_sites(dit):
            x = inputs[site.layer]
            expected = theirs.dit.get_submodule(site.name)(x)
            got = dit.get_submodule(site.layer)(x)
            worst = max(worst, relative(got, expected))
            moved = min(moved, relative(summed[site.layer], expected))
    # Measured 1.7e-7 relative at the worst site; the plain sum differs from the merge by at least 1.1 relative there.
    assert worst < 1e-4
    assert moved > 1e-2


def test_a_float32_patcher_merges_a_bfloat16_dits_loras_in_its_own_dtype(tiny):
    """The merger runs in the patcher's compute place and hands back the layer's dtype: a bf16 DiT with a float32
    patcher follows DiffSynth's float32 path within bf16 rounding."""
    theirs = their_pipe(tiny)
    dit = load_model(tiny.dit_path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.bfloat16, kind="dit")
    load_lora(dit, [str(p) for p in tiny.loras], alpha=list(STRENGTHS), hotload=True)
    enable_lora_merger(dit, our_patcher(tiny))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = dit.double_blocks[0].img_attn.qkv(x.bfloat16())
        expected = theirs.dit.blocks[0].attn.a_to_qkv(x)
    assert got.dtype == torch.bfloat16
    # Measured 5.1e-3 relative (bf16 weights and activations); the plain sum is off by > 1 (the float32 test above).
    assert relative(got.float(), expected) < 3e-2


def packed(latents):
    return rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


def ids(h, w):
    from diffusers import FluxPipeline
    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)[None]


def test_dit_forward_with_the_merger_matches_diffsynths_model_fn(tiny):
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    theirs = their_pipe(tiny)
    dit = our_dit(tiny)
    load_lora(dit, [str(p) for p in tiny.loras], alpha=list(STRENGTHS), hotload=True)
    enable_lora_merger(dit, our_patcher(tiny))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(B, 16, H, W, generator=g)
    txt, pooled = torch.randn(B, LT, 32, generator=g), torch.randn(B, 32, generator=g)
    sigma, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    with torch.no_grad():
        expected = packed(model_fn(dit=theirs.dit, latents=latents, timestep=sigma * 1000, prompt_emb=txt,
                                   pooled_prompt_emb=pooled, guidance=guidance, text_ids=torch.zeros(B, LT, 3),
                                   image_ids=ids(H, W)))
        got = dit(img=packed(latents), img_ids=ids(H, W), txt=txt, txt_ids=torch.zeros(B, LT, 3), timesteps=sigma,
                  y=pooled, guidance=guidance)
        disable_lora_merger(dit)
        summed = dit(img=packed(latents), img_ids=ids(H, W), txt=txt, txt_ids=torch.zeros(B, LT, 3), timesteps=sigma,
                     y=pooled, guidance=guidance)
        their_sum = packed(model_fn(dit=their_pipe(tiny, merger=False).dit, latents=latents, timestep=sigma * 1000,
                                    prompt_emb=txt, pooled_prompt_emb=pooled, guidance=guidance,
                                    text_ids=torch.zeros(B, LT, 3), image_ids=ids(H, W)))
    # Measured 4.3e-7 relative (merged) and 4.5e-7 (plain sum, after disable_lora_merger); merge and sum differ by 1.06.
    assert relative(got, expected) < 1e-4
    assert relative(summed, their_sum) < 1e-4
    assert relative(summed, expected) > 1e-2


@pytest.mark.parametrize("prefix", ["", "lora_patcher.", "pipe.lora_patcher."])
def test_detected_as_the_lora_patcher_with_or_without_diffsynths_prefixes(tiny, prefix):
    path = write_state_dict(tiny.their_patcher, tiny.tmp / f"prefixed_{prefix or 'none'}.safetensors", prefix=prefix)
    assert [(d.kind.name, d.layout) for d in detect(open_state_dict([path]))] == [("lora_patcher", "diffsynth")]
    model = load_model(path, torch_dtype=torch.float32)
    assert isinstance(model, FluxLoraPatcher) and len(model.sites) == 26
    key = "blocks___1___ff_b___2"
    assert torch.equal(model.model_dict[key].weight_cross, tiny.their_patcher.model_dict[key].weight_cross)


def test_merger_hooks_later_loras_refuses_fusing_and_survives_clear_lora(tiny):
    dit, patcher = our_dit(tiny), our_patcher(tiny)
    enable_lora_merger(dit, patcher)
    assert lora_merger_enabled(dit)
    with pytest.raises(LoraError, match=r"load_lora\(hotload=False\): the LoRA merger is enabled \(enable_lora_merger\)"
                                        r", and it merges hooked LoRAs only: load with hotload=True"):
        load_lora(dit, str(tiny.loras[0]), hotload=False)
    report = load_lora(dit, [str(p) for p in tiny.loras], alpha=list(STRENGTHS))  # float32: fused without the merger
    assert report.mode == "hook"
    late = our_dit(tiny)  # the same LoRAs with the merger enabled after them
    load_lora(late, [str(p) for p in tiny.loras], alpha=list(STRENGTHS), hotload=True)
    enable_lora_merger(late, patcher)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        assert torch.equal(dit.double_blocks[1].txt_mlp[2](x), late.double_blocks[1].txt_mlp[2](x))
    clear_lora(dit)
    assert lora_merger_enabled(dit)               # as DiffSynth's clear_lora, which leaves lora_merger set
    disable_lora_merger(dit)
    assert not lora_merger_enabled(dit)
    assert load_lora(dit, str(tiny.loras[0])).mode == "fused"


def test_merger_with_fused_loras_is_refused(tiny):
    dit = our_dit(tiny)
    load_lora(dit, str(tiny.loras[0]), hotload=False)
    with pytest.raises(LoraError, match=r"enable_lora_merger: 26 layers hold fused LoRAs \(e.g. double_blocks.0.img_attn"
                                        r".proj, .*\), which cannot be merged.*load the LoRAs again with hotload=True"):
        enable_lora_merger(dit, our_patcher(tiny))
    assert not lora_merger_enabled(dit)


def test_a_patcher_of_another_size_or_with_fewer_blocks_is_refused(tiny, tmp_path):
    dit = our_dit(tiny)
    wide = load_model(write_state_dict(diffsynth_patcher(seed=1, hidden=64, mlp_hidden=256), tmp_path / "w.safetensors"),
                      torch_dtype=torch.float32)
    with pytest.raises(LoraShapeError, match=r"the LoRA-Fusion patcher does not fit this DiT: 26 sites of another size: "
                                             r"blocks.0.attn.a_to_qkv \(patcher 192, DiT 96\), .* \(23 more\)\. It was "
                                             r"made for a model of another size"):
        enable_lora_merger(dit, wide)
    short = load_model(write_state_dict(diffsynth_patcher(seed=1, depth=1, single=1), tmp_path / "s.safetensors"),
                       torch_dtype=torch.float32)
    with pytest.raises(LoraShapeError, match=r"13 sites of the DiT without a patcher module: blocks.1.attn.a_to_qkv, "
                                             r"blocks.1.attn.a_to_out, blocks.1.ff_a.0, ... \(10 more\)"):
        enable_lora_merger(dit, short)
    with pytest.raises(TypeError, match=r"patcher is a Linear; pass the LoRA-Fusion model"):
        enable_lora_merger(dit, torch.nn.Linear(2, 2))


def test_layers_without_a_merger_are_summed_with_a_warning(tiny, tmp_path):
    """A LoRA also on img_in (not a LoRA-Fusion site): DiffSynth leaves that layer's lora_merger unset and sums."""
    pairs = {**site_pairs("kohya", seed=3), **random_pairs({"img_in": (32, 64)}, seed=4)}
    path = write_kohya(tmp_path / "with_img_in.safetensors", pairs)
    dit = our_dit(tiny)
    enable_lora_merger(dit, our_patcher(tiny))
    with pytest.warns(LoraMergerWarning, match=r"1 hooked layers have no LoRA-Fusion merger \(not among its LoRA "
                                               r"sites\): img_in; their LoRAs are summed"):
        load_lora(dit, str(path), alpha=0.5)
    x = torch.randn(3, 64)
    down, up, alpha = pairs["img_in"]
    base = torch.nn.functional.linear(x, dit.img_in.weight, dit.img_in.bias)
    with torch.no_grad():
        # Measured 0 (same operations): base + 0.5 * alpha/rank * x @ down^T @ up^T; a merged layer moves it by O(1).
        assert (dit.img_in(x) - (base + 0.5 * alpha / down.shape[0] * x @ down.T @ up.T)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------- pipeline

H_PX, W_PX = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
RUN = dict(prompt="a cat", height=H_PX, width=W_PX, sigmas=SIGMAS, embedded_guidance=3.5, t5_sequence_length=16,
           output_type="latent", progress_bar_cmd=None)


@pytest.fixture(scope="module")
def pipeline(tiny):
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    ref = make_diffusers_pipeline(tiny.tmp)
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(tiny.tmp / FOLDER_NAME)), ModelConfig(path=str(tiny.patcher_path))])
    return types.SimpleNamespace(ref=ref, pipe=pipe)


def test_from_pretrained_puts_the_patcher_in_its_slot(pipeline):
    assert isinstance(pipeline.pipe.lora_patcher, FluxLoraPatcher)
    assert pipeline.pipe.loaded_from["lora_patcher"].kind == "lora_patcher"


@pytest.mark.slow
def test_pipeline_run_with_the_merger_matches_diffsynths_loop(tiny, pipeline):
    """pipe.load_lora(hotload=True) twice, pipe.enable_lora_merger(), a run over SIGMAS, against DiffSynth's hot-loaded
    DiT with its merger and model_fn_flux_image per step, fed diffusers' prompt encoding of the same tiny encoders."""
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    pipe = pipeline.pipe
    x = torch.randn(1, 16, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(5))
    plain = pipe(latents=x, **RUN)
    try:
        pipe.load_lora(pipe.dit, str(tiny.loras[0]), alpha=0.8, hotload=True)
        pipe.load_lora(pipe.dit, str(tiny.loras[1]), alpha=0.6, hotload=True)
        summed = pipe(latents=x, **RUN)
        pipe.enable_lora_merger()
        got = pipe(latents=x, **RUN)
        pipe.disable_lora_merger()
        assert torch.equal(pipe(latents=x, **RUN), summed)  # back to the plain sum
    finally:
        pipe.clear_lora()
        disable_lora_merger(pipe.dit)
    theirs = their_pipe(tiny, transformer=pipeline.ref.transformer, loras=tiny.loras[:2], strengths=(0.8, 0.6))
    with torch.no_grad():
        emb, pooled, _ = pipeline.ref.encode_prompt(prompt=RUN["prompt"], prompt_2=None, max_sequence_length=16)
        latents, sigmas = x.clone(), SIGMAS + [0.0]
        for step, sigma in enumerate(SIGMAS):
            v = model_fn(dit=theirs.dit, latents=latents, timestep=torch.tensor([sigma * 1000]), prompt_emb=emb,
                         pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]), text_ids=torch.zeros(1, emb.shape[1], 3))
            latents = latents + v * (sigmas[step + 1] - sigma)
    # Measured 1.3e-6 on latents up to 4.6; the merge moves them by 4.3 from the plain sum (random merger weights), and
    # 1.4 from no LoRA.
    assert (got - latents).abs().max().item() < 1e-4
    assert (summed - got).abs().max().item() > 1e-2
    assert (plain - got).abs().max().item() > 1e-2


def test_pipeline_merger_needs_a_patcher(tiny):
    from flux_core.pipeline import FluxImagePipeline
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = our_dit(tiny)
    with pytest.raises(RuntimeError, match=r"cannot enable the LoRA merger: the pipeline has no lora_patcher"):
        pipe.enable_lora_merger()


def test_under_vram_management_the_encoder_and_the_merger_stream_and_give_the_same_run(tiny, pipeline):
    """enable_vram_management with no budget (every layer streamed from the CPU to a simulated device, the LoRA-Encoder
    and the patcher included): the LoRA-Encoder's tokens and the merged LoRAs give the unmanaged run's latents."""
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from flux_core.vram import SimulatedDevice
    from tests.tiny_lora_models import diffsynth_encoder
    from tests.tiny_pipeline import FOLDER_NAME
    encoder = write_state_dict(diffsynth_encoder(seed=3), tiny.tmp / "encoder.safetensors")
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=str(tiny.tmp / FOLDER_NAME)), ModelConfig(path=str(tiny.patcher_path)),
        ModelConfig(path=str(encoder))])
    for path, strength in zip(tiny.loras[:2], (0.8, 0.6)):
        pipe.load_lora(pipe.dit, str(path), alpha=strength, hotload=True)
    pipe.enable_lora_merger()
    x = torch.randn(1, 16, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(6))
    args = dict(latents=x, lora_encoder_inputs=str(tiny.loras[2]), **RUN)
    unmanaged = pipe(**args)
    vram = pipe.enable_vram_management(vram_limit=0, vram_buffer=0, device=SimulatedDevice())
    assert {"lora_encoder", "lora_patcher"} <= set(vram.models)
    managed = pipe(**args)
    # Measured 0: the same float32 operations on copies of the same tensors.
    assert (managed - unmanaged).abs().max().item() < 1e-5
    assert all(not t.is_meta for t in pipe.lora_patcher.parameters())
