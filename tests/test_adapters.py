"""The adapter mechanism: every DiTExtras slot against a reference we did not write (DiffSynth's own forward and its
multi-ControlNet step rule, diffusers' attention mask, DiffSynth's tile worker), per-branch and start/end calls,
and TeaCache with adapters active."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from einops import rearrange

from flux_core.adapters import Contribution, DiTCall, StepRange, apply_adapters, sum_residuals
from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs, run_dit
from flux_core.loading.loader import load_model
from flux_core.models.dit import DiTExtras
from flux_core.sampling import denoise, guided_velocity
from flux_core.teacache import TeaCache
from flux_core.tiled_dit import DiTTiling, tile_boxes, tiled_forward
from tests.tiny_dit import diffusers_forward, make_diffusers_dit, write_bfl_dit

B, H, W, LT = 1, 6, 8, 5  # latent 6x8 -> 3x4 = 12 image tokens
HIDDEN = 32


@pytest.fixture(scope="module")
def reference():
    return make_diffusers_dit(seed=4)


@pytest.fixture(scope="module")
def dit(reference, tmp_path_factory):
    path = write_bfl_dit(reference, tmp_path_factory.mktemp("dit") / "dit.safetensors")
    return load_model(path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")


def packed(latents):
    return rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


def diffsynth_dit(reference):
    from tests.diffsynth_ref import tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    theirs = tiny_diffsynth_dit()
    theirs.load_state_dict(diffsynth_state_dict(reference), strict=True)
    return theirs


def ids(h, w, index=0):
    from diffusers import FluxPipeline
    out = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
    out[..., 0] = index
    return out[None]


def test_residuals_reach_image_tokens_only_as_in_diffsynth(reference, dit):
    """ControlNet residuals after every double and single block, with Kontext reference tokens in the sequence:
    DiffSynth's own forward adds them to the target image tokens only; so must ours."""
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    g = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(B, 16, H, W, generator=g), torch.randn(B, 16, 4, 4, generator=g)
    txt, pooled = torch.randn(B, LT, 32, generator=g), torch.randn(B, 32, generator=g)
    n_img = (H // 2) * (W // 2)
    double = [torch.randn(B, n_img, HIDDEN, generator=g) for _ in range(2)]
    single = [torch.randn(B, n_img, HIDDEN, generator=g) for _ in range(2)]
    sigma, guidance = torch.tensor([0.7]), torch.tensor([3.5])

    def their_controlnet(conditionings, **kwargs):  # DiffSynth calls `controlnet(conditionings, **kwargs)`
        return double, single

    with torch.no_grad():
        expected = model_fn(dit=diffsynth_dit(reference), controlnet=their_controlnet, controlnet_conditionings=[None],
                            latents=latents, timestep=sigma * 1000, prompt_emb=txt, pooled_prompt_emb=pooled,
                            guidance=guidance, text_ids=torch.zeros(B, LT, 3), image_ids=ids(H, W),
                            kontext_latents=packed(ref), kontext_image_ids=ids(4, 4, index=1))
        extras = DiTExtras(ref_tokens=packed(ref), ref_ids=ids(4, 4, index=1), double_residuals=double,
                           single_residuals=single)
        out = dit(img=packed(latents), img_ids=ids(H, W), txt=txt, txt_ids=torch.zeros(B, LT, 3), timesteps=sigma,
                  y=pooled, guidance=guidance, extras=extras)
        plain = dit(img=packed(latents), img_ids=ids(H, W), txt=txt, txt_ids=torch.zeros(B, LT, 3), timesteps=sigma,
                    y=pooled, guidance=guidance, extras=DiTExtras(ref_tokens=packed(ref), ref_ids=ids(4, 4, index=1)))
    expected = packed(expected)
    # Measured 1.9e-6 on outputs up to ~5; the residuals change the output by O(1), and adding them to the reference
    # tokens too (a span to the end of the sequence) moves it by > 0.1.
    assert (out - expected).abs().max().item() < 1e-4
    assert (out - plain).abs().max().item() > 0.1


def test_a_wrong_sized_residual_is_refused(dit):
    g = torch.Generator().manual_seed(0)
    inputs = prepare_dit_inputs(torch.randn(1, 16, H, W, generator=g), 0.5,
                                PromptEmbeds(torch.randn(1, LT, 32), torch.randn(1, 32)), 3.5, torch.float32,
                                DiTExtras(single_residuals=[None, torch.zeros(1, 5, HIDDEN)]))
    with pytest.raises(ValueError, match=r"single block 1 has shape \(1, 5, 32\); it must be \(B, 12, 32\)"):
        run_dit(dit, inputs)


def test_attention_hooks_match_diffsynths_ip_adapter_path(reference, dit):
    """The attention-hook slot carries IP-Adapter: image queries (after QK-norm, before RoPE) attend to extra keys
    and values, scaled, added before the output projection; in single blocks the whole sequence's queries. A test
    hook doing that equals DiffSynth's `ipadapter_kwargs_list` path on the same weights."""
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(B, 16, H, W, generator=g)
    txt, pooled = torch.randn(B, LT, 32, generator=g), torch.randn(B, 32, generator=g)
    kv = {i: (torch.randn(B, 2, 3, 16, generator=g), torch.randn(B, 2, 3, 16, generator=g)) for i in range(4)}
    scale = 0.7

    def hook(site, q):
        k, v = kv[site.index + (2 if site.kind == "single" else 0)]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return scale * rearrange(out, "B H L D -> B L (H D)")

    ip = {i: {"ip_k": k, "ip_v": v, "scale": scale} for i, (k, v) in kv.items()}
    sigma, guidance = torch.tensor([0.4]), torch.tensor([3.5])
    with torch.no_grad():
        expected = model_fn(dit=diffsynth_dit(reference), latents=latents, timestep=sigma * 1000, prompt_emb=txt,
                            pooled_prompt_emb=pooled, guidance=guidance, text_ids=torch.zeros(B, LT, 3),
                            image_ids=ids(H, W), ipadapter_kwargs_list=ip)
        out = dit(img=packed(latents), img_ids=ids(H, W), txt=txt, txt_ids=torch.zeros(B, LT, 3), timesteps=sigma,
                  y=pooled, guidance=guidance, extras=DiTExtras(attention_hooks=(hook,)))
    # Measured 1.4e-6; single-block hooks given pre-RoPE queries differ by 3.9e-2.
    assert (out - packed(expected)).abs().max().item() < 1e-4


def test_attention_mask_matches_diffusers(reference, dit):
    """The attention-mask slot over [text, image] equals diffusers' `attention_mask` in joint_attention_kwargs."""
    g = torch.Generator().manual_seed(2)
    n_img = (H // 2) * (W // 2)
    total = LT + n_img
    mask = torch.rand(1, 1, total, total, generator=g) > 0.3
    mask |= torch.eye(total, dtype=torch.bool)  # every token sees itself: no row is all masked
    x = dict(img=torch.randn(1, n_img, 64, generator=g), img_ids=ids(H, W), txt=torch.randn(1, LT, 32, generator=g),
             txt_ids=torch.zeros(1, LT, 3), timesteps=torch.tensor([0.6]), y=torch.randn(1, 32, generator=g),
             guidance=torch.tensor([3.5]))
    with torch.no_grad():
        expected = reference(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                             timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                             guidance=x["guidance"], joint_attention_kwargs={"attention_mask": mask}).sample
        out = dit(**x, extras=DiTExtras(attention_mask=mask))
    unmasked = diffusers_forward(reference, x)
    # Measured 1.2e-6; the mask changes the output by O(1).
    assert (out - expected).abs().max().item() < 1e-4
    assert (expected - unmasked).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="attention_mask has shape .* over the joint sequence of 5 text"):
        dit(**x, extras=DiTExtras(attention_mask=mask[..., :-1, :-1]))


@dataclass(eq=False)
class RecordingAdapter:
    """A stand-in adapter: records every call it is asked about and contributes within its step range."""
    name: str
    steps: StepRange = field(default_factory=StepRange)
    branches: tuple = ("positive", "negative")
    calls: list = field(default_factory=list)
    residual: float = 0.0

    def contribute(self, inputs, call):
        self.calls.append((call.step, call.branch))
        if call.branch not in self.branches or not self.steps.contains(call):
            return None
        n = inputs.img.shape[1]  # not a constant: the next block's LayerNorm would remove a constant vector
        noise = torch.randn(inputs.batch, n, HIDDEN, generator=torch.Generator().manual_seed(7))
        return Contribution(self.name, double_residuals=[noise * self.residual])


@pytest.mark.parametrize("num_steps", [1, 2, 5, 8])
@pytest.mark.parametrize("start,end", [(1.0, 0.0), (1.0, 0.5), (0.6, 0.2), (0.3, 0.0), (0.5, 0.5)])
def test_step_ranges_follow_diffsynths_multi_controlnet(num_steps, start, end):
    """Which steps an input is active in, against DiffSynth's own MultiControlNet loop."""
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet

    class Counter(torch.nn.Module):
        def forward(self, controlnet_conditioning, processor_id=None, **kwargs):
            return [torch.ones(1)], [torch.ones(1)]

    theirs = MultiControlNet([Counter()])
    expected = [theirs([None], [TheirInput(start=start, end=end)], progress_id=i, num_inference_steps=num_steps)[0]
                is not None for i in range(num_steps)]
    ours = [StepRange(start, end).contains(DiTCall(step=i, num_steps=num_steps)) for i in range(num_steps)]
    assert ours == expected


def test_adapters_are_asked_per_step_and_branch(dit):
    """Under true CFG every adapter is asked for both branches at every step; one limited to the positive branch
    changes only that branch."""
    prompt = PromptEmbeds(torch.randn(1, LT, 32), torch.randn(1, 32))
    adapter = RecordingAdapter("test", branches=("positive",), residual=0.5)
    x = torch.randn(1, 16, H, W)
    with torch.no_grad():
        denoise(x, torch.tensor([1.0, 0.6, 0.3]),
                lambda lat, call: guided_velocity(dit, lat, call, prompt, prompt, 2.0, 3.5, adapters=[adapter]))
        assert adapter.calls == [(i, b) for i in range(3) for b in ("positive", "negative")]
        posi_only = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, prompt, 2.0, 3.5, adapters=[adapter])
        both = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, prompt, 2.0, 3.5,
                               adapters=[RecordingAdapter("both", residual=0.5)])
        plain = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, prompt, 2.0, 3.5)
    # Equal residuals on both branches cancel in nega + cfg (posi - nega) only for the difference term: the three
    # runs must all differ (a branch filter that is ignored would make posi_only equal to both).
    assert (posi_only - both).abs().max() > 1e-3 and (both - plain).abs().max() > 1e-3


def test_contributions_merge_by_slot():
    a, b = torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)
    assert [t.tolist() if t is not None else None for t in sum_residuals([a, None], [b, b, None])] == \
        [(a + b).tolist(), b.tolist(), None]
    inputs = prepare_dit_inputs(torch.zeros(1, 16, 4, 4), 0.5, PromptEmbeds(torch.zeros(1, 3, 32), torch.zeros(1, 32)),
                                None, torch.float32)

    class Fixed:
        def __init__(self, c):
            self.c = c

        def contribute(self, inputs, call):
            return self.c

    new_txt = torch.ones(1, 7, 32)
    mask = torch.ones(1, 1, 11, 11, dtype=torch.bool)
    out = apply_adapters(inputs, [Fixed(Contribution("text", txt=new_txt, txt_ids=torch.zeros(1, 7, 3))),
                                  Fixed(Contribution("flex", extra_channels=torch.ones(1, 4, 2))),
                                  Fixed(Contribution("flex2", extra_channels=torch.zeros(1, 4, 1))),
                                  Fixed(Contribution("eligen", attention_mask=mask))], DiTCall())
    assert out.txt is new_txt and out.extras.extra_channels.shape == (1, 4, 3)
    assert out.extras.contributors == ("text", "flex", "flex2", "eligen") and inputs.extras.contributors == ()
    with pytest.raises(ValueError, match="second gives an attention mask, but text, flex, flex2, eligen already"):
        apply_adapters(out, [Fixed(Contribution("second", attention_mask=mask))], DiTCall())


def test_teacache_reuses_only_across_calls_with_the_same_adapters(dit):
    """A ControlNet-like adapter active for the first half: TeaCache may skip while it stays active, must compute the
    step where it stops, and at threshold 0 equals the uncached run exactly."""
    prompt = PromptEmbeds(torch.randn(1, LT, 32), torch.randn(1, 32))
    sigmas = torch.linspace(1.0, 0.05, 12)
    x = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(5))

    def run(threshold, adapter):
        cache = TeaCache(len(sigmas), threshold) if threshold is not None else None
        extras = DiTExtras(tea_cache=cache)
        with torch.no_grad():
            out = denoise(x, sigmas, lambda lat, call: guided_velocity(dit, lat, call, prompt, None, 1.0, 3.5, extras,
                                                                        adapters=[adapter]))
        return out, cache

    half = StepRange(1.0, 0.5)  # active while progress >= 0.5: steps 0..5 of 12
    uncached, _ = run(None, RecordingAdapter("cn", half, residual=0.3))
    exact, cache0 = run(0.0, RecordingAdapter("cn", half, residual=0.3))
    assert torch.equal(exact, uncached) and cache0.stats.skipped == 0
    _, cache = run(1e9, RecordingAdapter("cn", half, residual=0.3))  # a huge threshold skips all it may
    first_inactive = next(i for i in range(12) if not half.contains(DiTCall(step=i, num_steps=12)))
    assert first_inactive == 6
    assert first_inactive not in cache.stats.skipped_steps      # the adapter stopped: computed
    assert set(range(1, first_inactive)) <= set(cache.stats.skipped_steps)  # same adapters: skipped
    assert set(range(first_inactive + 1, 11)) <= set(cache.stats.skipped_steps)


def test_tiles_match_diffsynths_tile_worker():
    """Tile placement and blending weights against DiffSynth's FastTileWorker on the same per-tile function."""
    from tests.diffsynth_ref import diffsynth_flux
    diffsynth_flux()
    from diffsynth.pipelines.flux_image import FastTileWorker
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(1, 16, 40, 56, generator=g)

    def fn(tile):  # any function of the tile content and its position
        return tile * tile.mean() + tile.roll(1, -1)

    tiling = DiTTiling(16, 8)
    ours = tiled_forward(lambda tile, top, left: fn(tile), latents, tiling)
    theirs = FastTileWorker().tiled_forward(lambda hl, hr, wl, wr: fn(latents[:, :, hl:hr, wl:wr]), latents,
                                            tile_size=16, tile_stride=8, tile_device="cpu")
    assert (ours - theirs).abs().max().item() < 1e-6
    assert len(tile_boxes(40, 56, tiling)) == 4 * 6


def test_one_tile_equals_the_untiled_dit(dit):
    prompt = PromptEmbeds(torch.randn(1, LT, 32), torch.randn(1, 32))
    x = torch.randn(1, 16, H, W)
    with torch.no_grad():
        whole = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, None, 1.0, 3.5)
        tiled = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, None, 1.0, 3.5, tiling=DiTTiling(128, 64))
        small = guided_velocity(dit, x, DiTCall(sigma=0.5), prompt, None, 1.0, 3.5, tiling=DiTTiling(4, 2))
    assert torch.equal(whole, tiled)
    assert (whole - small).abs().max() > 1e-3  # several tiles: positions restart per tile, so it differs


def test_spread_residuals_share_storage_through_scaling_and_summing():
    """A ControlNet's residuals spread over the DiT's blocks stay one tensor per ControlNet block after scaling and
    after summing two inputs (57 per-block copies would hold ~1 GiB more at 1024x1024 in bf16)."""
    from flux_core.controlnet import ControlNetAdapter
    from flux_core.dit_inputs import DiTInputs

    class FakeControlNet(torch.nn.Module):
        def __init__(self, double, single):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.counts = (double, single)

        def forward(self, img, **kwargs):
            return ([torch.randn(1, 4, HIDDEN) for _ in range(self.counts[0])],
                    [torch.randn(1, 4, HIDDEN) for _ in range(self.counts[1])])

    inputs = DiTInputs(img=torch.zeros(1, 4, 64), img_ids=torch.zeros(1, 4, 3), txt=torch.zeros(1, 2, 32),
                       txt_ids=torch.zeros(1, 2, 3), timesteps=torch.ones(1), y=torch.zeros(1, 32), guidance=None,
                       height=4, width=4)
    adapters = [ControlNetAdapter(f"cn{i}", FakeControlNet(5, 10), torch.zeros(1, 16, 4, 4), (19, 38), scale=0.5)
                for i in range(2)]
    extras = apply_adapters(inputs, adapters, DiTCall()).extras
    storages = {t.untyped_storage().data_ptr() for t in [*extras.double_residuals, *extras.single_residuals]}
    assert len(storages) == 15
