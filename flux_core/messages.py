"""Library messages reworded for a front end: the Python names in an error (`model_configs[1]`, `skip_download`,
`tokenizer_1_config=ModelConfig(path=...)`) replaced by what the user of a command line actually typed (its
flags, environment variables), without touching the values the user gave (a folder may be named `skip_download`).

    text = rename_parameters(str(error), [(python_name("skip_download"), "$DIFFSYNTH_SKIP_DOWNLOAD")],
                             protected_values=["/data/my models/ae.safetensors"])
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Sequence, Union

Replacement = Union[str, Callable[[re.Match], str]]


def python_name(name: str) -> str:
    """A regex for `name` standing as a word of prose, not as a piece of a path, a quoted value, a longer name or a
    flag (`skip_download` but not `/skip_download/`, `'skip_download'`, `no_skip_download`, `--skip_download`,
    `$SKIP_DOWNLOAD` or `skip_download.txt`)."""
    return rf"(?<![\w./\\$'\"-]){re.escape(name)}(?![\w/\\'\"-]|\.\w)"


def path_forms(value: str, parents: int = 0) -> list[str]:
    """How a path the user gave may appear in a library message: as given, normalised, absolute, resolved; and
    with `parents`, the absolute folders that many levels above it (where a library looks for files beside it)."""
    forms = [value, os.path.normpath(value), os.path.abspath(value)]
    try:
        forms.append(os.path.realpath(value))
    except (OSError, ValueError):
        pass
    folder = os.path.abspath(value)
    for _ in range(parents):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        forms.append(folder := parent)
    return list(dict.fromkeys(f for f in forms if f and os.path.dirname(f) != f))  # never the bare root "/"


def rename_parameters(message: str, table: Sequence[tuple[str, Replacement]],
                      protected_values: Iterable[str] = ()) -> str:
    """`message` with each (regex, replacement) of `table` applied in order (re.sub semantics: the replacement
    is a template with \\1 or a function of the match), never inside a protected value.

    protected_values: what the user gave (paths, model ids, patterns). Each occurrence standing as its own token
    is hidden behind a placeholder character while the table runs, so a rule can neither rename a piece of it
    (a folder named `skip_download`) nor fail to match around it (`ModelConfig(model_id='<id>')`). Values of
    letters only are not hidden (they would hide prose words); a rule sees them only where a message quotes
    them or puts them in a path, which `python_name` skips."""
    values = sorted({v for v in protected_values if v and not re.fullmatch(r"[A-Za-z]*", v)}, key=len, reverse=True)
    hidden: dict[str, str] = {}
    for value in values:
        mark = chr(_PLACEHOLDERS + len(hidden))
        masked = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", mark, message)
        if masked != message:
            hidden[mark], message = value, masked
    for pattern, replacement in table:
        message = re.sub(pattern, replacement, message)
    for mark, value in hidden.items():
        message = message.replace(mark, value)
    return message


_PLACEHOLDERS = 0xF0000  # Unicode's supplementary private use area: characters no library message contains


# Added to the errors of a real model whose files are missing and could not be downloaded (offline, skip_download,
# no modelscope): the bundled demo model runs without any download. Front ends reword the call
# (`python -m flux_core generate --demo ...` on the command line).
DEMO_HINT = ("To see FluxCore work without any download, try the bundled demo model: "
             "FluxImagePipeline.from_demo().")
