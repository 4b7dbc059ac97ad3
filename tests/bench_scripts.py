"""The bench scripts (bench/*.py) imported as modules, for the tests that run them at a tiny size:

    with bench_script("controlnet_step") as bench:
        result = bench.main([...])
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


@contextlib.contextmanager
def bench_script(name: str):
    """bench/<name>.py as a module, with bench/ on sys.path while it is used (the scripts import their helpers as
    `_measure`)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
