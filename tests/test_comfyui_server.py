"""FluxCore inside a real ComfyUI server: the pack imports, every node is listed, our JS and example workflows
are served, and each example workflow runs through POST /prompt on tiny models.

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -n 0 -m comfyui tests/test_comfyui_server.py

The interpreter running pytest starts the server (`sys.executable main.py --cpu ...`), so it needs ComfyUI's
requirements as well as this repository's test extras. The pack is linked into $COMFYUI_DIR/custom_nodes as
FluxCore for the duration of the test; models, input, output, temp and user folders live in a temp dir.
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

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from tests.native_standins import standins
from tests.test_workflows import INPUT_IMAGE, TINY_OVERRIDES, WORKFLOWS, H, W, write_input_image
from tests.tiny_comfy import NAMES, make_models_dir
from tests.workflow_harness import load_workflow, run_prompt, specs_from_classes, specs_from_object_info, ui_to_api

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "FluxCore"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SERVER_DEPS = ("aiohttp", "yaml", "torchsde", "alembic", "sqlalchemy", "comfyui_frontend_package")
STARTUP_S, RUN_S = 240, 300

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


def http(url: str, data: dict | None = None, timeout: float = 30):
    """(status, parsed JSON or text) of a GET, or of a POST of `data` as JSON."""
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
        pytest.skip("run this file without xdist (-n 0): one ComfyUI server and one custom_nodes/FluxCore link")
    comfy = Path(COMFYUI_DIR).resolve()
    if not (comfy / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py: not a ComfyUI checkout")
    missing = [m for m in SERVER_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{sys.executable} lacks ComfyUI's requirements ({', '.join(missing)}): "
                    f"pip install -r {comfy / 'requirements.txt'}")
    link = comfy / "custom_nodes" / PACK_NAME
    if link.is_symlink() and link.resolve() == ROOT:
        link.unlink()  # left over from an interrupted run
    if link.exists() or link.is_symlink():
        pytest.skip(f"{link} already exists and is not a link to this checkout; remove it to run this test")

    tmp = tmp_path_factory.mktemp("comfyui")
    models_dir, _ = make_models_dir(tmp)
    folders = {sub: sub for sub in ("diffusion_models", "text_encoders", "vae", "diffusers")}
    extra_paths = tmp / "extra_model_paths.yaml"
    extra_paths.write_text("fluxcore_tiny:\n" + f"    base_path: {models_dir}\n" +
                           "".join(f"    {key}: {value}\n" for key, value in folders.items()))
    dirs = {name: tmp / name for name in ("input", "output", "temp", "user")}
    for d in dirs.values():
        d.mkdir()
    write_input_image(dirs["input"] / INPUT_IMAGE)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "comfyui.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(extra_paths), "--output-directory", str(dirs["output"]),
           "--input-directory", str(dirs["input"]), "--temp-directory", str(dirs["temp"]),
           "--user-directory", str(dirs["user"]), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    link.symlink_to(ROOT, target_is_directory=True)
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
        yield dict(url=url, log=log, object_info=object_info, output=dirs["output"], models=models_dir,
                   input=dirs["input"], tmp=tmp)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if link.is_symlink():
            link.unlink()


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
    # The tiny models are found through the extra model paths (what each loader offers as choices).
    assert any(c.startswith(NAMES["dit"]) for c in info["FluxCoreDiTLoader"]["input"]["required"]["dit_name"][0])


def test_extension_js_is_served(server):
    status, extensions = http(f"{server['url']}/extensions")
    assert status == 200
    ours = sorted(f"/extensions/{PACK_NAME}/{p.relative_to(ROOT / 'js').as_posix()}" for p in (ROOT / "js").rglob("*.js"))
    assert ours and set(ours) <= set(extensions), f"{ours} not all in /extensions: {extensions}"
    status, text = http(server["url"] + f"/extensions/{PACK_NAME}/fluxcore.js")
    assert status == 200 and "app.registerExtension" in text


def test_example_workflows_are_offered_as_templates(server):
    status, templates = http(f"{server['url']}/workflow_templates")
    assert status == 200
    assert sorted(templates.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS)


@pytest.fixture(scope="module")
def standalone(server):
    """Our nodes and the core-node stand-ins outside ComfyUI, on the same tiny models and input image."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUXCORE_MODELS_DIR", str(server["models"]))
    output = server["tmp"] / "standalone_output"
    yield dict(classes={**NODE_CLASS_MAPPINGS, **standins(server["input"], output)}, output=output)
    mp.undo()


def tiny_overrides(object_info: dict) -> dict:
    """TINY_OVERRIDES with each model widget set to the tiny model's entry as this ComfyUI lists it (ComfyUI
    lists model files, e.g. "tiny-dit/diffusion_pytorch_model.safetensors", where FluxCore lists folders)."""
    overrides = dict(TINY_OVERRIDES)
    for node_id, name in (("FluxCoreDiTLoader", "dit_name"), ("FluxCoreTextEncoderLoader", "clip_name"),
                          ("FluxCoreTextEncoderLoader", "t5_name"), ("FluxCoreVAELoader", "vae_name")):
        choices = object_info[node_id]["input"]["required"][name][0]
        wanted = TINY_OVERRIDES[name]
        matches = [c for c in choices if c == wanted or c.startswith(wanted + "/")]
        assert matches, f"{node_id}.{name}: no {wanted} among {choices}"
        overrides[name] = matches[0]
    return overrides


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_runs_in_comfyui(server, standalone, path):
    info = server["object_info"]
    prompt = ui_to_api(load_workflow(path), specs_from_object_info(info), tiny_overrides(info))
    status, answer = http(f"{server['url']}/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, f"ComfyUI refused the prompt: {json.dumps(answer, indent=1)}"
    prompt_id = answer["prompt_id"]
    deadline = time.monotonic() + RUN_S
    while True:
        status, history = http(f"{server['url']}/history/{prompt_id}")
        entry = history.get(prompt_id) if status == 200 and isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            break
        assert time.monotonic() < deadline, f"{path.name} did not finish in {RUN_S} s:\n{log_tail(server['log'])}"
        time.sleep(0.5)
    errors = [m[1] for m in entry["status"].get("messages") or [] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success" and not errors, "\n".join(
        f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: {e.get('exception_message')}"
        + "".join(e.get("traceback") or []) for e in errors) or log_tail(server["log"])
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves
    # The same workflow without ComfyUI (our harness and stand-ins) gives the same picture.
    classes = standalone["classes"]
    alone = run_prompt(ui_to_api(load_workflow(path), specs_from_classes(classes), TINY_OVERRIDES), classes)
    for nid in saves:
        images, expected = entry["outputs"][nid]["images"], alone.ui[nid]["images"]
        assert images and len(images) == len(expected)
        for item, mine in zip(images, expected):
            with Image.open(server["output"] / item["subfolder"] / item["filename"]) as im:
                assert im.size == (W, H)
                got = np.asarray(im.convert("RGB"), dtype=np.int16)
            with Image.open(standalone["output"] / mine["subfolder"] / mine["filename"]) as im:
                want = np.asarray(im.convert("RGB"), dtype=np.int16)
            assert np.abs(got - want).max() <= 2, f"{path.name}: ComfyUI and standalone images differ"
