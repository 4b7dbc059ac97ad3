"""InfiniteYou: a face's identity conditions the DiT through InfuseNet, a ControlNet whose text input is the identity.

DiffSynth-Studio's semantics (reference notes §3.7):
- a 512-d ArcFace embedding of the face (flux_core.face_embedding computes it from a photo with insightface, or the
  user passes it) goes through the image projector (flux_core.models.infiniteyou) to 8 identity tokens;
- every ControlNet call of the run (InfuseNet, given through `controlnet_inputs`, usually with an all-black control
  image or a pose image) then takes those tokens as its text, zero text ids, and `infinityou_guidance` as its
  embedded guidance; the DiT itself keeps the prompt. InfuseNet's residuals enter the DiT through the ControlNet slot
  (flux_core.controlnet.ControlNetAdapter.identity), so without a ControlNet input the identity has no effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .vram import compute_place

FACE_EMBEDDING_DIM = 512
EMBEDDING_EXTENSIONS = (".safetensors", ".npy")


class InfiniteYouWithoutControlNetWarning(UserWarning):
    """An identity was given, but no ControlNet input carries it into the DiT (InfuseNet acts through one)."""


class IdentityOnOtherControlNetWarning(UserWarning):
    """The identity tokens replace the text of a ControlNet that is not InfuseNet-shaped (union/inpainting)."""


@dataclass(frozen=True)
class IdentityTokens:
    """InfiniteYou's conditioning for the ControlNets of one run: identity tokens (1, n, text width) and the
    embedded guidance InfuseNet gets."""
    tokens: torch.Tensor
    guidance: float = 1.0

    def text_inputs(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(txt, txt_ids, guidance) for a ControlNet call of `batch` samples."""
        tokens = self.tokens.to(device).expand(batch, -1, -1)
        return (tokens, torch.zeros(batch, tokens.shape[1], 3, device=device),
                torch.full((batch,), float(self.guidance), device=device))


def check_face_embedding(embedding, name: str = "infinityou_id_embedding") -> torch.Tensor:
    """A 512-d ArcFace embedding as (1, 1, 512) float32: a tensor or array of 512 values ((512,), (1, 512), ...)."""
    tensor = torch.as_tensor(embedding) if not isinstance(embedding, torch.Tensor) else embedding
    if tensor.numel() != FACE_EMBEDDING_DIM or not tensor.is_floating_point():
        raise ValueError(f"{name} must be the {FACE_EMBEDDING_DIM}-d ArcFace embedding of one face (a float tensor "
                         f"of {FACE_EMBEDDING_DIM} values), got {tuple(tensor.shape)} {tensor.dtype}.")
    return tensor.detach().float().reshape(1, 1, FACE_EMBEDDING_DIM)


def read_face_embedding(path: Path) -> torch.Tensor:
    """A face embedding file (a .npy array, read without unpickling, or a .safetensors file holding one tensor) as
    (1, 1, 512) float32. Raises ValueError saying what is wrong with the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_EXTENSIONS:
        raise ValueError(f"{path.name} is not an embedding file; use {' or '.join(EMBEDDING_EXTENSIONS)} (a face "
                         f"embedding is read from .npy or .safetensors files: one tensor of {FACE_EMBEDDING_DIM} "
                         f"floats)")
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    if suffix == ".npy":
        try:
            value = torch.from_numpy(np.ascontiguousarray(np.load(path, allow_pickle=False)))
        except ValueError as e:   # an object array needs unpickling, which is refused
            raise ValueError(f"{path} is not a plain numeric .npy array and cannot be read without unpickling ({e}); "
                             f"save a plain float array with numpy.save") from None
        except OSError as e:
            raise ValueError(f"{path} is not a .npy file ({e})") from None
    else:
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if len(tensors) != 1:
            raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); it must hold "
                             f"one, the face's {FACE_EMBEDDING_DIM} floats")
        value, = tensors.values()
    return check_face_embedding(value, path.name)


def identity_tokens(projector: torch.nn.Module, embedding: torch.Tensor, guidance: float = 1.0) -> IdentityTokens:
    """The projector's identity tokens for one face embedding."""
    device, dtype = compute_place(projector)
    tokens = projector(check_face_embedding(embedding).to(device, dtype))
    return IdentityTokens(tokens, float(guidance))
