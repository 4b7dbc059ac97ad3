"""A stand-in for flux_core.face_embedding.FaceEmbedder, where insightface (an optional extra) is not installed: a
unit 512-d vector drawn from a seed that the photo's pixels give, so the same photo gives the same embedding in
every process that embeds it (the example-workflow tests run the InfiniteYou workflow with it, in a ComfyUI server
too).

    install()   # flux_core.face_embedding.FaceEmbedder is the stand-in from now on (in this process)

Self-contained (numpy, torch, PIL): tests/test_comfyui_server.py loads this file by path inside the server,
through a custom node of its own (SERVER_SHIM), where the name `tests` is ComfyUI's own test package.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


class StandInFaceEmbedder:
    """FaceEmbedder's interface: `StandInFaceEmbedder(root=None, ...).embed(pil_image)` -> (512,) float32."""

    def __init__(self, root=None, device=None, arcface_weights=None):
        self.root = root

    def embed(self, image) -> torch.Tensor:
        seed = int(hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()[:8], 16)
        v = torch.randn(512, generator=torch.Generator().manual_seed(seed))
        return v / v.norm()


def install() -> None:
    from flux_core import face_embedding
    face_embedding.FaceEmbedder = StandInFaceEmbedder


# A ComfyUI custom node (a file in custom_nodes/, beside the FluxCore folder) that installs the stand-in in the
# server: the pack's folder made importable as FluxCore's __init__ does, then this file loaded by path.
SERVER_SHIM = '''"""Test-only: FluxCore's stand-in face embedder (tests/face_standin.py) in place of insightface's."""
import importlib.util
import os
import sys

_pack = os.path.join(os.path.dirname(os.path.abspath(__file__)), "FluxCore")
if _pack not in sys.path:
    sys.path.append(_pack)
_spec = importlib.util.spec_from_file_location("fluxcore_face_standin", os.path.join(_pack, "tests", "face_standin.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install()
NODE_CLASS_MAPPINGS = {}
'''
