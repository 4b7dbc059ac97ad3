"""The DiT against diffusers' FluxTransformer2DModel on the same tiny weights, from every checkpoint layout."""
import json

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.files import CheckpointError
from flux_core.loading.loader import load_model
from flux_core.math import image_ids, text_ids
from flux_core.models.dit import DiTExtras, FluxDiT, FluxParams
from tests.tiny_dit import (bfl_state_dict, diffusers_forward, make_diffusers_dit, write_bfl_dit, write_diffsynth_dit,
                            write_diffusers_dit)

B, H, W, LT = 2, 6, 10, 7  # non-square latent (packed 3x5 tokens), batch 2


@pytest.fixture(scope="module")
def reference():
    return make_diffusers_dit(seed=1)


def diffusers_image_ids(height, width, index=0):
    """Position ids as diffusers makes them (FluxPipeline; FluxKontextPipeline sets index 1 on the reference), with
    a batch dimension: the reference the DiT tests feed both models, so that our own id helper is tested too."""
    from diffusers import FluxPipeline
    ids = FluxPipeline._prepare_latent_image_ids(B, height // 2, width // 2, torch.device("cpu"), torch.float32)
    ids[..., 0] = index
    return ids[None].repeat(B, 1, 1)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(img=torch.randn(B, (H // 2) * (W // 2), 64, generator=g), img_ids=diffusers_image_ids(H, W),
                txt=torch.randn(B, LT, 32, generator=g), txt_ids=torch.zeros(B, LT, 3),
                timesteps=torch.tensor([0.9, 0.25]), y=torch.randn(B, 32, generator=g), guidance=torch.tensor([3.5, 1.0]))


def write_layout(layout, ref, tmp_path):
    if layout == "diffusers_folder":
        return write_diffusers_dit(ref, tmp_path / "transformer")
    if layout == "diffusers_sharded":
        return write_diffusers_dit(ref, tmp_path / "transformer", max_shard_size="200KB")
    if layout == "bfl":
        return write_bfl_dit(ref, tmp_path / "flux1-tiny.safetensors")
    if layout == "comfyui_prefixed":
        return write_bfl_dit(ref, tmp_path / "flux1-tiny.safetensors", prefix="model.diffusion_model.")
    if layout == "diffsynth":
        return write_diffsynth_dit(ref, tmp_path / "dit.safetensors")
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["bfl", "comfyui_prefixed", "diffusers_folder", "diffusers_sharded", "diffsynth"])
def test_parity_with_diffusers_in_every_layout(layout, reference, inputs, tmp_path):
    source = write_layout(layout, reference, tmp_path)
    # RoPE axes of a non-FLUX head dim come from config.json in a diffusers folder; single files state them.
    config = None if layout.startswith("diffusers") else {"axes_dim": (4, 6, 6)}
    ours = load_model(source, config=config, torch_dtype=torch.float32, kind="dit")
    assert isinstance(ours, FluxDiT)
    with torch.no_grad():
        out = ours(**inputs)
    expected = diffusers_forward(reference, inputs)
    assert out.shape == expected.shape
    # Measured 0 in every layout (the same float32 operations); 1e-5 leaves room for another CPU's kernel order on
    # outputs up to 4. The smallest wrong conversion measured, RoPE rows and columns swapped, moves it by 2.5e-2;
    # a swapped shift/scale (the Nexus-Gen final layer) by 4.5, the timestep scaled by 999 instead of 1000 by 1.5.
    assert (out - expected).abs().max().item() <= 1e-5


def test_position_ids_are_diffusers_ids():
    # Rows then columns, [index, row, col]: on the non-square 6x10 latent (3x5 tokens) a swap of rows and columns
    # changes the ids; text ids are zeros, as diffusers makes them (torch.zeros(L, 3)).
    assert torch.equal(image_ids(B, H, W), diffusers_image_ids(H, W))
    assert torch.equal(image_ids(B, 4, 6, index=1), diffusers_image_ids(4, 6, index=1))
    assert torch.equal(image_ids(1, 4, 6)[0, :4], torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]))
    assert torch.equal(text_ids(B, LT), torch.zeros(B, LT, 3))


def test_params_are_inferred_from_shapes(reference, tmp_path):
    ours = load_model(write_layout("bfl", reference, tmp_path), config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32)
    assert ours.params == FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=32,
                                     mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                                     guidance_embed=True)


def test_schnell_style_dit_without_guidance_embedder(inputs, tmp_path):
    ref = make_diffusers_dit(seed=2, guidance_embeds=False)
    ours = load_model(write_diffusers_dit(ref, tmp_path / "t"), torch_dtype=torch.float32)
    assert not ours.params.guidance_embed
    x = dict(inputs, guidance=None)
    with torch.no_grad():
        out = ours(**x)
        expected = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                       timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0]).sample
    # Measured 0; a guidance embedding added without a guidance embedder, or any conversion mistake above, moves
    # it by >= 2.5e-2.
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("stored", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_low_precision_files_are_cast_on_load(stored, reference, tmp_path):
    path = write_bfl_dit(reference, tmp_path / "low.safetensors", dtype=stored)
    ours = load_model(path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32)
    expected = bfl_state_dict(reference)["double_blocks.0.img_attn.qkv.weight"].to(stored).float()
    assert ours.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
    assert torch.equal(ours.double_blocks[0].img_attn.qkv.weight, expected)


def test_kontext_reference_tokens_are_dropped_from_output(reference, inputs, tmp_path):
    ours = load_model(write_layout("bfl", reference, tmp_path), config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32)
    ref_tokens = torch.randn(B, 6, 64)
    ref_ids = diffusers_image_ids(4, 6, index=1)  # a 4x6 latent: 2x3 tokens
    with torch.no_grad():
        plain = ours(**inputs)
        with_ref = ours(**inputs, extras=DiTExtras(ref_tokens=ref_tokens, ref_ids=ref_ids))
    assert with_ref.shape == plain.shape
    assert not torch.allclose(with_ref, plain)  # the reference is attended to (measured 0.27; ignored: 0)
    # Equivalent to diffusers with the reference appended to the sequence, output cut back.
    x = dict(inputs, img=torch.cat([inputs["img"], ref_tokens], 1), img_ids=torch.cat([inputs["img_ids"], ref_ids], 1))
    expected = diffusers_forward(reference, x)[:, : inputs["img"].shape[1]]
    # Measured 0; the reference at position index 0 instead of 1 (its RoPE ids the same as the image's) moves it by
    # 1.2e-3, which a bound of 1e-4 would only catch by a factor 12.
    assert (with_ref - expected).abs().max().item() <= 1e-5


def test_head_dim_other_than_128_needs_axes(reference, tmp_path):
    path = write_layout("bfl", reference, tmp_path)
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_model(path, torch_dtype=torch.float32)


def test_missing_shard_is_named(reference, tmp_path):
    folder = write_layout("diffusers_sharded", reference, tmp_path)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_model(folder)


def test_truncated_file_is_refused(reference, tmp_path):
    path = write_layout("bfl", reference, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(path)


def test_unknown_state_dict_is_not_a_flux_component(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a FLUX component"):
        load_model(path)


def test_incomplete_dit_names_missing_keys(reference, tmp_path):
    sd = bfl_state_dict(reference)
    del sd["single_blocks.1.linear2.weight"]
    path = tmp_path / "cut.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="single_blocks.1.linear2.weight"):
        load_model(path, config={"axes_dim": (4, 6, 6)})


def test_loading_modules_import_each_other_without_a_circle():
    # The loader imports the kind modules; a kind module importing the loader back (even lazily, inside a
    # function) is an import circle. The graph of imports between flux_core/loading modules must be acyclic.
    import ast
    from pathlib import Path
    folder = Path(__file__).parent.parent / "flux_core" / "loading"
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flux_core.loading."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps & {p.stem for p in folder.glob("*.py")}
    assert graph["loader"] >= {"dit_kind", "vae_kind", "text_kinds"}

    def visit(name, stack):
        assert name not in stack, f"import circle: {' -> '.join(stack + [name])}"
        for dep in graph[name]:
            visit(dep, stack + [name])
    for name in graph:
        visit(name, [])


def test_loading_progress_bar_only_for_large_models_or_when_asked(reference, tmp_path, capsys, monkeypatch):
    import flux_core.loading.loader as loader
    path = write_layout("bfl", reference, tmp_path)
    load_model(path, config={"axes_dim": (4, 6, 6)})
    assert capsys.readouterr().err == ""  # a tiny model loads quietly (tests stay quiet)
    load_model(path, config={"axes_dim": (4, 6, 6)}, progress=True)
    err = capsys.readouterr().err
    assert "Loading FLUX DiT" in err and "100%" in err
    monkeypatch.setattr(loader, "PROGRESS_MIN_BYTES", 1000)  # as if the model were large: the bar is on by default
    load_model(path, config={"axes_dim": (4, 6, 6)})
    assert "Loading FLUX DiT" in capsys.readouterr().err
    load_model(path, config={"axes_dim": (4, 6, 6)}, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("layout", ["diffsynth", "nexus_gen"])
def test_diffsynth_layouts_match_diffsynths_own_forward(layout, reference, tmp_path):
    """Files in DiffSynth's names, written by DiffSynth's own converter, against DiffSynth's own FluxDiT blocks and
    forward (`model_fn_flux_image`) on the same weights; Nexus-Gen's `pipe.dit.` files hold the final AdaLN in the
    other order, which DiffSynth's converter swaps back on load."""
    from einops import rearrange

    from tests.diffsynth_ref import diffsynth_flux, full_size_key_names, tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict, write_nexus_gen_dit
    model_fn, convert, _ = diffsynth_flux()
    # DiffSynth's belief about Nexus-Gen files, read off its converter at FLUX size (it splits at a literal 3072).
    nexus = convert({"pipe.dit.final_norm_out.linear.bias": torch.arange(6144.0)})["final_norm_out.linear.bias"]
    assert torch.equal(nexus, torch.cat([torch.arange(3072.0, 6144), torch.arange(3072.0)]))

    theirs = tiny_diffsynth_dit()
    theirs.load_state_dict(diffsynth_state_dict(reference), strict=True)
    assert {__import__("re").sub(r"\.\d+\.", ".N.", k) for k in theirs.state_dict()} == full_size_key_names()
    path = (write_layout("diffsynth", reference, tmp_path) if layout == "diffsynth"
            else write_nexus_gen_dit(reference, tmp_path / "nexus_gen.safetensors"))
    ours = load_model(path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")

    g = torch.Generator().manual_seed(3)
    latents = torch.randn(B, 16, H, W, generator=g)
    txt, pooled = torch.randn(B, LT, 32, generator=g), torch.randn(B, 32, generator=g)
    sigma, guidance = torch.tensor([0.9, 0.25]), torch.tensor([3.5, 1.0])
    ids, txt_ids = diffusers_image_ids(H, W), torch.zeros(B, LT, 3)
    with torch.no_grad():
        expected = model_fn(dit=theirs, latents=latents, timestep=sigma * 1000, prompt_emb=txt,
                            pooled_prompt_emb=pooled, guidance=guidance, text_ids=txt_ids, image_ids=ids)
        packed = rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)
        out = ours(img=packed, img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=sigma, y=pooled, guidance=guidance)
    out = rearrange(out, "B (H W) (C P Q) -> B C (H P) (W Q)", H=H // 2, P=2, Q=2)
    # Measured 1.4e-6 on outputs up to 4.0 (DiffSynth's float32 kernel order differs from ours). The final layer's
    # shift/scale halves left in the Nexus-Gen order moves it by 4.5, RoPE rows/columns swapped by 2.5e-2.
    assert (out - expected).abs().max().item() <= 1e-5


def test_a_transformers_config_json_beside_a_dit_file_is_not_read_as_the_dits(reference, tmp_path):
    """Nexus-Gen's folder holds its Qwen2.5-VL's config.json beside the decoders that carry a DiT: the DiT is built from
    its own shapes (and the explicit config), not from that file's hidden_size / num_attention_heads."""
    from tests.tiny_dit import write_nexus_gen_dit
    path = write_nexus_gen_dit(reference, tmp_path / "generation_decoder.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 3584,
                                                      "num_attention_heads": 28, "num_hidden_layers": 28}))
    dit = load_model(path, config={"axes_dim": (4, 6, 6)}, torch_dtype=torch.float32, kind="dit")
    assert dit.params.hidden_size == reference.config.num_attention_heads * reference.config.attention_head_dim
    assert dit.params.depth == reference.config.num_layers
