"""FLUX's two text encoders (CLIP-L and the T5-XXL encoder) as `transformers` modules, their tokenizers, and
`encode_prompt` with the FLUX / diffusers `FluxPipeline` semantics.

The modules are `transformers.CLIPTextModel` and `transformers.T5EncoderModel` built from a config read off the
checkpoint's shapes (`ClipParams`, `T5Params`); the loaders in `flux_core/loading/text_kinds.py` map every
published file layout onto them.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..inputs import T5_MAX_SEQUENCE_LENGTH
from ..model_config import FLUX_DEV
from ..vram import compute_place
from .shapes import count_blocks

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77  # CLIP-L's learned positions; FLUX always pads the CLIP prompt to exactly this length


def _shape(shapes: Mapping, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"no '{key}' ({what}); the file is incomplete or not this kind of model")
    return tuple(shapes[key])


def _known(cls, overrides: Mapping | None) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in (overrides or {}).items() if k in names and v is not None}


@dataclass(frozen=True)
class ClipParams:
    """CLIP-L text tower config; the defaults are FLUX.1-dev's `text_encoder/config.json`."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    # FLUX.1-dev ships the legacy value 2. transformers treats `eos_token_id == 2` as "pool at argmax(input_ids)",
    # i.e. at the first <|endoftext|> (the highest id in the CLIP vocab) - the original CLIP pooling, and the
    # one DiffSynth-Studio and ComfyUI use. Any other value pools at the first token equal to it.
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ClipParams: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}.")

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None) -> "ClipParams":
        """Read the config off the shapes of a CLIP text state dict named like transformers' `CLIPTextModel`
        without the `text_model.` prefix (`embeddings.token_embedding.weight`, `encoder.layers.N...`).

        The head count cannot be read from shapes: it comes from `overrides` (a config.json or the caller) or is
        `hidden_size // 64`, CLIP-L's head size; a hidden size that is not a multiple of 64 needs it stated."""
        overrides = _known(cls, overrides)
        vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight", "token embedding")
        inferred = dict(
            vocab_size=vocab, hidden_size=hidden,
            max_position_embeddings=_shape(shapes, "embeddings.position_embedding.weight", "position embedding")[0],
            num_hidden_layers=count_blocks(shapes, "encoder.layers."),
            intermediate_size=_shape(shapes, "encoder.layers.0.mlp.fc1.weight", "first MLP")[0],
        )
        if "num_attention_heads" not in overrides:
            if hidden % 64:
                raise ValueError(f"hidden size {hidden} is not a multiple of CLIP-L's head size 64, so the head count "
                                 f"cannot be inferred; pass config={{'num_attention_heads': N}}")
            inferred["num_attention_heads"] = hidden // 64
        return cls(**{**inferred, **overrides})

    def to_transformers(self):
        from transformers import CLIPTextConfig
        return CLIPTextConfig(**asdict(self))


@dataclass(frozen=True)
class T5Params:
    """T5 encoder config; the defaults are FLUX.1-dev's `text_encoder_2/config.json` (T5 v1.1 XXL)."""
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # not visible in the weights: always the T5 value unless stated
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # transformers runs "gated-gelu" with gelu_new (tanh approximation)

    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, tuple[int, ...]], overrides: Mapping | None = None) -> "T5Params":
        """Read the config off a `T5EncoderModel` state dict's shapes (`shared.weight`, `encoder.block.N...`)."""
        overrides = _known(cls, overrides)
        vocab, d_model = _shape(shapes, "shared.weight", "token embedding")
        attn = "encoder.block.0.layer.0.SelfAttention."
        buckets, heads = _shape(shapes, attn + "relative_attention_bias.weight", "relative position bias")
        inner = _shape(shapes, attn + "q.weight", "first attention query")[0]
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by the {heads} heads of the relative "
                             f"position bias")
        mlp = "encoder.block.0.layer.1.DenseReluDense."
        gated = mlp + "wi_0.weight" in shapes
        d_ff = _shape(shapes, mlp + ("wi_0.weight" if gated else "wi.weight"), "first feed-forward")[0]
        inferred = dict(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads,
                        num_layers=count_blocks(shapes, "encoder.block."), relative_attention_num_buckets=buckets,
                        feed_forward_proj="gated-gelu" if gated else "relu")
        return cls(**{**inferred, **overrides})

    def to_transformers(self):
        from transformers import T5Config
        return T5Config(**asdict(self), is_encoder_decoder=False, use_cache=False)


def build_clip(params: ClipParams) -> nn.Module:
    """A `transformers.CLIPTextModel` for `params` (weights uninitialised when built under the meta device)."""
    from transformers import CLIPTextModel
    return CLIPTextModel(params.to_transformers()).eval()


def build_t5(params: T5Params) -> nn.Module:
    """A `transformers.T5EncoderModel` for `params`; `shared` and `encoder.embed_tokens` are one tensor."""
    from transformers import T5EncoderModel
    return T5EncoderModel(params.to_transformers()).eval()


@functools.lru_cache(maxsize=None)
def clip_module_naming() -> tuple[str, bool]:
    """How this transformers version names `CLIPTextModel`'s state dict: (key prefix, position_ids persistent).

    transformers 4.x nests the tower under `text_model.`; 5.x flattens it (and renames on `from_pretrained`).
    Some old versions also saved `position_ids` as a persistent buffer. Probed once on a meta-device model."""
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        probe = CLIPTextModel(CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, max_position_embeddings=4, bos_token_id=0,
                                             eos_token_id=2, pad_token_id=1))
    keys = list(probe.state_dict())
    prefix = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
    return prefix, any(k.endswith("position_ids") for k in keys)


# ---------------------------------------------------------------------------------------------- tokenizers

class TokenizerFilesError(FileNotFoundError):
    """A tokenizer folder without the files its tokenizer needs; the message says where to get them. `title`,
    `folder` and `expected` let a front end (a node) phrase it in its own terms."""

    def __init__(self, message: str, title: str, folder: Path, expected: str):
        super().__init__(message)
        self.title, self.folder, self.expected = title, folder, expected


def _tokenizer_folder(path: str | os.PathLike, sub: str, file_sets: Sequence[tuple[str, ...]], title: str,
                      parameter: str) -> Path:
    """The folder holding a complete set of tokenizer files: `path` itself, or its `sub`/ (a pipeline folder).
    Otherwise the error names the tokenizer, both places searched, the files needed and the two fixes:
    `parameter` (the pipeline argument that names the folder) or FLUX.1-dev's folder from ModelScope."""
    path = Path(path)
    searched = (path, path / sub)
    for folder in searched:
        if folder.is_dir() and any(all((folder / f).is_file() for f in files) for files in file_sets):
            return folder
    expected = " or ".join(" + ".join(files) for files in file_sets)
    where = "does not exist" if not path.exists() else "holds no complete set of tokenizer files"
    raise TokenizerFilesError(
        f"{title} tokenizer not found: searched {searched[0]} and {searched[1]}; {path} {where}. The {title} "
        f"tokenizer needs {expected}. Pass {parameter}=ModelConfig(path=FOLDER) with a folder that holds them, or "
        f"fetch the {sub}/ folder of {FLUX_DEV} (a few MB): `python -m flux_core download` puts it in "
        f"./models/{FLUX_DEV}/{sub}/ (or `modelscope download --model {FLUX_DEV} --include "
        f"'{sub}/*' --local_dir ./models/{FLUX_DEV}`).", title, path, expected)



def load_clip_tokenizer(path: str | os.PathLike):
    """The CLIP-L tokenizer from a `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer
    folder = _tokenizer_folder(path, "tokenizer", [("vocab.json", "merges.txt"), ("tokenizer.json",)], "CLIP-L",
                               "tokenizer_1_config")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_t5_tokenizer(path: str | os.PathLike):
    """The T5 tokenizer from a `tokenizer_2/` folder (tokenizer.json, or spiece.model with sentencepiece)."""
    from transformers import T5TokenizerFast
    folder = _tokenizer_folder(path, "tokenizer_2", [("tokenizer.json",), ("spiece.model",)], "T5",
                               "tokenizer_2_config")
    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def t5_sequence_length_of(t5_tokenizer, t5_sequence_length: int | None = None) -> int:
    """The number of T5 tokens prompts are padded and truncated to: `t5_sequence_length` when given, else the
    T5 tokenizer's `model_max_length` (the prompt length the model was trained with: FLUX.1-dev's tokenizer_2/ says
    512, the bundled demo's 32), capped at T5_MAX_SEQUENCE_LENGTH (512). A tokenizer that sets no limit reports
    transformers' VERY_LARGE_INTEGER (about 1e30), and no tokenizer (a pipeline without T5) gives 512: FLUX.1-dev's
    length either way."""
    if t5_sequence_length is not None:
        return t5_sequence_length
    limit = getattr(t5_tokenizer, "model_max_length", None)
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit >= 1:
        return T5_MAX_SEQUENCE_LENGTH
    return int(min(limit, T5_MAX_SEQUENCE_LENGTH))


def load_tokenizers(clip_path: str | os.PathLike, t5_path: str | os.PathLike):
    """(CLIP tokenizer, T5 tokenizer) from FLUX.1-dev's `tokenizer/` and `tokenizer_2/` folders."""
    return load_clip_tokenizer(clip_path), load_t5_tokenizer(t5_path)


# ------------------------------------------------------------------------------------------ prompt encoding

def _device_of(module: nn.Module) -> torch.device:
    return compute_place(module)[0]  # where it computes (a VRAMManager may store it elsewhere)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return compute_place(module)[1]


def _tokenize(tokenizer, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    lengths = [len(x) for x in tokenizer(prompts, truncation=False).input_ids]
    if max(lengths) > max_length:
        logger.warning("%s prompt truncated to %d tokens (the longest prompt has %d).", name, max_length, max(lengths))
    return ids


@torch.no_grad()
def clip_pooled(prompts: list[str], clip: nn.Module, clip_tokenizer) -> torch.Tensor:
    """CLIP-L's pooled output (B, d_clip) of prompts padded and truncated to 77 tokens, on CLIP's device and dtype."""
    clip_ids = _tokenize(clip_tokenizer, prompts, CLIP_MAX_LENGTH, "CLIP")
    return clip(clip_ids.to(_device_of(clip)), output_hidden_states=False).pooler_output.to(_dtype_of(clip))


def encode_prompt(prompts: str | list[str], clip: nn.Module, t5: nn.Module, clip_tokenizer, t5_tokenizer,
                  t5_sequence_length: int | None = None, device: str | torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_emb (B, t5_sequence_length, d_t5), pooled (B, d_clip)) exactly as FLUX / diffusers' FluxPipeline.

    CLIP: padded ("max_length") and truncated to 77 tokens, pooled output = final-LayerNorm state at the first
    <|endoftext|>. T5: padded and truncated to `t5_sequence_length` (512 for dev, 256 for schnell; None: the T5
    tokenizer's own length, `t5_sequence_length_of`) and run
    without an attention mask, so padding tokens are attended to - the models were trained that way. Each encoder
    runs where its weights are; outputs keep the encoders' dtypes and go to `device` when it is given.
    (The text position ids are zeros and are the pipeline's business, not this function's.)
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pooled = clip_pooled(prompts, clip, clip_tokenizer)
    t5_sequence_length = t5_sequence_length_of(t5_tokenizer, t5_sequence_length)
    if t5_sequence_length < 1:
        raise ValueError(f"t5_sequence_length={t5_sequence_length}: use a positive number of T5 tokens "
                         f"(512 for FLUX.1-dev).")
    t5_ids = _tokenize(t5_tokenizer, prompts, t5_sequence_length, "T5")
    prompt_emb = t5(t5_ids.to(_device_of(t5)), output_hidden_states=False).last_hidden_state.to(_dtype_of(t5))
    if device is not None:
        pooled, prompt_emb = pooled.to(device), prompt_emb.to(device)
    return prompt_emb, pooled
