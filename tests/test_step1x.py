"""Step1X-Edit: the connector and the embedding against DiffSynth-Studio 2.1.12's own code, loading by key signature,
and a whole pipeline run against DiffSynth's model_fn loop.

The real Qwen2.5-VL processor files are not available offline: the processor here is tests/tiny_qwen_vl.py's, built
in the test (a byte-level tokenizer keeping the real ids of the special tokens and of “ ”). DiffSynth's
Step1xEditEmbedder runs on it with two adaptations, both outside the math: its model is handed over in the shape it
reads (`.model` = transformers' Qwen2_5_VLModel, `.config.hidden_size`), and its text-only processor calls go to the
tokenizer (transformers 5 refuses a text-only processor call holding an image token; the transformers 4 processor
DiffSynth was written for tokenized such text with its tokenizer).
"""
from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import save_file

from flux_core.loading.loader import load_model
from flux_core.model_config import ModelConfig
from flux_core.models.step1x_connector import ConnectorParams, Step1XConnector
from flux_core.pipeline import FluxImagePipeline
from flux_core.step1x import MAX_LENGTH, PREFIX_TOKENS, STEP1X_INSTRUCTION, quoted_pieces, step1x_embedding, \
    step1x_encoder
from flux_core.dit_inputs import DiTCall
from tests.diffsynth_ref import diffsynth_flux, tiny_diffsynth_dit
from tests.tiny_dit import bfl_state_dict, make_diffusers_dit
from tests.tiny_qwen_vl import (flat_config, make_processor, make_qwen_vl, published_state_dict, sample_image,
                                write_qwen_vl_folder)
from tests.tiny_vae import make_diffusers_vae, reference_encode_image, write_bfl_file, TINY_NORM_GROUPS

# A DiT with FLUX's head size (its RoPE axes then need no config), no guidance embedder, CLIP's pooled width 768
# (the connector's pooled output) and a 32-wide text input (the tiny connector's).
STEP1X_DIT = dict(guidance_embeds=False, pooled_projection_dim=768, attention_head_dim=128, num_attention_heads=1,
                  axes_dims_rope=(16, 56, 56))
DIFFSYNTH_PREFIX = 217   # what Step1xEditEmbedder drops (its literal `emb[0, 217:]`), for slicing its hidden states
PROMPTS = ['make the sign say "OPEN 24/7" in red', "it's a cat, not a dog"]


def diffsynth_step1x():
    """(DiffSynth's Qwen2Connector class, its Step1xEditEmbedder class, its connector converter)."""
    diffsynth_flux()
    from diffsynth.models.step1x_connector import Qwen2Connector
    from diffsynth.models.step1x_text_encoder import Step1xEditEmbedder
    from diffsynth.utils.state_dict_converters.step1x_connector import Qwen2ConnectorStateDictConverter
    return Qwen2Connector, Step1xEditEmbedder, Qwen2ConnectorStateDictConverter


def tiny_reference_connector(in_channels=16, hidden=32, heads=4, seed=0) -> torch.nn.Module:
    """DiffSynth's own Qwen2Connector (it takes its sizes; pooled width is its fixed 768), random float32 weights."""
    connector_cls, _, _ = diffsynth_step1x()
    torch.manual_seed(seed)
    ref = connector_cls(in_channels=in_channels, hidden_size=hidden, heads_num=heads, depth=2,
                        dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():  # zero-initialised gates would hide the blocks
            p.normal_(0.0, 0.2)
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


class _Recorder(torch.nn.Module):
    """Stands for DiffSynth's QwenImageTextEncoder: `.model` runs transformers' model and records the input ids and
    the float32 last hidden state DiffSynth slices."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = types.SimpleNamespace(hidden_size=model.config.text_config.hidden_size,
                                            output_attentions=False, output_hidden_states=False)
        self.calls = []
        outer = self

        class Model(torch.nn.Module):
            def forward(self, input_ids=None, **kwargs):
                out = outer.inner(input_ids=input_ids, attention_mask=kwargs["attention_mask"],
                                  pixel_values=kwargs["pixel_values"], image_grid_thw=kwargs["image_grid_thw"],
                                  output_hidden_states=True)
                outer.calls.append((input_ids.clone(), kwargs["attention_mask"].clone(), out.hidden_states[-1]))
                return out
        self.model = Model()


class _TextOnlyToTokenizer:
    """The processor, its text-only calls going to its tokenizer (module docstring)."""

    def __init__(self, processor):
        self.processor = processor

    def apply_chat_template(self, *args, **kwargs):
        return self.processor.apply_chat_template(*args, **kwargs)

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        if images is None:
            return self.processor.tokenizer(text, **kwargs)
        return self.processor(text=text, images=images, **kwargs)


def diffsynth_embedding(model, processor, prompts, image, max_length=MAX_LENGTH):
    """DiffSynth's Step1xEditEmbedder on the tiny model: (its bf16 states, its mask, the recorder)."""
    _, embedder_cls, _ = diffsynth_step1x()
    recorder = _Recorder(model)
    embedder = embedder_cls(recorder, _TextOnlyToTokenizer(processor), max_length=max_length)
    with torch.no_grad():
        states, mask = embedder(list(prompts), [image] * len(prompts))
    return states, mask, recorder


# ------------------------------------------------------------------------------------------------ connector

def test_connector_matches_diffsynth_and_loads_its_names_strictly():
    ref = tiny_reference_connector()
    sd = ref.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    ours = Step1XConnector(ConnectorParams.from_state_dict_shapes(shapes, {"heads_num": 4})).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :7], mask[1, :3] = 1, 1
    for sigma in (1.0, 0.55, 0.02):
        with torch.no_grad():
            want_tokens, want_pooled = ref(x, torch.full((2,), sigma), mask)
            tokens, pooled = ours(x, sigma, mask)
        # measured 0 (same float32 ops); a wrong head split or mask changes them by > 1e-2
        assert rel(tokens, want_tokens) <= 1e-4 and rel(pooled, want_pooled) <= 1e-4


def test_connector_key_names_are_diffsynths_full_size_ones():
    connector_cls, _, _ = diffsynth_step1x()
    with torch.device("meta"):
        full = connector_cls().state_dict()
        ours = Step1XConnector(ConnectorParams()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in full.items()}


def test_connector_heads_default_to_diffsynths_32_and_a_bad_count_is_named():
    shapes = {k: tuple(v.shape) for k, v in tiny_reference_connector(hidden=64).state_dict().items()}
    assert ConnectorParams.from_state_dict_shapes(shapes).heads == 32
    with pytest.raises(ValueError, match="heads_num"):
        ConnectorParams.from_state_dict_shapes(shapes, {"heads_num": 5})


# ------------------------------------------------------------------------------------------------ embedding

def test_quoted_pieces_split_quoted_characters_after_the_instruction():
    head = "x" * 160
    assert quoted_pieces(head + 'say "ab" now') == [head + 'say "', "“a”", "“b”", '" now']
    assert quoted_pieces(head + "it’s") == [head + "it’s"]          # ’ is not a quote
    assert quoted_pieces(head + "it's") == [head + 'it"', "“s”"]    # an apostrophe is one (as DiffSynth)
    assert quoted_pieces('"early" ' + head) == ['"early" ' + head]  # quotes of the instruction are plain


def test_embedding_matches_diffsynths_embedder():
    """Ids, states and mask as DiffSynth's Step1xEditEmbedder; with a max_length past the sequence, the padding."""
    model, processor, image = make_qwen_vl(), make_processor(), sample_image()
    for max_length in (MAX_LENGTH, 4096):
        want, want_mask, recorder = diffsynth_embedding(model, processor, PROMPTS, image, max_length)
        states, mask = step1x_embedding(model, processor, PROMPTS, image, max_length=max_length)
        assert torch.equal(mask, want_mask)
        # DiffSynth stores bfloat16: ours rounded the same way is equal (measured 0 difference)
        assert torch.equal(states.to(torch.bfloat16), want)
        for i, (_, _, hidden) in enumerate(recorder.calls):
            n = int(mask[i].sum())
            assert n == min(max_length, hidden.shape[1] - DIFFSYNTH_PREFIX)
            # float32: DiffSynth's own hidden states sliced at 217 (measured 0; one token off is > 0.1)
            assert rel(states[i, :n], hidden[0, DIFFSYNTH_PREFIX:DIFFSYNTH_PREFIX + n]) <= 1e-4
            assert not states[i, n:].any()


def test_embedding_input_ids_are_diffsynths():
    """The ids the model reads: DiffSynth's (recorded); curly quotes in the prompt are read as straight ones (the
    processor's own ids keep them as “ ” tokens, ids 2073 / 854)."""
    model, processor, image = make_qwen_vl(), make_processor(), sample_image()
    prompt = "write “HI” on it"
    _, _, recorder = diffsynth_embedding(model, processor, [prompt], image)
    seen = []
    original = model.forward

    def spy(input_ids=None, **kwargs):
        seen.append(input_ids.clone())
        return original(input_ids=input_ids, **kwargs)
    model.forward = spy
    try:
        step1x_embedding(model, processor, [prompt], image)
    finally:
        del model.forward
    assert torch.equal(seen[0], recorder.calls[0][0])
    assert 2073 not in seen[0].tolist() and 854 not in seen[0].tolist()
    straight = processor.tokenizer('"', add_special_tokens=False).input_ids[0]
    assert seen[0].tolist()[0].count(straight) >= 2


def test_prefix_constant_is_the_instruction_length_in_qwen_tokens():
    """217: the system turn and the instruction up to "User Prompt" in Qwen2.5's tokenizer (measured with the real
    vocabulary, which is not available here); the constant is what DiffSynth-Studio drops."""
    assert PREFIX_TOKENS == DIFFSYNTH_PREFIX and STEP1X_INSTRUCTION.endswith("User Prompt:")


# ------------------------------------------------------------------------------------------------ encoder

def test_encoder_runs_the_connector_at_each_sigma_with_zero_text_ids():
    model, processor, image = make_qwen_vl(), make_processor(), sample_image()
    ref = tiny_reference_connector()
    ours = Step1XConnector(ConnectorParams.from_state_dict_shapes(
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}, {"heads_num": 4})).eval()
    ours.load_state_dict(ref.state_dict())
    encoder = step1x_encoder(model, processor, ours, image, "cpu")
    assert encoder.slots == ("qwenvl",) and encoder.step_slots == ("step1x_connector",)
    positive = encoder.encode(PROMPTS[:1], "positive")
    states, mask = step1x_embedding(model, processor, PROMPTS[:1], image)
    for sigma in (0.9, 0.3):
        embeds = positive.at(DiTCall(sigma=sigma))
        with torch.no_grad():
            want_tokens, want_pooled = ref(states, torch.tensor([sigma]), mask)
        assert rel(embeds.prompt_emb, want_tokens) <= 1e-4 and rel(embeds.pooled, want_pooled) <= 1e-4
        assert embeds.text_ids is None  # all-zero text ids (flux_core.dit_inputs)
        assert positive.at(DiTCall(sigma=sigma)) is embeds   # the same call again: cached
    assert positive.tokens == MAX_LENGTH
    # transformers' Qwen2_5_VLForConditionalGeneration given instead: its base model's states
    lm = make_qwen_vl(conditional_generation=True)
    assert torch.equal(step1x_embedding(lm, processor, PROMPTS[:1], image)[0],
                       step1x_embedding(lm.model, processor, PROMPTS[:1], image)[0])
    # a prompt's embedding does not depend on the batch it is encoded with (DiffSynth encodes one by one)
    both = encoder.encode(PROMPTS, "positive")
    assert torch.equal(both.states[:1], positive.states)


# ------------------------------------------------------------------------------------------------ loading

def step1x_file(path, dit, connector) -> None:
    """step1x-edit-i1258.safetensors as published: a BFL DiT without guidance embedder, the connector under
    `connector.`."""
    sd = {k: v.contiguous() for k, v in bfl_state_dict(dit).items()}
    sd.update({"connector." + k: v.detach().clone().contiguous() for k, v in connector.state_dict().items()})
    save_file(sd, str(path))


def test_step1x_file_gives_the_dit_and_the_connector(tmp_path):
    _, _, convert = diffsynth_step1x()
    dit, ref = make_diffusers_dit(seed=1, **STEP1X_DIT), tiny_reference_connector()
    step1x_file(tmp_path / "step1x-edit-i1258.safetensors", dit, ref)
    connector = load_model(tmp_path / "step1x-edit-i1258.safetensors", kind="step1x_connector",
                           torch_dtype=torch.float32, config={"heads_num": 4})
    from safetensors.torch import load_file
    want = convert(load_file(str(tmp_path / "step1x-edit-i1258.safetensors")))   # DiffSynth's converter
    assert set(connector.state_dict()) == set(want)
    assert all(torch.equal(connector.state_dict()[k], want[k]) for k in want)
    loaded = load_model(tmp_path / "step1x-edit-i1258.safetensors", kind="dit", torch_dtype=torch.float32)
    assert not loaded.params.guidance_embed


def test_sharded_qwen_vl_folder_loads_transformers_model(tmp_path):
    lm = make_qwen_vl(seed=3, conditional_generation=True)
    folder = write_qwen_vl_folder(lm, tmp_path / "Qwen2.5-VL-tiny", shards=3)
    ours = load_model(str(folder), torch_dtype=torch.float32)
    from transformers import Qwen2_5_VLModel
    assert type(ours) is Qwen2_5_VLModel
    want = lm.model.state_dict()
    assert set(ours.state_dict()) == set(want)
    assert all(torch.equal(ours.state_dict()[k], want[k]) for k in want)
    # the rotary frequencies (not in the files) are transformers' own
    assert torch.equal(ours.language_model.rotary_emb.inv_freq, lm.model.language_model.rotary_emb.inv_freq)


def test_qwen_vl_without_config_is_refused_with_what_to_add(tmp_path):
    folder = write_qwen_vl_folder(make_qwen_vl(), tmp_path / "q", with_config=False, with_processor=False)
    from flux_core.loading.files import CheckpointError
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(folder), torch_dtype=torch.float32)


def test_nexus_gen_ar_model_is_not_a_plain_qwen_vl():
    from flux_core.loading.qwen_vl_kind import select_qwen_vl
    from flux_core.loading.lazy import LazyTensor
    keys = ["model.embed_tokens.weight", "visual.patch_embed.proj.weight", "model.norm.weight"]
    sd = {k: LazyTensor((2, 2), torch.float32, lambda: torch.zeros(2, 2), k) for k in keys}
    assert select_qwen_vl(sd) is not None
    for extra in ("image_prefill_embeds.weight", "vision_head.weight"):
        assert select_qwen_vl({**sd, extra: sd[keys[0]]}) is None


# ------------------------------------------------------------------------------------------------ pipeline

def step1x_models(tmp_path):
    """Tiny Step1X-Edit files: the DiT+connector file, a Qwen2.5-VL folder, a VAE; and the reference modules."""
    dit = make_diffusers_dit(seed=1, **STEP1X_DIT)
    connector = tiny_reference_connector(in_channels=16, hidden=32, heads=32)
    lm = make_qwen_vl(seed=2, conditional_generation=True)
    vae = make_diffusers_vae(seed=4)
    step1x_file(tmp_path / "step1x-edit-i1258.safetensors", dit, connector)
    write_qwen_vl_folder(lm, tmp_path / "Qwen2.5-VL-7B-Instruct")
    write_bfl_file(vae, tmp_path / "vae.safetensors")
    configs = [ModelConfig(path=str(tmp_path / "step1x-edit-i1258.safetensors")),
               ModelConfig(path=str(tmp_path / "Qwen2.5-VL-7B-Instruct")),
               ModelConfig(path=str(tmp_path / "vae.safetensors"))]
    return configs, dict(dit=dit, connector=connector, qwen=lm.model, vae=vae)


def load_step1x_pipeline(configs, tmp_path):
    from flux_core.loading.loader import load_model as load
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = load(configs[0].path, kind="dit", torch_dtype=torch.float32)
    pipe.step1x_connector = load(configs[0].path, kind="step1x_connector", torch_dtype=torch.float32)
    pipe.qwenvl = load(configs[1].path, torch_dtype=torch.float32)
    pipe.vae = load(configs[2].path, kind="vae", torch_dtype=torch.float32, config={"norm_groups": TINY_NORM_GROUPS})
    pipe.qwenvl_processor = make_processor()
    return pipe


def diffsynth_run(models, image, prompt, negative, sigmas, noise, cfg_scale):
    """DiffSynth's Step1X unit and model_fn loop: the embedder's states (its float32 hidden states, sliced as it
    slices them), its connector and DiT in model_fn_flux_image, true CFG, Euler steps."""
    model_fn, convert, _ = diffsynth_flux()
    dit = tiny_diffsynth_dit(dim=128, heads=1, axes=(16, 56, 56), guidance=False, pooled_dim=768)
    dit.load_state_dict(convert(bfl_state_dict(models["dit"])), strict=True)
    processor = make_processor()
    _, mask, recorder = diffsynth_embedding(models["qwen"], processor, [prompt, negative], image)
    states = torch.zeros(2, MAX_LENGTH, 16)
    for i, (_, _, hidden) in enumerate(recorder.calls):
        n = int(mask[i].sum())
        states[i, :n] = hidden[0, DIFFSYNTH_PREFIX:DIFFSYNTH_PREFIX + n]
    reference_latents = reference_encode_image(models["vae"], image)
    x = noise.clone()
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            t = torch.tensor([sigma * 1000.0])
            common = dict(dit=dit, step1x_connector=models["connector"], latents=x, timestep=t,
                          step1x_reference_latents=reference_latents)
            posi = model_fn(**common, step1x_llm_embedding=states[:1], step1x_mask=mask[:1])
            nega = model_fn(**common, step1x_llm_embedding=states[1:], step1x_mask=mask[1:])
            v = nega + cfg_scale * (posi - nega)
            x = x + ((sigmas[i + 1] if i + 1 < len(sigmas) else 0.0) - sigma) * v
    return x


@pytest.mark.slow
def test_pipeline_matches_diffsynths_step1x_loop(tmp_path):
    configs, models = step1x_models(tmp_path)
    pipe = load_step1x_pipeline(configs, tmp_path)
    image = sample_image(64, 48)   # the size of the output: DiffSynth keeps the first half of the tokens
    sigmas = [1.0, 0.6, 0.3]
    noise = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5))
    ours = pipe(prompt=PROMPTS[0], negative_prompt="blurry", cfg_scale=6.0, step1x_reference_image=image,
                height=48, width=64, latents=noise, sigmas=sigmas, output_type="latent", progress_bar_cmd=None)
    want = diffsynth_run(models, image, PROMPTS[0], "blurry", sigmas, noise, 6.0)
    # measured ~1e-6 (float32 op order); the reference tokens at index 1 instead of 0 change it by > 1e-2
    assert rel(ours, want) <= 1e-4


def test_step1x_request_without_its_vl_model_names_the_slots(tmp_path):
    configs, _ = step1x_models(tmp_path)
    pipe = load_step1x_pipeline(configs, tmp_path)
    pipe.qwenvl = pipe.qwenvl_processor = pipe.step1x_connector = None
    with pytest.raises(RuntimeError, match="qwenvl, qwenvl_processor, step1x_connector"):
        pipe(prompt="x", step1x_reference_image=sample_image(), height=48, width=64, output_type="latent")


def test_a_step1x_pipeline_called_without_the_image_to_edit_says_so(tmp_path):
    configs, _ = step1x_models(tmp_path)
    pipe = load_step1x_pipeline(configs, tmp_path)
    with pytest.raises(ValueError, match=r"Step1X-Edit's Qwen2\.5-VL and no T5: .* pass step1x_reference_image="):
        pipe(prompt="x", height=48, width=64, output_type="latent")


# ------------------------------------------------------------------------------------------------ processor

def test_processor_is_found_beside_the_qwen_model(tmp_path):
    from flux_core.pipeline_models import STEP1X_PROCESSOR, load_processor
    folder = write_qwen_vl_folder(make_qwen_vl(), tmp_path / "Qwen2.5-VL-7B-Instruct")
    shards = sorted(str(p) for p in folder.glob("model-*.safetensors"))
    processor = load_processor(STEP1X_PROCESSOR, None, shards, str(tmp_path / "models"))
    assert processor.image_processor.size.shortest_edge == 256 * 28 * 28   # DiffSynth's min_pixels / max_pixels
    assert processor.image_processor.size.longest_edge == 324 * 28 * 28
    assert processor.tokenizer("“", add_special_tokens=False).input_ids == [2073]


def test_missing_processor_files_are_a_clear_error(tmp_path, monkeypatch):
    from flux_core.pipeline_models import STEP1X_PROCESSOR, ProcessorNotFoundError, processor_folder
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    folder = write_qwen_vl_folder(make_qwen_vl(), tmp_path / "q", with_processor=False)
    with pytest.raises(ProcessorNotFoundError) as e:
        processor_folder(STEP1X_PROCESSOR, None, str(folder), str(tmp_path / "models"))
    message = str(e.value)
    assert "step1x_processor_config=" in message and str(folder) in message
    assert "preprocessor_config.json" in message and "Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert "skip_download" in message
    assert len(e.value.searched) == 4   # the model's folder, its parent, grandparent, the default model


def test_a_step1x_pipeline_does_not_warn_about_clip_and_t5():
    from flux_core.pipeline_models import empty_slots
    loaded = {slot: object() for slot in ("dit", "vae", "qwenvl", "step1x_connector")}
    assert empty_slots(loaded) == []
    assert empty_slots({"dit": 1, "vae": 1, "qwenvl": 1}) == ["step1x_connector"]
    assert empty_slots({"dit": 1, "vae": 1}) == ["text_encoder_1", "text_encoder_2"]


def test_from_pretrained_finds_the_dit_and_the_connector_in_one_file(tmp_path):
    """What from_pretrained's plan detects in step1x-edit-i1258.safetensors and in a Qwen2.5-VL folder's shards."""
    from flux_core.pipeline_models import MODEL_SLOTS, detect_components
    configs, _ = step1x_models(tmp_path)
    found = {kind: layout for _, kind, _, layout in detect_components(configs[0].path)}
    assert found == {"dit": "bfl", "step1x_connector": "step1x"}
    shards = sorted(str(p) for p in (tmp_path / "Qwen2.5-VL-7B-Instruct").glob("model-*.safetensors"))
    assert [(k, layout) for _, k, _, layout in detect_components(shards)] == [("qwen_vl", "hf")]
    assert MODEL_SLOTS["qwen_vl"] == "qwenvl" and MODEL_SLOTS["step1x_connector"] == "step1x_connector"


@pytest.mark.slow
@pytest.mark.parametrize("vram_limit", [None, 0])
def test_vram_managed_pipeline_gives_the_same_step1x_result(tmp_path, vram_limit):
    """Qwen2.5-VL (transformers' modules) and the connector under the VRAM manager: resident (no limit) or every layer
    streamed (vram_limit=0); the same latent as unmanaged, and nothing of Qwen2.5-VL left on the device after
    encoding."""
    from flux_core.vram import SimulatedDevice
    configs, _ = step1x_models(tmp_path)
    pipe = load_step1x_pipeline(configs, tmp_path)
    args = dict(prompt=PROMPTS[0], negative_prompt="blurry", cfg_scale=6.0, step1x_reference_image=sample_image(64, 48),
                height=48, width=64, latents=torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5)),
                sigmas=[1.0, 0.5], output_type="latent", progress_bar_cmd=None)
    unmanaged = pipe(**args)
    device = SimulatedDevice()
    vram = pipe.enable_vram_management(vram_limit=vram_limit, vram_buffer=0.0, device=device)
    assert {"qwenvl", "step1x_connector"} <= set(vram.models)
    during_steps = []

    def callback(step, total, latents):   # what is resident while the DiT denoises
        during_steps.append((bool(vram.models["qwenvl"].resident), bool(vram.models["step1x_connector"].resident)))
    managed = pipe(**args, callback=callback)
    # Qwen2.5-VL moved out after encoding; the connector resident with the DiT (when the budget allows any)
    assert during_steps == [(False, vram_limit is None)] * 2
    # measured 0 (the same float32 weights, only moved); the connector at the wrong sigma changes it by > 1e-2
    assert (managed - unmanaged).abs().max() <= 1e-5
    assert device.live_bytes == 0   # everything moved out after the run


@pytest.mark.slow
def test_from_pretrained_loads_a_step1x_pipeline_and_it_runs(tmp_path, monkeypatch, caplog):
    """The published files through from_pretrained: the DiT and the connector from one file, Qwen2.5-VL with the
    processor beside it, the VAE (here a diffusers folder: the tiny one's norm groups are in its config.json); no
    CLIP-L / T5 and no warning about them; the run equals the hand-assembled pipeline's."""
    import logging
    from tests.tiny_vae import write_diffusers_folder
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")   # nothing may be fetched
    configs, models = step1x_models(tmp_path)
    write_diffusers_folder(models["vae"], tmp_path / "vae")
    with caplog.at_level(logging.WARNING, logger="flux_core.pipeline"):
        pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            configs[0], configs[1], ModelConfig(path=str(tmp_path / "vae"))])
    assert not [r for r in caplog.records if "no model for" in r.getMessage()]
    assert {s: type(getattr(pipe, s)).__name__ for s in ("dit", "step1x_connector", "qwenvl")} == {
        "dit": "FluxDiT", "step1x_connector": "Step1XConnector", "qwenvl": "Qwen2_5_VLModel"}
    assert pipe.qwenvl_processor.image_processor.size.shortest_edge == 256 * 28 * 28
    args = dict(prompt=PROMPTS[0], negative_prompt="blurry", cfg_scale=6.0, step1x_reference_image=sample_image(64, 48),
                height=48, width=64, latents=torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(5)),
                sigmas=[1.0, 0.5], output_type="latent", progress_bar_cmd=None)
    assert torch.equal(pipe(**args), load_step1x_pipeline(configs, tmp_path)(**args))


def test_a_plan_with_qwen_vl_and_no_clip_t5_needs_no_tokenizers_but_one_with_t5_does(tmp_path, monkeypatch):
    from flux_core.model_config import ModelFileError
    from flux_core.pipeline_models import plan_models
    from tests.tiny_text import make_t5, write_t5
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    configs, _ = step1x_models(tmp_path)
    assert plan_models(configs[:2], local_model_path=str(tmp_path / "models")).tokenizers == {}
    t5 = write_t5(make_t5(), tmp_path / "t5", "hf_sharded")
    with pytest.raises(ModelFileError, match="T5 tokenizer") as e:
        plan_models(configs[:2] + [ModelConfig(path=str(t5))], local_model_path=str(tmp_path / "models"))
    assert "CLIP-L tokenizer" not in str(e.value)


def test_fp8_stored_qwen_vl_encodes_under_the_vram_manager(tmp_path):
    """FP8 storage (offload_dtype=torch.float8_e4m3fn) of transformers' Qwen2.5-VL, every layer streamed: it runs, the
    patch embedding computes from bf16 pixels, and the states stay near the bf16 model's."""
    from flux_core.vram import SimulatedDevice, VRAMManager
    folder = write_qwen_vl_folder(make_qwen_vl(seed=6, conditional_generation=True), tmp_path / "q")
    processor, image = make_processor(), sample_image()
    plain = load_model(str(folder), torch_dtype=torch.bfloat16)
    stored = load_model(str(folder), torch_dtype=torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    assert stored.language_model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert stored.visual.patch_embed.proj.weight.dtype == torch.bfloat16   # its values are FP8's (finalize)
    vram = VRAMManager(SimulatedDevice(), budget=0)
    vram.add("qwenvl", stored, torch.bfloat16)
    vram.load_models_to_device(["qwenvl"])
    want, _ = step1x_embedding(plain, processor, PROMPTS[:1], image)
    got, _ = step1x_embedding(stored, processor, PROMPTS[:1], image)
    # measured 0.12 relative (FP8's 3-bit mantissa on every weight of a random tiny model); the pixels cast to FP8
    # instead fail in the convolution
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 0.25


def test_the_published_7b_builds_from_its_shapes_as_diffsynths_config_says():
    """Without config.json: the 7B's shapes give DiffSynth-Studio's QwenImageTextEncoder config (its literal copy of
    Qwen2.5-VL-7B-Instruct's), and its size: 7.75 G parameters, 14.4 GiB in bf16, 7.2 GiB with FP8 weight matrices."""
    diffsynth_flux()
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from flux_core.loading.qwen_vl_kind import qwen_vl_config, select_qwen_vl
    from flux_core.loading.lazy import LazyTensor
    with torch.device("meta"):
        theirs = QwenImageTextEncoder()
    sd = {k: LazyTensor(tuple(v.shape), v.dtype, None, k) for k, v in theirs.state_dict().items()}
    layout, ours_sd = select_qwen_vl(sd)
    assert layout == "transformers5"
    ours = qwen_vl_config({k: v.shape for k, v in ours_sd.items()}, {})
    want = theirs.config
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "num_hidden_layers",
                  "vocab_size", "rms_norm_eps"):
        assert getattr(ours.text_config, field) == getattr(want.text_config, field), field
    assert ours.text_config.rope_parameters["mrope_section"] == want.text_config.rope_parameters["mrope_section"]
    assert ours.text_config.rope_parameters["rope_theta"] == want.text_config.rope_parameters["rope_theta"]
    for field in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "window_size",
                  "fullatt_block_indexes", "patch_size", "spatial_merge_size", "temporal_patch_size"):
        assert getattr(ours.vision_config, field) == getattr(want.vision_config, field), field
    params = [v for k, v in ours_sd.items()]
    total = sum(v.numel() for v in params)
    matrices = sum(v.numel() for v in params if len(v.shape) >= 2)
    assert round(total / 1e9, 2) == 7.75
    assert round(2 * total / 2**30, 1) == 14.4 and round((matrices + 2 * (total - matrices)) / 2**30, 1) == 7.2


def test_comfyui_scaled_fp8_single_file_loads_dequantized(tmp_path):
    """ComfyUI's text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors form: one file, the published names without the LM
    head, weight matrices as fp8(w / s) with their `scale_weight` s and the `scaled_fp8` marker."""
    lm = make_qwen_vl(seed=4, conditional_generation=True)
    sd = {k: v for k, v in published_state_dict(lm).items() if k != "lm_head.weight"}
    stored, want = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = (v.abs().max().float() / 448.0).reshape(())
            stored[k], stored[k[:-len("weight")] + "scale_weight"] = (v / scale).to(torch.float8_e4m3fn), scale
            want[k] = stored[k].float() * scale
        else:
            stored[k], want[k] = v, v
    save_file({k: v.contiguous() for k, v in stored.items()}, str(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(flat_config()))
    ours = load_model(tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors", torch_dtype=torch.float32)
    from flux_core.model_state import state_of
    assert state_of(ours).layout == "hf+scaled-fp8"
    got = ours.state_dict()
    for k, v in want.items():
        name = ("language_model." + k[len("model."):]) if k.startswith("model.") else k
        assert torch.equal(got[name], v.float()), k


def test_bf16_qwen_vl_under_the_vram_manager_keeps_its_float32_rotary_frequencies(tmp_path):
    """A managed bf16 Qwen2.5-VL (every layer streamed) gives the unmanaged model's states exactly: its float32 rotary
    `inv_freq` buffers stay float32 in each call (cast to bf16 they moved the states by 0.0625 here, and the rotary
    angles by up to a radian at the 7B's ~900 Step1X tokens)."""
    from flux_core.vram import SimulatedDevice, VRAMManager
    folder = write_qwen_vl_folder(make_qwen_vl(seed=7, conditional_generation=True), tmp_path / "q")
    processor, image = make_processor(), sample_image()
    plain = load_model(str(folder), torch_dtype=torch.bfloat16)
    managed = load_model(str(folder), torch_dtype=torch.bfloat16)
    assert any(b.dtype == torch.float32 for b in managed.buffers())
    vram = VRAMManager(SimulatedDevice(), budget=0)
    vram.add("qwenvl", managed, torch.bfloat16)
    vram.load_models_to_device(["qwenvl"])
    want, want_mask = step1x_embedding(plain, processor, PROMPTS[:1], image)
    got, mask = step1x_embedding(managed, processor, PROMPTS[:1], image)
    assert torch.equal(mask, want_mask) and torch.equal(got, want)


def test_the_memory_check_counts_step1x_tokens(tmp_path, monkeypatch):
    """The run's activation estimate counts the DiT's real sequence: 640 Qwen text tokens (not T5's 512) and the image
    to edit's tokens beside the image's."""
    from flux_core import pipeline as pipeline_module
    configs, _ = step1x_models(tmp_path)
    pipe = load_step1x_pipeline(configs, tmp_path)
    seen = []
    monkeypatch.setattr(pipeline_module, "check_run_cost", lambda *args, **kwargs: seen.append(args[3:5]))
    pipe(prompt=PROMPTS[0], step1x_reference_image=sample_image(64, 48), height=48, width=64,
         num_inference_steps=1, output_type="latent", progress_bar_cmd=None)
    (image_tokens, text_tokens), = seen
    assert text_tokens == MAX_LENGTH == 640 and image_tokens == 2 * (48 // 16) * (64 // 16)


def test_transformers_4_is_refused_naming_the_version_to_install(tmp_path, monkeypatch):
    """Qwen2.5-VL is built on transformers 5's classes: on 4.x the load says which version to install (not a failure
    deep inside transformers)."""
    import transformers
    from flux_core.loading.files import CheckpointError
    folder = write_qwen_vl_folder(make_qwen_vl(seed=1, conditional_generation=True), tmp_path / "q")
    monkeypatch.setattr(transformers, "__version__", "4.49.0")
    with pytest.raises(CheckpointError, match=r"need transformers 5 or newer, and 4\.49\.0 is installed: pip install "
                                              r"-U \"transformers>=5\""):
        load_model(str(folder), torch_dtype=torch.float32)
