"""The example workflows: well-formed, in sync with their generator, and running end to end on tiny models
through the UI -> API conversion and the stand-ins for ComfyUI's core nodes (no ComfyUI needed)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodes import NODE_CLASS_MAPPINGS
from tests.native_standins import STANDIN_NAMES, standins
from tests.tiny_comfy import NAMES, make_models_dir
from tests.workflow_harness import (WorkflowError, load_workflow, node_types, run_prompt, specs_from_classes,
                                    ui_to_api)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
H, W = 48, 64
INPUT_IMAGE = "input.png"

# Widget values that point the example workflows at the tiny models and keep them fast.
TINY_OVERRIDES = {"dit_name": NAMES["dit"], "clip_name": NAMES["clip"], "t5_name": NAMES["t5"], "vae_name": NAMES["vae"],
                  "width": W, "height": H, "steps": 2, "t5_sequence_length": 16, "image": INPUT_IMAGE}
REAL_FILES = {"dit_name": {"flux1-dev.safetensors", "flux1-kontext-dev.safetensors"}, "clip_name": {"clip_l.safetensors"},
              "t5_name": {"t5xxl_fp16.safetensors"}, "vae_name": {"ae.safetensors"}}


def write_input_image(path: Path) -> None:
    """An RGB image whose right half is transparent: LoadImage's MASK marks that half (1 = change)."""
    rgba = np.random.default_rng(0).integers(0, 255, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, W // 2:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workflows")
    models_dir, _ = make_models_dir(tmp)
    (tmp / "input").mkdir()
    write_input_image(tmp / "input" / INPUT_IMAGE)
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(models_dir))
    classes = {**NODE_CLASS_MAPPINGS, **standins(tmp / "input", tmp / "output")}
    yield dict(classes=classes, output=tmp / "output")
    mp.undo()


def test_the_four_examples_exist_each_with_a_thumbnail():
    names = {p.stem for p in WORKFLOWS}
    assert {"fluxcore_text_to_image", "fluxcore_image_to_image", "fluxcore_kontext_edit",
            "fluxcore_mixed_native"} <= names
    for path in WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name} has no {thumb.name} beside it"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and min(im.size) >= 128


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_is_ui_format_with_known_nodes_and_real_model_names(path):
    workflow = load_workflow(path)
    assert workflow["version"] == 0.4 and {"last_node_id", "last_link_id", "groups", "config", "extra"} <= set(workflow)
    unknown = node_types(workflow) - set(NODE_CLASS_MAPPINGS) - set(STANDIN_NAMES)
    assert not unknown, f"{path.name} uses node types that neither FluxCore nor the stand-ins provide: {unknown}"
    assert any(t.startswith("FluxCore") for t in node_types(workflow))
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        nodes = {n["id"]: n for n in workflow["nodes"]}
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    # Defaults are the real FLUX files a user has, not the tiny test models.
    prompt = ui_to_api(workflow, specs_from_classes({**NODE_CLASS_MAPPINGS, **standins(EXAMPLES, EXAMPLES)}))
    for node in prompt.values():
        for name, allowed in REAL_FILES.items():
            if name in node["inputs"]:
                assert node["inputs"][name] in allowed, f"{path.name}: {name}={node['inputs'][name]!r}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_committed_example_matches_its_generator(path):
    from example_workflows.build_workflows import WORKFLOWS as BUILDERS, build
    assert path.stem in BUILDERS, f"{path.name} is not written by example_workflows/build_workflows.py"
    assert build(path.stem) == load_workflow(path), "run python example_workflows/build_workflows.py"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_end_to_end_on_tiny_models(env, path):
    classes = env["classes"]
    prompt = ui_to_api(load_workflow(path), specs_from_classes(classes), TINY_OVERRIDES)
    json.dumps(prompt)  # what POST /prompt would receive
    result = run_prompt(prompt, classes)
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves
    for nid in saves:
        for item in result.ui[nid]["images"]:
            with Image.open(env["output"] / item["subfolder"] / item["filename"]) as im:
                assert im.size == (W, H) and im.mode == "RGB"
    by_type = {n["class_type"]: nid for nid, n in prompt.items()}
    if "SetLatentNoiseMask" in by_type:  # native nodes' data reached our sampler
        latent = result.outputs[by_type["SetLatentNoiseMask"]][0]
        assert latent["noise_mask"].shape == (1, 1, H, W) and latent["noise_mask"][..., W // 2:].min() == 1
    if "ReferenceLatent" in by_type:
        conditioning = result.outputs[by_type["ReferenceLatent"]][0]
        assert conditioning[0][1]["reference_latents"][0].shape == (1, 16, H // 8, W // 8)
        assert conditioning[0][1]["guidance"] == 2.5  # from native FluxGuidance


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
