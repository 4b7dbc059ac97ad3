"""What watches a run sees: one JSON event per line on stdout and in <output_path>/train_log.jsonl (the trainer
node parses these), and, for a person at a terminal, a tqdm progress bar on stderr (step, loss, images/s,
elapsed and time left).

The bar is drawn on stderr only, so stdout stays pure JSON lines whatever the mode; when both go to one
terminal, each event line is printed above the bar (tqdm clears and redraws it around the write).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


def wants_bar(mode: str, stream=None) -> bool:
    """--progress_bar: "on", "off", or "auto" = when `stream` (stderr) is a terminal."""
    if mode != "auto":
        return mode == "on"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    def __init__(self, total: int, initial: int):
        self.bar = tqdm(total=total, initial=initial, unit="step", desc="training", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", images_per_s=f"{images_per_s:.2f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class Log:
    """JSON events of the main process: appended to the log file and printed on stdout (above the bar)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.path = path
        self.bar: ProgressBar | None = None

    def __call__(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, **fields}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        try:
            if self.bar is not None:
                with tqdm.external_write_mode(file=sys.stdout):
                    print(line, flush=True)
            else:
                print(line, flush=True)
        except (BrokenPipeError, OSError):  # the reader went away (a closed UI): keep training, the file has it
            pass

    def start_bar(self, mode: str, total: int, initial: int) -> None:
        if self.enabled and wants_bar(mode):
            self.bar = ProgressBar(total, initial)

    def step(self, step: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step, loss, images_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
