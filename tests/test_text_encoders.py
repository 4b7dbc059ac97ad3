"""CLIP-L and T5 loaded by flux_core from every published layout, against the transformers models they were
written from; encode_prompt against diffusers' FluxPipeline on the same tiny encoders and tokenizers."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, T5EncoderModel

from flux_core.loading.files import CheckpointError, open_state_dict
from flux_core.loading.loader import detect, load_model
from flux_core.model_state import state_of
from flux_core.loading.text_kinds import clip_overrides
from flux_core.text_conditioning import ClipT5Encoder
from flux_core.models.text_encoders import (ClipParams, T5Params, TokenizerFilesError, encode_prompt,
                                            load_clip_tokenizer, load_t5_tokenizer, load_tokenizers)
from tests.tiny_text import (CLIP_LAYOUTS, CLIP_SINGLE_FILE_CONFIG, T5_LAYOUTS, make_clip, make_t5,
                             stored_reference, write_bundle, write_clip, write_t5, write_tokenizers)

# Measured 0 for every parity check below (transformers' own modules on both sides). The smallest real mistakes
# measured: a LayerNorm eps of 1e-6 for CLIP's 1e-5 moves the hidden states by 4.1e-5, T5's RMSNorm eps 1e-5 for 1e-6
# by 3.6e-5 (the former 1e-4 let both through), T5's exact GELU for gelu_new by 5.9e-4, a lossy file's rounding not
# reproduced by >= 2.3e-3 (fp16), CLIP's GELU for quick_gelu by 4.1e-2.
TOL = 1e-5
PROMPTS = ["a photo of a cat sitting on a red chair",
           "An astronaut riding a horse on the MOON at sunset, highly detailed digital painting!"]
LOSSY_T5 = ("t5xxl_fp16", "t5xxl_fp8", "t5xxl_fp8_scaled")


@pytest.fixture(scope="module")
def clip():
    return make_clip(seed=1)


@pytest.fixture(scope="module")
def t5():
    return make_t5(seed=2)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return load_tokenizers(*write_tokenizers(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def clip_ids(tokenizers):
    return tokenizers[0](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def t5_ids(tokenizers):
    return tokenizers[1](PROMPTS, padding="max_length", max_length=48, truncation=True, return_tensors="pt").input_ids


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("layout", CLIP_LAYOUTS)
def test_clip_parity_in_every_layout(layout, clip, clip_ids, tmp_path):
    source = write_clip(clip, tmp_path, layout)
    # Folders carry the head count in config.json; single files must state it (hidden 32 < CLIP-L's head size).
    config = None if layout in ("hf_folder", "save_pretrained") else CLIP_SINGLE_FILE_CONFIG
    ours = load_model(source, config=config, torch_dtype=torch.float32, kind="clip")
    assert isinstance(ours, CLIPTextModel)
    assert ours.config.num_attention_heads == 2 and ours.config.eos_token_id == 2
    with torch.no_grad():
        got, want = ours(clip_ids), clip(clip_ids)
    assert max_diff(got.pooler_output, want.pooler_output) <= TOL
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= TOL


@pytest.mark.parametrize("layout", T5_LAYOUTS)
def test_t5_parity_in_every_layout(layout, t5, t5_ids, tmp_path):
    source = write_t5(t5, tmp_path, layout)
    ours = load_model(source, torch_dtype=torch.float32, kind="t5")
    assert isinstance(ours, T5EncoderModel)
    assert ours.shared.weight is ours.encoder.embed_tokens.weight  # tied, as transformers builds it
    assert ours.config.feed_forward_proj == "gated-gelu" and ours.config.dense_act_fn == "gelu_new"
    reference = stored_reference(t5, layout)
    with torch.no_grad():
        got = ours(t5_ids).last_hidden_state
        want = reference(t5_ids).last_hidden_state
        if layout in LOSSY_T5:  # the rounding is real, so matching the rounded reference means something
            assert max_diff(want, t5(t5_ids).last_hidden_state) > 10 * TOL  # measured 2.3e-3 to 0.38
    assert max_diff(got, want) <= TOL
    if layout == "full_t5":
        assert state_of(ours).layout == "hf+decoder-dropped"
    if layout == "t5xxl_fp8_scaled":
        assert state_of(ours).layout == "hf+scaled-fp8"


def test_t5_newer_comfyui_quant_names(t5, t5_ids, tmp_path):
    """Newer ComfyUI writes `weight_scale` (+ a `comfy_quant` JSON tensor) where old files had `scale_weight`."""
    old = load_file(str(write_t5(t5, tmp_path, "t5xxl_fp8_scaled")))
    new = {}
    for k, v in old.items():
        if k.endswith(".scale_weight"):
            layer = k[: -len("scale_weight")]
            new[layer + "weight_scale"] = v
            new[layer + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        elif k != "scaled_fp8" and not k.endswith(".scale_input"):
            new[k] = v
    save_file(new, str(tmp_path / "t5_new_quant.safetensors"))
    ours = load_model(tmp_path / "t5_new_quant.safetensors", torch_dtype=torch.float32, kind="t5")
    with torch.no_grad():
        want = stored_reference(t5, "t5xxl_fp8_scaled")(t5_ids).last_hidden_state
        assert max_diff(ours(t5_ids).last_hidden_state, want) <= TOL


def test_per_channel_fp8_scales_are_refused(t5, tmp_path):
    sd = load_file(str(write_t5(t5, tmp_path, "t5xxl_fp8_scaled")))
    key = next(k for k in sd if k.endswith(".scale_weight"))
    sd[key] = torch.ones(sd[key[: -len("scale_weight")] + "weight"].shape[0], 1)
    save_file(sd, str(tmp_path / "t5_channel.safetensors"))
    with pytest.raises(CheckpointError, match="per-tensor scaled fp8"):
        load_model(tmp_path / "t5_channel.safetensors", kind="t5")


def test_configs_from_shapes_and_config_json(clip, t5, tmp_path):
    t5_params = T5Params.from_state_dict_shapes({k: tuple(v.shape) for k, v in t5.state_dict().items()})
    assert (t5_params.d_model, t5_params.d_kv, t5_params.num_heads, t5_params.d_ff, t5_params.num_layers,
            t5_params.vocab_size) == (32, 8, 4, 64, 2, t5.config.vocab_size)
    flat = {k.removeprefix("text_model."): tuple(v.shape) for k, v in clip.state_dict().items()}
    with pytest.raises(ValueError, match="num_attention_heads"):  # 32 is not a multiple of 64: no guess
        ClipParams.from_state_dict_shapes(flat)
    assert ClipParams.from_state_dict_shapes(flat, {"num_attention_heads": 2}).num_hidden_layers == 2
    # CLIP-L's real shapes give 12 heads of 64.
    real = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
            "encoder.layers.0.mlp.fc1.weight": (3072, 768), "encoder.layers.11.mlp.fc1.weight": (3072, 768)}
    assert ClipParams.from_state_dict_shapes(real) == ClipParams()
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_model(write_clip(clip, tmp_path, "clip_l"), kind="clip")


def test_bundle_holds_both_encoders(clip, t5, clip_ids, t5_ids, tmp_path):
    bundle = write_bundle(clip, t5, tmp_path / "flux_all_in_one.safetensors")
    with pytest.raises(CheckpointError, match="several components"):
        load_model(bundle)
    assert {d.kind.name: d.layout for d in detect(open_state_dict(bundle))} == {"clip": "hf", "t5": "hf"}
    clip_ours = load_model(bundle, config=CLIP_SINGLE_FILE_CONFIG, torch_dtype=torch.float32, kind="clip")
    t5_ours = load_model(bundle, torch_dtype=torch.float32, kind="t5")
    with torch.no_grad():
        assert max_diff(clip_ours(clip_ids).pooler_output, clip(clip_ids).pooler_output) <= TOL
        assert max_diff(t5_ours(t5_ids).last_hidden_state, t5(t5_ids).last_hidden_state) <= TOL


def test_t5_file_given_as_clip_is_refused(t5, clip, tmp_path):
    t5_file = write_t5(t5, tmp_path, "t5xxl_fp16")
    with pytest.raises(CheckpointError, match="expected a CLIP-L text encoder.*T5-XXL text encoder"):
        load_model(t5_file, kind="clip")
    clip_file = write_clip(clip, tmp_path, "clip_l")
    with pytest.raises(CheckpointError, match="expected a T5-XXL text encoder.*CLIP-L"):
        load_model(clip_file, kind="t5")


def test_missing_shard(t5, tmp_path):
    folder = write_t5(t5, tmp_path, "hf_sharded")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(folder, kind="t5")


def test_missing_tokenizer_files(tmp_path):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    (empty / "vocab.json").write_text("{}")  # merges.txt missing: not a complete set
    with pytest.raises(TokenizerFilesError, match=r"tokenizer.*vocab\.json \+ merges\.txt or tokenizer\.json.*FLUX\.1-dev"):
        load_clip_tokenizer(empty)
    with pytest.raises(TokenizerFilesError, match=r"does not exist.*tokenizer\.json or spiece\.model.*tokenizer_2/"):
        load_t5_tokenizer(tmp_path / "nowhere" / "tokenizer_2")


def test_tokenizers_from_a_pipeline_folder(tmp_path):
    write_tokenizers(tmp_path)  # tmp/tokenizer and tmp/tokenizer_2, as in a FLUX.1-dev download
    clip_tok, t5_tok = load_tokenizers(tmp_path, tmp_path)
    ids = clip_tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.eos_token_id == clip_tok.pad_token_id
    assert clip_tok.eos_token_id == len(clip_tok) - 1  # argmax pooling finds the first <|endoftext|>
    assert t5_tok("a cat").input_ids[-1] == t5_tok.eos_token_id == 1 and t5_tok.pad_token_id == 0


def test_clip_pools_at_the_first_end_of_text(clip, clip_ids):
    """eos_token_id 2 (FLUX.1-dev's config) makes transformers pool at argmax(ids): the first <|endoftext|>."""
    with torch.no_grad():
        out = clip(clip_ids)
    first = (clip_ids == clip_ids.max()).int().argmax(dim=1)
    assert (first < 76).all()  # the prompts are shorter than 77 tokens: padding (also <|endoftext|>) follows
    want = out.last_hidden_state[torch.arange(len(PROMPTS)), first]
    assert max_diff(out.pooler_output, want) == 0


def test_encode_prompt_matches_flux_pipeline(clip, t5, tokenizers):
    from diffusers import FluxPipeline

    clip_tok, t5_tok = tokenizers
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=None)
    prompts = PROMPTS + [" ".join(["a red castle with green trees"] * 30)]  # longer than both limits: truncated
    with torch.no_grad():
        want_emb, want_pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=torch.device("cpu"),
                                                      max_sequence_length=64)
    emb, pooled = encode_prompt(prompts, clip, t5, clip_tok, t5_tok, t5_sequence_length=64)
    assert emb.shape == (3, 64, 32) and pooled.shape == (3, 32)
    assert max_diff(emb, want_emb) <= TOL and max_diff(pooled, want_pooled) <= TOL
    emb, pooled = encode_prompt("a cat", clip, t5, clip_tok, t5_tok)  # FLUX.1-dev's default: 512 T5 tokens
    assert emb.shape == (1, 512, 32) and pooled.shape == (1, 32)
    # The conditioning encoder gives the same, and CLIP's pooled vector alone (Nexus-Gen's pooled input) as well.
    encoder = ClipT5Encoder(clip, t5, clip_tok, t5_tok, t5_sequence_length=64)
    embeds = encoder.encode(prompts, "positive")
    assert max_diff(embeds.prompt_emb, want_emb) <= TOL and max_diff(embeds.pooled, want_pooled) <= TOL
    assert embeds.text_ids is None and max_diff(encoder.pooled(prompts), want_pooled) <= TOL


def test_encode_prompt_keeps_the_encoders_dtype(clip, t5, tokenizers, tmp_path):
    clip_bf16 = load_model(write_clip(clip, tmp_path, "hf_folder"), torch_dtype=torch.bfloat16, kind="clip")
    t5_bf16 = load_model(write_t5(t5, tmp_path, "hf_sharded"), torch_dtype=torch.bfloat16, kind="t5")
    emb, pooled = encode_prompt(PROMPTS, clip_bf16, t5_bf16, *tokenizers, t5_sequence_length=16, device="cpu")
    assert emb.dtype == pooled.dtype == torch.bfloat16
    assert torch.isfinite(emb.float()).all() and torch.isfinite(pooled.float()).all()


def test_hf_folder_config_json_is_read(clip, tmp_path):
    folder = write_clip(clip, tmp_path, "hf_folder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 1  # the folder's config wins over the default guess
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder, kind="clip").config.num_attention_heads == 1
    cfg["num_attention_heads"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size 32 is not divisible by num_attention_heads 3"):
        load_model(folder, kind="clip")


def test_config_json_of_another_family_is_ignored(clip, t5, t5_ids, tmp_path):
    folder = write_t5(t5, tmp_path, "hf_sharded")
    (folder / "config.json").write_text(clip.config.to_json_string())  # a CLIP config beside T5 weights
    ours = load_model(folder, torch_dtype=torch.float32, kind="t5")
    with torch.no_grad():
        assert max_diff(ours(t5_ids).last_hidden_state, t5(t5_ids).last_hidden_state) <= TOL
    # A whole-CLIP config.json (openai/clip-vit-large-patch14) nests the text tower's config.
    assert clip_overrides({"model_type": "clip", "text_config": {"num_attention_heads": 12, "model_type":
                                                                  "clip_text_model"}})["num_attention_heads"] == 12
