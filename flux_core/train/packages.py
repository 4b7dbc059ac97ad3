"""The packages training needs beyond FluxCore's dependencies, and how to install them (the `train` extra)."""
from __future__ import annotations

import importlib

from .args import TrainError

TRAINING_PACKAGES = ("accelerate", "peft")
INSTALL_TRAIN_EXTRA = 'pip install "fluxcore[train]" (from a FluxCore checkout: pip install ".[train]")'


def missing_training_packages() -> list[str]:
    missing = []
    for name in TRAINING_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_training_packages() -> None:
    missing = missing_training_packages()
    if missing:
        raise TrainError(f"training needs {' and '.join(TRAINING_PACKAGES)}; not installed: {', '.join(missing)}. "
                         f"Install FluxCore's training extra: {INSTALL_TRAIN_EXTRA}.")
