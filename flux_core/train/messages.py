"""The engine's model-loading messages in the trainer's words: `FluxImagePipeline.from_pretrained` speaks of
`model_configs[i]`, `tokenizer_1_config=ModelConfig(path=...)` and `skip_download`; a trainer user typed
`--model_paths` / `--model_id_with_origin_paths` entries and `--tokenizer_1_path`, and can only skip downloads
with $DIFFSYNTH_SKIP_DOWNLOAD. The paths, model ids and patterns the user gave are never reworded.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..demo import DEMO_COMMAND
from ..messages import path_forms, python_name, rename_parameters
from ..model_config import DEFAULT_LOCAL_MODEL_PATH, ENV_MODEL_BASE_PATH, ENV_SKIP_DOWNLOAD

# from_pretrained looks for tokenizer/ beside a model file: in its folder, the parent and the grandparent.
SEARCHED_LEVELS = 3
MODEL_FLAGS = ("--model_paths", "--model_id_with_origin_paths")
# Pipeline slots in words.
SLOT_NAMES = {"dit": "DiT", "vae": "VAE", "text_encoder_1": "CLIP-L text encoder", "text_encoder_2": "T5 text encoder",
              "qwenvl": "Qwen2.5-VL", "step1x_connector": "Step1X-Edit connector", "nexus_gen": "Nexus-Gen model",
              "nexus_gen_generation_adapter": "Nexus-Gen generation adapter",
              "nexus_gen_editing_adapter": "Nexus-Gen editing adapter"}


@dataclass(frozen=True)
class ModelEntry:
    """Where one of the configs passed to from_pretrained came from: entry `number` (1-based) of `flag`."""
    flag: str
    number: int

    def describe(self) -> str:
        return f"the {ordinal(self.number)} entry of {self.flag}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def trainer_message(message: str, entries: Sequence[ModelEntry], protected_values: Sequence[str] = ()) -> str:
    """A from_pretrained message with `model_configs[i]` read as `entries[i]` (the configs passed, in order) and
    every other Python name as the trainer's flag or environment variable. `protected_values`: what the user
    gave (paths, model ids, patterns), left exactly as written."""
    flags = " / ".join(f for f in MODEL_FLAGS if any(e.flag == f for e in entries)) or " / ".join(MODEL_FLAGS)

    def configs(match: re.Match) -> str:
        indices = [int(i) for i in match.group(1).split(",")]
        if any(i >= len(entries) for i in indices):
            return match.group(0)
        names = [entries[i].describe() for i in indices]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def download_hint(match: re.Match) -> str:
        line = match.string[match.string.rfind("\n", 0, match.start()) + 1:match.start()]
        tokenizer = re.match(r"(?:- )?tokenizer_([12])_config: ", line)
        if tokenizer:  # a --tokenizer_N_path that does not exist
            return (f"leave --tokenizer_{tokenizer.group(1)}_path out to use the tokenizer folder beside the model "
                    f"files (or FLUX.1-dev's)")
        return "give it as model_id:origin_file_pattern in --model_id_with_origin_paths to download it"

    table = [
        (r"^from_pretrained: ", ""),
        (re.escape("FluxImagePipeline.from_demo()"), lambda m: f"`{DEMO_COMMAND}`"),
        (r"(\d+) of (\d+) model_configs name files", rf"\1 of \2 entries of {flags} name files"),
        (r"(?<![\w./\\])model_configs\[(\d+(?:, *\d+)*)\]", configs),
        (r"ModelConfig\(path=\.\.\.\): ", ""),
        (r"give model_id= and origin_file_pattern= to download the model", download_hint),
        (r"ModelConfig\(model_id='([^']*)'\)", r"ModelScope model '\1'"),
        (r"no file matches origin_file_pattern\b", "no file matches the pattern"),
        (rf"\bskip_download is set(?: \(by \$?{ENV_SKIP_DOWNLOAD}\)| by \$?{ENV_SKIP_DOWNLOAD})?",
         f"${ENV_SKIP_DOWNLOAD} is set"),
        (r"\b(pass |then )?skip_download=True",
         lambda m: ("then " if m.group(1) == "then " else "") + f"set ${ENV_SKIP_DOWNLOAD}=true"),
        (r"pass path= to (?:a local file|local files)", "give local files in --model_paths"),
        (rf"set local_model_path= \(or {ENV_MODEL_BASE_PATH}\)", f"set ${ENV_MODEL_BASE_PATH}"),
        (r"(?<![\w-])(tokenizer_[12])_config=ModelConfig\(path='?([^)']*)'?\)", r"--\1_path \2"),
        (python_name("tokenizer_1_config"), "--tokenizer_1_path"),
        (python_name("tokenizer_2_config"), "--tokenizer_2_path"),
        (python_name("skip_download"), f"${ENV_SKIP_DOWNLOAD}"),
        (python_name("local_model_path") + "=?", f"${ENV_MODEL_BASE_PATH}"),
        (python_name("model_configs"), flags),
        (rf"(?<![\w.])pipe\.({'|'.join(SLOT_NAMES)}) is already filled by",
         lambda m: f"the {SLOT_NAMES[m.group(1)]} is already loaded from"),
        (rf"(?<![\w.])pipe\.({'|'.join(SLOT_NAMES)})\b", lambda m: f"the pipeline's {SLOT_NAMES[m.group(1)]}"),
    ]
    return rename_parameters(message, table, protected_values)


def user_values(model_path_entries: Sequence, model_id_items: Sequence[str], other_paths: Sequence[str | None]
                ) -> list[str]:
    """Every value the user gave that a message may quote (each path also as normalised, absolute and resolved),
    and the folder ModelScope files are looked for in ($DIFFSYNTH_MODEL_BASE_PATH or ./models)."""
    values: list[str] = []
    for entry in model_path_entries:
        for path in ([entry] if isinstance(entry, str) else entry):
            values += path_forms(path, parents=SEARCHED_LEVELS)
    for item in model_id_items:
        values += path_forms(item, parents=SEARCHED_LEVELS)
        values += item.split(":", 1)  # model id, pattern
    for path in other_paths:
        if path:
            values += path_forms(path, parents=SEARCHED_LEVELS)
    values += path_forms(os.environ.get(ENV_MODEL_BASE_PATH) or DEFAULT_LOCAL_MODEL_PATH)
    return list(dict.fromkeys(v for v in values if v))


class _Reword(logging.Filter):
    def __init__(self, reword: Callable[[str], str]):
        super().__init__()
        self.reword = reword

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.reword(record.getMessage()), ()
        return True


@contextlib.contextmanager
def reworded_logs(logger_names: Sequence[str], reword: Callable[[str], str]) -> Iterator[None]:
    """While inside: every record these loggers emit (from_pretrained's "no model for pipe.vae ... Loaded:
    model_configs[0] ..." warning) is reworded as `reword` says."""
    loggers, reworder = [logging.getLogger(name) for name in logger_names], _Reword(reword)
    for logger in loggers:
        logger.addFilter(reworder)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(reworder)
