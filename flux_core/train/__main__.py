"""`python -m flux_core.train ...` / `accelerate launch -m flux_core.train ...`: train (see args.py for the
arguments); `python -m flux_core.train validate_lora|validate_full ...`: render a checkpoint (validate.py).

Exit status: 0 when training finished or was stopped cleanly (a checkpoint was saved), 2 for bad input (the
message names the argument, row or file; nothing was trained), 1 for anything else.
"""
from __future__ import annotations

import json
import sys

from .args import TrainError

VALIDATE_COMMANDS = ("validate_lora", "validate_full")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in VALIDATE_COMMANDS:
            from .validate import run
            run(argv[0], argv[1:])
            return 0
        from .args import parse_args
        from .trainer import train
        train(parse_args(argv))
        return 0
    except TrainError as e:
        print(json.dumps({"event": "error", "message": str(e)}, ensure_ascii=False), flush=True)
        print(f"flux_core.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from ..loading.files import CheckpointError
        from ..model_config import ModelFileError
        if isinstance(e, (CheckpointError, ModelFileError)):
            print(json.dumps({"event": "error", "message": str(e)}, ensure_ascii=False), flush=True)
            print(f"flux_core.train: error: {e}", file=sys.stderr, flush=True)
            return 2
        print(json.dumps({"event": "error", "message": f"{type(e).__name__}: {e}"}, ensure_ascii=False), flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
