"""LoRA-Encoder (flux_core.lora_encoder, flux_core.models.lora_encoder) against DiffSynth-Studio 2.1.12's own
FluxLoRAEncoder, FluxLoRALoader and FluxImageUnit_LoRAEncode: the published parameter names, the tokens of LoRAs
in three formats, what the pipeline appends, detection, and every input error."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux_core.adapters import DiTCall
from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs
from flux_core.loading.files import CheckpointError, open_state_dict
from flux_core.loading.loader import detect, load_model
from flux_core.lora_encoder import (LoraEncoderInputError, check_lora_encoder_inputs, encode_loras,
                                    lora_encoder_adapter)
from flux_core.model_config import ModelConfig
from flux_core.models.lora_encoder import FluxLoraEncoder, LoraEncoderParams
from tests.tiny_dit import make_diffusers_dit, write_bfl_dit
from tests.tiny_lora_models import diffsynth_encoder, write_site_lora, write_state_dict

FORMATS = ("kohya", "diffusers", "diffsynth")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.diffsynth_ref import diffsynth_lora_models
    _, _, loader = diffsynth_lora_models()   # skips without diffsynth
    tmp = tmp_path_factory.mktemp("lora_encoder")
    their = diffsynth_encoder(seed=0)
    path = write_state_dict(their, tmp / "model.safetensors")
    dit = load_model(write_bfl_dit(make_diffusers_dit(seed=1), tmp / "dit.safetensors"), config={"axes_dim": (4, 6, 6)},
                     torch_dtype=torch.float32, kind="dit")
    loras = {fmt: write_site_lora(tmp / f"{fmt}.safetensors", fmt, seed=10 + i, alpha=2.0)
             for i, fmt in enumerate(FORMATS)}
    return types.SimpleNamespace(tmp=tmp, their=their, path=path, loader=loader, dit=dit, loras=loras,
                                 ours=load_model(path, torch_dtype=torch.float32, kind="lora_encoder"))


def their_input(tiny, path: Path) -> dict:
    """What DiffSynth's LoRA-Encoder unit gives its encoder: the file through FluxLoRALoader.convert_state_dict (which
    scales tensors in place: fed copies)."""
    sd = {k: v.clone() for k, v in load_file(str(path)).items()}
    return tiny.loader(torch_dtype=torch.float32, device="cpu").convert_state_dict(sd)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_default_sizes_are_the_published_models_names_and_shapes():
    """FluxLoraEncoder() / FluxLoraPatcher() have exactly the parameter names and shapes of DiffSynth's real classes
    (what the published LoRA-Encoder-FLUX.1-Dev and LoRAFusion-preview-FLUX.1-dev files hold)."""
    from flux_core.models.lora_patcher import FluxLoraPatcher
    from tests.diffsynth_ref import lora_model_key_names
    encoder, patcher = lora_model_key_names()
    with torch.device("meta"):
        assert {k: tuple(v.shape) for k, v in FluxLoraEncoder().state_dict().items()} == encoder
        assert {k: tuple(v.shape) for k, v in FluxLoraPatcher().state_dict().items()} == patcher
    assert len(LoraEncoderParams().sites) == 19 * 10 + 38 * 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokens_match_diffsynths_encoder_for_each_lora_format(tiny, fmt):
    """The same LoRA file: DiffSynth's loader conversion + its FluxLoRAEncoder forward vs ours (lora_tools reading +
    our encoder)."""
    with torch.no_grad():
        expected = tiny.their(their_input(tiny, tiny.loras[fmt]))
        got = encode_loras(tiny.ours, check_lora_encoder_inputs(str(tiny.loras[fmt]), tiny.ours, tiny.dit))
        other = encode_loras(tiny.ours, check_lora_encoder_inputs(str(tiny.loras["kohya" if fmt != "kohya" else
                                                                                  "diffsynth"]), tiny.ours, tiny.dit))
    assert got.shape == expected.shape == (1, 1, 32)
    # Measured 1.5e-7 (kohya: DiffSynth scales down and up by sqrt(alpha/rank), we scale up by alpha/rank) and 0 for
    # the others, relative to tokens up to 1.6; another LoRA's tokens differ by 3.2e-2 to 7.1e-2 relative. (Each site's input is
    # LayerNorm'ed, so a per-site scale such as alpha moves the tokens only through the norm's eps.)
    assert relative(got, expected) < 1e-4
    assert relative(other, expected) > 1e-2


def test_pipeline_unit_appends_scaled_tokens_of_every_lora_to_the_positive_prompt_only(tiny):
    """DiffSynth's FluxImageUnit_LoRAEncode (paths -> tokens of each LoRA, concatenated, times lora_encoder_scale,
    appended to the positive prompt_emb with zero text ids) vs our adapter's contribution to each branch."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_LoRAEncode
    paths = [str(tiny.loras["kohya"]), str(tiny.loras["diffusers"])]
    g = torch.Generator().manual_seed(0)
    prompt = PromptEmbeds(torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g))
    fake = types.SimpleNamespace(lora_encoder=tiny.their, torch_dtype=torch.float32, device="cpu",
                                 load_models_to_device=lambda names: None)
    with torch.no_grad():
        _, posi, nega = FluxImageUnit_LoRAEncode().process(
            fake, {"lora_encoder_inputs": paths, "lora_encoder_scale": 0.7},
            {"prompt_emb": prompt.prompt_emb.clone(), "text_ids": torch.zeros(1, 5, 3)}, {})
        adapter = lora_encoder_adapter(tiny.ours, check_lora_encoder_inputs(paths, tiny.ours, tiny.dit), 0.7, tiny.dit)
        inputs = prepare_dit_inputs(torch.randn(1, 16, 4, 4, generator=g), 0.5, prompt, 3.5, torch.float32)
        positive = adapter.contribute(inputs, DiTCall(branch="positive"))
    assert "prompt_emb" not in nega
    assert adapter.contribute(inputs, DiTCall(branch="negative")) is None
    assert positive.txt.shape == posi["prompt_emb"].shape == (1, 7, 32)
    # Measured 5.2e-8 relative (the appended tokens; the prompt part is copied).
    assert relative(positive.txt, posi["prompt_emb"]) < 1e-4
    assert torch.equal(positive.txt_ids, posi["text_ids"])


@pytest.mark.parametrize("prefix", ["", "lora_encoder.", "pipe.lora_encoder."])
def test_detected_as_the_lora_encoder_with_or_without_diffsynths_prefixes(tiny, prefix):
    path = write_state_dict(tiny.their, tiny.tmp / f"prefixed_{prefix or 'none'}.safetensors", prefix=prefix)
    found = detect(open_state_dict([path]))
    assert [(d.kind.name, d.layout) for d in found] == [("lora_encoder", "diffsynth")]
    model = load_model(path, torch_dtype=torch.float32)
    assert isinstance(model, FluxLoraEncoder)
    assert torch.equal(model.special_embeds, tiny.their.special_embeds)


def test_heads_default_to_diffsynths_128_wide_and_can_be_given(tiny):
    """The head count is not in the shapes: 128-wide heads (DiffSynth's) unless config says otherwise."""
    narrow = diffsynth_encoder(seed=1, heads=2, head_dim=16)
    path = write_state_dict(narrow, tiny.tmp / "narrow.safetensors")
    with pytest.raises(CheckpointError, match=r"attention is 32 wide, not a multiple of DiffSynth's 128-wide heads: "
                                              r"pass config=\{'num_heads': n\}"):
        load_model(path, torch_dtype=torch.float32, kind="lora_encoder")
    ours = load_model(path, torch_dtype=torch.float32, kind="lora_encoder", config={"num_heads": 2})
    assert (ours.params.num_heads, ours.params.head_dim) == (2, 16) and tiny.ours.params.num_heads == 2
    with torch.no_grad():
        expected = narrow(their_input(tiny, tiny.loras["kohya"]))
        got = encode_loras(ours, check_lora_encoder_inputs(str(tiny.loras["kohya"]), ours, tiny.dit))
        one_head = load_model(path, torch_dtype=torch.float32, kind="lora_encoder", config={"num_heads": 1})
        wrong = encode_loras(one_head, check_lora_encoder_inputs(str(tiny.loras["kohya"]), one_head, tiny.dit))
    # Measured 3.1e-7; one head instead of two moves the tokens by 2.4e-2 relative.
    assert relative(got, expected) < 1e-4
    assert relative(wrong, expected) > 1e-3


def test_inputs_may_be_paths_model_configs_and_lora_files(tiny):
    from lora_tools import read_lora
    path = tiny.loras["diffsynth"]
    loras = check_lora_encoder_inputs([str(path), ModelConfig(path=str(path)), read_lora(path), Path(path)], tiny.ours,
                                      tiny.dit)
    with torch.no_grad():
        tokens = encode_loras(tiny.ours, loras)
    assert tokens.shape == (1, 4, 32)
    assert all(torch.equal(tokens[:, i], tokens[:, 0]) for i in range(4))


def test_a_lora_missing_sites_and_a_lora_of_another_model_are_named_in_one_error(tiny, tmp_path):
    partial = write_site_lora(tmp_path / "partial.safetensors", "kohya", seed=5,
                              drop=("single_blocks.1.linear2", "double_blocks.0.txt_mlp.0"))
    from tests.tiny_lora import random_pairs, write_kohya
    big = write_kohya(tmp_path / "big.safetensors",
                      random_pairs({"double_blocks.0.img_attn.qkv": (192, 64), "double_blocks.0.img_attn.proj": (64, 64)},
                                   seed=0))
    with pytest.raises(LoraEncoderInputError) as e:
        check_lora_encoder_inputs([str(tiny.loras["kohya"]), str(partial), str(big), 7], tiny.ours, tiny.dit)
    message = str(e.value)
    assert "lora_encoder_inputs[0]" not in message
    assert (f"lora_encoder_inputs[1]: {partial} has LoRAs on 24 of the 26 layers the LoRA-Encoder reads; 2 missing: "
            f"double_blocks.0.txt_mlp.0, single_blocks.1.linear2") in message
    assert f"lora_encoder_inputs[2]: {big}:" in message and "made for a different model" in message
    assert "lora_encoder_inputs[3]: is a int; pass a LoRA file path, a ModelConfig or a lora_tools.LoraFile" in message
    outside = write_kohya(tmp_path / "img_in.safetensors", random_pairs({"img_in": (32, 64)}, seed=1))
    with pytest.raises(LoraEncoderInputError, match=r"img_in.safetensors has LoRAs on 0 of the 26 layers the LoRA-Encoder "
                                                    r"reads; 26 missing: double_blocks.0.img_attn.qkv, "):
        check_lora_encoder_inputs(str(outside), tiny.ours, tiny.dit)
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs=\[\]: give at least one LoRA file"):
        check_lora_encoder_inputs([], tiny.ours, tiny.dit)
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs: .*missing.*no such file"):
        check_lora_encoder_inputs(str(tmp_path / "missing.safetensors"), tiny.ours, tiny.dit)


def test_an_encoder_made_for_another_dit_is_refused(tiny, tmp_path):
    small = load_model(write_bfl_dit(make_diffusers_dit(seed=1, num_layers=1, joint_attention_dim=48),
                                     tmp_path / "small.safetensors"), config={"axes_dim": (4, 6, 6)},
                       torch_dtype=torch.float32, kind="dit")
    with pytest.raises(LoraEncoderInputError, match=r"the LoRA-Encoder does not fit this DiT: its tokens are 32 wide but "
                                                    r"the DiT's text tokens 48; 10 sites of the LoRA-Encoder that the "
                                                    r"DiT does not have: blocks.1.attn.a_to_qkv"):
        check_lora_encoder_inputs(str(tiny.loras["kohya"]), tiny.ours, small)


# ---------------------------------------------------------------------------------------------------------- pipeline

H_PX, W_PX = 48, 64
SIGMAS = [1.0, 0.75, 0.5, 0.25]
RUN = dict(prompt="a cat", height=H_PX, width=W_PX, sigmas=SIGMAS, embedded_guidance=3.5, t5_sequence_length=16,
           output_type="latent", progress_bar_cmd=None)


@pytest.fixture(scope="module")
def pipeline(tiny):
    from flux_core.pipeline import FluxImagePipeline
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    ref = make_diffusers_pipeline(tiny.tmp)
    folder = ModelConfig(path=str(tiny.tmp / FOLDER_NAME))
    with_encoder = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        folder, ModelConfig(path=str(tiny.path))])
    without = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[folder])
    return types.SimpleNamespace(ref=ref, pipe=with_encoder, without=without)


def noise(seed=0):
    return torch.randn(1, 16, H_PX // 8, W_PX // 8, generator=torch.Generator().manual_seed(seed))


def test_from_pretrained_puts_the_encoder_in_its_slot(pipeline):
    assert isinstance(pipeline.pipe.lora_encoder, FluxLoraEncoder)
    assert pipeline.pipe.loaded_from["lora_encoder"].kind == "lora_encoder"


def test_lora_encoder_inputs_without_an_encoder_or_with_a_bad_lora_are_refused_before_any_model_runs(tiny, pipeline,
                                                                                                     tmp_path):
    with pytest.raises(RuntimeError, match=r"lora_encoder_inputs need a LoRA-Encoder, but the pipeline has none"):
        pipeline.without(latents=noise(), lora_encoder_inputs=str(tiny.loras["kohya"]), **RUN)
    partial = write_site_lora(tmp_path / "partial.safetensors", "diffsynth", seed=5, drop=("double_blocks.1.img_mlp.2",))
    with pytest.raises(LoraEncoderInputError, match=r"lora_encoder_inputs\[1\]: .*partial.safetensors has LoRAs on 25 "
                                                    r"of the 26 layers the LoRA-Encoder reads; 1 missing: "
                                                    r"double_blocks.1.img_mlp.2"):
        pipeline.pipe(latents=noise(), lora_encoder_inputs=[str(tiny.loras["kohya"]), str(partial)], **RUN)


def test_scale_zero_tokens_still_join_the_prompt_and_the_scale_steers_the_run(tiny, pipeline):
    x = noise(1)
    plain = pipeline.pipe(latents=x, **RUN)
    zero = pipeline.pipe(latents=x, lora_encoder_inputs=str(tiny.loras["kohya"]), lora_encoder_scale=0.0, **RUN)
    one = pipeline.pipe(latents=x, lora_encoder_inputs=str(tiny.loras["kohya"]), lora_encoder_scale=1.0, **RUN)
    # Zero tokens with zero ids still take part in the attention (as in DiffSynth), so scale 0 is not the plain run
    # (measured 0.11 apart); scale 1 moves the latents by a further 0.14.
    assert (zero - plain).abs().max().item() > 1e-2
    assert (one - zero).abs().max().item() > 1e-2


@pytest.mark.slow
def test_run_with_true_cfg_matches_diffsynths_unit_and_loop(tiny, pipeline):
    """Two LoRAs (kohya, diffusers) at lora_encoder_scale 0.8 under true CFG: DiffSynth's FluxImageUnit_LoRAEncode on
    diffusers' prompt encoding of the same tiny encoders (tokens on the positive branch only) and its
    model_fn_flux_image per step and branch, Euler steps over SIGMAS, against our pipeline on the same files."""
    from diffsynth.pipelines.flux_image import FluxImageUnit_LoRAEncode
    from tests.diffsynth_ref import diffsynth_flux, tiny_diffsynth_dit
    from tests.tiny_dit import diffsynth_state_dict
    model_fn, _, _ = diffsynth_flux()
    paths, x, cfg = [str(tiny.loras["kohya"]), str(tiny.loras["diffusers"])], noise(2), 2.0
    got = pipeline.pipe(latents=x, lora_encoder_inputs=paths, lora_encoder_scale=0.8, cfg_scale=cfg,
                        negative_prompt="blurry", **RUN)
    without = pipeline.pipe(latents=x, cfg_scale=cfg, negative_prompt="blurry", **RUN)
    their_dit = tiny_diffsynth_dit()
    their_dit.load_state_dict(diffsynth_state_dict(pipeline.ref.transformer), strict=True)
    fake = types.SimpleNamespace(lora_encoder=tiny.their, torch_dtype=torch.float32, device="cpu",
                                 load_models_to_device=lambda names: None)
    with torch.no_grad():
        sides = {}
        for side, prompt in (("posi", RUN["prompt"]), ("nega", "blurry")):
            emb, pooled, _ = pipeline.ref.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=16)
            sides[side] = {"prompt_emb": emb, "pooled_prompt_emb": pooled, "text_ids": torch.zeros(1, emb.shape[1], 3)}
        _, sides["posi"], sides["nega"] = FluxImageUnit_LoRAEncode().process(
            fake, {"lora_encoder_inputs": paths, "lora_encoder_scale": 0.8}, sides["posi"], sides["nega"])
        assert sides["posi"]["prompt_emb"].shape[1] == 18 and sides["nega"]["prompt_emb"].shape[1] == 16
        latents, sigmas = x.clone(), SIGMAS + [0.0]
        for step, sigma in enumerate(SIGMAS):
            preds = {side: model_fn(dit=their_dit, latents=latents, timestep=torch.tensor([sigma * 1000]),
                                    guidance=torch.tensor([3.5]), **kw) for side, kw in sides.items()}
            v = preds["nega"] + cfg * (preds["posi"] - preds["nega"])
            latents = latents + v * (sigmas[step + 1] - sigma)
    # Measured 1.9e-6 on latents up to 5.5; the LoRA tokens move them by 0.37.
    assert (got - latents).abs().max().item() < 1e-4
    assert (got - without).abs().max().item() > 1e-2
