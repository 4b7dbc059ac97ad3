"""Command line: inspect and convert FLUX.1 LoRA files.

    python -m lora_tools inspect FILE
    python -m lora_tools convert IN OUT --to kohya|diffusers|diffsynth [--dtype bf16|fp16|fp32]
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import FORMATS, LoraError, convert_lora, describe_lora, read_lora

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_tools", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print format, ranks, alphas, blocks covered, layer count")
    inspect.add_argument("file")
    convert = commands.add_parser("convert", help="write a LoRA in another format (atomic write)")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=FORMATS, default="kohya", help="output format (default: kohya)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="cast the matrices (default: keep)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(describe_lora(read_lora(args.file)))
        else:
            lora = convert_lora(args.src, args.dst, args.to, DTYPES.get(args.dtype))
            print(f"{args.src} ({lora.format}, {len(lora.layers)} layers) -> {args.dst} ({args.to})")
            if lora.unmatched:
                print(f"warning: {len(lora.unmatched)} keys were not converted: {list(lora.unmatched)[:10]}",
                      file=sys.stderr)
            if lora.skipped_keys:
                print(f"warning: {len(lora.skipped_keys)} text-encoder keys were not converted (DiT only)",
                      file=sys.stderr)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
