"""InfiniteYou's face embedding: a photo -> the 512-d ArcFace embedding of its largest face, as DiffSynth-Studio and
ByteDance's InfiniteYou compute it (reference notes §3.7):

1. the photo, in BGR channel order, goes to insightface's `FaceAnalysis("antelopev2")` detector at detection sizes
   640, then 320, then 160 (the first size that finds a face wins);
2. the largest face (bounding-box area) gives its 5 landmarks (`kps`); `insightface.utils.face_align.norm_crop`
   warps the BGR photo to the 112x112 ArcFace template;
3. the crop, scaled from [0, 255] to [-1, 1] and still in BGR order, goes through facexlib's ArcFace (IR-SE50)
   network, which returns a unit-length 512-d vector.

insightface, onnxruntime, facexlib and OpenCV are optional extras (`pip install ".[infiniteyou]"` from a clone),
imported only when a face is embedded; nothing is ever downloaded. Their weights are the user's to fetch:
- the antelopev2 detector: `<root>/models/antelopev2/scrfd_10g_bnkps.onnx` (the other antelopev2 files may sit
  beside it; only the detector is used), root by default DiffSynth's `<local model path>/ByteDance/InfiniteYou/
  supports/insightface`, from ModelScope/Hugging Face `ByteDance/InfiniteYou`, `supports/insightface/models/antelopev2/`;
- facexlib's ArcFace: `recognition_arcface_ir_se50.pth`, in facexlib's own weights folder (`<facexlib>/weights/`,
  where facexlib itself saves it) or at the path given as `arcface_weights`.
Differences from DiffSynth, none of which changes the embedding: only the detector of the antelopev2 pack is run (the
others add attributes the embedding does not use); ArcFace computes in float32 (as InfiniteYou does; DiffSynth in
the pipeline dtype) and rests on the CPU between calls (as InfiniteYou does), so it holds no GPU memory while the
DiT runs; its weights are read with `weights_only=True` and never downloaded.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .infiniteyou import FACE_EMBEDDING_DIM
from .model_config import ModelConfig

INFINITEYOU_MODEL_ID = "ByteDance/InfiniteYou"
DETECTOR_PACK = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"   # the pack's face detector (boxes + 5 landmarks)
DETECTION_SIZES = (640, 320, 160)        # DiffSynth's and InfiniteYou's order: first that finds a face
ARCFACE_FILE = "recognition_arcface_ir_se50.pth"
ARCFACE_URL = f"https://github.com/xinntao/facexlib/releases/download/v0.1.0/{ARCFACE_FILE}"
ALIGNED_SIZE = 112                       # ArcFace's input: the 112x112 template of norm_crop's "arcface" mode
PIP_EXTRA = 'pip install ".[infiniteyou]"'   # from a clone of FluxCore, as README's other extras

# (import name, pip package) of every optional package the face embedding needs.
PACKAGES = (("insightface", "insightface"), ("onnxruntime", "onnxruntime (or onnxruntime-gpu)"),
            ("facexlib", "facexlib"), ("cv2", "opencv-python"))


class FaceEmbeddingSetupError(RuntimeError):
    """An optional package or weight file the face embedding needs is missing (every missing piece is listed)."""


class NoFaceFoundError(ValueError):
    """The detector found no face in the photo at any detection size."""


def default_insightface_root() -> str:
    """DiffSynth-Studio's insightface root: `<local model path>/ByteDance/InfiniteYou/supports/insightface`, the
    local model path as ModelConfig's default ($DIFFSYNTH_MODEL_BASE_PATH or ./models)."""
    return os.path.join(ModelConfig(model_id=INFINITEYOU_MODEL_ID).model_folder(), "supports", "insightface")


def facexlib_weights_folder() -> Path | None:
    """Where facexlib keeps its downloaded weights (`<facexlib package>/weights`), found without importing it;
    None when facexlib is not installed."""
    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class FaceModelFiles:
    """Where the face embedding's weights are looked for."""
    detector: Path          # <root>/models/antelopev2/scrfd_10g_bnkps.onnx
    arcface: Path | None    # recognition_arcface_ir_se50.pth (None: facexlib not installed, so its folder unknown)

    @classmethod
    def locate(cls, root: str | os.PathLike, arcface_weights: str | os.PathLike | None = None) -> "FaceModelFiles":
        folder = facexlib_weights_folder()
        arcface = Path(arcface_weights) if arcface_weights is not None else (folder / ARCFACE_FILE if folder else None)
        return cls(Path(root) / "models" / DETECTOR_PACK / DETECTOR_FILE, arcface)


def missing_pieces(root: str | os.PathLike, arcface_weights: str | os.PathLike | None = None) -> list[str]:
    """Every package and weight file the face embedding lacks, one line each with where it is looked for and how to
    get it; empty when everything is there. Imports nothing."""
    missing = [f"the Python package {pip} (import name {module})" for module, pip in PACKAGES if not _installed(module)]
    files = FaceModelFiles.locate(root, arcface_weights)
    if not files.detector.is_file():
        pack = files.detector.parent
        nested = sorted(p.name for p in (pack / DETECTOR_PACK).glob("*.onnx")) if (pack / DETECTOR_PACK).is_dir() else []
        hint = (f" (found {', '.join(nested)} one folder too deep, in {pack / DETECTOR_PACK}: move them up into {pack})"
                if nested else "")
        published = f"supports/insightface/models/{DETECTOR_PACK}"
        command = f"modelscope download {INFINITEYOU_MODEL_ID} --include '{published}/*' --local-dir"
        root_path = Path(root)
        get = (f"`{command} {root_path.parent.parent}`" if root_path.parts[-2:] == ("supports", "insightface")
               else f"`{command} <folder>` and move <folder>/{published}/ to {pack}")
        missing.append(f"the insightface {DETECTOR_PACK} face detector {DETECTOR_FILE}, looked for at {files.detector}"
                       f"{hint}. Get the {DETECTOR_PACK} folder from {INFINITEYOU_MODEL_ID} (ModelScope or Hugging "
                       f"Face), {published}/: {get}; or pass root= (the folder holding models/{DETECTOR_PACK}/)")
    if files.arcface is None:
        missing.append(f"facexlib's ArcFace weights {ARCFACE_FILE} (looked for in facexlib's weights folder, "
                       f"<facexlib>/weights/, once facexlib is installed; or pass arcface_weights=). Download "
                       f"{ARCFACE_URL}")
    elif not files.arcface.is_file():
        missing.append(f"facexlib's ArcFace weights {ARCFACE_FILE}, looked for at {files.arcface}. Download "
                       f"{ARCFACE_URL} there (facexlib's weights folder), or pass arcface_weights= (its path)")
    return missing


def check_face_embedding_setup(root: str | os.PathLike, arcface_weights: str | os.PathLike | None = None) -> None:
    """Raise FaceEmbeddingSetupError listing every missing package and weight file at once."""
    missing = missing_pieces(root, arcface_weights)
    if missing:
        raise FaceEmbeddingSetupError(
            "infinityou_id_image needs a face detector and ArcFace, and these are missing:\n- " + "\n- ".join(missing)
            + f"\nInstall the packages into the Python that runs FluxCore: `pip install insightface onnxruntime "
            f"facexlib opencv-python` (from a clone of FluxCore: `{PIP_EXTRA}`). Or skip face detection: pass infinityou_id_embedding= (a precomputed 512-d ArcFace "
            f"embedding) instead of infinityou_id_image.")


def image_name(image: Image.Image) -> str:
    """How an error names a photo: its file name when it was opened from one, else its size."""
    filename = getattr(image, "filename", "") or ""
    return f"{filename} ({image.width}x{image.height})" if filename else f"the {image.width}x{image.height} image"


def largest_face(faces):
    """The face with the largest bounding-box area (x1, y1, x2, y2), as DiffSynth and InfiniteYou choose it."""
    return max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))


def arcface_input(aligned_bgr: np.ndarray) -> torch.Tensor:
    """The aligned 112x112x3 uint8 BGR crop -> ArcFace's input (1, 3, 112, 112) float32 in [-1, 1], channels kept
    in BGR order (the published models were used that way: `extract_arcface_bgr_embedding`)."""
    x = torch.from_numpy(np.ascontiguousarray(aligned_bgr)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return 2.0 * x - 1.0


class FaceEmbedder:
    """`FaceEmbedder(root=None, device=None, arcface_weights=None).embed(pil_image)` -> (512,) float32 on the CPU.

    root: the insightface root holding `models/antelopev2/` (default `default_insightface_root()`);
    device: where ArcFace computes (default cuda when available); the detector runs through onnxruntime with the
        CUDA provider first on a cuda device (as DiffSynth), else on the CPU;
    arcface_weights: the path of `recognition_arcface_ir_se50.pth` (default: facexlib's weights folder).
    Everything missing is reported when the embedder is made (FaceEmbeddingSetupError); the models load on first use."""

    def __init__(self, root: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 arcface_weights: str | os.PathLike | None = None):
        self.root = str(root) if root is not None else default_insightface_root()
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        check_face_embedding_setup(self.root, arcface_weights)
        self.files = FaceModelFiles.locate(self.root, arcface_weights)
        self._detectors: dict[int, object] = {}   # detection size -> insightface FaceAnalysis, made when first needed
        self._arcface: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------ models
    def _detector(self, size: int):
        if size not in self._detectors:
            from insightface.app import FaceAnalysis
            cuda = self.device.type == "cuda"
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            app = FaceAnalysis(name=DETECTOR_PACK, root=self.root, providers=providers, allowed_modules=["detection"])
            app.prepare(ctx_id=(self.device.index or 0) if cuda else -1, det_size=(size, size))
            self._detectors[size] = app
        return self._detectors[size]

    def _arcface_model(self) -> torch.nn.Module:
        """facexlib's IR-SE50 ArcFace with its published weights, resting on the CPU. Built here rather than through
        `facexlib.recognition.init_recognition_model`, which downloads missing weights and builds on cuda."""
        if self._arcface is None:
            from facexlib.recognition.arcface_arch import Backbone
            model = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
            model.load_state_dict(torch.load(self.files.arcface, map_location="cpu", weights_only=True), strict=True)
            self._arcface = model.eval()
        return self._arcface

    # ------------------------------------------------------------------------------------------ steps
    def detect(self, bgr: np.ndarray) -> list:
        """The faces insightface finds in a BGR uint8 photo at the first detection size that finds any."""
        for size in DETECTION_SIZES:
            faces = self._detector(size).get(bgr)
            if len(faces) > 0:
                return list(faces)
        return []

    def align(self, bgr: np.ndarray, kps) -> np.ndarray:
        """The 112x112 BGR crop of a face warped onto ArcFace's landmark template."""
        from insightface.utils import face_align
        landmarks = np.asarray(kps, dtype=np.float32).reshape(5, 2)
        return face_align.norm_crop(bgr, landmark=landmarks, image_size=ALIGNED_SIZE)

    @torch.no_grad()
    def embed_aligned(self, aligned_bgr: np.ndarray) -> torch.Tensor:
        model = self._arcface_model()
        try:
            model.to(self.device)
            out = model(arcface_input(aligned_bgr).to(self.device))[0]
        finally:
            model.to("cpu")   # rest off the GPU between calls (InfiniteYou does the same)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return out.float().cpu()

    def embed(self, image: Image.Image) -> torch.Tensor:
        """The (512,) float32 ArcFace embedding of the largest face in `image` (a PIL image)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"infinityou_id_image must be a PIL image, got {type(image).__name__}.")
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        faces = self.detect(bgr)
        if not faces:
            raise NoFaceFoundError(
                f"infinityou_id_image: no face found in {image_name(image)} by the {DETECTOR_PACK} detector at "
                f"detection sizes {', '.join(map(str, DETECTION_SIZES))}. Use a photo where one face is clearly "
                f"visible, frontal and not cut off (e.g. a head-and-shoulders portrait), or pass "
                f"infinityou_id_embedding= (a precomputed 512-d ArcFace embedding) instead.")
        embedding = self.embed_aligned(self.align(bgr, largest_face(faces)["kps"]))
        if embedding.shape != (FACE_EMBEDDING_DIM,):
            raise RuntimeError(f"ArcFace gave an embedding of shape {tuple(embedding.shape)}, not "
                               f"({FACE_EMBEDDING_DIM},): {self.files.arcface} is not facexlib's {ARCFACE_FILE}.")
        return embedding
