"""Every node standalone on tiny models: same numbers as the Python pipeline, native data formats, errors."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core.model_config import ModelConfig
from flux_core.pipeline import FluxImagePipeline
from nodes import comfy_bridge
from nodes.conditioning import FluxCoreKontextReference, FluxCoreTextEncode
from nodes.loaders import FluxCoreDiffusersLoader, FluxCoreDiTLoader, FluxCoreTextEncoderLoader, NodeInputError
from nodes.sampler import FluxCoreEmptyLatent, FluxCoreSampler
from nodes.vae_nodes import FluxCoreVAEDecode, FluxCoreVAEEncode
from tests.tiny_comfy import NAMES, load_node_models, make_models_dir

ROOT = Path(__file__).resolve().parents[1]
H, W = 48, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    models_dir, _ = make_models_dir(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    loaded = load_node_models(models_dir)
    dit, te, vae = loaded["dit"], loaded["te"], loaded["vae"]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                             model_configs=[ModelConfig(path=str(models_dir / "diffusers" / NAMES["diffusers"]))])
    yield dict(dir=models_dir, dit=dit, te=te, vae=vae, pipe=pipe)
    mp.undo()


def encode(models, text, guidance=3.5):
    return FluxCoreTextEncode().encode(models["te"], text, guidance, t5_sequence_length=16)[0]


def test_root_init_imports_outside_comfyui_and_registers_every_node():
    spec = importlib.util.spec_from_file_location("fluxcore_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fluxcore_pack"] = pack
    spec.loader.exec_module(pack)
    assert pack.WEB_DIRECTORY == "./js"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("FluxCore") and node_id in pack.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("FluxCore/")
        for group_name, group in cls.INPUT_TYPES().items():
            if group_name == "hidden":  # filled by ComfyUI (UNIQUE_ID, PROMPT), never shown: no tooltip
                continue
            for name, spec_ in group.items():
                assert spec_[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_text_to_image_through_nodes_equals_the_pipeline(models):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    positive, negative = encode(models, "a cat"), encode(models, "")
    out, = FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=5, steps=3, cfg=1.0)
    image, = FluxCoreVAEDecode().decode(out, models["vae"])
    assert image.shape == (1, H, W, 3) and 0 <= image.min() and image.max() <= 1
    expected = models["pipe"](prompt="a cat", height=H, width=W, seed=5, num_inference_steps=3, t5_sequence_length=16,
                              output_type="np", progress_bar_cmd=None)
    # Measured 0 here and in the node tests below (the same float32 computations). The smallest real mistake
    # measured on these tiny models: the VAE scale 0.3611 written 0.361 moves pixels by 3.0e-4 (test_pipeline.py),
    # guidance 3.4 for 3.5 by 0.99.
    assert np.abs(image.numpy() - expected).max() <= 1e-5


def test_true_cfg_and_guidance_from_native_conditioning(models):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    positive, negative = encode(models, "a cat"), encode(models, "blurry")
    # What native FluxGuidance does: a copy of every entry with "guidance" replaced.
    positive_25 = [[t, {**d, "guidance": 2.5}] for t, d in positive]
    out, = FluxCoreSampler().sample(models["dit"], positive_25, negative, latent, seed=1, steps=2, cfg=3.0)
    image, = FluxCoreVAEDecode().decode(out, models["vae"])
    expected = models["pipe"](prompt="a cat", negative_prompt="blurry", cfg_scale=3.0, embedded_guidance=2.5,
                              height=H, width=W, seed=1, num_inference_steps=2, t5_sequence_length=16,
                              output_type="np", progress_bar_cmd=None)
    assert np.abs(image.numpy() - expected).max() <= 1e-5  # measured 0; a CFG scale 1% off moves it by 8e-3


def test_kontext_reference_node_equals_the_pipeline(models):
    rng = np.random.default_rng(1)
    ref = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    ref_image = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255)[None]
    positive, = FluxCoreKontextReference().append(encode(models, "make it red", 2.5), models["vae"], ref_image)
    assert positive[0][1]["reference_latents"][0].shape == (1, 16, 4, 6)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    out, = FluxCoreSampler().sample(models["dit"], positive, positive, latent, seed=2, steps=2)
    image, = FluxCoreVAEDecode().decode(out, models["vae"])
    expected = models["pipe"](prompt="make it red", kontext_images=ref, embedded_guidance=2.5, height=H, width=W,
                              seed=2, num_inference_steps=2, t5_sequence_length=16, output_type="np",
                              progress_bar_cmd=None)
    assert np.abs(image.numpy() - expected).max() <= 1e-5  # measured 0; a reference at index 0: DiT 1.2e-3


def test_image_to_image_and_noise_mask_keep_the_unmasked_latent(models):
    pixels = torch.rand(1, H, W, 3)
    encoded, = FluxCoreVAEEncode().encode(pixels, models["vae"])
    assert encoded["samples"].shape == (1, 16, H // 8, W // 8)
    mask = torch.zeros(1, 1, H, W)
    mask[..., :, W // 2:] = 1.0  # regenerate the right half only (SetLatentNoiseMask's format)
    masked = dict(encoded, noise_mask=mask)
    out, = FluxCoreSampler().sample(models["dit"], encode(models, "a cat"), encode(models, ""), masked, seed=0,
                                    steps=3, denoise=0.8)
    left, right = slice(0, W // 16), slice(W // 16 + 1, None)
    # Kept half: measured 1.2e-7 (raw values up to 1.8, one scale/unscale round trip); the mask's polarity swapped
    # moves it by 14.8, a kept latent re-made with the shift 0.1159 written 0.12 by 4e-3.
    assert torch.allclose(out["samples"][..., left], encoded["samples"][..., left], atol=1e-6, rtol=0)
    assert not torch.allclose(out["samples"][..., right], encoded["samples"][..., right], atol=1e-2)  # measured 14.8
    assert "noise_mask" in out  # extra keys are kept for downstream nodes



def test_sampler_refuses_a_run_whose_activations_cannot_fit(models, monkeypatch):
    # A device smaller than the estimate refuses before the DiT runs; one 1.5x the estimate warns. The estimate
    # itself is checked against a measured peak in tests/test_pipeline_inputs.py.
    from flux_core.run_cost import ActivationMemoryWarning, dit_activation_bytes
    from flux_core.vram import SimulatedDevice
    from nodes import vram_nodes
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    positive, negative = encode(models, "a cat"), encode(models, "")
    params = models["dit"].model.module.params
    tokens = (H // 16) * (W // 16) + positive[0][0].shape[1]
    needed = dit_activation_bytes(1, tokens, params.hidden_size, params.mlp_ratio, torch.float32)
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: SimulatedDevice(total_memory=needed - 1))
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler: the DiT's activations for a 64x48 latent_image"):
        FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=5, steps=1)
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: SimulatedDevice(total_memory=int(needed * 1.5)))
    with pytest.warns(ActivationMemoryWarning):
        FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=5, steps=1)

def test_progress_is_reported_and_cancel_stops_within_a_step(models):
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    calls = []
    original = comfy_bridge.Progress.update
    comfy_bridge.Progress.update = lambda self, v, preview=None: calls.append(v) or original(self, v, preview)
    try:
        FluxCoreSampler().sample(models["dit"], encode(models, "x"), encode(models, ""), latent, seed=0, steps=3)
        assert calls == [1, 2, 3]
        calls.clear()
        comfy_bridge.request_interrupt()
        with pytest.raises(comfy_bridge.Interrupted):
            FluxCoreSampler().sample(models["dit"], encode(models, "x"), encode(models, ""), latent, seed=0, steps=3)
        assert calls == [1]
    finally:
        comfy_bridge.Progress.update = original


def test_diffusers_folder_loader_gives_all_three(models):
    dit, te, vae = FluxCoreDiffusersLoader().load(NAMES["diffusers"])
    assert dit.model.module.params == models["dit"].model.module.params
    assert te.t5_tokenizer is not None and vae.model.module.params.z_channels == 16


@pytest.mark.parametrize("call, match", [
    (lambda m: FluxCoreDiTLoader().load(NAMES["wrong_dit"]), r"FluxCoreDiTLoader, input 'dit_name': .*expected a FLUX DiT.*VAE"),
    (lambda m: FluxCoreTextEncoderLoader().load(NAMES["t5"], NAMES["t5"]), r"input 'clip_name': .*CLIP-L.*T5"),
    (lambda m: FluxCoreDiTLoader().load("missing.safetensors"), r"input 'dit_name'.*not found"),
    (lambda m: FluxCoreDiTLoader().load(NAMES["dit"], modelscope_id="no-colon"), r"input 'modelscope_id'"),
    (lambda m: FluxCoreEmptyLatent().generate(50, 64), r"FluxCoreEmptyLatent, input 'width': 50 .* 48 or 64"),
    (lambda m: FluxCoreSampler().sample(m["dit"], encode(m, "x"), encode(m, ""), {"samples": torch.zeros(1, 16, 5, 8)},
                                        0, 1), r"FluxCoreSampler, input 'latent_image': .* multiple of 16"),
    (lambda m: FluxCoreSampler().sample(m["dit"], encode(m, "x"), encode(m, ""), {"samples": torch.zeros(1, 4, 6, 8)},
                                        0, 1), r"16 channels"),
    (lambda m: FluxCoreVAEEncode().encode(torch.zeros(1, 40, 64, 3), m["vae"]), r"input 'pixels': 64x40"),
])
def test_bad_input_names_node_and_input(models, call, match):
    with pytest.raises(NodeInputError, match=match):
        call(models)


def write_tiny_lora(models, name="style.safetensors", seed=0):
    from tests.tiny_lora import random_pairs, write_kohya
    dit = models["dit"].model.module
    shapes = {n: (m.out_features, m.in_features) for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith(("double_blocks", "single_blocks"))}
    (models["dir"] / "loras").mkdir(exist_ok=True)
    return write_kohya(models["dir"] / "loras" / name, random_pairs(shapes, seed=seed, rank=2, alpha=1.0, std=0.3))


def test_lora_nodes_stack_equal_the_pipeline_and_never_stack_twice(models):
    from nodes.lora_nodes import FluxCoreLoraLoader
    a, b = write_tiny_lora(models, "a.safetensors", 0), write_tiny_lora(models, "b.safetensors", 1)
    with_loras, = FluxCoreLoraLoader().apply(models["dit"], "a.safetensors", 0.8)
    with_loras, = FluxCoreLoraLoader().apply(with_loras, "b.safetensors", -0.5)
    assert models["dit"].loras == ()  # the upstream handle is unchanged
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    run = lambda handle: FluxCoreVAEDecode().decode(FluxCoreSampler().sample(  # noqa: E731
        handle, encode(models, "a cat"), encode(models, ""), latent, seed=4, steps=2)[0], models["vae"])[0]
    first, again, plain = run(with_loras), run(with_loras), run(models["dit"])
    assert torch.equal(first, again)  # re-running does not apply the LoRAs a second time
    pipe = models["pipe"]
    kw = dict(prompt="a cat", height=H, width=W, seed=4, num_inference_steps=2, t5_sequence_length=16,
              output_type="np", progress_bar_cmd=None)
    expected_plain = pipe(**kw)
    pipe.load_lora(pipe.dit, str(a), alpha=0.8)
    pipe.load_lora(pipe.dit, str(b), alpha=-0.5)
    try:
        expected = pipe(**kw)
    finally:
        pipe.clear_lora()
    # Measured 0 for both; a LoRA strength 1% off moves the DiT's output by 0.1 (test_lora.py), a missing layer by
    # 1.2e-2.
    assert np.abs(first.numpy() - expected).max() <= 1e-5
    assert np.abs(plain.numpy() - expected_plain).max() <= 1e-5  # the LoRAs were taken off again
    assert np.abs(expected - expected_plain).max() > 1e-2  # measured 0.69


def test_lora_node_refuses_a_file_that_is_no_flux_lora(models):
    from safetensors.torch import save_file

    from nodes.lora_nodes import FluxCoreLoraLoader
    (models["dir"] / "loras").mkdir(exist_ok=True)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(8, 2)},
              str(models["dir"] / "loras" / "sdxl.safetensors"))
    with pytest.raises(NodeInputError, match=r"FluxCoreLoraLoader, input 'lora_name': .*SDXL"):
        FluxCoreLoraLoader().apply(models["dit"], "sdxl.safetensors", 1.0)


def test_fp8_weight_dtype_in_the_dit_loader_samples_close_to_full_precision(models):
    fp8 = FluxCoreDiTLoader().load(NAMES["dit"], weight_dtype="fp8_e4m3fn")[0]
    assert fp8.model.module.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    run = lambda handle: FluxCoreSampler().sample(handle, encode(models, "a cat"), encode(models, ""), latent,  # noqa: E731
                                                  seed=4, steps=2)[0]["samples"]
    full, low = run(models["dit"]), run(fp8)
    assert torch.isfinite(low).all()
    rel = (low - full).norm() / full.norm()
    # FP8 rounding of the weights, nothing more: measured 0.070 (deterministic on the CPU). Real mistakes on this
    # run: the prompt "a dog" instead of "a cat" gives 0.118 (the former bound 0.2 let it through), one step more
    # 0.32, guidance 3.0 for 3.5 0.49, another seed 1.2.
    assert 0 < rel < 0.09


def test_native_reference_latents_with_odd_sides_are_padded(models):
    # Native VAEEncode crops to multiples of 8 only: a 40x56 image gives a 5x7 latent.
    cond = encode(models, "make it red", 2.5)
    cond = [[t, {**d, "reference_latents": [torch.randn(1, 16, 5, 7)]}] for t, d in cond]
    latent, = FluxCoreEmptyLatent().generate(W, H, 2)
    out, = FluxCoreSampler().sample(models["dit"], cond, cond, latent, seed=0, steps=1)
    assert out["samples"].shape == (2, 16, H // 8, W // 8) and torch.isfinite(out["samples"]).all()
    bad = [[t, {**d, "reference_latents": [torch.randn(2, 16, 4, 6)]}] for t, d in cond]
    latent3, = FluxCoreEmptyLatent().generate(W, H, 3)
    with pytest.raises(NodeInputError, match=r"input 'positive' \(reference_latents\): reference 0 has a batch of 2"):
        FluxCoreSampler().sample(models["dit"], bad, bad, latent3, seed=0, steps=1)


def test_conditioning_of_another_model_is_refused_by_name(models):
    sdxl = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    with pytest.raises(NodeInputError, match=r"FluxCoreSampler, input 'positive': tokens of width 2048"):
        FluxCoreSampler().sample(models["dit"], sdxl, sdxl, latent, seed=0, steps=1)
    two = [[torch.cat([t, t]), {**d, "pooled_output": torch.cat([d["pooled_output"]] * 2)}]
           for t, d in encode(models, "x")]
    latent3, = FluxCoreEmptyLatent().generate(W, H, 3)
    with pytest.raises(NodeInputError, match=r"input 'positive': 2 prompts cannot be spread over a latent batch of 3"):
        FluxCoreSampler().sample(models["dit"], two, two, latent3, seed=0, steps=1)


def test_previews_show_the_predicted_clean_latent(models, monkeypatch):
    from nodes.sampler import FLUX_LATENT
    seen = []
    monkeypatch.setattr(comfy_bridge, "latent_previewer", lambda: (lambda x: seen.append(x.clone()) or "preview"))
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    out, = FluxCoreSampler().sample(models["dit"], encode(models, "a cat"), encode(models, ""), latent, seed=0, steps=3)
    assert len(seen) == 3
    # Sigma 0: the result. Measured 2.4e-7 (values up to 5.2); the raw latent shown instead of the scaled one is
    # off by > 0.1, the noisy latent of the last step by order 1.
    assert torch.allclose(seen[-1], FLUX_LATENT.raw_to_scaled(out["samples"]), atol=1e-5, rtol=0)
    # The first preview is the x0 estimate from the starting noise: noise - sigma_0 * v_0, not the noisy latent.
    from flux_core.sampling import make_noise, predict_velocity
    from flux_core.scheduler import flux_sigmas
    from nodes.conditioning import read_conditioning
    noise = make_noise(1, H, W, seed=0)
    sigma0 = float(flux_sigmas(3)[0])
    embeds, guidance, _, _ = read_conditioning("test", "positive", encode(models, "a cat"))
    with torch.no_grad():
        v0 = predict_velocity(models["dit"].model.module, noise, sigma0, embeds, guidance)
    # Measured 4.8e-7 (values up to 5.9); the noisy latent instead differs by sigma0 * |v0| (order 1), the x0
    # estimate with the next step's sigma by (sigma0 - sigma1) * |v0| (order 0.1).
    assert torch.allclose(seen[0], noise - sigma0 * v0, atol=1e-5, rtol=0)


def test_tokenizers_are_fetched_from_modelscope_when_no_folder_has_them(models, tmp_path, monkeypatch):
    import shutil

    from flux_core import model_config
    from nodes.loaders import find_tokenizers
    bare = tmp_path / "bare"
    (bare / "text_encoders").mkdir(parents=True)
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(bare))
    calls = []

    def fake_download(model_id, local_dir, allow_file_pattern):  # what ModelScope would put there
        calls.append((model_id, allow_file_pattern))
        for sub in ("tokenizer", "tokenizer_2"):
            if any(p.startswith(sub + "/") for p in ([allow_file_pattern] if isinstance(allow_file_pattern, str)
                                                    else allow_file_pattern)):
                shutil.copytree(models["dir"] / "text_encoders" / sub, f"{local_dir}/{sub}")

    monkeypatch.setattr(model_config, "download_from_modelscope", fake_download)
    clip_tok, t5_tok = find_tokenizers("FluxCoreTextEncoderLoader", bare / "text_encoders" / "clip_l.safetensors",
                                       bare / "text_encoders" / "t5xxl_fp16.safetensors")
    assert clip_tok("a cat").input_ids and t5_tok("a cat").input_ids
    assert [c[0] for c in calls] == ["black-forest-labs/FLUX.1-dev"] * 2



def test_missing_tokenizers_are_named_with_every_place_looked(tmp_path, monkeypatch):
    from nodes.loaders import find_tokenizers
    bare = tmp_path / "bare"
    (bare / "text_encoders").mkdir(parents=True)
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(bare))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    with pytest.raises(NodeInputError) as info:
        find_tokenizers("FluxCoreTextEncoderLoader", bare / "text_encoders" / "clip_l.safetensors",
                        bare / "text_encoders" / "t5xxl_fp16.safetensors")
    message = str(info.value)
    assert message.startswith("FluxCoreTextEncoderLoader: FLUX tokenizers not found: tokenizer/ is neither beside the "
                              f"file ({bare / 'text_encoders'}) nor in any of {bare / 'text_encoders'}, nor at ")
    assert "tokenizer_2/ is neither beside" in message
    assert "tokenizer_1_config" not in message  # the Python parameter means nothing in a node

# ---------------------------------------------------------------- model names stay inside their folders
def escape_targets(models, tmp_path):
    """A loadable DiT reachable from diffusion_models only by leaving it: through '..' or an absolute path; and one
    linked into diffusion_models by the machine's owner (followed, as ComfyUI follows it)."""
    import shutil
    outside = tmp_path / "outside-dit"
    shutil.copytree(models["dir"] / "diffusion_models" / NAMES["dit"], outside)
    above = models["dir"] / "escaped-dit"  # diffusion_models/../escaped-dit
    if not above.exists():
        shutil.copytree(outside, above)
    beside = models["dir"].parent / "elsewhere" / NAMES["dit"]  # diffusion_models/../../elsewhere/tiny-dit
    if not beside.exists():
        shutil.copytree(outside, beside)
    link = models["dir"] / "diffusion_models" / "linked-dit"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    return {"dotdot": "../escaped-dit", "absolute": str(outside), "symlink": "linked-dit"}


def test_a_link_placed_in_a_model_folder_is_followed(models, tmp_path):
    name = escape_targets(models, tmp_path)["symlink"]
    dit = FluxCoreDiTLoader().load(name)[0]
    assert dit is not None


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_model_names_outside_their_folder_are_refused_by_name(models, tmp_path, kind):
    name = escape_targets(models, tmp_path)[kind]
    with pytest.raises(NodeInputError, match=r"FluxCoreDiTLoader, input 'dit_name': .*'diffusion_models' model folder"):
        FluxCoreDiTLoader().load(name)
    from nodes.lora_nodes import FluxCoreLoraLoader
    with pytest.raises(NodeInputError, match=r"FluxCoreLoraLoader, input 'lora_name': .*'loras' model folder"):
        FluxCoreLoraLoader().apply(models["dit"], "../diffusion_models/" + NAMES["dit"], 1.0)
    with pytest.raises(NodeInputError, match=r"FluxCoreDiffusersLoader, input 'folder': .*'diffusers' model folder"):
        FluxCoreDiffusersLoader().load("../diffusers/" + NAMES["diffusers"])
    with pytest.raises(NodeInputError, match=r"FluxCoreDiTLoader, input 'modelscope_id': .*'diffusion_models'"):
        FluxCoreDiTLoader().load(NAMES["dit"], modelscope_id="../../elsewhere:" + NAMES["dit"] + "/*")
    with pytest.raises(NodeInputError, match=r"FluxCoreDiTLoader, input 'modelscope_id': .*'diffusion_models'"):
        FluxCoreDiTLoader().load(NAMES["dit"], modelscope_id="org/model:../../" + NAMES["dit"])


class FakeFolderPaths:
    """ComfyUI's folder_paths as documented: get_full_path joins the name (made relative to '/') with each
    folder of the kind and returns the first existing file; links are followed."""

    def __init__(self, folders):
        self.folders = folders

    def get_folder_paths(self, folder):
        return [str(p) for p in self.folders[folder]]

    def get_full_path(self, folder, name):
        import os
        name = os.path.relpath(os.path.join("/", name), "/")
        for root in self.get_folder_paths(folder):
            if os.path.isfile(os.path.join(root, name)):
                return os.path.join(root, name)
        return None


def test_model_names_are_checked_inside_comfyui_too(models, tmp_path, monkeypatch):
    from nodes.comfy_bridge import UnsafeModelName
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    root = tmp_path / "loras"
    root.mkdir()
    (root / "ok.safetensors").write_bytes(b"x")
    (root / "linked.safetensors").symlink_to(outside)
    monkeypatch.setattr(comfy_bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(comfy_bridge, "_folder_paths", FakeFolderPaths({"loras": [root]}))
    assert comfy_bridge.model_path("loras", "ok.safetensors") == str(root / "ok.safetensors")
    assert comfy_bridge.model_path("loras", "linked.safetensors") == str(root / "linked.safetensors")
    for name in ("../secret.safetensors", str(outside), "sub/../../secret.safetensors"):
        with pytest.raises(UnsafeModelName, match=r"'loras' model folder"):
            comfy_bridge.model_path("loras", name)
    with pytest.raises(FileNotFoundError, match="missing.safetensors not found in the 'loras' model folders"):
        comfy_bridge.model_path("loras", "missing.safetensors")


# ---------------------------------------------------------------- Cancel releases an offloaded DiT
def test_cancel_releases_the_offloaded_layers_as_a_normal_run_does(models, monkeypatch):
    import gc

    from flux_core.model_state import state_of
    from flux_core.vram import SimulatedDevice
    from nodes import vram_nodes
    from nodes.vram_nodes import FluxCoreVRAMOptions
    dit = FluxCoreDiTLoader().load(NAMES["dit"])[0]  # a module of its own: the shared one stays unplaced
    device = SimulatedDevice()
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: device)
    offloaded, = FluxCoreVRAMOptions().apply(dit, weight_dtype="default", offload=True, vram_limit=8.0)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    positive, negative = encode(models, "a cat"), encode(models, "")
    resident_while_sampling = []
    original = comfy_bridge.Progress.update

    def update(self, value, preview=None):
        resident_while_sampling.append(state_of(dit.model.module).vram_placement[1].resident_bytes)
        return original(self, value, preview)

    monkeypatch.setattr(comfy_bridge.Progress, "update", update)
    FluxCoreSampler().sample(offloaded, positive, negative, latent, seed=0, steps=2)
    manager = state_of(dit.model.module).vram_placement[1]
    gc.collect()
    after_normal = (manager.resident_bytes, device.live_bytes)
    comfy_bridge.request_interrupt()
    with pytest.raises(comfy_bridge.Interrupted):
        FluxCoreSampler().sample(offloaded, positive, negative, latent, seed=0, steps=2)
    gc.collect()
    assert resident_while_sampling[-1] > 0  # the layers were on the device while sampling
    assert (manager.resident_bytes, device.live_bytes) == after_normal == (0, 0)


# ---------------------------------------------------------------- one spelling of the fp8 choices
def test_fp8_choices_are_one_spelling_and_old_workflows_still_load(models):
    from flux_core.dtypes import WEIGHT_DTYPES
    from nodes.vram_nodes import FluxCoreVRAMOptions
    for cls in (FluxCoreDiTLoader, FluxCoreVRAMOptions):
        assert cls.INPUT_TYPES()["required"]["weight_dtype"][0] == list(WEIGHT_DTYPES)
        # ComfyUI skips its combo check for inputs VALIDATE_INPUTS takes: the old spelling passes validation.
        for value in ("fp8_e4m3fn", "float8_e4m3fn", "float8_e5m2", "default"):
            assert cls.VALIDATE_INPUTS(weight_dtype=value) is True
        assert "int4" in cls.VALIDATE_INPUTS(weight_dtype="int4")
    old, = FluxCoreVRAMOptions().apply(models["dit"], weight_dtype="float8_e4m3fn")
    new, = FluxCoreVRAMOptions().apply(models["dit"], weight_dtype="fp8_e4m3fn")
    assert old.vram == new.vram and new.vram.weight_dtype == "fp8_e4m3fn"
    fp8 = FluxCoreDiTLoader().load(NAMES["dit"], weight_dtype="float8_e5m2")[0]
    assert fp8.model.module.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e5m2
    with pytest.raises(NodeInputError, match=r"FluxCoreVRAMOptions, input 'weight_dtype': 'int4'"):
        FluxCoreVRAMOptions().apply(models["dit"], weight_dtype="int4")


def test_an_fp8_loaded_dit_with_vram_options_keeps_its_storage(models, monkeypatch):
    from flux_core.vram import SimulatedDevice
    from nodes import vram_nodes
    from nodes.vram_nodes import FluxCoreVRAMOptions
    monkeypatch.setattr(vram_nodes, "make_compute_device", lambda: SimulatedDevice())
    fp8 = FluxCoreDiTLoader().load(NAMES["dit"], weight_dtype="fp8_e4m3fn")[0]
    offloaded, = FluxCoreVRAMOptions().apply(fp8, weight_dtype="default", offload=True, vram_limit=0.0)
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)
    out, = FluxCoreSampler().sample(offloaded, encode(models, "a cat"), encode(models, ""), latent, seed=0, steps=1)
    assert torch.isfinite(out["samples"]).all()
    assert fp8.model.module.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn


# ---------------------------------------------------------------- conditioning the sampler cannot use
def test_unused_conditioning_entries_are_named_once_per_run(models, caplog):
    import logging
    positive = [[t, {**d, "control": object(), "mask": torch.ones(1, H, W), "area": (8, 8, 0, 0), "strength": 0.5,
                     "gligen": ("position", object(), []), "set_area_to_bounds": None}]
                for t, d in encode(models, "a cat")]
    negative = [[t, {**d, "mask": torch.ones(1, H, W)}] for t, d in encode(models, "")]
    latent, = FluxCoreEmptyLatent().generate(W, H, 1)

    def warned():
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "conditioning entry" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="FluxCore"):
        FluxCoreSampler().sample(models["dit"], positive, negative, latent, seed=0, steps=2, cfg=2.0)
    messages = warned()
    assert len(messages) == 5  # once each, though the sampler reads the conditioning at every step
    for key in ("control", "mask", "area", "strength", "gligen"):
        assert sum(f"entry '{key}'" in m for m in messages) == 1, (key, messages)
    assert any("'mask' (on 'positive' and 'negative')" in m for m in messages)
    assert not any("set_area_to_bounds" in m for m in messages)  # None: nothing was set
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="FluxCore"):  # cfg 1: the negative is not used at all
        FluxCoreSampler().sample(models["dit"], encode(models, "a cat"), negative, latent, seed=0, steps=1)
    assert warned() == []


def test_model_folders_comfyui_lacks_are_registered_once_and_keep_other_packs_paths(monkeypatch):
    """`register_model_folder` adds <models>/<folder> to ComfyUI's folder table (the IP-Adapter and InfiniteYou
    loaders list `ipadapter`, `infinite_you`, `face_embeddings`); a folder another pack registered keeps its paths and
    gains our extensions; one registered for every file (an empty extension set) is left alone."""
    import types
    from nodes import comfy_bridge as bridge
    table = {"ipadapter": (["/other/pack/ipadapter"], {".safetensors"}), "insightface": (["/x"], set())}
    monkeypatch.setattr(bridge, "IN_COMFYUI", True)
    monkeypatch.setattr(bridge, "_folder_paths", types.SimpleNamespace(folder_names_and_paths=table,
                                                                       models_dir="/comfy/models"))
    for folder in ("ipadapter", "infinite_you", "insightface", "infinite_you"):
        bridge.register_model_folder(folder)
    assert table["ipadapter"] == (["/other/pack/ipadapter"], set(bridge.MODEL_EXTENSIONS))
    assert table["infinite_you"] == (["/comfy/models/infinite_you"], set(bridge.MODEL_EXTENSIONS))
    assert table["insightface"] == (["/x"], set())
