"""LoRA: every format against diffusers on the same tiny weights, exact fuse/unfuse, hooks, stacking, per-layer
alpha, conversion round trips, and the errors and warnings that keep a LoRA from silently doing nothing."""
import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.loader import load_model
from flux_core.lora import clear_lora, load_lora, loaded_loras
from flux_core.model_state import state_of
from flux_core.math import image_ids, text_ids
from lora_tools import (LoraFormatError, LoraKeyWarning, LoraShapeError, parse_lora, read_lora, read_state_dict,
                        save_lora)
from lora_tools.__main__ import main as lora_cli
from tests.tiny_dit import diffusers_forward, make_diffusers_dit, write_bfl_dit
from tests.tiny_lora import (bfl_shapes, bfl_to_diffsynth, diffusers_shapes, expected_from_bfl,
                             expected_from_diffusers, expected_from_xlabs, random_pairs, write_kohya,
                             write_onetrainer, write_peft, write_xlabs)

B, H, W, LT = 2, 4, 6, 5
HIDDEN = 32


def varied_alpha(name: str) -> float:
    return (1.0, 2.0, 3.0, 8.0, 0.5)[sum(map(ord, name)) % 5]


def varied_rank(name: str) -> int:
    return 2 if len(name) % 2 else 4


@pytest.fixture(scope="module")
def reference():
    return make_diffusers_dit(seed=1)


@pytest.fixture(scope="module")
def base_dit(reference, tmp_path_factory):
    path = write_bfl_dit(reference, tmp_path_factory.mktemp("dit") / "flux1-tiny.safetensors")
    return load_model(path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32)


@pytest.fixture
def dit(base_dit):
    """The shared DiT, checked clean before and after each test."""
    assert not loaded_loras(base_dit)
    yield base_dit
    clear_lora(base_dit)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(img=torch.randn(B, (H // 2) * (W // 2), 64, generator=g), img_ids=image_ids(B, H, W),
                txt=torch.randn(B, LT, 32, generator=g), txt_ids=text_ids(B, LT),
                timesteps=torch.tensor([0.9, 0.3]), y=torch.randn(B, 32, generator=g), guidance=torch.tensor([3.5, 1.0]))


@pytest.fixture(scope="module")
def shapes(reference):
    return {"bfl": bfl_shapes(reference), "diffusers": diffusers_shapes(reference)}


def ours_forward(dit, x):
    with torch.no_grad():
        return dit(**x)


def diffusers_with_lora(reference, path, x):
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # "no LoRA keys for text_encoder": this pipeline has none
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=copy.deepcopy(reference))
    pipe.load_lora_weights(str(path))
    return diffusers_forward(pipe.transformer, x)


def weights(dit):
    return {n: p.detach().clone() for n, p in dit.named_parameters()}


def assert_deltas(dit, before, expected, atol=1e-6):
    # Measured <= 2.0e-7 (float32 rounding of weight + delta, weights up to 2.5). The smallest layer's delta peaks at
    # 0.044, so a scale (alpha / rank, strength) off by 1% there is 4.4e-4; a dropped or misplaced layer is the whole
    # delta. rtol=0: the default rtol would add up to 2.5e-5 on large weights.
    for name, d in expected.items():
        got = dit.get_submodule(name).weight.detach().double() - before[f"{name}.weight"].double()
        assert torch.allclose(got, d, atol=atol, rtol=0), f"{name}: max error {(got - d).abs().max().item():.3g}"


# ---- the LoRA files of the parity tests -------------------------------------------------------------------

def peft_pairs(shapes):
    """Every diffusers module of block 0 and single block 0, only some of q/k/v elsewhere (block 1: to_q, to_v,
    add_k_proj; single block 1: to_k and proj_mlp, no q/v), the global layers; ranks 2 and 4."""
    d = shapes["diffusers"]
    partial = {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_v", "transformer_blocks.1.attn.add_k_proj",
               "transformer_blocks.1.ff.net.2", "single_transformer_blocks.1.attn.to_k",
               "single_transformer_blocks.1.proj_mlp"}
    chosen = {n: s for n, s in d.items() if n.startswith(("transformer_blocks.0.", "single_transformer_blocks.0."))
              or n in partial or not n.startswith(("transformer_blocks", "single_transformer_blocks"))}
    return random_pairs(chosen, seed=11, rank=varied_rank)


def kohya_pairs(shapes, seed=12, for_diffusers=False, rank=4):
    """Every BFL layer with per-layer alphas. diffusers 0.42.1's kohya reader hard-codes FLUX-size linear1
    parts and drops (silently) the LoRA of every layer outside the blocks, so `for_diffusers` leaves those out."""
    chosen = {n: s for n, s in shapes["bfl"].items()
              if not for_diffusers or (n.startswith(("double_blocks", "single_blocks")) and not n.endswith("linear1"))}
    return random_pairs(chosen, seed=seed, rank=rank, alpha=varied_alpha)


def xlabs_pairs():
    shapes = {}
    for i in range(2):
        for s in "12":
            shapes[f"double_blocks.{i}.processor.qkv_lora{s}"] = (3 * HIDDEN, HIDDEN)
            shapes[f"double_blocks.{i}.processor.proj_lora{s}"] = (HIDDEN, HIDDEN)
    shapes["single_blocks.0.processor.qkv_lora"] = (3 * HIDDEN, HIDDEN)
    shapes["single_blocks.0.processor.proj_lora"] = (HIDDEN, HIDDEN + 4 * HIDDEN)
    return random_pairs(shapes, seed=13, rank=4)


def make_case(case, shapes, tmp_path):
    """(file, expected {BFL layer: delta}) for a parity case."""
    if case == "diffusers":
        pairs = peft_pairs(shapes)
        return write_peft(tmp_path / "peft.safetensors", pairs), expected_from_diffusers(pairs, shapes["bfl"], HIDDEN)
    if case == "diffusers_alpha_metadata":  # diffusers' own lora_adapter_metadata with lora_alpha != r
        pairs = random_pairs({n: s for n, s in shapes["diffusers"].items() if "transformer_blocks.0." in n}, seed=14)
        pattern = {"transformer_blocks.0.attn.to_q": 1.0, "single_transformer_blocks.0.proj_out": 16.0}
        pairs = {n: (d, u, pattern.get(n, 8.0)) for n, (d, u, _) in pairs.items()}
        config = {"r": 4, "lora_alpha": 8, "alpha_pattern": pattern, "rank_pattern": {},
                  "target_modules": sorted(pairs), "use_dora": False, "lora_bias": False}
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
        return (write_peft(tmp_path / "peft_meta.safetensors", pairs, metadata=meta),
                expected_from_diffusers(pairs, shapes["bfl"], HIDDEN))
    if case == "kohya":
        pairs = kohya_pairs(shapes, for_diffusers=True)
        return write_kohya(tmp_path / "kohya.safetensors", pairs), expected_from_bfl(pairs)
    if case == "xlabs":
        pairs = xlabs_pairs()
        return write_xlabs(tmp_path / "xlabs.safetensors", pairs), expected_from_xlabs(pairs, shapes["bfl"])
    raise AssertionError(case)


# ---- parity with diffusers ---------------------------------------------------------------------------------

# peft warns that diffusers' inferred target "proj_out" also names single-block proj_out layers: harmless here.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
@pytest.mark.parametrize("case", ["diffusers", "diffusers_alpha_metadata", "kohya", "xlabs"])
def test_parity_with_diffusers_fused_and_hooked(case, reference, dit, inputs, shapes, tmp_path):
    path, expected = make_case(case, shapes, tmp_path)
    expected_out = diffusers_with_lora(reference, path, inputs)
    base_out = ours_forward(dit, inputs)
    # Measured 1.4 to 6.3: the LoRA changes the output far beyond the parity bound below.
    assert (expected_out - diffusers_forward(reference, inputs)).abs().max() > 1e-2, "the LoRA must change the output"
    before = weights(dit)

    report = load_lora(dit, path, hotload=False)
    assert report.mode == "fused" and not report.unmatched_keys
    assert report.loras[0].format == case.split("_")[0]
    assert set(report.layers) == set(expected)
    assert_deltas(dit, before, expected)
    fused_out = ours_forward(dit, inputs)
    clear_lora(dit)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters()), "unfuse must restore the bits"

    report = load_lora(dit, path, hotload=True)
    assert report.mode == "hook"
    hooked_out = ours_forward(dit, inputs)
    clear_lora(dit)
    assert torch.equal(ours_forward(dit, inputs), base_out)

    # Measured <= 2.9e-6 (fused) and 1.8e-6 (hooked) on outputs up to 5.5 (peft's unfused float32 order differs).
    # The least visible real mistake measured: one LoRA layer of 36 missing (double_blocks.1.txt_attn.proj) moves the
    # output by 1.2e-2; every layer's strength 1% off by 0.1.
    assert (fused_out - expected_out).abs().max().item() <= 1e-4
    assert (hooked_out - expected_out).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_files_we_write_load_in_diffusers(fmt, reference, dit, inputs, shapes, tmp_path):
    """Our writers against diffusers' readers: a kohya source written as diffusers/PEFT (split q/k/v,
    alpha folded, adapter metadata), and a diffusers source (partial q/k/v) written as kohya."""
    if fmt == "diffusers":
        source = write_kohya(tmp_path / "src.safetensors", kohya_pairs(shapes, seed=21, rank=varied_rank))
    else:
        pairs = {n: p for n, p in peft_pairs(shapes).items() if n.startswith("transformer_blocks")}
        source = write_peft(tmp_path / "src.safetensors", pairs)
    written = save_lora(read_lora(source), tmp_path / f"out_{fmt}.safetensors", fmt=fmt)
    expected_out = diffusers_with_lora(reference, written, inputs)
    load_lora(dit, source)
    out = ours_forward(dit, inputs)
    assert (expected_out - diffusers_forward(reference, inputs)).abs().max() > 1e-2  # measured 2.3, 6.8
    # Measured <= 6.2e-6; a missing LoRA layer moves it by >= 1.2e-2 (see the test above).
    assert (out - expected_out).abs().max().item() <= 1e-4


# ---- alpha, stacking, exact unfuse, hooks ------------------------------------------------------------------

def test_kohya_per_layer_alpha(dit, shapes, tmp_path):
    pairs = random_pairs(shapes["bfl"], seed=31, rank=4, alpha=varied_alpha)
    assert len({a for _, _, a in pairs.values()}) >= 4
    before = weights(dit)
    load_lora(dit, write_kohya(tmp_path / "k.safetensors", pairs))
    assert_deltas(dit, before, {n: u.double() @ d.double() * (a / 4) for n, (d, u, a) in pairs.items()})


def test_stacking_with_strengths_and_exact_unfuse(dit, inputs, shapes, tmp_path):
    bfl = shapes["bfl"]
    p1 = random_pairs(bfl, seed=41, rank=4, alpha=varied_alpha)
    p2 = random_pairs({n: s for n, s in bfl.items() if "double_blocks.1" in n or "single" in n}, seed=42, rank=2)
    f1, f2 = write_kohya(tmp_path / "a.safetensors", p1), write_kohya(tmp_path / "b.safetensors", p2)
    before = weights(dit)
    base_out = ours_forward(dit, inputs)

    report = load_lora(dit, [f1, f2], alpha=[0.7, -0.3])
    assert [r.strength for r in report.loras] == [0.7, -0.3]
    expected = {n: 0.7 * d for n, d in expected_from_bfl(p1).items()}
    for n, d in expected_from_bfl(p2).items():
        expected[n] = expected[n] - 0.3 * d
    assert_deltas(dit, before, expected)
    fused_out = ours_forward(dit, inputs)
    clear_lora(dit)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())

    # The same stack as hooks, one LoRA per call, in the other order.
    load_lora(dit, f2, alpha=-0.3, hotload=True)
    load_lora(dit, f1, alpha=0.7, hotload=True)
    assert len(loaded_loras(dit)) == 2
    assert any(m._forward_hooks for m in dit.modules())
    # Measured 2.7e-6 (hooks add x @ delta.T where fusing adds delta to W); a strength off by 0.01 moves outputs
    # by ~0.1 (measured for 1.0 -> 0.99), a missing layer by >= 1.2e-2.
    assert (ours_forward(dit, inputs) - fused_out).abs().max().item() <= 1e-5
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters()), "hooks never touch weights"
    clear_lora(dit)
    assert not any(m._forward_hooks for m in dit.modules())
    assert torch.equal(ours_forward(dit, inputs), base_out)


def test_fused_and_hooked_loras_mix_and_clear(dit, inputs, shapes, tmp_path):
    pairs = random_pairs(shapes["bfl"], seed=51)
    path = write_kohya(tmp_path / "k.safetensors", pairs)
    before = weights(dit)
    load_lora(dit, path, alpha=0.5, hotload=False)
    load_lora(dit, path, alpha=0.5, hotload=True)
    mixed = ours_forward(dit, inputs)
    clear_lora(dit)
    load_lora(dit, path, alpha=1.0)
    # Measured 2.9e-6; the hooked half lost (strength 0.5 in all) would move it by order 1 (1% of strength: 0.1).
    assert (ours_forward(dit, inputs) - mixed).abs().max().item() <= 1e-5
    clear_lora(dit)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())
    assert not any(m._forward_hooks for m in dit.modules())


def test_hotload_none_chooses_hooks_for_offloaded_and_fp8(base_dit, shapes, tmp_path):
    path = write_kohya(tmp_path / "k.safetensors", random_pairs(shapes["bfl"], seed=61))
    offloaded = copy.deepcopy(base_dit)
    state_of(offloaded).offloaded = True
    assert load_lora(offloaded, path).mode == "hook"
    fp8 = copy.deepcopy(base_dit)
    layer = fp8.get_submodule("double_blocks.0.img_attn.qkv")
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    stored = layer.weight.detach().clone()
    assert load_lora(fp8, path).mode == "hook"
    assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8))
    assert load_lora(copy.deepcopy(base_dit), path).mode == "fused"


def test_state_dict_and_lorafile_sources(dit, shapes, tmp_path):
    pairs = random_pairs(shapes["bfl"], seed=71, alpha=varied_alpha)
    path = write_kohya(tmp_path / "k.safetensors", pairs)
    before = weights(dit)
    tensors, _ = read_state_dict(path)
    load_lora(dit, tensors)
    assert_deltas(dit, before, expected_from_bfl(pairs))
    clear_lora(dit)
    load_lora(dit, read_lora(path), alpha=2.0)
    assert_deltas(dit, before, expected_from_bfl(pairs, strength=2.0))


# ---- every format reads to the same deltas ------------------------------------------------------------------

def test_bfl_named_formats_read_to_the_same_deltas(shapes, tmp_path):
    pairs = random_pairs(shapes["bfl"], seed=81, rank=varied_rank)   # alpha = rank: files without .alpha agree
    expected = expected_from_bfl(pairs)
    files = {
        "kohya": write_kohya(tmp_path / "k.safetensors", pairs),
        "kohya_no_alpha": write_kohya(tmp_path / "k0.safetensors", pairs, with_alpha=False),
        "diffsynth_default": write_peft(tmp_path / "ds.safetensors",
                                        {bfl_to_diffsynth(n): p for n, p in pairs.items() if bfl_to_diffsynth(n)},
                                        prefix="", adapter="default"),
        "diffsynth": write_peft(tmp_path / "ds2.safetensors",
                                {bfl_to_diffsynth(n): p for n, p in pairs.items() if bfl_to_diffsynth(n)}, prefix=""),
    }
    for prefix in ("", "diffusion_model.", "transformer.", "base_model.model."):
        files[f"bfl[{prefix}]"] = write_peft(tmp_path / f"bfl{len(prefix)}.safetensors", pairs, prefix=prefix)
    files["bfl_kohya_suffixes"] = write_peft(tmp_path / "c.safetensors", pairs, prefix="diffusion_model.",
                                             down_up=("lora_down", "lora_up"))
    for label, path in files.items():
        lora = read_lora(path)
        assert lora.format == label.split("_")[0].split("[")[0], label
        want = expected if not label.startswith("diffsynth") else {n: d for n, d in expected.items() if bfl_to_diffsynth(n)}
        assert set(lora.layers) == set(want), label
        for name, d in want.items():
            # Measured <= 4.0e-8 (float32 up @ down against float64); a layer's alpha / rank off by 1% moves its
            # delta by >= 4.4e-4, q/k/v parts in the wrong order by the whole delta.
            assert torch.allclose(lora.delta(name).double(), d, atol=1e-6, rtol=0), (label, name)


def test_onetrainer_and_peft_alpha_keys(shapes, tmp_path):
    pairs = random_pairs(shapes["diffusers"], seed=82, rank=varied_rank, alpha=varied_alpha)
    expected = expected_from_diffusers(pairs, shapes["bfl"], HIDDEN)
    for path, fmt in ((write_onetrainer(tmp_path / "ot.safetensors", pairs), "onetrainer"),
                      (write_peft(tmp_path / "pa.safetensors", pairs, alpha_keys=True), "diffusers")):
        lora = read_lora(path)
        assert lora.format == fmt and not lora.unmatched
        for name, d in expected.items():
            # Measured <= 9.5e-8; the alpha key ignored (alpha / rank taken as 1) scales a delta by 0.25 to 4.
            assert torch.allclose(lora.delta(name).double(), d, atol=1e-6, rtol=0), (fmt, name)


def test_xlabs_with_comfyui_prefix(shapes, tmp_path):
    pairs = xlabs_pairs()
    lora = read_lora(write_xlabs(tmp_path / "x.safetensors", pairs, prefix="diffusion_model."))
    assert lora.format == "xlabs" and not lora.unmatched
    for name, d in expected_from_xlabs(pairs, shapes["bfl"]).items():
        # Measured <= 4.6e-8; a wrong xlabs scale or a swapped qkv/proj layer moves a delta by >= 4e-4.
        assert torch.allclose(lora.delta(name).double(), d, atol=1e-6, rtol=0), name


def test_format_is_detected_from_the_whole_key_set(shapes, tmp_path):
    sd = {}
    for name, (down, up, alpha) in random_pairs(shapes["bfl"], seed=83).items():
        sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = down
        sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = up
    # The first key is a diffusers one, the rest kohya: the file is kohya.
    first = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4)}
    lora = parse_lora({**first, **sd})
    assert lora.format == "kohya"
    assert any("several formats" in n for n in lora.notes)
    assert set(lora.unmatched) == set(first), "the same layer given twice is reported, not summed"


# ---- conversion ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [("kohya", "diffusers"), ("kohya", "diffsynth"), ("diffusers", "kohya"),
                                 ("diffusers", "diffsynth"), ("diffsynth", "kohya"), ("diffsynth", "diffusers")])
def test_round_trip_keeps_deltas(a, b, shapes, tmp_path):
    source = read_lora(write_kohya(tmp_path / "src.safetensors",
                                   random_pairs(shapes["bfl"], seed=91, rank=varied_rank, alpha=varied_alpha)))
    first = read_lora(save_lora(source, tmp_path / f"1.{a}.safetensors", fmt=a))
    second = read_lora(save_lora(first, tmp_path / f"2.{b}.safetensors", fmt=b))
    third = read_lora(save_lora(second, tmp_path / f"3.{a}.safetensors", fmt=a))
    assert (first.format, second.format, third.format) == (a, b, a)
    for lora in (first, second, third):
        assert set(lora.layers) == set(source.layers)
        for name in source.layers:
            # Measured <= 3.0e-8 (0 for most; alpha folded into up and back rounds once); an alpha written for
            # the wrong rank changes a delta by a factor 2 (ranks 2 and 4), a 1% scale error by >= 4e-4.
            assert torch.allclose(lora.delta(name), source.delta(name), rtol=1e-6, atol=1e-7), (lora.format, name)


def test_diffusers_split_is_exact(shapes, tmp_path):
    """A diffusers file (partial q/k/v, ranks 2 and 4) -> canonical (fused qkv) -> diffusers: the same tensors."""
    pairs = peft_pairs(shapes)
    src = write_peft(tmp_path / "p.safetensors", pairs)
    tensors, meta = read_state_dict(save_lora(read_lora(src), tmp_path / "back.safetensors", fmt="diffusers"))
    original, _ = read_state_dict(src)
    assert set(tensors) == set(original)
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 4


def test_kohya_metadata_and_alpha_written(shapes, tmp_path):
    lora = read_lora(write_kohya(tmp_path / "k.safetensors", random_pairs(shapes["bfl"], seed=92, alpha=varied_alpha)))
    tensors, meta = read_state_dict(save_lora(lora, tmp_path / "out.safetensors"))
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "Dynamic"
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == varied_alpha("double_blocks.0.img_attn.qkv")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_cli_inspect_and_convert(shapes, tmp_path, capsys):
    pairs = random_pairs(shapes["bfl"], seed=93, alpha=varied_alpha)
    src = write_kohya(tmp_path / "k.safetensors", pairs)
    assert lora_cli(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "format:        kohya" in out and f"layers:        {len(pairs)}" in out
    assert "double blocks: 0-1" in out and "single blocks: 0-1" in out and "alpha:" in out and "rank:          4" in out
    dst = tmp_path / "conv" / "d.safetensors"
    assert lora_cli(["convert", str(src), str(dst), "--to", "diffusers"]) == 0
    converted = read_lora(dst)
    assert converted.format == "diffusers"
    for name, d in expected_from_bfl(pairs).items():
        # Measured <= 6.4e-8; a conversion that drops alpha or splits q/k/v wrong moves a delta by >= 4e-4.
        assert torch.allclose(converted.delta(name).double(), d, atol=1e-6, rtol=0)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(sdxl))
    assert lora_cli(["inspect", str(sdxl)]) == 1
    assert "SDXL" in capsys.readouterr().err


# ---- errors and warnings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys,looks_like", [
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "SDXL"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "text-encoder"),
    (["diffusion_model.blocks.0.cross_attn.q.lora_A.weight", "diffusion_model.blocks.0.cross_attn.q.lora_B.weight"], "Wan"),
    (["double_blocks.0.img_attn.qkv.weight"], "not a LoRA"),
])
def test_no_matching_key_is_an_error_naming_the_format(keys, looks_like, dit, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(4, 4) for k in keys}, str(path))
    before = weights(dit)
    with pytest.raises(LoraFormatError, match=looks_like) as e:
        load_lora(dit, path)
    assert str(path) in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())


def test_partial_match_warns_listing_unmatched_keys(dit, shapes, tmp_path):
    pairs = random_pairs({n: s for n, s in shapes["bfl"].items() if n.startswith("double_blocks.0")}, seed=101)
    extra = {"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": torch.randn(4, 32),   # no block 7 here
             "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": torch.randn(96, 4),
             "lora_unet_double_blocks_0_img_attn_foo.lora_down.weight": torch.randn(4, 32),   # no such layer
             "lora_unet_double_blocks_0_img_attn_foo.lora_up.weight": torch.randn(32, 4),
             "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.randn(1, 32),        # DoRA: not applied
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32)}
    path = write_kohya(tmp_path / "partial.safetensors", pairs, extra=extra)
    with pytest.warns(LoraKeyWarning) as record:
        report = load_lora(dit, path)
    text = "\n".join(str(w.message) for w in record)
    for key in extra:
        assert key in text
    assert "text-encoder" in text
    assert set(report.unmatched_keys) == set(extra) - {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"}
    assert report.loras[0].skipped_keys == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert set(report.layers) == set(pairs)


def test_full_match_does_not_warn(dit, shapes, tmp_path):
    path = write_kohya(tmp_path / "k.safetensors", random_pairs(shapes["bfl"], seed=102))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lora(dit, path)


@pytest.mark.parametrize("kind", ["kohya", "diffusers_part"])
def test_shape_mismatch_is_an_error_naming_key_and_shapes(kind, dit, tmp_path):
    if kind == "kohya":  # a FLUX.1-dev-sized LoRA on the tiny model
        key = "lora_unet_double_blocks_0_img_attn_proj"
        sd = {f"{key}.lora_down.weight": torch.randn(4, 3072), f"{key}.lora_up.weight": torch.randn(3072, 4)}
        shapes_text = ["(3072, 3072)", "(32, 32)"]
    else:
        key = "transformer.transformer_blocks.0.attn.to_k"
        sd = {f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.randn(48, 4)}
        shapes_text = ["(48, 32)", "(32, 32)"]
    path = tmp_path / "big.safetensors"
    save_file(sd, str(path))
    before = weights(dit)
    with pytest.raises(LoraShapeError) as e:
        load_lora(dit, path)
    for text in [key, *shapes_text]:
        assert text in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in dit.named_parameters())


def test_written_files_get_the_usual_mode_not_safetensors_0600(tmp_path):
    """safetensors creates its files 0600; a LoRA in a shared ComfyUI folder must be readable like any new file."""
    import os
    import stat

    from lora_tools.io import write_state_dict
    path = write_state_dict({"a": torch.zeros(2)}, tmp_path / "lora.safetensors")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
