"""The VAE against diffusers' AutoencoderKL on the same tiny weights, from every checkpoint layout; tiling; errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model
from flux_core.model_state import state_of
from flux_core.models.vae import AutoEncoderParams, FluxVAE, tile_starts, tiled_apply
from tests.tiny_vae import (TINY_NORM_GROUPS, bfl_state_dict, make_diffusers_vae, reference_decode,
                            reference_encode, write_bfl_file, write_diffusers_folder)

B, H, W = 2, 48, 64  # non-square image, batch 2 -> latent 6x8
TINY_CONFIG = {"norm_groups": TINY_NORM_GROUPS}  # a single file has no config.json to say so


@pytest.fixture(scope="module")
def reference():
    return make_diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    return {
        "bfl": write_bfl_file(reference, tmp / "ae.safetensors"),
        "first_stage_model": write_bfl_file(reference, tmp / "ldm.safetensors", prefix="first_stage_model."),
        "diffusers": write_diffusers_folder(reference, tmp / "vae"),
    }


@pytest.fixture(scope="module")
def ours(reference):
    """Our VAE holding the reference weights, without going through the loader (for the tiling tests)."""
    vae = FluxVAE(AutoEncoderParams(ch=16, ch_mult=(1, 1, 2, 2), norm_groups=TINY_NORM_GROUPS))
    vae.load_state_dict(bfl_state_dict(reference))
    return vae.eval().requires_grad_(False)


def images(seed=0, h=H, w=W):
    return torch.rand(B, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- parity ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bfl", "first_stage_model", "diffusers"])
def test_parity_with_diffusers(layout, reference, files):
    config = None if layout == "diffusers" else TINY_CONFIG
    vae = load_model(files[layout], config=config, torch_dtype=torch.float32, kind="vae")
    assert isinstance(vae, FluxVAE)
    assert state_of(vae).layout == ("diffusers" if layout == "diffusers" else "bfl")
    assert vae.params == AutoEncoderParams(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=16,
                                           norm_groups=TINY_NORM_GROUPS)
    image = images()
    with torch.no_grad():
        latent = vae.encode(image)
        assert latent.shape == (B, 16, H // 8, W // 8)
        # Measured 4.8e-7 (encode) and 3.2e-6 (decode, outputs up to 3.2) in every layout. The smallest real
        # mistakes measured: GroupNorm eps 1e-5 instead of 1e-6 moves them by 1.4e-5 / 2.8e-5, the published scale
        # 0.3611 rounded to 0.361 by 2.2e-4 / 5.9e-4, the shift 0.1159 as 0.12 by 1.5e-3 / 3.1e-3.
        assert (latent - reference_encode(reference, image)).abs().max() <= 5e-6

        z = torch.randn(B, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(1))
        decoded = vae.decode(z)
        assert decoded.shape == (B, 3, H, W)
        assert (decoded - reference_decode(reference, z)).abs().max() <= 1e-5


def test_raw_space_is_comfyui_latent_space(reference, ours):
    image = images(2)
    with torch.no_grad():
        raw = ours.encode_raw(image)
        # Measured 1.3e-6; GroupNorm eps 1e-5 instead of 1e-6 moves it by 3.9e-5.
        assert (raw - reference.encode(image).latent_dist.mean).abs().max() <= 1e-5
        scaled = ours.encode(image)
        # Measured 1.2e-7 and 0 (values up to 2.1); the shift 0.1159 written 0.12 moves raw values by 4.1e-3, the
        # scale 0.3611 as 0.361 by 6e-4. rtol=0: the default rtol would add 2e-5 to the bound.
        assert torch.allclose(ours.to_comfy_latent(scaled), raw, atol=1e-6, rtol=0)
        assert torch.allclose(ours.from_comfy_latent(raw), scaled, atol=1e-6, rtol=0)
        # Measured 4.0e-6 (outputs up to 3.2); decode unscaling with the scale 0.361 moves it by 1.3e-3, with the
        # shift 0.12 by 3.0e-2.
        assert torch.allclose(ours.decode_raw(raw), ours.decode(scaled), atol=1e-5, rtol=0)
        # Measured 6.8e-6; GroupNorm eps 1e-5 instead of 1e-6 moves it by 9.0e-5, a skipped mid-block attention by 0.7.
        assert (ours.decode_raw(raw) - reference.decode(raw).sample).abs().max() <= 2e-5


def test_scale_and_shift_from_config(files):
    vae = load_model(files["bfl"], config={**TINY_CONFIG, "scale_factor": 0.5, "shift_factor": 0.0},
                     torch_dtype=torch.float32, kind="vae")
    assert (vae.params.scale_factor, vae.params.shift_factor) == (0.5, 0.0)
    default = load_model(files["bfl"], config=TINY_CONFIG, torch_dtype=torch.float32, kind="vae")
    assert (default.params.scale_factor, default.params.shift_factor) == (0.3611, 0.1159)


def test_norm_groups_are_never_guessed(files):
    # A single file does not tell its GroupNorm groups: FLUX's 32 is taken, which cannot fit 16 channels.
    with pytest.raises(CheckpointError, match="norm_groups"):
        load_model(files["bfl"], torch_dtype=torch.float32, kind="vae")


def test_bf16_load_runs(files):
    vae = load_model(files["first_stage_model"], config=TINY_CONFIG, kind="vae")  # default bfloat16
    assert vae.dtype == torch.bfloat16
    with torch.no_grad():
        out = vae.decode(vae.encode(images()[:1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# -- tiling ------------------------------------------------------------------------------------------------------

def test_tile_starts_cover_with_whole_tiles():
    assert tile_starts(6, 8, 4) == [0]
    assert tile_starts(16, 8, 4) == [0, 4, 8]
    assert tile_starts(13, 5, 3) == [0, 3, 6, 8]  # the last tile moves back to end at the border
    assert tile_starts(16, 8, 8) == [0, 8]


@pytest.mark.parametrize("in_per_unit,out_per_unit", [(1, 1), (8, 1), (1, 8)])
@pytest.mark.parametrize("tile,stride", [(5, 3), (5, 5), (4, 1), (6, 2)])
def test_blend_weights_sum_to_one(in_per_unit, out_per_unit, tile, stride):
    """With a position-wise fn, tiling must give back fn(x) exactly: weights sum to one, tiles land in place."""
    x = torch.randn(2, 3, 13 * in_per_unit, 11 * in_per_unit, generator=torch.Generator().manual_seed(0))
    if in_per_unit > 1:
        def fn(t): return F.avg_pool2d(t, in_per_unit) * 2 + 1
    else:
        def fn(t): return F.interpolate(t, scale_factor=out_per_unit, mode="nearest") * 2 + 1
    out = tiled_apply(fn, x, tile, stride, in_per_unit=in_per_unit, out_per_unit=out_per_unit)
    # Measured <= 2.9e-6 on values up to 9.2 (float32 sums of weights); weights that do not sum to one or a tile
    # placed one unit off move outputs by a sizeable fraction of |fn(x)| (order 1).
    assert torch.allclose(out, fn(x), atol=1e-5, rtol=0)


def test_blend_has_no_seams():
    """Each tile comes out offset by its own constant (as per-tile GroupNorm statistics do), alternately -0.5 and
    +0.5: tiles that merely abut (stride == tile) show the whole step of 1 at their border; blended tiles turn it
    into a slope no steeper than 1 / (overlap + 1) per image pixel."""
    def run(tile, stride):
        counter = iter(range(1000))

        def fn(t):
            return F.interpolate(torch.full_like(t, 0.5 * (-1) ** next(counter)), scale_factor=8, mode="nearest")
        out = tiled_apply(fn, torch.zeros(1, 1, 24, 40), tile, stride, in_per_unit=1, out_per_unit=8)
        return max((out[..., 1:, :] - out[..., :-1, :]).abs().max(), (out[..., 1:] - out[..., :-1]).abs().max()).item()

    assert run(8, 8) == 1.0
    for tile, stride in ((8, 4), (8, 6), (12, 8), (8, 2)):
        overlap_px = (tile - stride) * 8
        # Measured exactly 1 / (overlap_px + 1) (1e-6 is float32 rounding); a ramp one pixel shorter, 1 / overlap_px,
        # is steeper by >= 9.5e-4 (overlap 32 px).
        assert run(tile, stride) <= 1 / (overlap_px + 1) + 1e-6, (tile, stride)


def test_input_within_one_tile_is_exactly_untiled(ours):
    image = images(3)
    z = torch.randn(B, 16, 6, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours.encode(image, tiled=True, tile_size=8, tile_stride=4), ours.encode(image))
        assert torch.equal(ours.decode(z, tiled=True, tile_size=8, tile_stride=4), ours.decode(z))


def periodic(channels, h, w, period, seed):
    """A smooth pattern whose statistics are the same in every tile that starts on a whole period."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(h, dtype=torch.float32)[:, None] * 2 * math.pi / period
    x = torch.arange(w, dtype=torch.float32)[None, :] * 2 * math.pi / period
    a = torch.randn(4, channels, 1, 1, generator=g)
    return (a[0] * torch.sin(x) + a[1] * torch.cos(y) + a[2] * torch.sin(x + y) + a[3])[None]


def test_tiled_close_to_untiled_on_smooth_input(ours):
    """Tiles see zero padding at their borders and their own attention and GroupNorm statistics, so tiled output
    differs from untiled; blended overlaps keep that small and far below what abutting tiles give. (A random tiny
    VAE exaggerates border effects: a trained VAE with 128-latent-px tiles differs much less.)"""
    h, w, tile, stride = 24, 32, 16, 8  # latent pixels; 8-px period so every tile sees the same statistics
    z = periodic(16, h, w, 8, seed=0)
    image = torch.tanh(periodic(3, h * 8, w * 8, 64, seed=1))
    with torch.no_grad():
        for run, x in ((ours.decode, z), (ours.encode, image)):
            full = run(x)
            blended = run(x, tiled=True, tile_size=tile, tile_stride=stride)
            abutting = run(x, tiled=True, tile_size=tile, tile_stride=tile)
            err, err_abutting = (blended - full).abs(), (abutting - full).abs()
            # Mean error / std: measured 0.057 (decode), 0.086 (encode); abutting tiles (no blend) give 0.11, 0.16.
            assert err.mean() < {"decode": 0.07, "encode": 0.1}[run.__name__] * full.std(), run.__name__
            # Measured 0.10 (decode), 0.21 (encode); no blending at all gives 1 (the abutting tiles' own error).
            assert err.max() < 0.4 * err_abutting.max(), run.__name__


def test_tile_arguments_checked(ours):
    with pytest.raises(ValueError, match="tile_stride"):
        ours.decode(torch.zeros(1, 16, 16, 16), tiled=True, tile_size=8, tile_stride=9)
    with pytest.raises(ValueError, match="tile_stride"):
        ours.encode(torch.zeros(1, 3, 128, 128), tiled=True, tile_size=8, tile_stride=0)


# -- errors ------------------------------------------------------------------------------------------------------

def test_odd_sizes_and_wrong_channels_refused(ours):
    with pytest.raises(ValueError, match=r"multiples of 8.*50x64.*48x64"):
        ours.encode(torch.zeros(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 4, 48, 64))
    with pytest.raises(ValueError, match="channels-last"):
        ours.encode(torch.zeros(1, 48, 64, 3))
    with pytest.raises(ValueError, match="Stable Diffusion"):
        ours.decode(torch.zeros(1, 4, 6, 8))
    with pytest.raises(ValueError, match="unpacked"):
        ours.decode(torch.zeros(1, 12, 64))


def test_dit_file_given_as_vae_names_both_kinds(tmp_path, files):
    from tests.tiny_dit import make_diffusers_dit, write_bfl_dit

    dit_file = write_bfl_dit(make_diffusers_dit(), tmp_path / "flux1-dev.safetensors")
    with pytest.raises(CheckpointError, match=r"expected a FLUX VAE \(autoencoder\).*FLUX DiT"):
        load_model(dit_file, kind="vae")
    with pytest.raises(CheckpointError, match=r"expected a FLUX DiT.*FLUX VAE \(autoencoder\)"):
        load_model(files["bfl"], config=TINY_CONFIG, kind="dit")


def test_vae_found_in_all_in_one_checkpoint(tmp_path, reference):
    from tests.tiny_dit import bfl_state_dict as dit_bfl_state_dict, make_diffusers_dit

    dit = {"model.diffusion_model." + k: v for k, v in dit_bfl_state_dict(make_diffusers_dit()).items()}
    path = write_bfl_file(reference, tmp_path / "flux_aio.safetensors", prefix="vae.", extra=dit)
    vae = load_model(path, config=TINY_CONFIG, torch_dtype=torch.float32, kind="vae")
    assert isinstance(vae, FluxVAE) and state_of(vae).layout == "bfl"


def test_stable_diffusion_vae_refused(tmp_path):
    from diffusers import AutoencoderKL

    sd_vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                           block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4)
    sd_vae.save_pretrained(tmp_path / "sd_vae")
    with pytest.raises(CheckpointError, match=r"Stable Diffusion.*4 latent channels.*not the FLUX.1 VAE"):
        load_model(tmp_path / "sd_vae", kind="vae")
