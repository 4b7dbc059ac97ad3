"""InfiniteYou's face embedding (flux_core.face_embedding) without its optional packages.

insightface, onnxruntime, facexlib and OpenCV are not installed here (and must not be in the project's venv), so:
- the error paths run against the real environment (nothing installed, no weights) and against stand-in modules put
  in sys.modules (packages "installed", weights missing);
- the detect -> align -> embed flow runs against stand-ins that record what our code hands them. These check OUR
  glue (detection sizes in DiffSynth's order, the largest face, BGR channel order, [-1, 1] scaling, norm_crop called
  as insightface's source requires: landmarks of shape (5, 2) and image_size 112 in its "arcface" mode), not
  insightface's or facexlib's own computations.
"""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flux_core import face_embedding as fe
from flux_core.face_embedding import (ARCFACE_FILE, DETECTOR_FILE, FaceEmbedder, FaceEmbeddingSetupError,
                                      NoFaceFoundError, default_insightface_root)

OPTIONAL = ("insightface", "onnxruntime", "facexlib", "cv2")


def _module(name: str, package_dir=None, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package_dir is not None)
    if package_dir is not None:
        m.__spec__.submodule_search_locations = [str(package_dir)]
        m.__path__ = [str(package_dir)]
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


class StandIns:
    """Stand-in insightface / facexlib / onnxruntime / cv2 modules that record how they are called.

    detections: {det_size: [faces]} (a face is {"bbox": (x1, y1, x2, y2), "kps": 5x2}); the ArcFace stand-in maps the
    (1, 3, 112, 112) input to a 512-d unit vector through a fixed matrix (its 'weights', loaded from the file)."""

    def __init__(self, monkeypatch, tmp_path, detections=None):
        self.detections = detections or {}
        self.apps, self.get_calls, self.crops, self.arcface_inputs = [], [], [], []
        standins = self

        class FaceAnalysis:
            def __init__(self, name="buffalo_l", root="~/.insightface", allowed_modules=None, **kwargs):
                self.kwargs = dict(name=name, root=root, allowed_modules=allowed_modules, **kwargs)
                standins.apps.append(self)

            def prepare(self, ctx_id, det_thresh=0.5, det_size=(640, 640)):
                self.ctx_id, self.det_size = ctx_id, det_size

            def get(self, img, max_num=0):
                standins.get_calls.append((self.det_size, img.copy()))
                return list(standins.detections.get(self.det_size[0], []))

        def norm_crop(img, landmark, image_size=112, mode="arcface"):
            # insightface's estimate_norm asserts lmk.shape == (5, 2); its arcface template is for 112 (asserted).
            assert isinstance(landmark, np.ndarray) and landmark.shape == (5, 2)
            assert image_size == 112 and mode == "arcface"
            x, y = int(landmark[0][0]), int(landmark[0][1])
            crop = np.zeros((112, 112, 3), dtype=np.uint8)
            part = img[y:y + 112, x:x + 112]
            crop[:part.shape[0], :part.shape[1]] = part
            standins.crops.append((landmark.copy(), crop))
            return crop

        class Backbone(torch.nn.Module):
            def __init__(self, num_layers, drop_ratio, mode="ir"):
                super().__init__()
                assert (num_layers, mode) == (50, "ir_se")
                self.weight = torch.nn.Parameter(torch.zeros(512, 3))

            def forward(self, x):
                standins.arcface_inputs.append(x.detach().clone())
                v = x.mean(dim=(2, 3)) @ self.weight.T
                return v / v.norm(dim=1, keepdim=True)

        self.facexlib_dir = tmp_path / "site" / "facexlib"
        modules = {
            "insightface": _module("insightface", tmp_path / "site" / "insightface"),
            "insightface.app": _module("insightface.app", tmp_path, FaceAnalysis=FaceAnalysis),
            "insightface.utils": _module("insightface.utils", tmp_path),
            "insightface.utils.face_align": _module("insightface.utils.face_align", norm_crop=norm_crop),
            "onnxruntime": _module("onnxruntime"),
            "cv2": _module("cv2"),
            "facexlib": _module("facexlib", self.facexlib_dir),
            "facexlib.recognition": _module("facexlib.recognition", tmp_path),
            "facexlib.recognition.arcface_arch": _module("facexlib.recognition.arcface_arch", Backbone=Backbone),
        }
        modules["insightface.utils"].face_align = modules["insightface.utils.face_align"]
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        self.root = tmp_path / "insightface"
        self.weight = torch.randn(512, 3, generator=torch.Generator().manual_seed(0))

    def install_weights(self):
        detector = self.root / "models" / "antelopev2" / DETECTOR_FILE
        detector.parent.mkdir(parents=True, exist_ok=True)
        detector.write_bytes(b"onnx")
        arcface = self.facexlib_dir / "weights" / ARCFACE_FILE
        arcface.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"weight": self.weight}, arcface)
        return self


def face(x1, y1, x2, y2, seed=0):
    kps = np.random.default_rng(seed).uniform(x1, x2 - 1, (5, 2)).astype(np.float32)
    kps[:, 1] = np.clip(kps[:, 1], y1, y2 - 1)
    return {"bbox": np.array([x1, y1, x2, y2], dtype=np.float32), "kps": kps, "det_score": 0.9}


def photo(seed=0, size=(200, 160)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------- missing pieces
def test_nothing_installed_lists_every_package_and_weight_at_once(tmp_path):
    for module in OPTIONAL:  # the premise: this venv has none of them
        assert importlib.util.find_spec(module) is None, f"{module} must not be installed in the project venv"
    with pytest.raises(FaceEmbeddingSetupError) as err:
        FaceEmbedder(root=tmp_path / "insightface")
    text = str(err.value)
    for piece in ("insightface", "onnxruntime", "facexlib", "opencv-python"):
        assert f"the Python package {piece}" in text
    assert "`pip install insightface onnxruntime facexlib opencv-python`" in text
    assert 'pip install ".[infiniteyou]"' in text
    assert str(tmp_path / "insightface" / "models" / "antelopev2" / DETECTOR_FILE) in text
    assert ("`modelscope download ByteDance/InfiniteYou --include 'supports/insightface/models/antelopev2/*' "
            f"--local-dir <folder>` and move <folder>/supports/insightface/models/antelopev2/ to "
            f"{tmp_path / 'insightface' / 'models' / 'antelopev2'}") in text
    assert ARCFACE_FILE in text and "https://github.com/xinntao/facexlib/releases" in text
    assert "infinityou_id_embedding=" in text


def test_missing_weights_name_where_they_are_looked_for(monkeypatch, tmp_path):
    StandIns(monkeypatch, tmp_path)  # packages "installed", no weight files
    with pytest.raises(FaceEmbeddingSetupError) as err:
        FaceEmbedder(root=tmp_path / "insightface", device="cpu")
    text = str(err.value)
    assert "the Python package" not in text
    assert str(tmp_path / "insightface" / "models" / "antelopev2" / DETECTOR_FILE) in text
    assert str(tmp_path / "site" / "facexlib" / "weights" / ARCFACE_FILE) in text  # facexlib's own weights folder
    # An explicit arcface_weights path is where it is looked for instead.
    with pytest.raises(FaceEmbeddingSetupError) as err:
        FaceEmbedder(root=tmp_path / "insightface", device="cpu", arcface_weights=tmp_path / "arc.pth")
    assert str(tmp_path / "arc.pth") in str(err.value)


def test_antelopev2_unzipped_one_folder_too_deep_is_named(monkeypatch, tmp_path):
    standins = StandIns(monkeypatch, tmp_path).install_weights()
    good = standins.root / "models" / "antelopev2" / DETECTOR_FILE
    nested = good.parent / "antelopev2" / DETECTOR_FILE
    nested.parent.mkdir()
    good.rename(nested)
    with pytest.raises(FaceEmbeddingSetupError, match="one folder too deep") as err:
        FaceEmbedder(root=standins.root, device="cpu")
    assert "facexlib" not in str(err.value).split("\n- ", 1)[1].split("\n")[0]  # only the detector line
    assert len(str(err.value).split("\n- ")) == 2  # one missing piece


def test_default_root_is_diffsynths_and_follows_the_model_path_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    assert default_insightface_root() == "./models/ByteDance/InfiniteYou/supports/insightface"
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "m"))
    expected = str(tmp_path / "m" / "ByteDance" / "InfiniteYou" / "supports" / "insightface")
    assert default_insightface_root() == expected
    with pytest.raises(FaceEmbeddingSetupError) as err:
        FaceEmbedder()
    assert expected in str(err.value)
    # The published layout under the default root: the download command fills it in place.
    assert ("`modelscope download ByteDance/InfiniteYou --include 'supports/insightface/models/antelopev2/*' "
            f"--local-dir {tmp_path / 'm' / 'ByteDance' / 'InfiniteYou'}`") in str(err.value)


def test_nothing_optional_is_imported_with_flux_core():
    """Importing the engine (pipeline, face embedding) and checking what is missing never imports the optional
    packages: a finder placed first offers them with a loader that records any import (find_spec probes, which run
    no module code, are what missing_pieces does)."""
    code = ("import importlib.abc, importlib.machinery, sys\n"
            "imported = []\n"
            "class Loader(importlib.abc.Loader):\n"
            "    def create_module(self, spec): return None\n"
            "    def exec_module(self, module): imported.append(module.__name__); raise ImportError('spy')\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {OPTIONAL!r}:\n"
            "            return importlib.machinery.ModuleSpec(name, Loader(), is_package=True)\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import flux_core.face_embedding, flux_core.pipeline\n"
            "missing = flux_core.face_embedding.missing_pieces('/nonexistent')\n"
            "assert not imported, imported\n"
            "assert not any('Python package' in m for m in missing), missing  # the spy makes them look installed\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))


def test_pipeline_identity_from_a_photo_reports_the_missing_pieces(tmp_path, monkeypatch):
    """pipe(infinityou_id_image=...) reaches FaceEmbedder through pipe.identity(); the user sees the full list."""
    from flux_core.pipeline import FluxImagePipeline
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    with pytest.raises(FaceEmbeddingSetupError, match="the Python package insightface"):
        pipe.identity(photo(), None, 1.0)


# ---------------------------------------------------------------------------------------- the flow (stand-ins)
def test_detect_align_embed_flow(monkeypatch, tmp_path):
    """640 finds nothing, 320 finds two faces: the larger one's landmarks are aligned from the BGR photo, and the
    aligned crop goes to ArcFace in BGR order scaled to [-1, 1]. 160 is never tried."""
    small, large = face(10, 10, 40, 50, seed=1), face(60, 20, 150, 140, seed=2)
    standins = StandIns(monkeypatch, tmp_path, detections={640: [], 320: [small, large]}).install_weights()
    image = photo()
    embedder = FaceEmbedder(root=standins.root, device="cpu")
    got = embedder.embed(image)

    assert [app.det_size for app in standins.apps] == [(640, 640), (320, 320)]  # lazily made, in DiffSynth's order
    for app in standins.apps:
        assert app.kwargs["name"] == "antelopev2" and app.kwargs["root"] == str(standins.root)
        assert app.kwargs["allowed_modules"] == ["detection"] and app.ctx_id == -1
        assert app.kwargs["providers"] == ["CPUExecutionProvider"]
    rgb = np.asarray(image)
    for _, seen in standins.get_calls:
        np.testing.assert_array_equal(seen, rgb[:, :, ::-1])  # BGR, as cv2.cvtColor(RGB2BGR) gives

    (landmarks, crop), = standins.crops
    np.testing.assert_array_equal(landmarks, large["kps"])  # the largest face
    x, = standins.arcface_inputs
    assert x.shape == (1, 3, 112, 112) and x.dtype == torch.float32
    expected_input = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None] / 255 * 2 - 1
    torch.testing.assert_close(x, expected_input, rtol=0, atol=1e-6)  # exact up to float rounding
    assert x.min() >= -1 and x.max() <= 1
    # The crop is the BGR photo's pixels (the stand-in's crop starts at the first landmark).
    x0, y0 = int(large["kps"][0][0]), int(large["kps"][0][1])
    np.testing.assert_array_equal(crop[0, 0], rgb[y0, x0, ::-1])

    v = expected_input.mean(dim=(2, 3)) @ standins.weight.T
    torch.testing.assert_close(got, (v / v.norm())[0], rtol=0, atol=1e-6)
    assert got.shape == (512,) and got.dtype == torch.float32 and got.device.type == "cpu"
    # ArcFace rests on the CPU between calls.
    assert all(p.device.type == "cpu" for p in embedder._arcface.parameters())

    # A second photo reuses the detectors made so far: found at 640 now, nothing new is made.
    standins.detections[640] = [large]
    embedder.embed(photo(seed=3))
    assert len(standins.apps) == 2


def test_no_face_at_any_size_names_the_image_and_the_way_out(monkeypatch, tmp_path):
    standins = StandIns(monkeypatch, tmp_path, detections={}).install_weights()
    path = tmp_path / "portrait.png"
    photo().save(path)
    embedder = FaceEmbedder(root=standins.root, device="cpu")
    with Image.open(path) as image:
        with pytest.raises(NoFaceFoundError) as err:
            embedder.embed(image)
    text = str(err.value)
    assert "infinityou_id_image" in text and str(path) in text and "640, 320, 160" in text
    assert "infinityou_id_embedding=" in text and "frontal" in text
    assert [size for size, _ in standins.get_calls] == [(640, 640), (320, 320), (160, 160)]
    assert not standins.arcface_inputs
    with pytest.raises(NoFaceFoundError, match="the 200x160 image"):
        embedder.embed(photo())


def test_arcface_weights_are_read_with_weights_only(monkeypatch, tmp_path):
    """A weight file holding more than tensors (a pickled object) is refused rather than executed."""
    standins = StandIns(monkeypatch, tmp_path, detections={640: [face(20, 20, 150, 150)]}).install_weights()
    torch.save({"weight": standins.weight, "extra": fe.FaceModelFiles}, standins.facexlib_dir / "weights" / ARCFACE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        FaceEmbedder(root=standins.root, device="cpu").embed(photo())
