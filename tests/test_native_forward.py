"""flux_core.native_forward: ComfyUI's FLUX call signature on FluxCore's DiT, against diffusers on the same tiny
weights (packing, odd sides, extra channels, ControlNet residuals by block index), a spelled-out table of Kontext
reference positions, and a k-diffusion-style Euler sampler against flux_core's own denoise loop."""
import pytest
import torch
from diffusers import FluxPipeline

from flux_core.adapters import Contribution
from flux_core.dit_inputs import PromptEmbeds
from flux_core.loading.loader import load_model
from flux_core.native_forward import Placement, call_of, native_forward, reference_placements
from flux_core.sampling import denoise, predict_velocity, reference_extras
from flux_core.scheduler import flux_sigmas
from tests.tiny_dit import make_diffusers_dit, write_bfl_dit

TXT = 32


def load_ours(reference, path):
    return load_model(write_bfl_dit(reference, path), config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32,
                      kind="dit").eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = make_diffusers_dit(seed=5)
    return ref, load_ours(ref, tmp_path_factory.mktemp("dit") / "dit.safetensors")


@pytest.fixture(scope="module")
def pair_extra(tmp_path_factory):
    """A DiT with 32 latent channels in (16 + 16 extra, like FLUX.1-Fill's joined image) and 16 out."""
    ref = make_diffusers_dit(seed=6, in_channels=128, out_channels=64)
    return ref, load_ours(ref, tmp_path_factory.mktemp("dit") / "dit.safetensors")


def wrap_pad(x):
    """Odd sides padded by wrapping around, written out with cat (ComfyUI pads with F.pad(mode='circular'))."""
    if x.shape[-2] % 2:
        x = torch.cat((x, x[..., :1, :]), dim=-2)
    if x.shape[-1] % 2:
        x = torch.cat((x, x[..., :1]), dim=-1)
    return x


def diffusers_call(model, x, sigma, context, y, guidance, **kwargs):
    """diffusers' FluxTransformer2DModel on a (B, C, h, w) latent, packed and unpacked with FluxPipeline's own
    helpers, odd sides padded as ComfyUI does and cropped back."""
    b, c, h, w = x.shape
    padded = wrap_pad(x)
    hp, wp = padded.shape[-2:]
    tokens = FluxPipeline._pack_latents(padded, b, c, hp, wp)
    ids = FluxPipeline._prepare_latent_image_ids(b, hp // 2, wp // 2, x.device, x.dtype)
    with torch.no_grad():
        out = model(hidden_states=tokens, encoder_hidden_states=context, pooled_projections=y, timestep=sigma,
                    img_ids=ids, txt_ids=torch.zeros(context.shape[1], 3), guidance=guidance, **kwargs).sample
    return FluxPipeline._unpack_latents(out, hp * 8, wp * 8, 8)[:, :, :h, :w]


def call_inputs(b=2, c=16, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, c, h, w, generator=g), timestep=torch.tensor([0.8] * b),
                context=torch.randn(b, 5, TXT, generator=g), y=torch.randn(b, TXT, generator=g),
                guidance=torch.tensor([3.5] * b))


@pytest.mark.parametrize("size", [(9, 11), (8, 10), (1, 3)])
def test_native_forward_equals_diffusers_on_odd_sizes(pair, size):
    ref, ours = pair
    a = call_inputs(h=size[0], w=size[1])
    with torch.no_grad():
        got = native_forward(ours, **a)
    want = diffusers_call(ref, a["x"], a["timestep"], a["context"], a["y"], a["guidance"])
    assert got.shape == a["x"].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_forward_with_extra_channels_equals_diffusers(pair_extra):
    ref, ours = pair_extra
    a = call_inputs(c=32, h=7, w=10)
    with torch.no_grad():
        got = native_forward(ours, **a)
    want = diffusers_call(ref, a["x"], a["timestep"], a["context"], a["y"], a["guidance"])
    assert got.shape == (2, 16, 7, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_forward_without_guidance_or_pooled(pair):
    """guidance None leaves the guidance embedder out (FluxDisableGuidance); y None is zeros (ComfyUI's rule)."""
    ref, ours = pair
    a = call_inputs(h=8, w=8)
    with torch.no_grad():
        got = native_forward(ours, a["x"], a["timestep"], a["context"], y=None, guidance=None)
        want_y0 = native_forward(ours, a["x"], a["timestep"], a["context"], y=torch.zeros(2, TXT), guidance=None)
    torch.testing.assert_close(got, want_y0, rtol=0, atol=0)


def test_guidance_stays_float32(pair):
    """A bf16 guidance (ComfyUI casts extra conds to the model dtype) is embedded from float32: 1000 x 3.5 stays 3500
    (in bf16 it is 3504)."""
    _, ours = pair
    a = call_inputs(h=8, w=8)
    with torch.no_grad():
        exact = native_forward(ours, **{**a, "guidance": 3.5})
        cast = native_forward(ours, **{**a, "guidance": torch.tensor([3.5, 3.5], dtype=torch.bfloat16)})
    torch.testing.assert_close(exact, cast, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [(2, 2), (1, 0), (0, 1)])
def test_control_residuals_equal_diffusers_controlnet_samples(pair, lengths):
    """ComfyUI's control["input"][i] is added to the image tokens after double block i and control["output"][i]
    after single block i; a shorter list leaves the later blocks alone. diffusers adds
    controlnet_block_samples[i] after block i when there is one per block: the missing ones are zeros there."""
    ref, ours = pair
    a = call_inputs(h=8, w=10)
    g = torch.Generator().manual_seed(3)
    tokens, hidden = 4 * 5, ref.inner_dim
    double = [torch.randn(2, tokens, hidden, generator=g) for _ in range(lengths[0])]
    single = [torch.randn(2, tokens, hidden, generator=g) for _ in range(lengths[1])]
    with torch.no_grad():
        got = native_forward(ours, **a, control={"input": [r.clone() for r in double],
                                                 "output": [r.clone() for r in single]})
    pad = lambda rs, n: rs + [torch.zeros(2, tokens, hidden)] * (n - len(rs))  # noqa: E731
    want = diffusers_call(ref, a["x"], a["timestep"], a["context"], a["y"], a["guidance"],
                          controlnet_block_samples=pad(double, 2), controlnet_single_block_samples=pad(single, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = native_forward(ours, **a)
    assert (got - plain).abs().max() > 1e-3


# ComfyUI 0.3.64, comfy/ldm/flux/model.py `_forward`: (index, row offset, column offset) in latent pixels for a
# 9 x 11 latent and references of 6x4, 4x8 and 5x5 latent pixels, worked out by hand from its rules.
REFERENCE_TABLE = {
    "offset": [Placement(1, 0, 0), Placement(1, 6, 0), Placement(1, 0, 8)],
    "index": [Placement(1), Placement(2), Placement(3)],
    "uxo": [Placement(0, 10, 12), Placement(0, 16, 16), Placement(0, 20, 24)],
}


@pytest.mark.parametrize("method", list(REFERENCE_TABLE))
def test_reference_placements_follow_comfyui(method):
    assert reference_placements(9, 11, [(6, 4), (4, 8), (5, 5)], method) == REFERENCE_TABLE[method]


def test_reference_ids_round_offsets_to_patches():
    """Offsets count latent pixels; ids count 2x2 patches, rounding up: a 5-row first reference puts the second at
    row 5 -> patch row 3 (ComfyUI: (5 + 1) // 2)."""
    refs = [torch.zeros(1, 16, 5, 4), torch.zeros(1, 16, 4, 8)]
    extras = reference_extras(refs, 2, placements=reference_placements(8, 8, [(5, 4), (4, 8)], "offset"))
    tokens, ids = extras.ref_tokens, extras.ref_ids
    assert tokens.shape == (2, 3 * 2 + 2 * 4, 64)
    first, second = ids[0, :6], ids[0, 6:]
    assert first[0].tolist() == [1, 0, 0] and first[-1].tolist() == [1, 2, 1]
    assert second[0].tolist() == [1, 3, 0] and second[-1].tolist() == [1, 4, 3]
    with pytest.raises(ValueError, match="ref_latents_method 'sideways'"):
        reference_placements(8, 8, [(4, 4)], "sideways")


def test_one_reference_equals_diffusers_kontext(pair):
    """One reference with the offset (default) and index methods sits at index 1 with no offset: diffusers'
    FluxKontextPipeline layout (image tokens, then the reference's with ids [1, row, col])."""
    ref, ours = pair
    a = call_inputs(h=8, w=10)
    r = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(9))
    tokens = torch.cat((FluxPipeline._pack_latents(a["x"], 2, 16, 8, 10),
                        FluxPipeline._pack_latents(r.repeat(2, 1, 1, 1), 2, 16, 6, 4)), dim=1)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    ref_ids[:, 0] = 1
    ids = torch.cat((FluxPipeline._prepare_latent_image_ids(2, 4, 5, "cpu", torch.float32), ref_ids))
    with torch.no_grad():
        out = ref(hidden_states=tokens, encoder_hidden_states=a["context"], pooled_projections=a["y"],
                  timestep=a["timestep"], img_ids=ids, txt_ids=torch.zeros(5, 3), guidance=a["guidance"]).sample
    want = FluxPipeline._unpack_latents(out[:, :20], 64, 80, 8)
    for method in (None, "offset", "index"):
        with torch.no_grad():
            got = native_forward(ours, **a, ref_latents=[r], ref_latents_method=method)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_call_of_reads_step_from_sample_sigmas():
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert call_of({"sample_sigmas": sigmas}, 0.75).step == 1
    assert call_of({"sample_sigmas": sigmas}, 0.6).step == 1   # a multistep sampler's point between 0.75 and 0.5
    call = call_of({"sample_sigmas": sigmas}, 0.25)
    assert (call.step, call.num_steps, call.progress) == (3, 4, 0.0)
    assert call_of({}, 0.3).num_steps == 1


class Recording:
    """An adapter that adds a constant residual to double block 0 of the positive branch only, and records calls."""
    name = "recording"

    def __init__(self):
        self.calls = []

    def contribute(self, inputs, call):
        self.calls.append((call.branch, call.step, inputs.batch))
        if call.branch != "positive":
            return None
        hidden = inputs.img.new_full((inputs.batch, inputs.img.shape[1], 32), 0.5)
        return Contribution(self.name, double_residuals=[hidden])


def test_batched_cond_uncond_give_each_adapter_its_branch(pair):
    """ComfyUI batches cond and uncond ([0, 1] in cond_or_uncond): each chunk runs with its own branch, equal to
    running the chunks alone."""
    _, ours = pair
    a = call_inputs(h=8, w=8)
    options = {"cond_or_uncond": [1, 0], "sample_sigmas": torch.tensor([1.0, 0.8, 0.4, 0.0])}
    adapter = Recording()
    with torch.no_grad():
        both = native_forward(ours, **a, transformer_options=options, adapters=[adapter])
    assert adapter.calls == [("negative", 1, 1), ("positive", 1, 1)]
    one = {k: v[1:] for k, v in a.items()}
    with torch.no_grad():
        alone = native_forward(ours, **one, transformer_options={"cond_or_uncond": [0]}, adapters=[Recording()])
        plain = native_forward(ours, **{k: v[:1] for k, v in a.items()})
    torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    torch.testing.assert_close(both[:1], plain, rtol=0, atol=0)


def k_diffusion_euler(model, x, sigmas):
    """k-diffusion's sample_euler (what ComfyUI's "euler" runs) for a CONST (flow) model: denoised = x - sigma * v."""
    for i in range(len(sigmas) - 1):
        denoised = x - sigmas[i] * model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def test_euler_through_native_forward_equals_flux_core_denoise(pair):
    _, ours = pair
    a = call_inputs(b=1, h=8, w=10)
    prompt = PromptEmbeds(a["context"], a["y"])
    sigmas = flux_sigmas(4, 1.0, 3.0)
    with torch.no_grad():
        ours_loop = denoise(a["x"], sigmas, lambda x, call: predict_velocity(ours, x, call, prompt, 3.5))
        native = k_diffusion_euler(
            lambda x, s: native_forward(ours, x, s.reshape(1), a["context"], a["y"], 3.5),
            a["x"], torch.cat((sigmas, torch.zeros(1))))
    torch.testing.assert_close(native, ours_loop, rtol=1e-5, atol=1e-5)
