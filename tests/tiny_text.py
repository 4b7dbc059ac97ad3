"""Tiny FLUX text encoders and tokenizers for tests, and writers for every published checkpoint layout.

    clip, t5 = make_clip(), make_t5()            # transformers CLIPTextModel / T5EncoderModel, random weights
    clip_dir, t5_dir = write_tokenizers(tmp)     # working tokenizer/ and tokenizer_2/ folders (FLUX.1-dev style)
    src = write_clip(clip, tmp, "clip_l")        # the same weights in a published layout (see CLIP_LAYOUTS)
    ours = load_model(src, config=CLIP_SINGLE_FILE_CONFIG, torch_dtype=torch.float32, kind="clip")
    ref = stored_reference(t5, "t5xxl_fp8_scaled")   # the reference with the rounding that layout's storage applies

CLIP hidden 32 and T5 d_model 32 match the pooled and text dims of tests/tiny_dit.py. CLIP's head count is not in
its shapes and 32 is not a multiple of CLIP-L's head size 64, so single CLIP files need CLIP_SINGLE_FILE_CONFIG
(folders carry it in config.json). Token ids of both tokenizers fit the models' vocabularies; CLIP's
<|endoftext|> is its highest id, as in the real vocab, which the argmax pooling relies on.
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_core.demo.tokenizers import clip_bpe, t5_pieces, write_clip_tokenizer, write_t5_tokenizer

CLIP_HEADS = 2
CLIP_SINGLE_FILE_CONFIG = {"num_attention_heads": CLIP_HEADS}
T5_VOCAB = 256  # the tokenizer uses fewer ids, as T5-XXL's 32100-token tokenizer does with its 32128 embeddings

CLIP_LAYOUTS = ("hf_folder", "save_pretrained", "clip_l", "clip_l_flat", "openai_full", "comfyui_bundle",
                "sd1_bundle", "sdxl_bundle")
T5_LAYOUTS = ("hf_sharded", "save_pretrained", "t5xxl_fp16", "embed_tokens_only", "both_embeddings", "t5xxl_fp8",
              "t5xxl_fp8_scaled", "full_t5", "comfyui_bundle")

_CORPUS = ("a photo of a cat sitting on a red chair in the sun a dog running on the beach at sunset an astronaut "
           "riding a horse on the moon highly detailed digital painting of a castle with a blue sky and green trees "
           "portrait of a woman wearing a hat")


# -------------------------------------------------------------------------------------------- tokenizers

def clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the tiny CLIP BPE, laid out like the real one (flux_core.demo.tokenizers.clip_bpe)."""
    return _clip_bpe()


@lru_cache(maxsize=None)
def _clip_bpe():
    return clip_bpe(_CORPUS)


def write_tokenizers(folder: Path) -> tuple[Path, Path]:
    """Write working `tokenizer/` (CLIP: vocab.json + merges.txt) and `tokenizer_2/` (T5: tokenizer.json)
    folders shaped like FLUX.1-dev's; returns (clip_dir, t5_dir)."""
    pieces = t5_pieces(_CORPUS)
    assert len(pieces) <= T5_VOCAB
    return (write_clip_tokenizer(Path(folder) / "tokenizer", _CORPUS),
            write_t5_tokenizer(Path(folder) / "tokenizer_2", pieces))


# ------------------------------------------------------------------------------------------------ models

def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Default init leaves norms at 1/0: move every weight so that a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make_clip(seed: int = 0) -> CLIPTextModel:
    """A tiny CLIP-L-like CLIPTextModel (hidden 32, 2 heads, 2 layers, 77 positions, FLUX.1-dev's eos_token_id 2)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(clip_vocab()[0]), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=CLIP_HEADS, max_position_embeddings=77,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, projection_dim=32)
    model = CLIPTextModel(config).eval()
    _perturb(model, seed)
    return model


def make_t5(seed: int = 0) -> T5EncoderModel:
    """A tiny T5 v1.1-like T5EncoderModel (d_model 32, 4 heads of 8, gated-gelu d_ff 64, 2 blocks)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    _perturb(model, seed)
    return model


# ------------------------------------------------------------------------------------- layouts: helpers

_T5_LINEAR = re.compile(r"\.(q|k|v|o|wi|wi_0|wi_1|wo)\.weight$")


def _fp8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float8_e4m3fn)


def _scaled_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's scaled fp8: fp8(w / s) with the per-tensor scalar s = max|w| / 448 (fp8 e4m3's largest value)."""
    scale = (t.abs().max().float() / 448.0).reshape(())
    return _fp8(t.float() / scale), scale


def _round(name: str, t: torch.Tensor, layout: str) -> torch.Tensor:
    """The float32 values a layout's storage keeps of a weight (what a loader must reproduce)."""
    if layout == "t5xxl_fp8":
        return _fp8(t).float()
    if layout == "t5xxl_fp8_scaled" and _T5_LINEAR.search(name):
        q, s = _scaled_fp8(t)
        return q.float() * s
    if layout in ("t5xxl_fp16", "t5xxl_fp8_scaled"):
        return t.half().float()
    return t


def stored_reference(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    """A copy of `model` holding the values `layout`'s storage rounds its weights to (itself if lossless)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(_round(name, p, layout))
    return ref


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _write_config(model: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_json_string())


def _write_sharded(tensors: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> Path:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, as transformers writes big models."""
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        _save({k: tensors[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return folder


# ---------------------------------------------------------------------------------------- layouts: CLIP

def clip_weights(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text tower's weights without `text_model.` (and without the position_ids buffer), any transformers."""
    sd = {k.removeprefix("text_model."): v.detach().clone() for k, v in model.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    return sd


def write_clip(model: CLIPTextModel, folder: Path, layout: str) -> Path:
    """Write `model` in one of CLIP_LAYOUTS under `folder`; returns the path to give load_model."""
    folder = Path(folder)
    flat = clip_weights(model)
    hf = {"text_model." + k: v for k, v in flat.items()}
    hidden = model.config.hidden_size
    if layout == "hf_folder":  # FLUX.1-dev text_encoder/: config.json + model.safetensors with text_model.*
        _write_config(model, folder / "text_encoder")
        _save(hf, folder / "text_encoder" / "model.safetensors")
        return folder / "text_encoder"
    if layout == "save_pretrained":  # whatever this transformers version writes (5.x: no text_model. prefix)
        model.save_pretrained(folder / "clip_saved")
        return folder / "clip_saved"
    if layout == "clip_l":  # ComfyUI models/text_encoders/clip_l.safetensors: text_model.* + text_projection
        return _save({**hf, "text_projection.weight": torch.randn(hidden, hidden)}, folder / "clip_l.safetensors")
    if layout == "clip_l_flat":
        return _save(flat, folder / "clip_l_flat.safetensors")
    if layout == "openai_full":  # a whole CLIP (text + vision tower + projections), HF names
        extra = {"vision_model.embeddings.class_embedding": torch.randn(hidden),
                 "vision_model.post_layernorm.weight": torch.randn(hidden), "logit_scale": torch.tensor(4.6),
                 "visual_projection.weight": torch.randn(hidden, hidden),
                 "text_projection.weight": torch.randn(hidden, hidden),
                 "text_model.embeddings.position_ids": torch.arange(77)[None]}
        return _save({**hf, **extra}, folder / "clip_full.safetensors")
    if layout == "comfyui_bundle":
        return _save({"text_encoders.clip_l.transformer." + k: v for k, v in hf.items()},
                     folder / "comfyui_checkpoint.safetensors")
    if layout == "sd1_bundle":  # old SD1 checkpoints even hold position_ids as (rounded) floats
        sd = {"cond_stage_model.transformer." + k: v for k, v in hf.items()}
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.4
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
        return _save(sd, folder / "sd1_checkpoint.safetensors")
    if layout == "sdxl_bundle":  # CLIP-L first, OpenCLIP-G (its own names) second
        sd = {"conditioner.embedders.0.transformer." + k: v for k, v in hf.items()}
        sd["conditioner.embedders.1.model.token_embedding.weight"] = torch.randn(16, 8)
        sd["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8)
        return _save(sd, folder / "sdxl_checkpoint.safetensors")
    raise ValueError(f"unknown CLIP layout {layout!r}; one of {CLIP_LAYOUTS}")


# ------------------------------------------------------------------------------------------ layouts: T5

def t5_weights(model: T5EncoderModel) -> dict[str, torch.Tensor]:
    """`shared.weight` + `encoder.*` without the tied duplicate `encoder.embed_tokens.weight`."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd.pop("encoder.embed_tokens.weight")
    return sd


def write_t5(model: T5EncoderModel, folder: Path, layout: str) -> Path:
    """Write `model` in one of T5_LAYOUTS under `folder`; returns the path to give load_model.
    fp16/fp8 layouts round the weights: compare against `stored_reference(model, layout)`."""
    folder = Path(folder)
    sd = t5_weights(model)
    if layout == "hf_sharded":  # FLUX.1-dev text_encoder_2/: config.json + 2 shards + index
        _write_config(model, folder / "text_encoder_2")
        return _write_sharded(sd, folder / "text_encoder_2")
    if layout == "save_pretrained":
        model.save_pretrained(folder / "t5_saved")
        return folder / "t5_saved"
    if layout == "t5xxl_fp16":
        return _save({k: v.half() for k, v in sd.items()}, folder / "t5xxl_fp16.safetensors")
    if layout == "embed_tokens_only":
        sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
        return _save(sd, folder / "t5xxl_embed_tokens.safetensors")
    if layout == "both_embeddings":
        return _save({**sd, "encoder.embed_tokens.weight": sd["shared.weight"].clone()}, folder / "t5xxl_both.safetensors")
    if layout == "t5xxl_fp8":
        return _save({k: _fp8(v) for k, v in sd.items()}, folder / "t5xxl_fp8_e4m3fn.safetensors")
    if layout == "t5xxl_fp8_scaled":  # ComfyUI: fp8 Linear weights + scalar scale_weight, the rest fp16, a marker
        out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
        for k, v in sd.items():
            if _T5_LINEAR.search(k):
                layer = k[: -len("weight")]
                out[k], out[layer + "scale_weight"] = _scaled_fp8(v)
                out[layer + "scale_input"] = torch.tensor(1.0)
            else:
                out[k] = v.half()
        return _save(out, folder / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    if layout == "full_t5":  # encoder-decoder T5: the decoder and LM head must be left out
        d = model.config.d_model
        extra = {"decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(d, d),
                 "decoder.final_layer_norm.weight": torch.randn(d),
                 "decoder.embed_tokens.weight": sd["shared.weight"].clone(),
                 "lm_head.weight": torch.randn(model.config.vocab_size, d)}
        return _save({**sd, **extra}, folder / "t5_full.safetensors")
    if layout == "comfyui_bundle":
        return _save({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()},
                     folder / "comfyui_checkpoint.safetensors")
    raise ValueError(f"unknown T5 layout {layout!r}; one of {T5_LAYOUTS}")


def write_bundle(clip: CLIPTextModel, t5: T5EncoderModel, path: Path) -> Path:
    """A ComfyUI all-in-one file holding both encoders (`text_encoders.clip_l/t5xxl.transformer.`)."""
    sd = {"text_encoders.clip_l.transformer.text_model." + k: v for k, v in clip_weights(clip).items()}
    sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_weights(t5).items()})
    return _save(sd, path)
