"""The example workflows: well-formed, in sync with their generator, and run exactly as shipped (no value of the
workflow file changed) on tiny FLUX-shaped models through the UI -> API conversion and the stand-ins for ComfyUI's
core nodes (no ComfyUI needed). The test only prepares what a user prepares: model files under the names the
workflows use and the pack's example image in the input folder. Each result is checked for content: it matches
FluxImagePipeline run standalone with the workflow's settings, and the seed matters."""
import ast
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from example_workflows.build_workflows import (CONTROLNET_FILES, DEMO_FILES, DEMO_LORA, INFINITEYOU_FILES,
                                               INPUT_IMAGES, IPADAPTER_FILES, NATIVE_LORA, NEXUS_GEN_FILES,
                                               QWEN_VL_FOLDER)
from example_workflows.make_adapter_images import IMAGES as ADAPTER_IMAGES
from example_workflows.core_nodes import core_nodes, native_sampling_nodes
from example_workflows.make_example_image import (HOLE, INPAINT_HOLE, INPAINT_NAME as INPAINT_IMAGE, INPAINT_SIZE,
                                                  NAME as EXAMPLE_IMAGE, SIZE, draw, draw_inpaint)
from nodes import NODE_CLASS_MAPPINGS
from tests.face_standin import StandInFaceEmbedder
from tests.native_standins import STANDIN_NAMES, standins
from tests.tiny_flux_files import EDIT_FILES, FILES, set_up_like_a_user
from tests.workflow_harness import (WorkflowError, load_workflow, node_types, run_prompt, specs_from_classes,
                                    ui_to_api)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
# The bundled demo model's examples run on its shipped files (test_demo_workflow_...), the others on tiny files
# under the real models' names.
DEMO_WORKFLOWS = [p for p in WORKFLOWS if p.stem.startswith("fluxcore_demo_")]
# Examples that sample a native MODEL with ComfyUI's KSampler run in a real ComfyUI only (tests/test_comfyui_server.py)
NATIVE_SAMPLING = set(native_sampling_nodes([]))
COMFYUI_ONLY_WORKFLOWS = [p for p in WORKFLOWS if node_types(load_workflow(p)) & NATIVE_SAMPLING]
TINY_WORKFLOWS = [p for p in WORKFLOWS if p not in DEMO_WORKFLOWS and p not in COMFYUI_ONLY_WORKFLOWS]
REAL_FILES = {"dit_name": {"flux1-dev.safetensors", "flux1-kontext-dev.safetensors", "flux1-fill-dev.safetensors",
                           "Flex.2-preview.safetensors", "step1x-edit-i1258.safetensors",
                           NEXUS_GEN_FILES["decoder"], DEMO_FILES["dit"]},
              "decoder_name": {NEXUS_GEN_FILES["decoder"]}, "model_name": {NEXUS_GEN_FILES["model"]},
              "connector_name": {"step1x-edit-i1258.safetensors"}, "qwen_vl_name": {QWEN_VL_FOLDER},
              "clip_name": {"clip_l.safetensors", DEMO_FILES["clip"]},
              "t5_name": {"t5xxl_fp16.safetensors", DEMO_FILES["t5"]},
              "vae_name": {"ae.safetensors", DEMO_FILES["vae"]}, "lora_name": {DEMO_LORA, NATIVE_LORA},
              "controlnet_name": set(CONTROLNET_FILES.values()), "ipadapter_name": {IPADAPTER_FILES["ipadapter"]},
              "image_encoder_name": {IPADAPTER_FILES["image_encoder"]},
              "projector_name": {INFINITEYOU_FILES["projector"]}, "infusenet_name": {INFINITEYOU_FILES["infusenet"]}}
RAW_SHIFT, RAW_SCALE = 0.1159, 0.3611  # FLUX's published latent shift/scale: scaled = (raw - shift) * scale


def test_the_examples_exist_each_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert {"fluxcore_text_to_image", "fluxcore_image_to_image", "fluxcore_kontext_edit",
            "fluxcore_mixed_native", "fluxcore_controlnet_inpainting", "fluxcore_controlnet_union_canny",
            "fluxcore_controlnet_upscale", "fluxcore_ipadapter_instantx", "fluxcore_infiniteyou",
            "fluxcore_eligen", "fluxcore_flux_fill", "fluxcore_flex2", "fluxcore_step1x_edit",
            "fluxcore_nexus_gen", "fluxcore_demo_text_to_image", "fluxcore_demo_lora",
            "fluxcore_native_ksampler"} <= names
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no {thumb.name} beside it"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_is_ui_format_with_known_nodes_and_real_model_names(path):
    workflow = load_workflow(path)
    assert workflow["version"] == 0.4 and {"last_node_id", "last_link_id", "groups", "config", "extra"} <= set(workflow)
    unknown = node_types(workflow) - set(NODE_CLASS_MAPPINGS) - set(STANDIN_NAMES) - NATIVE_SAMPLING
    assert not unknown, f"{path.name} uses node types that neither FluxCore nor the stand-ins provide: {unknown}"
    assert any(t.startswith("FluxCore") for t in node_types(workflow))
    demo_names = set(DEMO_FILES.values()) | {DEMO_LORA}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        nodes = {n["id"]: n for n in workflow["nodes"]}
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    # Defaults are the real FLUX files a user has, not test models; images are the one the pack ships.
    prompt = ui_to_api(workflow, specs_from_classes({**NODE_CLASS_MAPPINGS, **core_nodes(INPUT_IMAGES),
                                                     **native_sampling_nodes([NATIVE_LORA])}))
    for node in prompt.values():
        for name, allowed in REAL_FILES.items():
            if name in node["inputs"]:
                assert node["inputs"][name] in allowed, f"{path.name}: {name}={node['inputs'][name]!r}"
                # the demo's examples name only the demo's files, the others never
                assert (node["inputs"][name] in demo_names) == (path in DEMO_WORKFLOWS), path.name
        if node["class_type"] == "LoadImage":
            assert node["inputs"]["image"] in INPUT_IMAGES and (EXAMPLES / node["inputs"]["image"]).is_file()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_committed_example_matches_its_generator(path):
    from example_workflows.build_workflows import WORKFLOWS as BUILDERS, build
    assert path.stem in BUILDERS, f"{path.name} is not written by example_workflows/build_workflows.py"
    assert build(path.stem) == load_workflow(path), "run python example_workflows/build_workflows.py"


def test_the_shipped_example_image_is_what_its_script_draws():
    with Image.open(EXAMPLES / EXAMPLE_IMAGE) as im:
        assert im.mode == "RGBA" and im.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(im), np.asarray(draw())), "run python example_workflows/make_example_image.py"
        alpha = np.asarray(im.getchannel("A"))
    left, top, right, bottom = HOLE
    assert (alpha[top:bottom, left:right] == 0).all() and (alpha == 0).sum() == (right - left) * (bottom - top)
    assert (EXAMPLES / EXAMPLE_IMAGE).stat().st_size < 64 * 1024


def test_the_shipped_inpainting_image_is_what_its_script_draws():
    with Image.open(EXAMPLES / INPAINT_IMAGE) as im:
        assert im.mode == "RGBA" and im.size == (INPAINT_SIZE, INPAINT_SIZE)
        assert np.array_equal(np.asarray(im), np.asarray(draw_inpaint())), \
            "run python example_workflows/make_example_image.py"
        alpha = np.asarray(im.getchannel("A"))
    left, top, right, bottom = INPAINT_HOLE
    assert (alpha[top:bottom, left:right] == 0).all() and (alpha == 0).sum() == (right - left) * (bottom - top)
    assert set(np.unique(alpha)) == {0, 255} and all(v % 64 == 0 for v in INPAINT_HOLE)  # sharp at every scale
    assert (EXAMPLES / INPAINT_IMAGE).stat().st_size < 64 * 1024


@pytest.mark.parametrize("name", sorted(ADAPTER_IMAGES))
def test_the_shipped_adapter_images_are_what_their_script_draws(name):
    with Image.open(EXAMPLES / name) as im:
        assert im.mode == "RGB" and im.size == (256, 256)
        assert np.array_equal(np.asarray(im), np.asarray(ADAPTER_IMAGES[name]())), \
            "run python example_workflows/make_adapter_images.py"
    assert (EXAMPLES / name).stat().st_size < 32 * 1024


def test_example_workflows_import_nothing_from_tests():
    for path in EXAMPLES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tests" or n.startswith("tests.") for n in names), f"{path.name} imports {names}"


def test_core_node_declarations_match_the_stand_ins(tmp_path, monkeypatch):
    (tmp_path / EXAMPLE_IMAGE).write_bytes(b"")
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "ae.safetensors").write_bytes(b"")
    monkeypatch.setenv("FLUXCORE_MODELS_DIR", str(tmp_path / "models"))
    declared, runnable = core_nodes([EXAMPLE_IMAGE], ["ae.safetensors"]), standins(tmp_path, tmp_path)
    assert set(declared) == set(runnable) == set(STANDIN_NAMES)
    for name, cls in declared.items():
        assert cls.RETURN_TYPES == runnable[name].RETURN_TYPES, name
        mine, theirs = cls.INPUT_TYPES(), runnable[name].INPUT_TYPES()
        assert {g: list(v) for g, v in mine.items()} == {g: list(v) for g, v in theirs.items()}, name
        for group in mine:
            if group != "hidden":
                assert [tuple(mine[group][k])[0] for k in mine[group]] == [tuple(theirs[group][k])[0]
                                                                         for k in theirs[group]], name


# ---------------------------------------------------------------- the examples, run as shipped
@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A base folder set up as README tells a user (models under the workflows' names, the example images in
    input/), our nodes with the core-node stand-ins over it, and FluxImagePipeline on the same files. The face
    embedder is a stand-in (tests/face_standin.py) on both sides: insightface is an optional extra, not installed."""
    from flux_core import face_embedding
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from nodes import comfy_bridge, infiniteyou_nodes
    base = tmp_path_factory.mktemp("comfyui_base")
    files = set_up_like_a_user(base)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(base / "models"))
    mp.setenv("FLUXCORE_INPUT_DIR", str(files["input"]))
    mp.setenv("FLUXCORE_OUTPUT_DIR", str(files["output"]))  # the trainer node's runs
    # The demo's folders after the base folder's, as the pack registers them in ComfyUI (register_demo_folders).
    mp.setattr(comfy_bridge, "standalone_extra_folders", {k: [v] for k, v in comfy_bridge.demo_folders().items()})
    mp.setattr(face_embedding, "FaceEmbedder", StandInFaceEmbedder)  # what face_standin.install() does
    mp.setattr(infiniteyou_nodes, "_embedders", {})
    classes = {**NODE_CLASS_MAPPINGS, **standins(files["input"], files["output"])}

    def pipeline(dit: str, controlnet_names=(), adapters=()) -> FluxImagePipeline:
        """The pipeline on the same files; ControlNets by their name in models/controlnet, in controlnet_id order;
        `adapters`: keys of set_up_like_a_user's paths ("ipadapter", "image_encoder", "projector", "infusenet").
        Step1X-Edit's file (DiT and connector) comes with the Qwen2.5-VL folder (its processor beside it) instead
        of CLIP-L and T5; Nexus-Gen's decoder (DiT and adapter) with its AR model's folder besides them."""
        kind = {name: k for k, (_, name) in {**FILES, **EDIT_FILES}.items()
                if k.endswith("dit") or k == "nexus_gen_decoder"}[dit]
        encoders = {"step1x_dit": ("qwen_vl",), "nexus_gen_decoder": ("nexus_gen", "clip", "t5")}.get(kind,
                                                                                                  ("clip", "t5"))
        by_name = {name: files[f"controlnet_{k}"] for k, name in CONTROLNET_FILES.items()}
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            *(ModelConfig(path=str(files[k])) for k in (kind, *encoders, "vae")),
            *(ModelConfig(path=str(by_name[name])) for name in controlnet_names),
            *(ModelConfig(path=str(files[k])) for k in adapters)])
        pipe.infinityou_processor = StandInFaceEmbedder()
        return pipe

    yield dict(classes=classes, files=files, pipeline=pipeline)
    mp.undo()


def by_type(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def upstream(prompt: dict, nid: str, input_name: str) -> str:
    return prompt[nid]["inputs"][input_name][0]


def loaded_image(files, name: str = EXAMPLE_IMAGE) -> Image.Image:
    """An input image as LoadImage gives it (RGB); by default the example image."""
    with Image.open(files["input"] / name) as im:
        return im.convert("RGB")


def loaded_mask(files, name: str) -> torch.Tensor:
    """LoadImage's MASK of an input image, (H, W): 1 where it is transparent."""
    with Image.open(files["input"] / name) as im:
        return 1 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255)


def image_scaled(files, width: int, height: int, name: str = EXAMPLE_IMAGE) -> Image.Image:
    """What LoadImage -> ImageScale(lanczos, no crop needed: the image is square) hands on: ComfyUI's lanczos
    goes through 8-bit PIL images (x * 255 truncated), then PIL's LANCZOS."""
    rgb = np.asarray(loaded_image(files, name), dtype=np.float32) / 255
    return Image.fromarray((rgb * 255).clip(0, 255).astype(np.uint8)).resize((width, height), Image.LANCZOS)


def pipeline_reference(shipped, prompt: dict) -> torch.Tensor:
    """FluxImagePipeline with the settings the workflow file holds; returns the raw latent (as the sampler's LATENT output holds it)."""
    from flux_core.sampling import make_noise
    from flux_core.scheduler import flux_sigmas, next_sigmas
    files = shipped["files"]
    sampler = prompt[by_type(prompt, "FluxCoreSampler")[0]]["inputs"]
    step1x, nexus = by_type(prompt, "FluxCoreStep1XEncode"), by_type(prompt, "FluxCoreNexusGenEncode")
    encode = prompt[(step1x or nexus or by_type(prompt, "FluxCoreTextEncode"))[0]]["inputs"]  # the positive first
    applies = by_type(prompt, "FluxCoreApplyControlNet")
    ipadapters, identities = by_type(prompt, "FluxCoreApplyIPAdapter"), by_type(prompt, "FluxCoreApplyInfiniteYou")
    assert len(applies) + len(ipadapters) + len(identities) <= 1  # one adapter per example (chains: node tests)
    controlnet_names = [prompt[upstream(prompt, a, "control_net")]["inputs"]["controlnet_name"] for a in applies]
    adapters = (("ipadapter", "image_encoder") if ipadapters else ()) + (("projector", "infusenet") if identities
                                                                         else ())
    pipe = shipped["pipeline"](prompt[by_type(prompt, "FluxCoreDiTLoader")[0]]["inputs"]["dit_name"],
                               controlnet_names, adapters)
    guidance = encode.get("guidance", 3.5)  # Step1X-Edit's DiT has no guidance embedder
    for nid in by_type(prompt, "FluxGuidance"):
        guidance = prompt[nid]["inputs"]["guidance"]
    latent_source = prompt[sampler["latent_image"][0]]
    if latent_source["class_type"] == "FluxCoreEmptyLatent":
        width, height = latent_source["inputs"]["width"], latent_source["inputs"]["height"]
    elif latent_source["class_type"] == "InpaintModelConditioning":  # the picture's size (LoadImage's)
        assert sampler["latent_image"][1] == 2
        width, height = loaded_image(files, prompt[upstream(prompt, sampler["latent_image"][0], "pixels")]
                                     ["inputs"]["image"]).size
    elif by_type(prompt, "ImageScaleBy"):
        factor = prompt[by_type(prompt, "ImageScaleBy")[0]]["inputs"]["scale_by"]
        width = height = round(SIZE * factor)
    else:
        scale = prompt[by_type(prompt, "ImageScale")[0]]["inputs"]
        width, height = scale["width"], scale["height"]
    seed = sampler["seed"]
    kw = dict(prompt=encode["prompt" if nexus else "text"], embedded_guidance=guidance, height=height, width=width,
              seed=seed,
              num_inference_steps=sampler["steps"], cfg_scale=sampler["cfg"], sigma_shift=sampler["sigma_shift"],
              output_type="latent", progress_bar_cmd=None)
    if "t5_sequence_length" in encode:  # 0: the T5 tokenizer's length, the pipeline's None
        kw["t5_sequence_length"] = encode["t5_sequence_length"] or None
    assert sampler["embedded_guidance"] == -1.0  # the conditioning's guidance, as `guidance` above
    if sampler["cfg"] != 1.0:  # true CFG: the negative prompt's node is the sampler's negative input
        negative = prompt[sampler["negative"][0]]
        assert negative["class_type"] in ("FluxCoreTextEncode", "FluxCoreStep1XEncode")
        kw["negative_prompt"] = negative["inputs"]["text"]
        if nexus:  # Nexus-Gen's negative branch is T5's (DiffSynth's): its sequence length from that node
            assert negative["class_type"] == "FluxCoreTextEncode" and "image" not in encode
            kw["t5_sequence_length"] = negative["inputs"]["t5_sequence_length"] or None
    for nid in step1x:  # both encode nodes read the same image: LoadImage -> ImageScale
        scale = prompt[upstream(prompt, nid, "image")]
        load = prompt[upstream(prompt, upstream(prompt, nid, "image"), "image")]
        assert scale["class_type"] == "ImageScale" and load["class_type"] == "LoadImage"
        assert (scale["inputs"]["width"], scale["inputs"]["height"]) == (width, height)
        kw["step1x_reference_image"] = image_scaled(files, width, height, load["inputs"]["image"])
    for nid in by_type(prompt, "FluxCoreFlexInputs"):  # FLEX.2: the image and its MASK from LoadImage, the control
        inputs = prompt[nid]["inputs"]                # image its canny edges (FluxCoreCannyMap)
        load = prompt[upstream(prompt, nid, "inpaint_image")]
        assert load["class_type"] == "LoadImage" and inputs["inpaint_mask"] == [inputs["inpaint_image"][0], 1]
        canny = prompt[upstream(prompt, nid, "control_image")]
        assert canny["class_type"] == "FluxCoreCannyMap" and canny["inputs"]["image"] == inputs["inpaint_image"]
        from flux_core import control_maps
        picture = loaded_image(files, load["inputs"]["image"])
        kw.update(flex_inpaint_image=picture, flex_inpaint_mask=loaded_mask(files, load["inputs"]["image"]),
                  flex_control_image=control_maps.canny(picture, low_threshold=canny["inputs"]["low_threshold"],
                                                        high_threshold=canny["inputs"]["high_threshold"],
                                                        sigma=canny["inputs"]["sigma"]),
                  flex_control_strength=inputs["control_strength"], flex_control_stop=inputs["control_stop"])
    if by_type(prompt, "FluxCoreKontextReference"):
        kw["kontext_images"] = loaded_image(files)
    if by_type(prompt, "ReferenceLatent"):
        kw["kontext_images"] = image_scaled(files, width, height)
    if latent_source["class_type"] == "FluxCoreVAEEncode":
        kw.update(input_image=image_scaled(files, width, height), denoising_strength=sampler["denoise"])
        assert latent_source["inputs"]["tiled"] == sampler.get("tiled_dit", False)  # the pipeline tiles both or none
    if sampler.get("tiled_dit"):  # the pipeline's tiled=True tiles the DiT and the VAE alike
        decode = prompt[by_type(prompt, "FluxCoreVAEDecode")[0]]["inputs"]
        assert (decode["tiled"], decode["tile_size"], decode["tile_stride"]) == \
            (True, sampler["tile_size"], sampler["tile_stride"])
        kw.update(tiled=True, tile_size=sampler["tile_size"], tile_stride=sampler["tile_stride"])
    if applies:
        kw["controlnet_inputs"] = [controlnet_input(files, prompt, applies[0], width, height)]
    for nid in ipadapters:  # the reference image straight from LoadImage
        inputs = prompt[nid]["inputs"]
        assert prompt[upstream(prompt, nid, "image")]["class_type"] == "LoadImage"
        assert (inputs["start_percent"], inputs["end_percent"]) == (0.0, 1.0)  # the pipeline has no IP-Adapter range
        kw.update(ipadapter_images=[loaded_image(files, prompt[upstream(prompt, nid, "image")]["inputs"]["image"])],
                  ipadapter_scale=inputs["weight"])
    for nid in identities:  # InfuseNet (controlnet_id 0) with DiffSynth's all-black control image, the face photo
        inputs = prompt[nid]["inputs"]
        assert "control_image" not in inputs and prompt[upstream(prompt, nid, "face_image")]["class_type"] == "LoadImage"
        from flux_core import ControlNetInput
        kw["controlnet_inputs"] = [ControlNetInput(controlnet_id=0, image=Image.new("RGB", (width, height)),
                                                   scale=inputs["strength"], start=1 - inputs["start_percent"],
                                                   end=1 - inputs["end_percent"], processor_id="None")]
        kw.update(infinityou_id_image=loaded_image(files, prompt[upstream(prompt, nid, "face_image")]["inputs"]["image"]),
                  infinityou_guidance=inputs["guidance"])
    entities = by_type(prompt, "FluxCoreEliGenEntity")
    if entities:  # the chain from the sampler's positive back to the prompt; each mask as LoadImage gives it
        chain, nid = [], sampler["positive"][0]
        while prompt[nid]["class_type"] == "FluxCoreEliGenEntity":
            chain.insert(0, prompt[nid]["inputs"])
            nid = upstream(prompt, nid, "conditioning")
        assert len(chain) == len(entities) and prompt[nid]["inputs"] == encode
        masks = []
        for inputs in chain:  # LoadImage's MASK: 1 where the shipped image is transparent
            load = prompt[inputs["mask"][0]]
            assert load["class_type"] == "LoadImage" and inputs["mask"][1] == 1
            with Image.open(files["input"] / load["inputs"]["image"]) as im:
                masks.append(1 - torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255))
        kw.update(eligen_entity_prompts=[c["text"] for c in chain], eligen_entity_masks=masks)
    if latent_source["class_type"] == "InpaintModelConditioning":
        # FLUX.1-Fill from InpaintModelConditioning: the picture and the mask at the output's size, the mask sharp
        # (0 or 1) there, so ComfyUI's unrounded concat_mask is the pipeline's binarised one.
        inputs = latent_source["inputs"]
        load = prompt[inputs["pixels"][0]]
        assert load["class_type"] == "LoadImage" and inputs["mask"] == [inputs["pixels"][0], 1]
        mask = loaded_mask(files, load["inputs"]["image"])
        assert mask.shape == (height, width) and set(mask.unique().tolist()) == {0.0, 1.0}
        kw.update(flux_fill_image=loaded_image(files, load["inputs"]["image"]), flux_fill_mask=mask)
    if latent_source["class_type"] in ("SetLatentNoiseMask", "InpaintModelConditioning"):
        # The latent's noise_mask: outside the mask (LoadImage's: 1 where transparent) the encoded image, noised
        # to the next sigma, replaces the latent after every step. The sampler resizes the mask bilinearly to the
        # latent: at 384 -> 128 every latent pixel samples image pixel 3i + 1; at 512 -> 64 it averages pixels
        # 8i + 3 and 8i + 4, of one 8x8 block. Either way the mask stays exactly 0/1 there.
        name = (prompt[latent_source["inputs"]["mask"][0]] if latent_source["class_type"] == "SetLatentNoiseMask"
                else load)["inputs"]["image"]
        picture = image_scaled(files, width, height) if name == EXAMPLE_IMAGE else loaded_image(files, name)
        full = loaded_mask(files, name)
        step = full.shape[0] // (height // 8)
        start = step // 2 if step % 2 else step // 2 - 1
        mask = full[start::step, start::step].clone()[None, None]
        assert mask.shape[-2:] == (height // 8, width // 8) and set(mask.unique().tolist()) == {0.0, 1.0}
        from flux_core.image import pil_to_tensor
        x0 = pipe.encode_image(pil_to_tensor(picture))
        noise = make_noise(1, height, width, seed)
        sigmas = next_sigmas(flux_sigmas(sampler["steps"], sampler["denoise"], sampler["sigma_shift"]))
        kw["latents"] = noise
        kw["callback"] = lambda i, total, x: mask * x + (1 - mask) * ((1 - sigmas[i]) * x0 + sigmas[i] * noise)
    with torch.no_grad():
        scaled = pipe(**kw)
    return scaled / RAW_SCALE + RAW_SHIFT


@contextlib.contextmanager
def noise_seeds():
    """The seeds the sampler node draws its starting noise from while the block runs (flux_core.sampling.make_noise,
    as the pipeline draws it)."""
    from nodes import sampler
    seeds, original = [], sampler.make_noise

    def recording(batch, height, width, seed, *args, **kwargs):
        seeds.append(seed)
        return original(batch, height, width, seed, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "make_noise", recording)
        yield seeds


@contextlib.contextmanager
def counted_controlnet_calls():
    """Counts the ControlNet (InfuseNet included), IP-Adapter and EliGen contributions made while the block runs, and
    the FLEX.2 / Fill extra channels made from an image (their mask channel is not the default's all-ones):
    {"contributed": n, "ipadapter": m, "eligen": k, "channels": c}."""
    from flux_core.controlnet import ControlNetAdapter
    from flux_core.eligen import EliGenAdapter
    from flux_core.flex import ChannelAdapter
    from flux_core.ipadapter import IPAdapterAdapter
    count = {"contributed": 0, "ipadapter": 0, "eligen": 0, "channels": 0}

    def counting(cls, key):
        original = cls.contribute

        def contribute(self, inputs, call):
            out = original(self, inputs, call)
            if key == "channels":  # channel 16: FLEX.2's mask, or the first of Fill's 64 mask channels
                count[key] += out is not None and bool((self.condition[:, 16] < 1).any())
            else:
                count[key] += out is not None
            return out
        return contribute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ControlNetAdapter, "contribute", counting(ControlNetAdapter, "contributed"))
        mp.setattr(IPAdapterAdapter, "contribute", counting(IPAdapterAdapter, "ipadapter"))
        mp.setattr(EliGenAdapter, "contribute", counting(EliGenAdapter, "eligen"))
        mp.setattr(ChannelAdapter, "contribute", counting(ChannelAdapter, "channels"))
        yield count


def controlnet_input(files, prompt: dict, apply: str, width: int, height: int):
    """The ControlNetInput the workflow's Apply ControlNet (FluxCore) node stands for, its image and mask made
    from the example image as the core nodes upstream make them (the image as PIL, the mask as LoadImage's MASK)."""
    from flux_core import ControlNetInput, control_maps
    inputs = prompt[apply]["inputs"]
    source = prompt[upstream(prompt, apply, "image")]
    if source["class_type"] == "LoadImage":
        image = loaded_image(files)
    elif source["class_type"] in ("ImageScale", "ImageScaleBy"):
        image = image_scaled(files, width, height)
    else:
        assert source["class_type"] == "FluxCoreCannyMap"
        scale = prompt[upstream(prompt, upstream(prompt, apply, "image"), "image")]
        assert scale["class_type"] == "ImageScale" and (scale["inputs"]["width"], scale["inputs"]["height"]) == (
            width, height)
        image = control_maps.canny(image_scaled(files, width, height), low_threshold=source["inputs"]["low_threshold"],
                                   high_threshold=source["inputs"]["high_threshold"], sigma=source["inputs"]["sigma"])
        assert isinstance(image, Image.Image)
    mask = None
    if "mask" in inputs:
        assert inputs["mask"] == [upstream(prompt, apply, "image"), 1]  # LoadImage's MASK: 1 where transparent
        alpha = np.asarray(Image.open(files["input"] / EXAMPLE_IMAGE).getchannel("A"), dtype=np.float32) / 255
        mask = torch.from_numpy(1 - alpha)
    mode = inputs["union_mode"]
    return ControlNetInput(controlnet_id=0, image=image, inpaint_mask=mask, scale=inputs["strength"],
                           start=1 - inputs["start_percent"], end=1 - inputs["end_percent"],
                           processor_id=None if mode == "none" else mode)


@pytest.mark.slow
@pytest.mark.parametrize("path", TINY_WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_as_shipped_and_matches_the_pipeline(shipped, path):
    classes, files = shipped["classes"], shipped["files"]
    workflow = load_workflow(path)
    before = json.dumps(workflow, sort_keys=True)
    prompt = ui_to_api(workflow, specs_from_classes(classes))  # no overrides: the file's own values
    json.dumps(prompt)  # what POST /prompt would receive
    with counted_controlnet_calls() as in_workflow, noise_seeds() as seeds:
        result = run_prompt(prompt, classes)
    assert json.dumps(workflow, sort_keys=True) == before
    save, = by_type(prompt, "SaveImage")
    item, = result.ui[save]["images"]
    with Image.open(files["output"] / item["subfolder"] / item["filename"]) as im:
        saved = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    decoded = result.outputs[upstream(prompt, save, "images")][0][0].numpy()
    # the 384-px example image scaled 2x; EliGen's example renders 768x768, issue 13's 512x512 (short runs)
    size = {"fluxcore_controlnet_upscale": 768, "fluxcore_eligen": 768, "fluxcore_flux_fill": 512,
            "fluxcore_flex2": 512, "fluxcore_step1x_edit": 512, "fluxcore_nexus_gen": 512}.get(path.stem, 1024)
    assert saved.shape == decoded.shape == (size, size, 3)
    # The file holds the decoded image (8-bit): measured 0.00392, just under 1 / 255, as SaveImage truncates to uint8
    # (ComfyUI's astype(np.uint8)); another output saved, or its channels swapped, differs by order 0.1.
    assert np.abs(saved - decoded).max() <= 1 / 255 + 1e-6
    assert saved.std() > 0.05 and np.ptp(saved) > 0.3, "a blank or constant image"  # measured std 0.19 to 0.24, ptp 1
    sampler, = by_type(prompt, "FluxCoreSampler")
    got = result.outputs[sampler][0]["samples"]
    with counted_controlnet_calls() as in_pipeline:
        expected = pipeline_reference(shipped, prompt)
    # Measured 0 for all (the same float32 computations on the same files; latents of std 1.6 to 3.4), the Fill,
    # FLEX.2, Step1X-Edit and Nexus-Gen examples included. A latent shift off by 4e-3 moves every value by
    # 4e-3 / 0.3611; in the text-to-image example another seed moves it by 23.2, guidance 3.4 for 3.5 by 2.5,
    # another prompt by 2.4; the Fill example's masked-image latent encoded from a channels-last view (as
    # ComfyUI lays it out; see tests/native_standins.py) moved the result by 1.2e-2, and InpaintModelConditioning's
    # stand-in without its grey fill by 0.40 (at FLUX's head size of 128).
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
    # The seed matters: the workflow's seed drew the sampler's noise, as the pipeline drew it above.
    assert seeds == [prompt[sampler]["inputs"]["seed"]]
    # Both runs got the same ControlNet contributions, one per step (and tile): a ControlNet ignored on both sides
    # would still make the latents equal. (Without it the latents differ by 1.1 to 2.2; test_controlnet_nodes and
    # test_controlnet_pipeline check the values of what it adds.)
    steps = prompt[sampler]["inputs"]["steps"]
    if by_type(prompt, "FluxCoreApplyControlNet") or by_type(prompt, "FluxCoreApplyInfiniteYou"):
        assert in_workflow["contributed"] == in_pipeline["contributed"] >= steps
    else:
        assert in_workflow["contributed"] == in_pipeline["contributed"] == 0
    if by_type(prompt, "FluxCoreApplyIPAdapter"):
        assert in_workflow["ipadapter"] == in_pipeline["ipadapter"] >= steps
    else:
        assert in_workflow["ipadapter"] == in_pipeline["ipadapter"] == 0
    if by_type(prompt, "FluxCoreEliGenEntity"):
        assert in_workflow["eligen"] == in_pipeline["eligen"] >= steps
    else:
        assert in_workflow["eligen"] == in_pipeline["eligen"] == 0
    # FLEX.2 / Fill: the picture's channels reached every step on both sides (the default channels on both would
    # also give equal latents).
    if by_type(prompt, "FluxCoreFlexInputs") or by_type(prompt, "InpaintModelConditioning"):
        assert in_workflow["channels"] == in_pipeline["channels"] >= steps
    else:
        assert in_workflow["channels"] == in_pipeline["channels"] == 0


def saved_and_decoded(result, files, prompt: dict) -> tuple[np.ndarray, np.ndarray]:
    """(the file SaveImage wrote, the image the decode node handed it), as (H, W, 3) floats in [0, 1]."""
    save, = by_type(prompt, "SaveImage")
    item, = result.ui[save]["images"]
    with Image.open(files["output"] / item["subfolder"] / item["filename"]) as im:
        saved = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    return saved, result.outputs[upstream(prompt, save, "images")][0][0].numpy()


@pytest.mark.slow
@pytest.mark.parametrize("path", DEMO_WORKFLOWS, ids=lambda p: p.stem)
def test_demo_workflow_runs_as_shipped_on_the_shipped_demo_files(shipped, path):
    """The bundled demo's examples in a base folder that holds nothing of the demo: its files come from the pack's
    own folders (registered after the user's, as in ComfyUI), the LoRA example's training set by its name. Each
    result equals FluxImagePipeline.from_demo() with the workflow's settings (and the LoRA the trainer node made)."""
    from flux_core import demo
    from flux_core.pipeline import FluxImagePipeline
    classes, files = shipped["classes"], shipped["files"]
    missing = demo.missing_files()
    assert not missing, f"the demo's files are missing (python -m flux_core.demo.build): {missing}"
    models = files["output"].parent / "models"
    assert not any(p.name.startswith("fluxcore_demo") for p in models.rglob("*")), "the base folder has demo files"
    workflow = load_workflow(path)
    prompt = ui_to_api(workflow, specs_from_classes(classes))  # no overrides: the file's own values
    with noise_seeds() as seeds:
        result = run_prompt(prompt, classes)
    saved, decoded = saved_and_decoded(result, files, prompt)
    assert saved.shape == decoded.shape == (demo.HEIGHT, demo.WIDTH, 3)
    assert np.abs(saved - decoded).max() <= 1 / 255 + 1e-6  # SaveImage's 8-bit truncation, as above
    sampler, = by_type(prompt, "FluxCoreSampler")
    inputs = prompt[sampler]["inputs"]
    assert seeds == [inputs["seed"]]
    positive = prompt[inputs["positive"][0]]["inputs"]
    assert positive["t5_sequence_length"] == 0 and inputs["cfg"] == 1.0  # the demo's 32 T5 tokens; no negative
    pipe = FluxImagePipeline.from_demo()
    trainers = by_type(prompt, "FluxCoreTrainLoRA")
    if trainers:  # the trained LoRA, published into the user's loras folder, is the one the loader applied
        lora_name, = result.outputs[trainers[0]]
        trained = models / "loras" / lora_name
        assert trained.is_file() and not (demo.MODELS_DIR / "loras" / lora_name).exists()
        loader, = by_type(prompt, "FluxCoreLoraLoader")
        assert prompt[loader]["inputs"]["trained_lora"] == [trainers[0], 0]
        pipe.load_lora(pipe.dit, str(trained), alpha=prompt[loader]["inputs"]["strength"])
    kw = dict(prompt=positive["text"], seed=inputs["seed"], num_inference_steps=inputs["steps"],
              sigma_shift=inputs["sigma_shift"], output_type="latent", progress_bar_cmd=None)
    with torch.no_grad():
        # LATENT holds FLUX's raw space whatever the VAE (the sampler's FLUX_LATENT, ComfyUI's latent_formats.Flux);
        # the decode node undoes exactly that before the demo VAE's own scale and shift.
        expected = pipe(**kw) / RAW_SCALE + RAW_SHIFT
    got = result.outputs[sampler][0]["samples"]
    # Measured 0 for both (latents of std about 3); the LoRA example without its LoRA differs by 2.4.
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
    if trainers:  # the trained LoRA reached the sampler (the pipeline with it equals the workflow, without it not)
        pipe.clear_lora()
        with torch.no_grad():
            plain = pipe(**kw) / RAW_SCALE + RAW_SHIFT
        assert (got - plain).abs().max().item() > 0.1


# ---------------------------------------------------------------- the converter's rules, on a hand-made graph
class Sampler:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "seed": ("INT", {}), "steps": ("INT", {}),
                             "mode": (["a", "b"], {"control_after_generate": True}), "name": ("STRING", {})},
                "optional": {"extra": ("FLOAT", {"forceInput": True}), "scale": ("FLOAT", {})}}


class Loader:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (["x.safetensors"],)}}


class Patch(Loader):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "strength": ("FLOAT", {})}}


def graph(nodes, links):
    return {"nodes": nodes, "links": links, "last_node_id": 0, "last_link_id": 0, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def node(id_, type_, values=None, inputs=(), outputs=(), mode=0):
    return {"id": id_, "type": type_, "mode": mode, "widgets_values": values,
            "inputs": [{"name": n, "type": t, "link": l, **({"widget": {"name": n}} if w else {})}
                       for n, t, l, w in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs]}


def test_converter_maps_widgets_follows_reroutes_and_drops_frontend_nodes():
    workflow = graph([
        node(1, "Loader", ["x.safetensors"], outputs=["MODEL"]),
        node(2, "Reroute", None, [("", "*", 1, False)], ["MODEL"]),
        node(3, "Sampler", [5, "randomize", 20, "b", "fixed", "cat", 1.5],
             [("model", "MODEL", 2, False), ("steps", "INT", 3, True)]),
        node(4, "PrimitiveNode", [7, "fixed"], outputs=["INT"]),
        node(5, "Note", ["hello"]),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 4, 0, 3, 1, "INT"]])
    prompt = ui_to_api(workflow, specs_from_classes({"Loader": Loader, "Sampler": Sampler}), {"scale": 2.0})
    assert set(prompt) == {"1", "3"}
    # seed and `mode` (control_after_generate) each skip one saved value; the linked widget keeps its slot.
    assert prompt["3"]["inputs"] == {"model": ["1", 0], "seed": 5, "steps": 7, "mode": "b", "name": "cat", "scale": 2.0}
    assert prompt["1"] == {"class_type": "Loader", "inputs": {"file": "x.safetensors"}, "_meta": {"title": "Loader"}}


def test_converter_bypass_mute_overrides_and_unknown_types():
    workflow = graph([
        node(1, "Loader", ["x.safetensors"], outputs=["MODEL"]),
        node(2, "Patch", [0.5], [("model", "MODEL", 1, False)], ["MODEL"], mode=4),
        node(3, "Sampler", [5, "fixed", 20, "a", "fixed", "cat", 1.0], [("model", "MODEL", 2, False)]),
        node(4, "Patch", [0.5], [("model", "MODEL", None, False)], ["MODEL"], mode=2),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]])
    specs = specs_from_classes({"Loader": Loader, "Patch": Patch, "Sampler": Sampler})
    prompt = ui_to_api(workflow, specs, {"Sampler": {"steps": 1}, "steps": 9, "seed": 3})
    assert set(prompt) == {"1", "3"} and prompt["3"]["inputs"]["model"] == ["1", 0]
    assert prompt["3"]["inputs"]["steps"] == 1 and prompt["3"]["inputs"]["seed"] == 3
    with pytest.raises(WorkflowError, match="unknown node type 'Mystery'"):
        ui_to_api(graph([node(1, "Mystery", [])], []), specs)
