"""What a LoRA file is, from its whole key set: the FLUX formats by name, and, for files that match no FLUX
layer, the model family they were made for (so the error says "this is an SDXL LoRA", not "0 keys loaded")."""
from __future__ import annotations

import re
from typing import Iterable

FORMAT_TITLES = {
    "kohya": "kohya / civitai (lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight + .alpha)",
    "diffusers": "diffusers / PEFT (transformer.transformer_blocks.0.attn.to_q.lora_A.weight)",
    "onetrainer": "OneTrainer (lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight)",
    "xlabs": "XLabs (double_blocks.0.processor.qkv_lora1.down.weight)",
    "diffsynth": "DiffSynth-Studio (blocks.0.attn.a_to_qkv.lora_A.default.weight)",
    "bfl": "PEFT/kohya tensors on BFL names (diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight)",
}

# (regex searched in the keys, what the file is). First hit wins, so the specific signatures come first.
_FOREIGN = [
    (r"(lokr_w1|lokr_w2|hada_w1_a|hada_w2_a|\.oft_|oft_blocks)",
     "a LyCORIS LoKr/LoHa/OFT file; FluxCore applies plain low-rank (LoRA) adapters only"),
    (r"double_stream_modulation|single_stream_modulation",
     "a FLUX.2 LoRA; FluxCore runs FLUX.1 models"),
    (r"(lora_unet_input_blocks|lora_unet_output_blocks|lora_unet_middle_block|^input_blocks\.)",
     "an SDXL LoRA (UNet keys lora_unet_input_blocks_*); it is for Stable Diffusion XL, not FLUX"),
    (r"(lora_unet_down_blocks|lora_unet_up_blocks|lora_unet_mid_block|^unet\.)",
     "a Stable Diffusion 1.x/2.x/XL UNet LoRA (down_blocks/up_blocks keys), not a FLUX LoRA"),
    (r"(lora_unet_joint_blocks|joint_blocks\.\d+\.(x|context)_block)",
     "an SD3 LoRA (joint_blocks keys), not a FLUX LoRA"),
    (r"(img_mlp_fc1|img_mod_linear|individual_token_refiner|img_mlp\.fc1)",
     "a HunyuanVideo LoRA (img_mlp.fc1 / individual_token_refiner keys), not a FLUX LoRA"),
    (r"(blocks\.\d+\.(self_attn|cross_attn)\.|blocks_\d+_(self_attn|cross_attn)_)",
     "a Wan video LoRA (blocks.N.self_attn / cross_attn keys), not a FLUX LoRA"),
    (r"(transformer_blocks\.\d+\.(attn1|attn2)\.|transformer_blocks_\d+_attn1_)",
     "an LTX-Video / PixArt-style LoRA (attn1/attn2 keys), not a FLUX LoRA"),
    (r"(transformer_blocks\.\d+\.img_mod|transformer_blocks\.\d+\.img_mlp\.net|transformer_blocks_\d+_img_mod)",
     "a Qwen-Image LoRA, not a FLUX.1 LoRA"),
]

TEXT_ENCODER_RE = re.compile(r"^(lora_te\d?_|lora_te_|text_encoder(_\d)?\.|text_encoders\.|te\d?\.|te_)")


def is_text_encoder_key(key: str) -> bool:
    return bool(TEXT_ENCODER_RE.match(key))


def describe_foreign(keys: Iterable[str]) -> str:
    """A sentence naming what a file that matches no FLUX layer appears to be."""
    keys = list(keys)
    if not keys:
        return "an empty file (no tensors)"
    if all(is_text_encoder_key(k) for k in keys):
        return "a text-encoder-only LoRA (lora_te* / text_encoder.* keys); FluxCore applies LoRAs to the DiT"
    for pattern, what in _FOREIGN:
        regex = re.compile(pattern)
        if any(regex.search(k) for k in keys):
            return what
    if not any("lora" in k or k.endswith((".alpha", ".down.weight", ".up.weight")) for k in keys):
        return f"not a LoRA at all (no lora_*/alpha keys; first keys: {keys[:3]}); it may be a full checkpoint"
    return f"a LoRA for an unknown model (first keys: {keys[:3]})"
