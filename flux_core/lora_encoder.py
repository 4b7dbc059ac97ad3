"""LoRA-Encoder (DiffSynth-Studio's FluxLoRAEncoder): a LoRA turned into conditioning tokens. Being built (issue 12)."""
from __future__ import annotations


def check_lora_encoder_inputs(value, encoder, dit, param: str = "lora_encoder_inputs") -> list:
    """Every LoRA of `value` (a path, ModelConfig, LoraFile or a list of them) read and checked against the
    encoder and the DiT; all problems listed at once."""
    raise NotImplementedError("LoRA-Encoder: being built")


def lora_encoder_adapter(encoder, loras: list, scale: float, dit):
    """An adapter appending the encoded LoRAs' tokens (times `scale`) to the positive branch's text."""
    raise NotImplementedError("LoRA-Encoder: being built")
