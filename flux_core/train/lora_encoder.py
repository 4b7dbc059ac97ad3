"""The LoRA-Encoder side of training (DiffSynth-Studio's semantics, reference notes §3.8): each row's LoRA file is
encoded by the LoRA-Encoder of the model flags into tokens appended to the caption's T5 tokens (zero position ids),
and the DiT, frozen, renders the row's image from them.

    --trainable_models lora_encoder --extra_inputs lora_encoder_inputs --remove_prefix_in_ckpt pipe.lora_encoder.

As in DiffSynth's training, the LoRA is NOT applied to the DiT: its weights reach the DiT only as the encoder's tokens,
so the encoder learns to make tokens that do what the LoRA does (DiffSynth's FLUX training module runs the pipeline's
LoRA-Encoder unit, which only appends tokens; its loss loads a LoRA into the DiT only for an input named `lora`, which
the FLUX units never make). The tokens are computed inside the training step, under autograd when the encoder trains;
the LoRA files are data (read without gradients, every step: a full FLUX LoRA is hundreds of MB, not kept per row).

A row holds one LoRA file, or a list of them (their tokens one after the other, as DiffSynth encodes a list). A LoRA
file is read in any format lora_tools reads and must cover every site the encoder reads (all layers of every double and
single block); every row's files are read and checked once when the run starts, and all bad rows are named in one
message.
"""
from __future__ import annotations

import argparse

from ..lora_encoder import LoraEncoderInputError, check_encoder_fits, check_lora_encoder_inputs, lora_encoder_adapter
from .args import TrainError

COLUMN = "lora_encoder_inputs"
_LISTED = 10


def check_lora_encoder_slots(slots: list[str]) -> None:
    """lora_encoder_inputs need a LoRA-Encoder among the model flags (read from the files' keys, before any weights
    load)."""
    if "lora_encoder" not in slots:
        raise TrainError(f"--extra_inputs {COLUMN}: the model flags load no LoRA-Encoder; add it (e.g. "
                         f"DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev:model.safetensors) to --model_paths or "
                         f"--model_id_with_origin_paths.")


def check_lora_rows(pipe, dataset) -> None:
    """The LoRA-Encoder fits the DiT, and every row's LoRA file can be encoded (read, of this DiT, on every site);
    each distinct file is read once, every bad row named in one message."""
    try:
        check_encoder_fits(pipe.lora_encoder, pipe.dit)
    except LoraEncoderInputError as e:
        raise TrainError(f"the LoRA-Encoder of --model_paths / --model_id_with_origin_paths: {e}") from None
    problems, advice, seen = [], "", {}
    for row in dataset.rows:
        paths = dataset._value(row, COLUMN)
        key = tuple(paths) if isinstance(paths, list) else paths
        if key not in seen:
            try:
                check_lora_encoder_inputs(paths, pipe.lora_encoder, pipe.dit, param=COLUMN)
                seen[key] = None
            except LoraEncoderInputError as e:
                # "LoRA-Encoder: <what is wrong>. <how to fix>": the fix is said once, after every row
                what, _, fix = str(e).removeprefix("LoRA-Encoder: ").partition(". ")
                seen[key], advice = what, fix or advice
        if seen[key] is not None:
            problems.append(f"{row.where}: {seen[key]}")
    if problems:
        more = f"; ... and {len(problems) - _LISTED} more rows" if len(problems) > _LISTED else ""
        raise TrainError(f"--extra_inputs {COLUMN}: " + "; ".join(problems[:_LISTED]) + more + ". " + advice)


def sample_loras(pipe, sample: dict) -> list:
    """The sample's LoRA(s), read (as lora_tools' LoraFile) against the encoder's sites. Not against the DiT:
    check_lora_rows checked the encoder and every file against it at setup, and a DiT LoRA run has since wrapped the
    DiT's layers (peft), whose names the DiT check would not find."""
    return check_lora_encoder_inputs(sample[COLUMN], pipe.lora_encoder, None)


def lora_tokens(pipe, loras: list):
    """The adapter appending the encoded LoRA's tokens to the prompt (scale 1: DiffSynth's training passes none)."""
    return lora_encoder_adapter(pipe.lora_encoder, loras, 1.0, None)


def validation_loras(args: argparse.Namespace, dataset, pipe) -> list[str]:
    """The validation images' LoRA files: --validation_lora_encoder_inputs, else the first data row's; checked now as
    the pipeline will check them (against the DiT it renders with), not after the first training steps."""
    if args.validation_lora_encoder_inputs:
        paths, source = list(args.validation_lora_encoder_inputs), "--validation_lora_encoder_inputs"
    else:
        first = dataset[0][COLUMN]
        paths = list(first) if isinstance(first, list) else [first]
        source = f"the validation images' {COLUMN} (the first data row's, {dataset.rows[0].where})"
    try:
        check_lora_encoder_inputs(paths, pipe.lora_encoder, pipe.dit, param=source)
    except LoraEncoderInputError as e:
        raise TrainError(str(e)) from None
    return paths
