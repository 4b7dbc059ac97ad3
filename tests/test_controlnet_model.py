"""The FLUX ControlNet model and its loading: residuals against diffusers' FluxControlNetModel and DiffSynth-Studio's
FluxControlNet on the same tiny weights, residual spreading against both, detection and refusals by key signature."""
import re

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.controlnet_kind import select_controlnet
from flux_core.loading.files import CheckpointError, open_state_dict
from flux_core.loading.lazy import LazyTensor
from flux_core.loading.loader import detect, load_model
from flux_core.models.controlnet import (UNION_MODES, ControlNetParams, FluxControlNet, spread_residuals,
                                         union_mode_id)
from flux_core.models.dit import FluxDiT
from tests.tiny_controlnet import (controlnet_inputs, diffusers_residuals, make_diffusers_controlnet,
                                   sd_controlnet_state_dict, write_diffsynth_controlnet, write_diffusers_controlnet,
                                   write_lone_file, xlabs_controlnet_state_dict)
from tests.tiny_dit import make_diffusers_dit, write_diffusers_dit

AXES = {"axes_dim": (4, 6, 6)}  # the tiny models' RoPE axes (head dim 16), for files with no config.json beside them
# Measured: at most 1.4e-6 against diffusers, 3.0e-6 against DiffSynth (float32 summation order), on residuals up to
# ~10. The bound catches a wrong mode (moves residuals by > 0.1), a dropped guidance embedding (> 0.1), a mode token
# with a non-zero position id, single-block residuals read from the wrong tokens, a wrong spread (all > 1e-2).
TOL = 1e-4


def ours(model: FluxControlNet, x: dict, mode=None):
    with torch.no_grad():
        return model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"],
                     x["control"], mode=mode)


def max_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max([(p - q).abs().max().item() for p, q in zip(a, b)], default=0.0)


@pytest.fixture(scope="module")
def plain():
    return make_diffusers_controlnet(seed=1)


@pytest.fixture(scope="module")
def union():
    return make_diffusers_controlnet(seed=2, num_mode=10)


def write(source: str, model, tmp_path):
    """The published ways a ControlNet is stored: a diffusers folder, its single file (config.json beside it),
    shards, or a lone file (no config.json: tiny RoPE axes given as config)."""
    if source == "folder":
        return write_diffusers_controlnet(model, tmp_path / "cn"), None
    if source == "single_file":
        return write_diffusers_controlnet(model, tmp_path / "cn") / "diffusion_pytorch_model.safetensors", None
    if source == "sharded":
        folder = write_diffusers_controlnet(model, tmp_path / "cn", max_shard_size="60KB")
        assert len(list(folder.glob("*.safetensors"))) > 1
        return folder, None
    if source == "lone_file":
        return write_lone_file(model, tmp_path / "controlnet.safetensors"), AXES
    raise AssertionError(source)


@pytest.mark.parametrize("source", ["folder", "single_file", "sharded", "lone_file"])
def test_plain_residuals_equal_diffusers(source, plain, tmp_path):
    path, config = write(source, plain, tmp_path)
    model = load_model(path, config=config, torch_dtype=torch.float32)
    assert isinstance(model, FluxControlNet)
    assert model.params.depth == 2 and model.params.depth_single_blocks == 2 and model.params.num_modes == 0
    x = controlnet_inputs(batch=2)
    expected = diffusers_residuals(plain, x, x["control"])
    double, single = ours(model, x)
    assert len(double) == 2 and len(single) == 2 and double[0].shape == (2, 6, 32)
    assert max_diff(double, expected[0]) <= TOL and max_diff(single, expected[1]) <= TOL


@pytest.mark.parametrize("source", ["folder", "single_file", "sharded"])
def test_union_residuals_equal_diffusers_for_each_mode(source, union, tmp_path):
    path, config = write(source, union, tmp_path)
    model = load_model(path, config=config, torch_dtype=torch.float32)
    assert model.params.num_modes == 10
    x = controlnet_inputs(batch=2, seed=1)
    results = {}
    for name in ("canny", "depth", "lq"):
        mode = UNION_MODES[name]
        expected = diffusers_residuals(union, x, x["control"], mode=mode)
        double, single = ours(model, x, mode=mode)
        assert max_diff(double, expected[0]) <= TOL and max_diff(single, expected[1]) <= TOL
        assert max_diff(ours(model, x, mode=name)[1], single) == 0.0  # a name gives its id's residuals
        results[name] = single
    assert max_diff(results["canny"], results["depth"]) > 0.1  # the mode matters


def test_upscaler_shape_has_no_single_residuals(tmp_path):
    """jasperai Upscaler's shape (5 double, 0 single blocks): diffusers returns None for the single residuals."""
    ref = make_diffusers_controlnet(seed=3, num_layers=5, num_single_layers=0)
    model = load_model(write_diffusers_controlnet(ref, tmp_path / "up"), torch_dtype=torch.float32)
    x = controlnet_inputs()
    expected = diffusers_residuals(ref, x, x["control"])
    double, single = ours(model, x)
    assert len(double) == 5 and single == [] and expected[1] == []
    assert max_diff(double, expected[0]) <= TOL
    assert spread_residuals(single, 38) == [None] * 38


@pytest.fixture(scope="module")
def alimama():
    """alimama Inpainting-Beta's shape: 6 double, 0 single blocks, controlnet_x_embedder 64 + 4 wide."""
    return make_diffusers_controlnet(seed=4, num_layers=6, num_single_layers=0, extra_condition_channels=4)


def test_alimama_68_wide_input_equals_diffusers_forward(alimama, tmp_path):
    path = write_diffusers_controlnet(alimama, tmp_path / "inpaint")
    model = load_model(path, torch_dtype=torch.float32)
    assert model.params.extra_condition_channels == 4 and model.params.control_channels == 68
    x = controlnet_inputs(batch=2, extra_channels=4)
    assert x["control"].shape[-1] == 68
    expected = diffusers_residuals(alimama, x, x["control"])
    double, single = ours(model, x)
    assert len(double) == 6 and single == []
    assert max_diff(double, expected[0]) <= TOL


def diffsynth_aligned(theirs, x: dict, mode_name=None):
    """DiffSynth's FluxControlNet.forward (batch 1: its union path builds a batch-1 mode token): it packs the latents
    itself, makes its own image ids, takes sigma x 1000 and returns residuals aligned to 19 / 38 DiT blocks."""
    with torch.no_grad():
        return theirs(x["latent"], x["control_latent"], timestep=x["timesteps"] * 1000, prompt_emb=x["txt"],
                      pooled_prompt_emb=x["y"], guidance=x["guidance"], text_ids=x["txt_ids"], image_ids=None,
                      processor_id=mode_name)


@pytest.mark.parametrize("variant", ["plain", "union", "alimama"])
def test_residuals_equal_diffsynths_own_controlnet(variant, plain, union, alimama, tmp_path):
    """DiffSynth's own FluxControlNet (tiny subclass of its class, its blocks and forward), weights converted by its own
    ControlNet converter; ours loaded from the diffusers file. Both sides spread over FLUX's 19 / 38 blocks, ours by
    spread_residuals, theirs by align_res_stack_to_original_blocks (zeros where ours gives None)."""
    from tests.diffsynth_ref import controlnet_key_names, tiny_diffsynth_controlnet
    from tests.tiny_controlnet import diffsynth_state_dict
    ref = {"plain": plain, "union": union, "alimama": alimama}[variant]
    shape = dict(double=ref.config.num_layers, single=ref.config.num_single_layers,
                 num_mode=10 if variant == "union" else 0, additional_input_dim=4 if variant == "alimama" else 0)
    theirs = tiny_diffsynth_controlnet(**shape)
    theirs.load_state_dict(diffsynth_state_dict(ref), strict=True)
    # the tiny subclass has the real class's parameter names (as DiffSynth's registry builds each variant)
    real = dict(num_joint_blocks=shape["double"], num_single_blocks=shape["single"], num_mode=shape["num_mode"],
                mode_dict=dict(UNION_MODES) if shape["num_mode"] else {},
                additional_input_dim=shape["additional_input_dim"])
    assert {re.sub(r"\.\d+\.", ".N.", k) for k in theirs.state_dict()} == controlnet_key_names(**real)

    model = load_model(write_diffusers_controlnet(ref, tmp_path / "cn"), torch_dtype=torch.float32)
    x = controlnet_inputs(extra_channels=shape["additional_input_dim"], seed=5)
    for mode_name in (("canny", "pose", "lq") if variant == "union" else (None,)):
        exp_double, exp_single = diffsynth_aligned(theirs, x, mode_name)
        double, single = ours(model, x, mode=mode_name)
        got_double, got_single = spread_residuals(double, 19), spread_residuals(single, 38)
        got_single = [torch.zeros_like(exp_single[0]) if r is None else r for r in got_single]
        # Measured 3.0e-6 (TOL above); a spread off by one block moves a residual by > 0.5.
        assert max_diff(got_double, exp_double) <= TOL and max_diff(got_single, exp_single) <= TOL


def test_diffsynth_layout_loads_and_matches(union, tmp_path):
    """A file in DiffSynth's names (its converter's output, as its ControlNet training saves it), also under its
    training prefix `pipe.controlnet.models.0.`."""
    x = controlnet_inputs(batch=2, seed=6)
    expected = diffusers_residuals(union, x, x["control"], mode=4)
    for prefix in ("", "pipe.controlnet.models.0."):
        path = write_diffsynth_controlnet(union, tmp_path / f"cn{len(prefix)}.safetensors", prefix=prefix)
        model = load_model(path, config=AXES, torch_dtype=torch.float32)
        assert [(d.kind.name, d.layout) for d in detect(open_state_dict(path))] == [("controlnet", "diffsynth")]
        double, single = ours(model, x, mode="pose")
        assert max_diff(double, expected[0]) <= TOL and max_diff(single, expected[1]) <= TOL


def test_own_names_round_trip(plain, tmp_path):
    """FluxCore's own names (BFL trunk), as `state_dict()` writes them after training, load back identically."""
    model = load_model(write_diffusers_controlnet(plain, tmp_path / "cn"), torch_dtype=torch.float32)
    path = tmp_path / "trained.safetensors"
    save_file({"controlnet." + k: v for k, v in model.state_dict().items()}, str(path))
    assert [(d.kind.name, d.layout) for d in detect(open_state_dict(path))] == [("controlnet", "bfl")]
    again = load_model(path, config=AXES, torch_dtype=torch.float32)
    x = controlnet_inputs()
    assert max_diff(ours(again, x)[0], ours(model, x)[0]) == 0.0


# ---------------------------------------------------------------- spreading residuals over the DiT's blocks

PAIRS = [(5, 19), (10, 38), (6, 19), (4, 19), (2, 19), (1, 38), (19, 19), (3, 38), (7, 19), (4, 10), (6, 38)]


@pytest.mark.parametrize("n, num_blocks", PAIRS)
def test_spread_residuals_is_diffsynths_alignment(n, num_blocks):
    from tests.diffsynth_ref import diffsynth_controlnet
    cn, _ = diffsynth_controlnet()
    residuals = [torch.full((1,), float(i)) for i in range(n)]
    theirs = cn.FluxControlNet.align_res_stack_to_original_blocks(None, residuals, num_blocks, torch.zeros(1))
    assert [id(r) for r in spread_residuals(residuals, num_blocks)] == [id(r) for r in theirs]


def test_spread_residuals_is_diffusers_interval():
    """diffusers' FluxTransformer2DModel adds controlnet_block_samples[i // ceil(blocks / n)] after block i: observed
    through its own forward with recording stand-ins for its blocks (a residual k is the constant k + 1)."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
            seen.append(hidden_states.clone())
            return encoder_hidden_states, hidden_states

    class RecordOut(torch.nn.Module):
        def forward(self, hidden_states, temb):
            seen.append(hidden_states.clone())
            return hidden_states

    dit = make_diffusers_dit(num_layers=19, num_single_layers=38)
    dit.transformer_blocks = torch.nn.ModuleList(Recorder() for _ in range(19))
    dit.single_transformer_blocks = torch.nn.ModuleList(Recorder() for _ in range(38))
    dit.norm_out, dit.proj_out = RecordOut(), torch.nn.Identity()
    x = controlnet_inputs()
    for n_double, n_single in ((5, 10), (6, 1), (4, 7)):
        seen.clear()
        res_d = [torch.full((1, 6, 32), k + 1.0) for k in range(n_double)]
        res_s = [torch.full((1, 6, 32), 100.0 * (k + 1)) for k in range(n_single)]
        with torch.no_grad():
            dit(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
                controlnet_block_samples=res_d, controlnet_single_block_samples=res_s)
        added = [(b - a).mean().item() for a, b in zip(seen, seen[1:])]  # what was added after each block
        ours_d = [r.mean().item() for r in spread_residuals(res_d, 19)]
        ours_s = [r.mean().item() for r in spread_residuals(res_s, 38)]
        assert added == pytest.approx(ours_d + ours_s, abs=1e-4)


def test_spread_residuals_of_nothing_is_none():
    assert spread_residuals([], 19) == [None] * 19
    assert spread_residuals([torch.zeros(1)], 0) == []


# ---------------------------------------------------------------- modes

def test_union_mode_names_and_ids():
    assert union_mode_id("canny") == 0 and union_mode_id("Depth") == 2 and union_mode_id(6) == 6
    assert union_mode_id("low quality") == union_mode_id("low_quality") == union_mode_id("lq") == 6
    for bad in ("sketch", 7, -1, True):
        with pytest.raises(ValueError, match=r"processor_id .*'canny' \(0\).*'lq' \(6\)"):
            union_mode_id(bad)


def test_mode_required_by_union_and_refused_by_plain(plain, union, tmp_path):
    plain_model = load_model(write_diffusers_controlnet(plain, tmp_path / "p"), torch_dtype=torch.float32)
    union_model = load_model(write_diffusers_controlnet(union, tmp_path / "u"), torch_dtype=torch.float32)
    x = controlnet_inputs()
    with pytest.raises(ValueError, match="union ControlNet.*give processor_id, one of canny, tile"):
        ours(union_model, x)
    with pytest.raises(ValueError, match="processor_id 'canny' was given, but this ControlNet has no modes"):
        ours(plain_model, x, mode="canny")
    with pytest.raises(ValueError, match=r"processor_id 10 is not a mode id of this union ControlNet \(0..9\)"):
        ours(union_model, x, mode=10)
    with pytest.raises(ValueError, match="processor_id 'sketch'"):
        ours(union_model, x, mode="sketch")


def test_one_control_serves_the_batch(plain, tmp_path):
    model = load_model(write_diffusers_controlnet(plain, tmp_path / "p"), torch_dtype=torch.float32)
    x = controlnet_inputs(batch=2)
    x["control"] = x["control"][:1]
    expected = diffusers_residuals(plain, x, x["control"].expand(2, -1, -1))
    assert max_diff(ours(model, x)[0], expected[0]) <= TOL
    x["control"] = controlnet_inputs(batch=3)["control"]
    with pytest.raises(ValueError, match="control has batch 3, img 2: give one control per image or one for all"):
        ours(model, x)


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(plain, tmp_path):
    model = load_model(write_diffusers_controlnet(plain, tmp_path / "p"), torch_dtype=torch.float32)
    model.requires_grad_(True)
    x = controlnet_inputs()
    calls, block = [], model.double_blocks[0]
    block.forward = lambda *a, _forward=block.forward, **k: calls.append(1) or _forward(*a, **k)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        double, single = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                               x["guidance"], x["control"])
        sum(r.square().mean() for r in double + single).backward()
        grads.append(model.controlnet_x_embedder.weight.grad.clone())
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-6 * grads[0].abs().max().item()


def test_wrong_control_width_is_named(alimama, tmp_path):
    model = load_model(write_diffusers_controlnet(alimama, tmp_path / "inpaint"), torch_dtype=torch.float32)
    x = controlnet_inputs()  # 64-wide control: the mask channel is missing
    with pytest.raises(ValueError, match=r"control has 64 features per token, this ControlNet takes 68 "
                                         r"\(64 latent \+ 4 mask features\)"):
        ours(model, x)


# ---------------------------------------------------------------- detection and refusals

def test_controlnet_and_dit_are_told_apart(plain, tmp_path):
    cn_folder = write_diffusers_controlnet(plain, tmp_path / "cn")
    dit_folder = write_diffusers_dit(make_diffusers_dit(), tmp_path / "transformer")
    assert [(d.kind.name, d.layout) for d in detect(open_state_dict(cn_folder))] == [("controlnet", "diffusers")]
    assert [(d.kind.name, d.layout) for d in detect(open_state_dict(dit_folder))] == [("dit", "diffusers")]
    assert isinstance(load_model(dit_folder, torch_dtype=torch.float32), FluxDiT)
    with pytest.raises(CheckpointError, match=r"expected a FLUX DiT \(diffusion model\), but it looks like a FLUX "
                                              r"ControlNet"):
        load_model(cn_folder, kind="dit")
    with pytest.raises(CheckpointError, match="expected a FLUX ControlNet, but it looks like a FLUX DiT"):
        load_model(dit_folder, kind="controlnet")


def test_controlnet_under_a_prefix(plain, tmp_path):
    path = write_lone_file(plain, tmp_path / "cn.safetensors", prefix="controlnet.")
    assert [d.kind.name for d in detect(open_state_dict(path))] == ["controlnet"]
    model = load_model(path, config=AXES, torch_dtype=torch.float32, kind="controlnet")
    x = controlnet_inputs()
    assert max_diff(ours(model, x)[0], diffusers_residuals(plain, x, x["control"])[0]) <= TOL


def refusals(tmp_path):
    xlabs_diffusers = make_diffusers_controlnet(conditioning_embedding_channels=16)  # XLabs converted to diffusers
    files = {"xlabs": xlabs_controlnet_state_dict(),
             "xlabs_diffusers": {k: v.detach().contiguous() for k, v in xlabs_diffusers.state_dict().items()},
             "sd_ldm": sd_controlnet_state_dict("ldm"), "sd_ldm_bare": sd_controlnet_state_dict("ldm-bare"),
             "sd_diffusers": sd_controlnet_state_dict("diffusers")}
    out = {}
    for name, sd in files.items():
        out[name] = tmp_path / f"{name}.safetensors"
        save_file(sd, str(out[name]))
    return out


@pytest.mark.parametrize("name, message", [
    ("xlabs", r"this is an XLabs-style FLUX ControlNet .*which FluxCore does not run\. FluxCore runs the "
              r"diffusers-format FLUX ControlNets \(InstantX Union-alpha, alimama Inpainting-Beta, jasperai Upscaler"),
    ("xlabs_diffusers", r"this is an XLabs-style FLUX ControlNet .*FluxCore does not run"),
    ("sd_ldm", r"this is a Stable Diffusion 1\.5/SDXL ControlNet \(LDM layout.*not a FLUX ControlNet\. FluxCore runs"),
    ("sd_ldm_bare", r"this is a Stable Diffusion 1\.5/SDXL ControlNet \(LDM layout"),
    ("sd_diffusers", r"this is a Stable Diffusion 1\.5/SDXL ControlNet \(diffusers ControlNetModel layout"),
])
def test_unsupported_controlnets_are_refused_by_name(name, message, tmp_path):
    path = refusals(tmp_path)[name]
    for kind in (None, "controlnet", "dit"):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": " + message):
            load_model(path, kind=kind)


@pytest.mark.parametrize("sd", [
    {"conv.weight": torch.zeros(3, 3)},
    # an SD UNet (LDM names, ComfyUI prefix) and a FLUX VAE-like diffusers down path are not called SD ControlNets
    {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
     "model.diffusion_model.output_blocks.0.0.weight": torch.zeros(2, 2)},
    {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2), "mid_block.resnets.0.conv1.weight": torch.zeros(2, 2),
     "up_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)},
])
def test_other_files_still_say_not_a_flux_component(sd, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"not a FLUX component \(none of: FLUX ControlNet, FLUX DiT \(diffusion model\), "
                                              r"FLUX VAE.*LoRA-Encoder, LoRA-Fusion patcher, .*Qwen2\.5-VL, Step1X-Edit connector\)"):
        load_model(path, kind="controlnet")


def test_head_dim_other_than_128_needs_axes(plain, tmp_path):
    with pytest.raises(CheckpointError, match=r"ControlNet head dim is 16, not FLUX's 128.*axes_dim"):
        load_model(write_lone_file(plain, tmp_path / "cn.safetensors"))


# ---------------------------------------------------------------- the published checkpoints' shapes

def published_state_dict(extra_condition_channels=0, **config) -> dict[str, LazyTensor]:
    """The key names and shapes of a published checkpoint at full size (no data: built on the meta device from its
    config.json values), as lazy tensors that refuse to be read."""
    with torch.device("meta"):
        from diffusers import FluxControlNetModel
        model = FluxControlNetModel(**config)
        if extra_condition_channels:
            model.controlnet_x_embedder = torch.nn.Linear(64 + extra_condition_channels, 3072)

    def unreadable():
        raise AssertionError("config inference must not read tensor data")
    return {k: LazyTensor(tuple(v.shape), v.dtype, unreadable) for k, v in model.state_dict().items()}


# Their config.json values (huggingface.co: alimama-creative, InstantX, jasperai, ByteDance InfiniteYou).
PUBLISHED = {
    "alimama Inpainting-Beta": (dict(num_layers=6, num_single_layers=0, guidance_embeds=True), 4,
                                dict(depth=6, depth_single_blocks=0, extra_condition_channels=4, num_modes=0)),
    "InstantX Union-alpha": (dict(num_layers=5, num_single_layers=10, guidance_embeds=True, num_mode=10), 0,
                             dict(depth=5, depth_single_blocks=10, extra_condition_channels=0, num_modes=10)),
    "jasperai Upscaler": (dict(num_layers=5, num_single_layers=0, guidance_embeds=True), 0,
                          dict(depth=5, depth_single_blocks=0, extra_condition_channels=0, num_modes=0)),
    "InfiniteYou InfuseNet": (dict(num_layers=4, num_single_layers=10, guidance_embeds=True), 0,
                              dict(depth=4, depth_single_blocks=10, extra_condition_channels=0, num_modes=0)),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_from_shapes(name):
    config, extra, expected = PUBLISHED[name]
    layout, sd = select_controlnet(published_state_dict(extra, **config))
    assert layout == "diffusers"
    params = ControlNetParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()})
    assert {k: getattr(params, k) for k in expected} == expected
    assert (params.hidden_size, params.num_heads, params.axes_dim, params.in_channels, params.context_in_dim,
            params.vec_in_dim, params.guidance_embed) == (3072, 24, (16, 56, 56), 64, 4096, 768, True)
    with torch.device("meta"):
        module = FluxControlNet(params)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


# ---------------------------------------------------------------- storage

def test_fp8_storage_loads_and_computes_through_the_vram_manager(union, tmp_path):
    import copy

    from flux_core.vram import VRAMManager
    model = load_model(write_diffusers_controlnet(union, tmp_path / "u"), torch_dtype=torch.float32,
                       weight_dtype=torch.float8_e4m3fn)
    assert model.controlnet_x_embedder.weight.dtype == torch.float8_e4m3fn
    assert model.controlnet_mode_embedder.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.controlnet_blocks[1].bias.dtype == torch.float32
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    manager = VRAMManager("cpu")
    manager.add("controlnet", model, torch.float32)
    manager.load_models_to_device(["controlnet"])
    rounded = copy.deepcopy(union)  # diffusers with its weight matrices rounded through float8 as stored
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim >= 2:
                p.copy_(p.to(torch.float8_e4m3fn).float())
    x = controlnet_inputs(batch=2)
    expected = diffusers_residuals(rounded, x, x["control"], mode=2)
    double, single = ours(model, x, mode=2)
    # Measured 0.0; the unrounded weights' residuals differ by 0.5 / 1.3.
    assert max_diff(double, expected[0]) <= TOL and max_diff(single, expected[1]) <= TOL


def test_bf16_model_works_in_the_dtype_of_its_image_tokens(union, tmp_path):
    model = load_model(write_diffusers_controlnet(union, tmp_path / "u"), torch_dtype=torch.bfloat16)
    x = controlnet_inputs(batch=2)
    expected = diffusers_residuals(union, x, x["control"], mode=2)
    x["img"] = x["img"].bfloat16()  # txt, y, control, timesteps and guidance stay float32: cast inside
    double, single = ours(model, x, mode=2)
    assert double[0].dtype == single[0].dtype == torch.bfloat16
    rel = max(((p.float() - q).norm() / q.norm()).item() for p, q in zip(double + single, expected[0] + expected[1]))
    assert rel < 0.03  # measured 0.012 (bf16 weights and activations); another mode gives 0.089


def test_bf16_file_is_cast(plain, tmp_path):
    path = write_lone_file(plain, tmp_path / "cn.safetensors", dtype=torch.bfloat16)
    model = load_model(path, config=AXES, torch_dtype=torch.float32)
    assert model.img_in.weight.dtype == torch.float32
    x = controlnet_inputs()
    # bf16 weights: relative error of bf16 (~4e-3) times residual magnitude (~8); catches a fp32-vs-random swap.
    assert max_diff(ours(model, x)[0], diffusers_residuals(plain, x, x["control"])[0]) <= 0.5
