"""The packages training needs beyond FluxCore's dependencies, and how to install them: the one definition the
trainer and the trainer node both use."""
from __future__ import annotations

import importlib

from .args import TrainError

TRAINING_PACKAGES = ("accelerate", "peft")
# From PyPI by their own names (FluxCore itself is not published there); a FluxCore checkout has the same
# packages as its `train` extra (pyproject.toml).
INSTALL_TRAINING_PACKAGES = (f"pip install {' '.join(TRAINING_PACKAGES)} (or, from a FluxCore checkout, "
                             f"pip install \".[train]\")")


def missing_training_packages() -> list[str]:
    missing = []
    for name in TRAINING_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def missing_packages_message(missing: list[str], python: str | None = None) -> str:
    """What is missing and the command that installs it. `python`: which Python lacks them ("ComfyUI's Python"),
    when that is not the one the user types commands into."""
    where = f" in {python}" if python else ""
    return (f"training needs {' and '.join(TRAINING_PACKAGES)}; not installed{where}: {', '.join(missing)}. "
            f"Install them{' there' if python else ''}: {INSTALL_TRAINING_PACKAGES}.")


def require_training_packages() -> None:
    missing = missing_training_packages()
    if missing:
        raise TrainError(missing_packages_message(missing))
