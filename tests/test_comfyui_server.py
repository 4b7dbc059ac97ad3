"""FluxCore inside a real ComfyUI server, installed as a user installs it: a fresh ComfyUI started on an empty base
directory (`--base-directory`), the pack in its custom_nodes/, the model files under the names the example
workflows use in its models/ folders and the pack's example image copied into its input/ folder (README,
"Example workflows"). Then: the pack imports, every node is listed, our JS, the example workflows and their input
image are served, and each example workflow runs through POST /prompt exactly as shipped (no value changed),
giving the same image as the same workflow run standalone (our nodes with stand-ins for the core nodes).

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -n 0 -m comfyui tests/test_comfyui_server.py

The server runs with $COMFYUI_PYTHON (default: the interpreter running pytest), which needs ComfyUI's
requirements and this repository's. Nothing is written into $COMFYUI_DIR: the base directory (custom_nodes/,
models/, input/, output/, temp/, user/) is a temp dir. The tiny models run the workflows' own sizes and 28 steps
on the CPU; RUN_S (default 1800, env FLUXCORE_COMFYUI_RUN_S) bounds each workflow. Two custom nodes are test-only:
the stand-in face embedder (insightface is an optional extra) and SERVER_VAE_SHIM (ComfyUI's VAE loader builds FLUX
VAEs at full width; the tiny test VAE is narrower).
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from example_workflows.build_workflows import DEMO_FILES, DEMO_LORA, INFINITEYOU_FILES, IPADAPTER_FILES
from example_workflows.make_example_image import NAME as EXAMPLE_IMAGE
from example_workflows.ui_format import combo_choices
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from tests.face_standin import SERVER_SHIM, StandInFaceEmbedder
from tests.native_standins import standins
from tests.test_workflows import COMFYUI_ONLY_WORKFLOWS, WORKFLOWS
from tests.tiny_flux_files import FILES, set_up_like_a_user
from tests.workflow_harness import load_workflow, run_prompt, specs_from_classes, specs_from_object_info, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "FluxCore"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SERVER_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
SERVER_DEPS = ("aiohttp", "yaml", "torchsde", "alembic", "sqlalchemy", "comfyui_frontend_package")
STARTUP_S, RUN_S = 240, float(os.environ.get("FLUXCORE_COMFYUI_RUN_S", 1800))

# A custom node that lets ComfyUI's own VAE loader (VAELoader: the FLUX.1-Fill example's InpaintModelConditioning and
# VAEDecode take ComfyUI's VAE) read the test's tiny FLUX VAE. ComfyUI builds every LDM-layout VAE 128 channels wide
# with two res blocks per level; for a narrower file this builds ComfyUI's own Encoder / Decoder at the file's widths
# (read from its shapes) instead. Nothing else changes: the real FLUX VAE (128 wide) takes ComfyUI's path untouched.
SERVER_VAE_SHIM = '''"""Test-only: ComfyUI's VAE classes built at the widths of FluxCore's tiny test VAE."""
import comfy.sd
from comfy.ldm.modules.diffusionmodules import model as _ldm

_original_init = comfy.sd.VAE.__init__


def _sizes(sd):
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    return dict(ch=ch, ch_mult=mult, num_res_blocks=blocks)


def _init(self, sd=None, device=None, config=None, dtype=None, metadata=None):
    conv_in = None if sd is None or config is not None else sd.get("encoder.conv_in.weight")
    if conv_in is None or conv_in.shape[0] >= 128 or "decoder.conv_in.weight" not in sd:
        return _original_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)
    sizes, encoder, decoder = _sizes(sd), _ldm.Encoder, _ldm.Decoder
    _ldm.Encoder = lambda **params: encoder(**{**params, **sizes})
    _ldm.Decoder = lambda **params: decoder(**{**params, **sizes})
    try:
        _original_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)
    finally:
        _ldm.Encoder, _ldm.Decoder = encoder, decoder


comfy.sd.VAE.__init__ = _init
NODE_CLASS_MAPPINGS = {}
'''

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: point it at a ComfyUI checkout (and run "
                                               "pytest with a Python that has ComfyUI's requirements) to test the "
                                               "pack inside a real ComfyUI server"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: dict | None = None, timeout: float = 30, raw: bool = False):
    """(status, parsed JSON or text, or bytes with raw=True) of a GET, or of a POST of `data` as JSON."""
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, content = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, content = e.code, e.read()
    if raw:
        return status, content
    try:
        return status, json.loads(content)
    except ValueError:
        return status, content.decode(errors="replace")


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def missing_modules(modules) -> list[str]:
    """The modules SERVER_PYTHON cannot import."""
    if SERVER_PYTHON == sys.executable:
        return [m for m in modules if importlib.util.find_spec(m) is None]
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    out = subprocess.run([SERVER_PYTHON, "-c", probe, *modules], capture_output=True, text=True, timeout=120)
    return out.stdout.split() if out.returncode == 0 else list(modules)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
        pytest.skip("run this file without xdist (-n 0): one ComfyUI server at a time")
    comfy = Path(COMFYUI_DIR).resolve()
    if not (comfy / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py: not a ComfyUI checkout")
    missing = missing_modules(SERVER_DEPS)
    if missing:
        pytest.skip(f"{SERVER_PYTHON} lacks ComfyUI's requirements ({', '.join(missing)}): "
                    f"pip install -r {comfy / 'requirements.txt'}")

    base = tmp_path_factory.mktemp("comfyui_base")
    assert not any(base.iterdir())  # a fresh, empty base directory
    # What a user does (README): the pack into custom_nodes/ (cloned there; linked here), the model files into
    # models/<folder>/ under the workflows' names, the example image into input/.
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(ROOT, target_is_directory=True)
    # Not what a user does: insightface is an optional extra, absent here, so the InfiniteYou example's face photo is
    # embedded by the test's stand-in (tests/face_standin.py), put in place by a custom node of its own.
    (base / "custom_nodes" / "fluxcore_face_standin.py").write_text(SERVER_SHIM, encoding="utf-8")
    # Nor is this: the tiny VAE file read by ComfyUI's own VAE loader (SERVER_VAE_SHIM above).
    (base / "custom_nodes" / "fluxcore_tiny_vae.py").write_text(SERVER_VAE_SHIM, encoding="utf-8")
    files = set_up_like_a_user(base)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = base.parent / f"{base.name}_comfyui.log"
    cmd = [SERVER_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
           str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    process = None
    try:
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, cwd=comfy, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{log_tail(log)}")
            try:
                status, object_info = http(f"{url}/object_info", timeout=10)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {STARTUP_S} s:\n{log_tail(log)}")
            time.sleep(1)
        yield dict(url=url, log=log, object_info=object_info, base=base, files=files)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_pack_imports_and_every_node_is_listed(server):
    log = server["log"].read_text(errors="replace")
    failures = [line for line in log.splitlines()
                if PACK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failures, "\n".join(failures) + "\n" + log_tail(server["log"])
    info = server["object_info"]
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"/object_info lacks {missing}"
    for node_id in NODE_CLASS_MAPPINGS:
        assert info[node_id]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert info[node_id]["category"].startswith("FluxCore/")
    # The user's files are what the loaders and LoadImage offer (a list of choices, or a COMBO's options).
    spec = specs_from_object_info(info)
    assert {FILES["dit"][1], FILES["kontext_dit"][1]} <= set(combo_choices(spec("FluxCoreDiTLoader"), "dit_name"))
    assert FILES["vae"][1] in combo_choices(spec("FluxCoreVAELoader"), "vae_name")
    assert {FILES["clip"][1], FILES["t5"][1]} <= set(combo_choices(spec("FluxCoreTextEncoderLoader"), "clip_name"))
    assert EXAMPLE_IMAGE in combo_choices(spec("LoadImage"), "image")
    # Folders ComfyUI itself lacks (models/ipadapter, models/infinite_you) are registered and listed; model folders
    # (the SigLIP snapshot, the sharded InfuseNetModel/) are offered as one choice each.
    ipadapter = spec("FluxCoreIPAdapterLoader")
    assert IPADAPTER_FILES["ipadapter"] in combo_choices(ipadapter, "ipadapter_name")
    assert IPADAPTER_FILES["image_encoder"] in combo_choices(ipadapter, "image_encoder_name")
    assert set(INFINITEYOU_FILES.values()) <= set(combo_choices(spec("FluxCoreInfiniteYouLoader"), "infusenet_name"))
    # The bundled demo model's files, from the pack's own folders (nothing of them in the base folder's models/).
    assert not any(p.name.startswith("fluxcore_demo") for p in (server["base"] / "models").rglob("*"))
    assert DEMO_FILES["dit"] in combo_choices(spec("FluxCoreDiTLoader"), "dit_name")
    assert DEMO_FILES["vae"] in combo_choices(spec("FluxCoreVAELoader"), "vae_name")
    assert {DEMO_FILES["clip"], DEMO_FILES["t5"]} <= set(combo_choices(spec("FluxCoreTextEncoderLoader"), "t5_name"))
    assert DEMO_LORA in combo_choices(spec("FluxCoreLoraLoader"), "lora_name")
    assert DEMO_FILES["dit"] in combo_choices(spec("FluxCoreTrainLoRA"), "dit_name")


def test_extension_js_is_served(server):
    status, extensions = http(f"{server['url']}/extensions")
    assert status == 200
    ours = sorted(f"/extensions/{PACK_NAME}/{p.relative_to(ROOT / 'js').as_posix()}" for p in (ROOT / "js").rglob("*.js"))
    assert ours and set(ours) <= set(extensions), f"{ours} not all in /extensions: {extensions}"
    status, text = http(server["url"] + f"/extensions/{PACK_NAME}/fluxcore.js")
    assert status == 200 and "app.registerExtension" in text


def test_example_workflows_and_their_image_are_served_as_templates(server):
    status, templates = http(f"{server['url']}/workflow_templates")
    assert status == 200
    assert sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS)
    status, image = http(f"{server['url']}/api/workflow_templates/{PACK_NAME}/{EXAMPLE_IMAGE}", raw=True)
    assert status == 200 and image == (ROOT / "example_workflows" / EXAMPLE_IMAGE).read_bytes()


@pytest.fixture(scope="module")
def standalone(server):
    """Our nodes and the core-node stand-ins outside ComfyUI, over the same base directory (and the same
    stand-in face embedder)."""
    from flux_core import face_embedding
    from nodes import comfy_bridge, infiniteyou_nodes
    output = server["base"].parent / f"{server['base'].name}_standalone_output"
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(server["base"] / "models"))
    mp.setenv("FLUXCORE_INPUT_DIR", str(server["files"]["input"]))
    mp.setenv("FLUXCORE_OUTPUT_DIR", str(output))  # the trainer node's runs (the LoRA: the same models/loras)
    # the demo's folders after the base folder's, as register_demo_folders adds them in ComfyUI
    mp.setattr(comfy_bridge, "standalone_extra_folders", {k: [v] for k, v in comfy_bridge.demo_folders().items()})
    mp.setattr(face_embedding, "FaceEmbedder", StandInFaceEmbedder)  # as the server's shim does
    mp.setattr(infiniteyou_nodes, "_embedders", {})
    yield dict(classes={**NODE_CLASS_MAPPINGS, **standins(server["files"]["input"], output)}, output=output)
    mp.undo()


def run_in_comfyui(server, prompt: dict, name: str) -> dict:
    status, answer = http(f"{server['url']}/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"ComfyUI refused {name}: {json.dumps(answer, indent=1)}"
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + RUN_S
    while True:
        status, history = http(f"{server['url']}/history/{prompt_id}")
        entry = history.get(prompt_id) if status == 200 and isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            break
        assert time.monotonic() < deadline, f"{name} did not finish in {RUN_S} s:\n{log_tail(server['log'])}"
        time.sleep(1)
    errors = [m[1] for m in entry["status"].get("messages") or [] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success" and not errors, "\n".join(
        f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: {e.get('exception_message')}"
        + "".join(e.get("traceback") or []) for e in errors) or log_tail(server["log"])
    return entry


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p not in COMFYUI_ONLY_WORKFLOWS], ids=lambda p: p.stem)
def test_example_workflow_runs_as_shipped_in_comfyui(server, standalone, path):
    info = server["object_info"]
    workflow = load_workflow(path)
    prompt = ui_to_api(workflow, specs_from_object_info(info))  # the file's own values, nothing replaced
    entry = run_in_comfyui(server, prompt, path.name)
    save, = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    item, = entry["outputs"][save]["images"]
    with Image.open(server["base"] / "output" / item["subfolder"] / item["filename"]) as im:
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    # The upscale example doubles the shipped 384x384 image, EliGen's renders 768x768, issue 13's (Fill, FLEX.2,
    # Step1X-Edit, Nexus-Gen) 512x512, the demo model's 128x128; the others 1024x1024.
    size = {"fluxcore_controlnet_upscale": 768, "fluxcore_eligen": 768, "fluxcore_flux_fill": 512,
            "fluxcore_flex2": 512, "fluxcore_step1x_edit": 512, "fluxcore_nexus_gen": 512,
            "fluxcore_demo_text_to_image": 128, "fluxcore_demo_lora": 128}.get(path.stem, 1024)
    assert got.shape == (size, size, 3)
    assert got.std() > 0.05 * 255 and np.ptp(got) > 0.3 * 255, "a blank or constant image"
    # The same file run standalone (our nodes, stand-ins for the core nodes) gives the same picture.
    classes = standalone["classes"]
    alone = run_prompt(ui_to_api(workflow, specs_from_classes(classes)), classes)
    mine, = alone.ui[save]["images"]
    with Image.open(standalone["output"] / mine["subfolder"] / mine["filename"]) as im:
        want = np.asarray(im.convert("RGB"), dtype=np.int16)
    # Equal computations in float32 on the same files; 2 levels allow for 8-bit rounding of values at a .5 edge.
    # The FLUX.1-Fill example encodes and decodes with ComfyUI's own VAE classes in ComfyUI (VAELoader) and with
    # FluxCore's VAE standalone: two implementations' float32 rounding, carried through the sampler, measured at
    # most 1 level (mean 0.02) with 2 threads and 3 (mean 0.06, 2 pixels of 786432 at 3) with one.
    difference = np.abs(got - want)
    if path.stem == "fluxcore_flux_fill":
        assert difference.max() <= 4 and difference.mean() <= 0.1, (path.name, difference.max(), difference.mean())
    else:
        assert difference.max() <= 2, f"{path.name}: ComfyUI and standalone images differ"


# ---------------------------------------------------------------- FluxCore adapters under ComfyUI's own sampler
# The examples whose FLUX Sampler (FluxCore) can be swapped for native sampling on the DiT's MODEL. Not the other
# two: the upscale example tiles the DiT (tiled_dit, a FluxCore-sampler option), the demo LoRA example loads its LoRA
# with FluxCore's LoRA node (on a MODEL: LoraLoaderModelOnly).
NATIVE_SAMPLED = ("fluxcore_text_to_image", "fluxcore_demo_text_to_image", "fluxcore_image_to_image",
                  "fluxcore_kontext_edit", "fluxcore_mixed_native", "fluxcore_controlnet_inpainting",
                  "fluxcore_controlnet_union_canny", "fluxcore_ipadapter_instantx", "fluxcore_infiniteyou",
                  "fluxcore_eligen", "fluxcore_flex2", "fluxcore_flux_fill", "fluxcore_step1x_edit",
                  "fluxcore_nexus_gen", "fluxcore_controlnet_union_canny:fp8")
# ":fp8": the example with its ControlNet stored in FP8 (Load ControlNet (FluxCore)'s weight_dtype): FluxCore's VRAM
# manager computes it there, ComfyUI's manual cast on the MODEL, both in the compute dtype.


def with_native_sampler(prompt: dict) -> dict:
    """The prompt with each FLUX Sampler (FluxCore) replaced by FluxCore DiT to MODEL -> SamplerCustom (euler, FLUX
    Sigmas (FluxCore) with the sampler's steps, shift and denoise), the same seed, cfg and conditioning."""
    out = json.loads(json.dumps(prompt))
    for nid in [n for n, node in prompt.items() if node["class_type"] == "FluxCoreSampler"]:
        inputs = out[nid]["inputs"]
        assert inputs["embedded_guidance"] < 0 and not inputs["tiled_dit"] and not inputs["eligen_inpaint"]
        out[f"{nid}.model"] = {"class_type": "FluxCoreDiTToModel", "inputs": {"model": inputs["model"]}}
        out[f"{nid}.sigmas"] = {"class_type": "FluxCoreSigmas", "inputs": {
            "steps": inputs["steps"], "sigma_shift": inputs["sigma_shift"], "denoise": inputs["denoise"]}}
        out[f"{nid}.euler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        out[nid] = {"class_type": "SamplerCustom", "inputs": {
            "model": [f"{nid}.model", 0], "add_noise": True, "noise_seed": inputs["seed"], "cfg": inputs["cfg"],
            "positive": inputs["positive"], "negative": inputs["negative"], "sampler": [f"{nid}.euler", 0],
            "sigmas": [f"{nid}.sigmas", 0], "latent_image": inputs["latent_image"]}}
    return out


def saved_image(server, prompt: dict, entry: dict) -> np.ndarray:
    save, = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    item, = entry["outputs"][save]["images"]
    with Image.open(server["base"] / "output" / item["subfolder"] / item["filename"]) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", NATIVE_SAMPLED)
def test_fluxcore_adapters_under_native_sampler(server, name):
    """The example with ComfyUI's SamplerCustom on the DiT's MODEL gives the picture FLUX Sampler (FluxCore) gives:
    every FluxCore adapter in it reaches the DiT through the conditioning, on the native path too."""
    stem, _, variant = name.partition(":")
    path, = [p for p in WORKFLOWS if p.stem == stem]
    prompt = ui_to_api(load_workflow(path), specs_from_object_info(server["object_info"]))
    if variant == "fp8":
        for node in prompt.values():
            if node["class_type"] == "FluxCoreControlNetLoader":
                node["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    shipped = saved_image(server, prompt, run_in_comfyui(server, prompt, path.name))
    native_prompt = with_native_sampler(prompt)
    native = saved_image(server, native_prompt, run_in_comfyui(server, native_prompt, f"{path.name} (native)"))
    difference = np.abs(native - shipped)
    assert difference.max() <= 2, (name, difference.max(), difference.mean())


def test_native_ksampler_example_runs_as_shipped(server):
    """KSampler + LoraLoaderModelOnly + ModelSamplingFlux on the DiT loader's MODEL, with FluxCore's Apply ControlNet
    on the conditioning, as shipped; the LoRA and the ControlNet each change the picture (the same prompt with the
    LoRA's strength 0, or the ControlNet's, differs)."""
    path, = [p for p in WORKFLOWS if p.stem == "fluxcore_native_ksampler"]
    prompt = ui_to_api(load_workflow(path), specs_from_object_info(server["object_info"]))
    shipped = saved_image(server, prompt, run_in_comfyui(server, prompt, path.name))
    assert shipped.shape == (1024, 1024, 3)
    assert shipped.std() > 0.05 * 255 and np.ptp(shipped) > 0.3 * 255, "a blank or constant image"
    for node_type, strength in (("LoraLoaderModelOnly", "strength_model"), ("FluxCoreApplyControlNet", "strength")):
        variant = json.loads(json.dumps(prompt))
        nid, = [n for n, node in variant.items() if node["class_type"] == node_type]
        variant[nid]["inputs"][strength] = 0.0
        image = saved_image(server, variant, run_in_comfyui(server, variant, f"{path.name} ({node_type} off)"))
        assert np.abs(image - shipped).mean() > 1.0, f"{node_type} did not change the picture"
