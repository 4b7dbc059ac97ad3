"""The run folder (--output_path): writable, one run per folder, no half-written files left behind.

Checked when a run starts, before any model is loaded:
- the folder can be created and written (else an error naming --output_path and the path);
- a folder holding an earlier run (resumable states in checkpoints/, or step-N / epoch-N weights files) is
  only continued (--resume) or explicitly replaced (--overwrite, which deletes that run's files first); a new
  run never writes over it silently;
- temporary files of a save that was killed (`.<name>.<pid>.tmp` from `atomic_write`, `.tmp-*` / `.old-*`
  state folders) are removed; saves remove them too.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from lora_tools.io import TEMP_SUFFIX

from .args import TrainError

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
ARGS_FILE = "training_args.json"
VALIDATION = "validation"
WEIGHTS = re.compile(r"(step|epoch)-\d+\.safetensors")
STATE = re.compile(r"step-\d+")
TEMP_FOLDER_PREFIXES = (".tmp-", ".old-")


def check_writable(output: Path) -> None:
    """Create --output_path (and its parents) and write a probe file into it: an error names the flag."""
    if output.exists() and not output.is_dir():
        raise TrainError(f"--output_path {output}: is a file, not a folder; give a folder for the checkpoints.")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output, prefix=".write-test-", suffix=TEMP_SUFFIX):
            pass
    except OSError as e:
        raise TrainError(f"--output_path {output}: cannot write there ({type(e).__name__}: {e.strerror or e}); "
                         f"give a folder you can write to.") from None


def earlier_run(output: Path) -> list[str]:
    """What an earlier run left in `output` that a new run would overwrite (paths relative to it): resumable
    states and the `latest` pointer in checkpoints/, and step-N / epoch-N weights files."""
    found: list[str] = []
    root = output / CHECKPOINTS
    if root.is_dir():
        found += sorted(f"{CHECKPOINTS}/{p.name}" for p in root.iterdir()
                        if (p.is_dir() and STATE.fullmatch(p.name)) or p.name == "latest")
    if output.is_dir():
        found += sorted(p.name for p in output.iterdir() if p.is_file() and WEIGHTS.fullmatch(p.name))
    return found


def refuse_earlier_run(output: Path, found: list[str]) -> None:
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    raise TrainError(f"--output_path {output} holds an earlier run ({shown}); a new run would overwrite it. Add "
                     f"--resume to continue that run, give a new --output_path for a new run, or add --overwrite "
                     f"to delete the earlier run's checkpoints and start again in this folder.")


def delete_earlier_run(output: Path) -> list[str]:
    """--overwrite: remove checkpoints/, step-N / epoch-N weights, the log, training_args.json and validation
    images of the earlier run. Other files in the folder are left alone. Returns what was removed."""
    removed = earlier_run(output)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    for name in removed:
        if "/" not in name:
            (output / name).unlink(missing_ok=True)
    for name in (LOG_FILE, ARGS_FILE):
        if (output / name).is_file():
            (output / name).unlink()
            removed.append(name)
    if (output / VALIDATION).is_dir():
        shutil.rmtree(output / VALIDATION, ignore_errors=True)
        removed.append(VALIDATION + "/")
    return removed


def remove_stale_temps(output: Path) -> list[Path]:
    """Delete what an interrupted save leaves: hidden `*.tmp` files (atomic_write's temporary names) in the run
    folder, checkpoints/ and validation/, and `.tmp-*` / `.old-*` folders in checkpoints/. Returns them."""
    removed = []
    for folder in (output, output / CHECKPOINTS, output / VALIDATION):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
            elif folder.name == CHECKPOINTS and p.is_dir() and p.name.startswith(TEMP_FOLDER_PREFIXES):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def check_output(output: Path, resume: str | None, overwrite: bool) -> list[str]:
    """Every process, before any model loads and before anything is changed: the folder is writable, and an
    earlier run in it is continued or replaced on purpose. Returns the earlier run's files (for --overwrite)."""
    check_writable(output)
    found = earlier_run(output)
    if found and not resume and not overwrite:
        refuse_earlier_run(output, found)
    return found


def prepare_output(output: Path, resume: str | None, overwrite: bool) -> list[str]:
    """The main process, after `check_output` on every process: delete the earlier run (--overwrite) and stale
    temporary files. Returns what --overwrite removed."""
    removed = delete_earlier_run(output) if overwrite else []
    remove_stale_temps(output)
    if not resume:  # a new run starts a new log; a resumed one continues it
        (output / LOG_FILE).unlink(missing_ok=True)
    return removed

