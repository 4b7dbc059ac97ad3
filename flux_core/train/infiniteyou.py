"""The InfiniteYou side of training (DiffSynth-Studio's semantics, reference notes §3.7): each row's face, as an
identity for InfuseNet (the ControlNet of the model flags) through the image projector.

    --trainable_models controlnet,image_proj_model     InfuseNet and the projector train, the DiT is frozen
    --extra_inputs controlnet_image,infinityou_id_image,infinityou_guidance
    --extra_inputs controlnet_image,infinityou_id_embedding[,infinityou_guidance]

The face of a row is a photo (`infinityou_id_image`, cropped like any image column; its 512-d ArcFace embedding is
computed with insightface by flux_core.face_embedding) or the embedding itself (`infinityou_id_embedding`: a
.safetensors file holding one tensor of 512 floats, or a .npy file of 512 floats, read without unpickling).
Photos are embedded once per row when the run starts, before any model loads: a missing insightface, or a photo
without a face, stops the run then, naming the row. A row's embedding does not change during training, so this
computes what DiffSynth computes at every step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..infiniteyou import FACE_EMBEDDING_DIM, IdentityTokens, check_face_embedding, identity_tokens
from ..infiniteyou import read_face_embedding as read_embedding_file
from .args import TrainError

ID_IMAGE, ID_EMBEDDING, GUIDANCE = "infinityou_id_image", "infinityou_id_embedding", "infinityou_guidance"
DEFAULT_GUIDANCE = 1.0   # DiffSynth's default infinityou_guidance
PRECOMPUTED_HINT = (f"To train without face detection, use --extra_inputs {ID_EMBEDDING} (a metadata column of "
                    f".safetensors/.npy files of the faces' {FACE_EMBEDDING_DIM}-d ArcFace embeddings) instead of "
                    f"{ID_IMAGE}.")


def read_face_embedding(path: Path) -> torch.Tensor:
    """A face embedding file (flux_core.infiniteyou.read_face_embedding) as the (512,) a dataset row holds."""
    return read_embedding_file(path).reshape(FACE_EMBEDDING_DIM)


def guidance_value(value, where: str) -> float:
    """A row's infinityou_guidance as a float (CSV gives text)."""
    if isinstance(value, bool):
        value = None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise TrainError(f"{where}: column '{GUIDANCE}' must be a number (InfuseNet's embedded guidance; DiffSynth "
                         f"uses 1.0), got {value!r}.")
    return number


def face_embedder():
    """flux_core.face_embedding's FaceEmbedder (imported here: insightface is an optional extra)."""
    from ..face_embedding import FaceEmbedder
    return FaceEmbedder()


def embed_faces(dataset) -> list[torch.Tensor]:
    """The ArcFace embedding (512,) of every row's infinityou_id_image, in row order. Any failure (insightface or
    its weights missing, no face found) stops the run naming the flag, or the row and file."""
    rows = dataset.rows
    print(f"flux_core.train: computing the face embeddings of {len(rows)} {ID_IMAGE} row(s).", file=sys.stderr,
          flush=True)
    try:
        embedder = face_embedder()
    except Exception as e:  # noqa: BLE001 - the embedder's own message says which package or folder is missing
        raise TrainError(f"--extra_inputs {ID_IMAGE}: {_sentence(e)} {PRECOMPUTED_HINT}") from None
    out = []
    for index, row in enumerate(rows):
        image, path = dataset.row_image(index, ID_IMAGE)
        try:
            embedding = embedder.embed(image)
        except ImportError as e:
            raise TrainError(f"--extra_inputs {ID_IMAGE}: {_sentence(e)} {PRECOMPUTED_HINT}") from None
        except Exception as e:  # noqa: BLE001 - no face found, a damaged model file, ...: named with the row
            raise TrainError(f"{row.where}: '{ID_IMAGE}' image {path}: {_sentence(e)} {PRECOMPUTED_HINT}") from None
        out.append(check_face_embedding(embedding, f"the face embedding of {path.name}").reshape(FACE_EMBEDDING_DIM))
    return out


def _sentence(error: Exception) -> str:
    text = str(error).rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def check_infiniteyou_models(args: argparse.Namespace, slots: list[str]) -> None:
    """An identity column needs InfiniteYou's image projector among the model flags (InfuseNet is checked as the
    ControlNet)."""
    from .args import identity_input
    column = identity_input(args)
    if column and "image_proj_model" not in slots:
        raise TrainError(f"--extra_inputs {column}: no InfiniteYou image projector is loaded; add "
                         f"ByteDance/InfiniteYou's image_proj_model.bin (e.g. "
                         f"ByteDance/InfiniteYou:infu_flux_v1.0/aes_stage2/image_proj_model.bin) to --model_paths or "
                         f"--model_id_with_origin_paths, beside InfuseNetModel/ (the ControlNet).")


def sample_identity(projector: torch.nn.Module, sample: dict) -> IdentityTokens:
    """The identity tokens of one sample (with the projector's gradient when it trains)."""
    return identity_tokens(projector, sample[ID_EMBEDDING], float(sample.get(GUIDANCE, DEFAULT_GUIDANCE)))


def validation_identity(args: argparse.Namespace, dataset) -> dict:
    """The validation images' infinityou_id_embedding and infinityou_guidance: --validation_infinityou_* flags, else
    the first data row's."""
    from PIL import Image, UnidentifiedImageError
    first = dataset[0]
    guidance = args.validation_infinityou_guidance
    guidance = float(first.get(GUIDANCE, DEFAULT_GUIDANCE)) if guidance is None else guidance
    if args.validation_infinityou_id_embedding:
        try:
            embedding = read_face_embedding(Path(args.validation_infinityou_id_embedding))
        except ValueError as e:
            raise TrainError(f"--validation_infinityou_id_embedding: {e}.") from None
    elif args.validation_infinityou_id_image:
        path = args.validation_infinityou_id_image
        try:
            with Image.open(path) as image:
                photo = image.convert("RGB")
            embedding = face_embedder().embed(photo)
        except (UnidentifiedImageError, OSError) as e:
            raise TrainError(f"--validation_infinityou_id_image {path}: cannot be read as an image ({e}).") from None
        except Exception as e:  # noqa: BLE001 - insightface missing, no face found: the embedder's message
            raise TrainError(f"--validation_infinityou_id_image {path}: {e}") from None
    else:
        embedding = first[ID_EMBEDDING]
    return {"infinityou_id_embedding": embedding, "infinityou_guidance": guidance}
