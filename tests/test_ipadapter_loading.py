"""Loading IP-Adapters, their image encoders and InfiniteYou's projector from every published layout, and refusing a
wrong file in a slot by name. The tiny files are written by tests/tiny_ipadapter.py under the published key names
(and, for DiffSynth's layout, by DiffSynth 2.1.12's own converter), so a naming mistake in a loader fails here."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.files import CheckpointError, open_state_dict
from flux_core.loading.loader import detect, load_model
from flux_core.model_config import ModelConfig
from flux_core.models.image_encoders import encode_images
from flux_core.models.infiniteyou import InfiniteYouProjector
from flux_core.models.ipadapter import INSTANTX, XLABS, FluxIPAdapter, IPAdapterParams
from flux_core.pipeline_models import detect_components, plan_models
from tests.tiny_ipadapter import (CLIP_PROJECTION_DIM, DOUBLE, HIDDEN, SIGLIP_DIM, SINGLE, TEXT_DIM, instantx_state_dict, make_clip_vision,
                                  make_siglip, projector_state_dict, reference_image, write_comfy_clip_vision,
                                  write_instantx, write_projector, write_siglip, write_xlabs, xlabs_state_dict)

F32 = torch.float32
TINY_HEADS = {"num_attention_heads": 2}   # the tiny towers' 24 width has no published head count


def kinds(path) -> list[tuple[str, str]]:
    return [(d.kind.name, d.layout) for d in detect(open_state_dict(path))]


def assert_instantx_weights(model: FluxIPAdapter, sd: dict) -> None:
    """Every published tensor is in the module under its DiffSynth name, unchanged."""
    ours = model.state_dict()
    for i in range(DOUBLE + SINGLE):
        for name in ("to_k_ip", "to_v_ip"):
            assert torch.equal(ours[f"ipadapter_modules.{i}.{name}.weight"], sd["ip_adapter"][f"{i}.{name}.weight"])
    for name, tensor in sd["image_proj"].items():
        assert torch.equal(ours[f"image_proj.{name}"], tensor)
    assert len(ours) == len(sd["ip_adapter"]) + len(sd["image_proj"])   # no bias, no extra parameter


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_instantx_checkpoint_loads(suffix, tmp_path):
    """InstantX's ip-adapter.bin (a torch file of two dicts, read with weights_only=True) and the same keys
    flattened into safetensors."""
    sd = instantx_state_dict(seed=3)
    path = write_instantx(sd, tmp_path / f"ip-adapter{suffix}")
    assert kinds(path) == [("ipadapter", "instantx")]
    model = load_model(path, torch_dtype=F32, kind="ipadapter")
    assert model.params == IPAdapterParams(family=INSTANTX, image_embed_dim=SIGLIP_DIM, token_dim=TEXT_DIM,
                                           num_tokens=3, hidden_size=HIDDEN, num_blocks=DOUBLE + SINGLE)
    assert_instantx_weights(model, sd)


@pytest.mark.parametrize("prefix", ["", "pipe.ipadapter."])
def test_diffsynth_names_load(prefix, tmp_path):
    """DiffSynth-Studio's names, as its own converter makes them from ip-adapter.bin (and as its IP-Adapter training
    saves them, with or without `pipe.ipadapter.`)."""
    from tests.diffsynth_ref import diffsynth_ipadapter
    _, convert = diffsynth_ipadapter()
    sd = instantx_state_dict(seed=4)
    converted = convert({group: dict(d) for group, d in sd.items()})
    path = tmp_path / "ipadapter.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in converted.items()}, str(path))
    assert kinds(path) == [("ipadapter", "diffsynth")]
    assert_instantx_weights(load_model(path, torch_dtype=F32), sd)


def test_xlabs_checkpoint_loads(tmp_path):
    sd = xlabs_state_dict(seed=5)
    path = write_xlabs(sd, tmp_path / "flux-ip-adapter.safetensors")
    assert kinds(path) == [("ipadapter", "xlabs")]
    model = load_model(path, torch_dtype=F32, kind="ipadapter")
    assert model.params.family == XLABS and model.params.num_blocks == DOUBLE and model.params.num_tokens == 4
    ours = model.state_dict()
    for i in range(DOUBLE):
        for kv in "kv":
            for s in ("weight", "bias"):
                assert torch.equal(ours[f"ipadapter_modules.{i}.to_{kv}_ip.{s}"],
                                   sd[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{s}"])
    assert torch.equal(ours["image_proj.proj.weight"], sd["ip_adapter_proj_model.proj.weight"])
    assert torch.equal(ours["image_proj.norm.bias"], sd["ip_adapter_proj_model.norm.bias"])
    assert len(ours) == len(sd)


def same_features(encoder, reference, images) -> None:
    """The loaded tower computes what the model it was written from computes."""
    from flux_core.models.image_encoders import pixel_values
    with torch.no_grad():
        x = pixel_values(encoder, images)
        theirs = reference(pixel_values=x)
        expected = theirs.pooler_output if hasattr(theirs, "pooler_output") and not hasattr(theirs, "image_embeds") \
            else theirs.image_embeds
        # Measured 0 to 6e-8 (tensors read from safetensors are not 64-byte aligned: other CPU kernels); a weight
        # loaded into the wrong layer or transposed changes features by > 1e-2.
        assert (encode_images(encoder, images) - expected).abs().max().item() < 1e-5


def test_siglip_folder_loads_and_its_text_tower_is_not_clip(tmp_path):
    """google/siglip-so400m-patch14-384's folder holds both towers; only the vision tower is an image encoder, and
    the text tower (which has CLIP-like key names) is not taken for a CLIP-L text encoder."""
    siglip = make_siglip(seed=1)
    folder = write_siglip(siglip, tmp_path / "siglip")
    assert [c[1:] for c in detect_components(str(folder))] == [("image_encoder", "IP-Adapter image encoder "
                                                                 "(SigLIP / CLIP vision)", "hf-siglip")]
    with pytest.raises(CheckpointError, match=r"siglip: expected a CLIP-L text encoder, but it looks like a "
                                              r"IP-Adapter image encoder"):
        load_model(folder, kind="clip")
    encoder = load_model(folder, torch_dtype=F32)   # its config.json (a whole SiglipConfig) gives the heads
    same_features(encoder, siglip.vision_model, [reference_image(0), reference_image(1)])


def comfy_siglip_file(siglip, path):
    """ComfyUI's clip_vision/sigclip_vision_patch14_384.safetensors: the vision tower under `vision_model.`."""
    sd = {f"vision_model.{k}": v.contiguous() for k, v in siglip.vision_model.state_dict().items()
          if not k.endswith("position_ids")}
    save_file(sd, str(path))
    return path


def test_single_vision_files_in_comfyui_layout(tmp_path):
    """ComfyUI's clip_vision files (SigLIP and CLIP ViT): one file, no config.json beside it. The tiny towers' width
    has no known head count, so without config the load asks for it (naming the file); with it, they load."""
    siglip, clip = make_siglip(seed=2), make_clip_vision(seed=3)
    siglip_file = comfy_siglip_file(siglip, tmp_path / "sigclip_vision_patch14_384.safetensors")
    clip_file = write_comfy_clip_vision(clip, tmp_path / "clip_vision_l.safetensors")
    assert kinds(siglip_file) == [("image_encoder", "hf-siglip")]
    assert kinds(clip_file) == [("image_encoder", "hf-clip")]
    for path in (siglip_file, clip_file):
        with pytest.raises(CheckpointError, match=rf"{path.name}: cannot build a IP-Adapter image encoder .*number "
                                                  r"of attention heads of a 24-wide vision tower is not known; put "
                                                  r"its config.json \(num_attention_heads\)"):
            load_model(path, torch_dtype=F32)
    images = [reference_image(2)]
    same_features(load_model(siglip_file, config=TINY_HEADS, torch_dtype=F32), siglip.vision_model, images)
    same_features(load_model(clip_file, config=TINY_HEADS, torch_dtype=F32), clip, images)


@pytest.mark.parametrize("family, shapes, expected", [
    # google/siglip-so400m-patch14-384: 27 x 27 patches of 14 from a 384 image (27 x 14 = 378: the conv drops 6 px)
    ("siglip", {"embeddings.patch_embedding.weight": (1152, 3, 14, 14), "embeddings.position_embedding.weight":
                (729, 1152), "encoder.layers.0.mlp.fc1.weight": (4304, 1152), "encoder.layers.26.mlp.fc1.weight":
                (4304, 1152)}, dict(image_size=384, num_attention_heads=16, num_hidden_layers=27)),
    # openai/clip-vit-large-patch14: 16 x 16 patches of 14 + the class token
    ("clip", {"embeddings.patch_embedding.weight": (1024, 3, 14, 14), "embeddings.position_embedding.weight":
              (257, 1024), "encoder.layers.0.mlp.fc1.weight": (4096, 1024), "encoder.layers.23.mlp.fc1.weight":
              (4096, 1024), "visual_projection.weight": (768, 1024)},
     dict(image_size=224, num_attention_heads=16, num_hidden_layers=24, projection_dim=768)),
])
def test_published_vision_configs_from_shapes(family, shapes, expected):
    """ComfyUI's single files carry no config.json: the published towers' config comes from their shapes alone."""
    from flux_core.models.image_encoders import VisionParams
    params = VisionParams.from_state_dict_shapes(family, shapes)
    assert {k: getattr(params, k) for k in expected} == expected


def test_whole_clip_folder_gives_text_encoder_and_image_encoder(tmp_path):
    """openai/clip-vit-large-patch14 as published (CLIPModel: both towers, one config.json with `vision_config`):
    two components; as the image encoder its vision config is read from the nested `vision_config` and its features
    equal transformers' CLIPModel.get_image_features."""
    from transformers import CLIPConfig, CLIPModel
    from flux_core.models.image_encoders import pixel_values
    from tests.tiny_ipadapter import VISION
    torch.manual_seed(5)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=24, **VISION),
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8),
        projection_dim=CLIP_PROJECTION_DIM)).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.normal_(0.0, 0.15)
    clip.save_pretrained(tmp_path / "clip-vit")
    assert sorted((c[1], c[3]) for c in detect_components(str(tmp_path / "clip-vit"))) == [("clip", "hf"),
                                                                                          ("image_encoder", "hf-clip")]
    encoder = load_model(tmp_path / "clip-vit", kind="image_encoder", torch_dtype=F32)
    images = [reference_image(4), reference_image(5)]
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixel_values(encoder, images))
        expected = getattr(expected, "pooler_output", expected)
        # Measured 0 (6e-8 in the SigLIP folder test: unaligned safetensors tensors); a wrong head count or layer
        # changes them by > 1e-2.
        assert (encode_images(encoder, images) - expected).abs().max().item() < 1e-5


def test_towers_that_cannot_give_ip_adapter_features_are_refused_by_name(tmp_path):
    """A SigLIP tower saved without its attention-pooling head gives no pooled output (InstantX's features); a CLIP
    tower saved without visual_projection gives no image_embeds (XLabs'). Each is recognised as a vision tower and
    refused with what it lacks, not as 'not a FLUX component'."""
    siglip, clip = make_siglip(seed=3), make_clip_vision(seed=3)
    headless = {f"vision_model.{k}": v.contiguous() for k, v in siglip.vision_model.state_dict().items()
                if not k.startswith("head.") and not k.endswith("position_ids")}
    save_file(headless, str(tmp_path / "siglip_headless.safetensors"))
    unprojected = {k: v.contiguous() for k, v in clip.state_dict().items()
                   if k.startswith("vision_model.") and not k.endswith("position_ids")}
    save_file(unprojected, str(tmp_path / "clip_vision_model.safetensors"))
    for name, lacks in (("siglip_headless", r"a SigLIP vision tower without its attention-pooling head \(head\.\*\)"),
                        ("clip_vision_model", r"a CLIP vision tower without its projection "
                                              r"\(visual_projection\.weight\)")):
        path = tmp_path / f"{name}.safetensors"
        assert [k for k, _ in kinds(path)] == ["image_encoder"]
        with pytest.raises(CheckpointError, match=rf"{name}.safetensors: cannot build a IP-Adapter image encoder "
                                                  rf".*: it is {lacks}"):
            load_model(path, config=TINY_HEADS, torch_dtype=F32)


def test_clip_vision_folder_loads(tmp_path):
    clip = make_clip_vision(seed=4)
    clip.save_pretrained(tmp_path / "image_encoder")
    assert kinds(tmp_path / "image_encoder") == [("image_encoder", "hf-clip")]
    same_features(load_model(tmp_path / "image_encoder", torch_dtype=F32), clip, [reference_image(3)])


def assert_projector_weights(model: InfiniteYouProjector, sd: dict) -> None:
    ours = model.state_dict()
    assert set(ours) == set(sd)
    assert all(torch.equal(ours[k], v) for k, v in sd.items())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_infiniteyou_projector_loads(suffix, tmp_path):
    """image_proj_model.bin as published (`{"image_proj": {...}}`), and its keys under `image_proj.` in safetensors."""
    sd = projector_state_dict(seed=6)
    path = write_projector(sd, tmp_path / f"image_proj_model{suffix}")
    assert kinds(path) == [("infiniteyou", "bytedance")]
    model = load_model(path, torch_dtype=F32, kind="infiniteyou")
    assert (model.params.dim, model.params.depth, model.params.heads, model.params.num_queries,
            model.params.output_dim) == (128, 2, 2, 4, TEXT_DIM)
    assert_projector_weights(model, sd)


def test_projector_beside_infusenet_in_one_file(tmp_path):
    """DiffSynth's InfiniteYou training output (`--remove_prefix_in_ckpt pipe.`): the projector under
    `image_proj_model.` and InfuseNet under `controlnet.models.0.` in one file: two components, each loadable."""
    from tests.tiny_controlnet import diffsynth_state_dict, make_diffusers_controlnet
    sd = projector_state_dict(seed=7)
    infusenet = diffsynth_state_dict(make_diffusers_controlnet(seed=8))
    path = tmp_path / "epoch-0.safetensors"
    save_file({**{f"image_proj_model.{k}": v for k, v in sd.items()},
               **{f"controlnet.models.0.{k}": v.contiguous() for k, v in infusenet.items()}}, str(path))
    assert sorted((c[1], c[3]) for c in detect_components(str(path))) == [("controlnet", "diffsynth"),
                                                                          ("infiniteyou", "diffsynth")]
    assert_projector_weights(load_model(path, torch_dtype=F32, kind="infiniteyou"), sd)
    controlnet = load_model(path, torch_dtype=F32, kind="controlnet", config={"axes_dim": (4, 6, 6)})
    assert controlnet.params.depth == 2
    with pytest.raises(CheckpointError, match="holds several components .*pass kind="):
        load_model(path, torch_dtype=F32)


@pytest.fixture(scope="module")
def other_files(tmp_path_factory):
    """A file of each neighbouring kind: a DiT, a ControlNet, an IP-Adapter, a SigLIP folder, a projector."""
    from tests.tiny_controlnet import make_diffusers_controlnet, write_lone_file
    from tests.tiny_dit import make_diffusers_dit, write_bfl_dit
    tmp = tmp_path_factory.mktemp("slots")
    return dict(dit=write_bfl_dit(make_diffusers_dit(seed=1), tmp / "flux1-dev.safetensors"),
                controlnet=write_lone_file(make_diffusers_controlnet(seed=2), tmp / "controlnet.safetensors"),
                ipadapter=write_instantx(instantx_state_dict(), tmp / "ip-adapter.bin"),
                xlabs=write_xlabs(xlabs_state_dict(), tmp / "flux-ip-adapter.safetensors"),
                siglip=write_siglip(make_siglip(), tmp / "siglip"),
                projector=write_projector(projector_state_dict(), tmp / "image_proj_model.bin"))


@pytest.mark.parametrize("file, kind, wanted, found", [
    ("controlnet", "ipadapter", "FLUX IP-Adapter", "FLUX ControlNet"),
    ("dit", "ipadapter", "FLUX IP-Adapter", r"FLUX DiT \(diffusion model\)"),
    ("dit", "image_encoder", r"IP-Adapter image encoder \(SigLIP / CLIP vision\)", r"FLUX DiT \(diffusion model\)"),
    ("ipadapter", "image_encoder", r"IP-Adapter image encoder \(SigLIP / CLIP vision\)", "FLUX IP-Adapter"),
    ("xlabs", "image_encoder", r"IP-Adapter image encoder \(SigLIP / CLIP vision\)", "FLUX IP-Adapter"),
    ("siglip", "ipadapter", "FLUX IP-Adapter", r"IP-Adapter image encoder \(SigLIP / CLIP vision\)"),
    ("projector", "ipadapter", "FLUX IP-Adapter", "InfiniteYou image projector"),
    ("ipadapter", "infiniteyou", "InfiniteYou image projector", "FLUX IP-Adapter"),
    ("controlnet", "infiniteyou", "InfiniteYou image projector", "FLUX ControlNet"),
    ("ipadapter", "dit", r"FLUX DiT \(diffusion model\)", "FLUX IP-Adapter"),
    ("ipadapter", "controlnet", "FLUX ControlNet", "FLUX IP-Adapter"),
])
def test_wrong_file_in_a_slot_is_named(other_files, file, kind, wanted, found):
    path = other_files[file]
    with pytest.raises(CheckpointError, match=rf"{path.name}: expected a {wanted}, but it looks like a {found}\."):
        load_model(path, torch_dtype=F32, kind=kind)


def test_wrong_file_in_a_model_config_slot_is_named(other_files):
    """from_pretrained's planning refuses every mismatched ModelConfig(kind=...) at once, naming file, slot and
    content, before any weights are loaded."""
    configs = [ModelConfig(path=str(other_files["ipadapter"]), kind="image_encoder"),
               ModelConfig(path=str(other_files["siglip"]), kind="ipadapter"),
               ModelConfig(path=str(other_files["controlnet"]), kind="infiniteyou")]
    with pytest.raises(CheckpointError) as e:
        plan_models(configs, {"tokenizer": ModelConfig(path=str(other_files["siglip"])),
                              "tokenizer_2": ModelConfig(path=str(other_files["siglip"]))})
    message = str(e.value)
    assert (f"model_configs[0] {other_files['ipadapter']}: kind='image_encoder' (the model for "
            f"pipe.ipadapter_image_encoder), but it holds FLUX IP-Adapter.") in message
    assert (f"model_configs[1] {other_files['siglip']}: kind='ipadapter' (the model for pipe.ipadapter), but it "
            f"holds IP-Adapter image encoder (SigLIP / CLIP vision).") in message
    assert (f"model_configs[2] {other_files['controlnet']}: kind='infiniteyou' (the model for pipe.image_proj_model), "
            f"but it holds FLUX ControlNet.") in message


def test_each_file_fills_its_own_slot(other_files):
    configs = [ModelConfig(path=str(other_files[name])) for name in ("ipadapter", "siglip", "projector")]
    plan = plan_models(configs, {"tokenizer": ModelConfig(path=str(other_files["siglip"])),
                                 "tokenizer_2": ModelConfig(path=str(other_files["siglip"]))})
    assert [e.slot for *_, e in plan.entries] == ["ipadapter", "ipadapter_image_encoder", "image_proj_model"]


class _Marker:
    """Unpickling this would call `_record_unpickled` (what a malicious pickle does with os.system)."""

    def __reduce__(self):
        return _record_unpickled, ("ran",)


_UNPICKLED: list[str] = []


def _record_unpickled(value):
    _UNPICKLED.append(value)
    return value


@pytest.mark.parametrize("name, make", [
    ("ip-adapter.bin", lambda: {**instantx_state_dict(), "extra": _Marker()}),
    ("image_proj_model.bin", lambda: {"image_proj": projector_state_dict(), "extra": _Marker()}),
])
def test_a_pickle_with_code_is_refused_unrun(name, make, tmp_path):
    """A .bin is read with weights_only=True: a pickled object that would run code on load is refused, naming the
    file, and its code never runs."""
    path = tmp_path / name
    torch.save(make(), path)
    _UNPICKLED.clear()
    with pytest.raises(CheckpointError, match=rf"{name}: cannot be read as a PyTorch weights file: it holds pickled "
                                              r"Python objects, not only tensors") as error:
        load_model(path, torch_dtype=F32)
    assert "weights_only=False" not in str(error.value)  # torch's advice to unpickle is not passed on
    assert _UNPICKLED == []
    assert pickle.loads(pickle.dumps(_Marker())) == "ran" and _UNPICKLED == ["ran"]   # the marker does run when unpickled
