"""A tiny Qwen2.5-VL (transformers' own classes, random weights) and a tiny processor built in the test, for the
Step1X-Edit and Nexus-Gen tests. The real processor files (Qwen/Qwen2.5-VL-7B-Instruct's tokenizer and
preprocessor) are not available offline, so the tokenizer here is a byte-level BPE made in code:

    model = make_qwen_vl()                        # transformers Qwen2_5_VLModel, hidden 16, 2 layers, 2 vision blocks
    lm = make_qwen_vl(conditional_generation=True)   # Qwen2_5_VLForConditionalGeneration (with lm_head)
    processor = make_processor()                  # Qwen2_5_VLProcessor: tiny tokenizer + the PIL image processor
    folder = write_qwen_vl_folder(lm, tmp / "Qwen2.5-VL-tiny")   # published layout: sharded model-*.safetensors,
                                                  # model.safetensors.index.json, a flat config.json, processor files

The tokenizer keeps the ids the real one gives the tokens DiffSynth-Studio's code names by number: the special
tokens (<|endoftext|> 151643 ... <|video_pad|> 151656) and the curly quotes (“ 2073, ” 854). Every other
character is one token per UTF-8 byte (ids 0..255), so any text tokenizes. The vocabulary therefore spans
151657 ids (the embedding table is 151657 x 16, 9.7 MB in float32).

The image processor is transformers' PIL Qwen2-VL one with the real patch sizes (14, temporal 2, merge 2).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from flux_core.demo.tokenizers import byte_chars

# The ids of the real Qwen2.5 tokenizer for the tokens the Step1X-Edit / Nexus-Gen code names by number.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
                  "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
                  "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                  "<|image_pad|>": 151655, "<|video_pad|>": 151656}
OPEN_QUOTE_ID, CLOSE_QUOTE_ID = 2073, 854   # “ and ” as single tokens (real ids)
VOCAB_SIZE = 151657

# A chat template that writes Qwen2-VL's conversation format (a default system turn, "Picture N: " before each
# image with add_vision_id, each image as <|vision_start|><|image_pad|><|vision_end|>, the assistant's header with
# add_generation_prompt). Written for these tests from the format, not copied from the model's files.
CHAT_TEMPLATE = (
    "{% set ns = namespace(images=0) %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.images = ns.images + 1 %}"
    "{% if add_vision_id %}Picture {{ ns.images }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# DiffSynth-Studio's Step1X processor bounds (FluxImagePipeline.from_pretrained): 256..324 merged image tokens.
STEP1X_MIN_PIXELS, STEP1X_MAX_PIXELS = 256 * 28 * 28, 324 * 28 * 28


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    symbols = byte_chars()
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for char, token_id in (("“", OPEN_QUOTE_ID), ("”", CLOSE_QUOTE_ID)):
        a, b, c = (symbols[x] for x in char.encode("utf-8"))   # three bytes each: E2 80 9C / E2 80 9D
        if a + b not in vocab:
            vocab[a + b] = 256
            merges.append((a, b))
        vocab[a + b + c] = token_id
        merges.append((a + b, c))
    vocab.update(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def make_tokenizer():
    """The tiny Qwen2 tokenizer (transformers' Qwen2TokenizerFast over a byte-level BPE made here)."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast
    return Qwen2TokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), unk_token=None,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              chat_template=CHAT_TEMPLATE)


# preprocessor_config.json of the tiny processor: Qwen2.5-VL's image processor settings (patch 14, temporal 2,
# merge 2, CLIP's mean and std, bicubic resampling).
PREPROCESSOR_CONFIG = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                       "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "temporal_patch_size": 2,
                       "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                       "image_std": [0.26862954, 0.26130258, 0.27577711], "do_rescale": True, "do_normalize": True,
                       "do_resize": True, "do_convert_rgb": True, "resample": 3, "rescale_factor": 1 / 255}


def write_processor(folder: Path) -> Path:
    """The tiny processor's files as a Qwen2.5-VL model folder holds them: tokenizer files, preprocessor_config.json,
    chat_template.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


@lru_cache(maxsize=None)
def _processor_folder() -> Path:
    import tempfile
    return write_processor(Path(tempfile.mkdtemp(prefix="tiny-qwen-vl-processor-")))


def make_processor(min_pixels: int = STEP1X_MIN_PIXELS, max_pixels: int = STEP1X_MAX_PIXELS):
    """The tiny processor loaded as FluxCore loads a real one (flux_core.vl_processor: transformers' processor,
    without its video part when torchvision is missing), with DiffSynth-Studio's Step1X pixel bounds by default."""
    from flux_core.vl_processor import load_vl_processor
    return load_vl_processor(_processor_folder(), min_pixels=min_pixels, max_pixels=max_pixels)


# Text model and vision tower sizes: head_dim 8 (mrope sections 1+1+2 = head_dim / 2), vision out 16 = text hidden.
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=VOCAB_SIZE, rope_theta=1000000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
TINY_VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                   in_chans=3, hidden_act="silu")


def flat_config(**text_overrides) -> dict:
    """The tiny model's config.json as Qwen/Qwen2.5-VL-7B-Instruct's is laid out: the text model's fields at the top
    level, the vision tower's under vision_config, the special token ids."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            **TINY_TEXT, **text_overrides, "vision_config": dict(TINY_VISION),
            "image_token_id": SPECIAL_TOKENS["<|image_pad|>"], "video_token_id": SPECIAL_TOKENS["<|video_pad|>"],
            "vision_start_token_id": SPECIAL_TOKENS["<|vision_start|>"],
            "vision_end_token_id": SPECIAL_TOKENS["<|vision_end|>"], "tie_word_embeddings": False,
            "torch_dtype": "float32"}


def tiny_qwen_vl_config(**text_overrides):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(**flat_config(**text_overrides))


def make_qwen_vl(seed: int = 0, conditional_generation: bool = False, **text_overrides) -> torch.nn.Module:
    """transformers' Qwen2_5_VLModel (or Qwen2_5_VLForConditionalGeneration) with random weights (norms included,
    so every path matters), float32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
    cls = Qwen2_5_VLForConditionalGeneration if conditional_generation else Qwen2_5_VLModel
    torch.manual_seed(seed)
    return randomised(cls(tiny_qwen_vl_config(**text_overrides)), seed, scale=0.2)


def randomised(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1, the rest of std `scale`), so every path matters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def published_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under Qwen/Qwen2.5-VL-7B-Instruct's published names (`model.*` text model, `visual.*` vision tower,
    `lm_head.weight`), from a transformers 5 Qwen2_5_VLModel (`language_model.*`, `visual.*`) or a
    Qwen2_5_VLForConditionalGeneration (the same under `model.`, plus `lm_head`). A Qwen2_5_VLModel has no lm_head:
    a random one is added, as the published files carry one."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.removeprefix("model.")
        if k.startswith("language_model."):
            k = "model." + k[len("language_model."):]
        out[k] = v.detach().clone().contiguous()
    if "lm_head.weight" not in out:
        g = torch.Generator().manual_seed(1)
        out["lm_head.weight"] = torch.randn(out["model.embed_tokens.weight"].shape, generator=g)
    return out


def write_qwen_vl_folder(model: torch.nn.Module, folder: Path, shards: int = 2, with_processor: bool = True,
                         with_config: bool = True, dtype: torch.dtype | None = None) -> Path:
    """A Qwen2.5-VL model folder as published: `model-0000i-of-0000n.safetensors` shards with their
    `model.safetensors.index.json`, the flat config.json, and the processor files (with_processor)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in published_state_dict(model).items()}
    names = sorted(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if with_config:
        (folder / "config.json").write_text(json.dumps(flat_config(), indent=2))
    if with_processor:
        write_processor(folder)
    return folder


def sample_image(width: int = 40, height: int = 56, seed: int = 0):
    """A small RGB PIL image of random colours (the processor scales it up to its min_pixels)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)
