"""InfiniteYou against DiffSynth-Studio 2.1.12's own code, on tiny weights in float32: its InfiniteYouImageProjector
(built at tiny sizes from its own class) loaded from the same image_proj_model.bin through its own converter, and a
whole DiT call of its `model_fn_flux_image` with its MultiControlNet around a tiny InfuseNet-shaped FluxControlNet
given `id_emb` and `infinityou_guidance`, against our DiT with ControlNetAdapter(identity=...)."""
from __future__ import annotations

import types

import pytest
import torch
from einops import rearrange

from flux_core.adapters import DiTCall, apply_adapters
from flux_core.controlnet import ControlNetAdapter
from flux_core.dit_inputs import PromptEmbeds, prepare_dit_inputs, run_dit
from flux_core.infiniteyou import identity_tokens
from flux_core.loading.loader import load_model
from tests.tiny_ipadapter import PROJECTOR, TEXT_DIM, face_embedding, projector_state_dict, write_projector

F32 = torch.float32
H, W, LT = 6, 8, 5


@pytest.fixture(scope="module")
def projectors(tmp_path_factory):
    """(ours, DiffSynth's) from one image_proj_model.bin as ByteDance publishes it."""
    from tests.diffsynth_ref import diffsynth_infiniteyou
    projector_class, convert = diffsynth_infiniteyou()
    path = write_projector(projector_state_dict(seed=3), tmp_path_factory.mktemp("iy") / "image_proj_model.bin")
    theirs = projector_class(**PROJECTOR)
    theirs.load_state_dict(convert(torch.load(path, weights_only=True)), strict=True)
    return load_model(path, torch_dtype=F32, kind="infiniteyou"), theirs.eval()


def test_identity_tokens_equal_diffsynths_projector(projectors):
    """DiffSynth's prepare_infinite_you feeds `id_emb.unsqueeze(0).reshape([1, -1, 512])` to its projector; ours
    takes the 512-d embedding through identity_tokens."""
    ours, theirs = projectors
    diffs = []
    for seed in range(3):
        embedding = face_embedding(seed)
        with torch.no_grad():
            expected = theirs(embedding.unsqueeze(0).reshape([1, -1, 512]))
            got = identity_tokens(ours, embedding, guidance=0.8)
        assert got.tokens.shape == expected.shape == (1, PROJECTOR["num_queries"], TEXT_DIM)
        assert got.guidance == 0.8
        diffs.append((got.tokens - expected).abs().max().item())
    # Measured 0 (the same operations in the same order). q and k each scaled by dim_head^-1/2 instead of
    # dim_head^-1/4 move the tokens by 4.3, keys/values from the face features without the latents by 5.2, a
    # missing feed-forward residual by 3.5.
    assert max(diffs) < 1e-4


def packed(latents):
    return rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


def ids(h, w):
    out = torch.zeros(1, (h // 2) * (w // 2), 3)
    out[0, :, 1], out[0, :, 2] = torch.arange(out.shape[1]) // (w // 2), torch.arange(out.shape[1]) % (w // 2)
    return out


@pytest.fixture(scope="module")
def infusenet(tmp_path_factory):
    """A DiT of FLUX's 19 / 38 blocks (DiffSynth spreads ControlNet residuals over a literal 19 and 38) and an
    InfuseNet-shaped ControlNet (2 double, 3 single blocks; InfuseNet has 4 / 10), ours and DiffSynth's."""
    from tests.diffsynth_ref import tiny_diffsynth_controlnet, tiny_diffsynth_dit
    from tests.tiny_controlnet import diffsynth_state_dict as controlnet_sd, make_diffusers_controlnet, \
        write_diffusers_controlnet
    from tests.tiny_dit import diffsynth_state_dict as dit_sd, make_diffusers_dit, write_diffusers_dit
    tmp = tmp_path_factory.mktemp("infusenet")
    deep = make_diffusers_dit(seed=31, num_layers=19, num_single_layers=38)
    net = make_diffusers_controlnet(seed=32, num_layers=2, num_single_layers=3)
    their_dit = tiny_diffsynth_dit(double=19, single=38)
    their_dit.load_state_dict(dit_sd(deep), strict=True)
    their_net = tiny_diffsynth_controlnet(double=2, single=3)
    their_net.load_state_dict(controlnet_sd(net), strict=True)
    dit_folder = write_diffusers_dit(deep, tmp / "transformer")   # config.json gives the tiny RoPE axes
    net_folder = write_diffusers_controlnet(net, tmp / "InfuseNetModel")
    return types.SimpleNamespace(
        dit=load_model(dit_folder, torch_dtype=F32, kind="dit"),
        net=load_model(net_folder, torch_dtype=F32, kind="controlnet"),
        their_dit=their_dit, their_net=their_net.eval(), dit_folder=dit_folder, net_folder=net_folder)


@pytest.mark.slow
@pytest.mark.parametrize("infinityou_guidance", [1.0, 0.6])
def test_dit_call_with_infusenet_equals_diffsynth(projectors, infusenet, infinityou_guidance):
    """One DiT call with the identity: DiffSynth's model_fn_flux_image (MultiControlNet over its FluxControlNet, one
    ControlNetInput(scale=0.9, processor_id="None") as its InfiniteYou example passes, id_emb from its projector,
    infinityou_guidance) against our DiT with ControlNetAdapter(identity=identity_tokens(...)). The DiT keeps the
    text prompt and its own embedded guidance (3.5); InfuseNet gets the identity tokens, zero text ids and
    infinityou_guidance."""
    from tests.diffsynth_ref import diffsynth_flux
    model_fn, _, _ = diffsynth_flux()
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet
    ours_projector, their_projector = projectors
    g = torch.Generator().manual_seed(40)
    latents, control = torch.randn(1, 16, H, W, generator=g), torch.randn(1, 16, H, W, generator=g)
    txt, pooled = torch.randn(1, LT, TEXT_DIM, generator=g), torch.randn(1, 32, generator=g)
    sigma, embedding = 0.6, face_embedding(4)
    with torch.no_grad():
        id_emb = their_projector(embedding.unsqueeze(0).reshape([1, -1, 512]))
        common = dict(dit=infusenet.their_dit, latents=latents, timestep=torch.tensor([sigma * 1000]), prompt_emb=txt,
                      pooled_prompt_emb=pooled, guidance=torch.tensor([3.5]), text_ids=torch.zeros(1, LT, 3),
                      image_ids=ids(H, W), progress_id=0, num_inference_steps=1)
        expected = model_fn(**common, controlnet=MultiControlNet([infusenet.their_net]),
                            controlnet_inputs=[TheirInput(scale=0.9, processor_id="None")],
                            controlnet_conditionings=[control], id_emb=id_emb,
                            infinityou_guidance=torch.tensor([infinityou_guidance]))
        text_conditioned = model_fn(**common, controlnet=MultiControlNet([infusenet.their_net]),
                                    controlnet_inputs=[TheirInput(scale=0.9, processor_id="None")],
                                    controlnet_conditionings=[control])

        adapter = ControlNetAdapter(name="infusenet", model=infusenet.net, control=control, dit_depth=(19, 38),
                                    scale=0.9, identity=identity_tokens(ours_projector, embedding,
                                                                        infinityou_guidance))
        inputs = prepare_dit_inputs(latents, sigma, PromptEmbeds(txt, pooled), 3.5, F32)
        got = run_dit(infusenet.dit, apply_adapters(inputs, [adapter], DiTCall(sigma=sigma)))
    # Measured 1.7e-6 and 1.9e-6 (the bound: 1e-4). The smallest mistakes it must catch: text ids of ones
    # instead of zeros for the identity tokens (moves the output by 4.2e-3), a projector scaling q and k by
    # dim_head^-1/2 (0.16); InfuseNet given the text instead of the identity moves it by 2.2, the DiT's 3.5 instead
    # of infinityou_guidance by 2.5.
    assert (got - expected).abs().max().item() < 1e-4
    assert (expected - text_conditioned).abs().max().item() > 1e-2


@pytest.mark.slow
def test_pipeline_run_with_identity_equals_diffsynths_loop(projectors, infusenet, tmp_path):
    """A whole run with true CFG: FluxImagePipeline(infinityou_id_embedding=..., infinityou_guidance=0.8,
    controlnet_inputs=[ControlNetInput(image=black, processor_id="None")]) from the DiT, VAE, text encoders, InfuseNet
    folder and image_proj_model.bin, against DiffSynth's loop: model_fn_flux_image per step and branch with its
    MultiControlNet, the identity on both branches (DiffSynth's InfiniteYou unit puts id_emb in the shared inputs),
    the black control image encoded by the same VAE (posterior mean, shifted and scaled)."""
    import numpy as np
    from PIL import Image
    from flux_core import ControlNetInput
    from flux_core.model_config import ModelConfig
    from flux_core.pipeline import FluxImagePipeline
    from tests.diffsynth_ref import diffsynth_flux
    from tests.tiny_pipeline import FOLDER_NAME, make_diffusers_pipeline
    model_fn, _, _ = diffsynth_flux()
    from diffsynth.pipelines.flux_image import ControlNetInput as TheirInput, MultiControlNet
    ref = make_diffusers_pipeline(tmp_path)
    folder = tmp_path / FOLDER_NAME
    write_projector(projector_state_dict(seed=3), tmp_path / "image_proj_model.bin")   # the fixture's weights
    ours = FluxImagePipeline.from_pretrained(torch_dtype=F32, device="cpu", model_configs=[
        ModelConfig(path=str(infusenet.dit_folder)), ModelConfig(path=str(folder / "vae")),
        ModelConfig(path=str(folder / "text_encoder")), ModelConfig(path=str(folder / "text_encoder_2")),
        ModelConfig(path=str(infusenet.net_folder)), ModelConfig(path=str(tmp_path / "image_proj_model.bin"))],
        tokenizer_1_config=ModelConfig(path=str(folder / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(folder / "tokenizer_2")))
    black = Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8))
    sigmas, embedding = [1.0, 0.7, 0.4], face_embedding(9)
    latents = torch.randn(1, 16, H, W, generator=torch.Generator().manual_seed(41))
    run = dict(prompt="a portrait", negative_prompt="blurry", cfg_scale=2.0, height=48, width=64, sigmas=sigmas,
               latents=latents, embedded_guidance=3.5, t5_sequence_length=16, output_type="latent",
               progress_bar_cmd=None, controlnet_inputs=[ControlNetInput(image=black, processor_id="None")])
    got = ours(**run, infinityou_id_embedding=embedding, infinityou_guidance=0.8)

    _, their_projector = projectors
    with torch.no_grad():
        id_emb = their_projector(embedding.unsqueeze(0).reshape([1, -1, 512]))
        pixels = torch.from_numpy(np.asarray(black, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        control = (ref.vae.encode(pixels).latent_dist.mode() - ref.vae.config.shift_factor) * \
            ref.vae.config.scaling_factor
        sides = {side: ref.encode_prompt(prompt=p, prompt_2=None, max_sequence_length=16)[:2]
                 for side, p in (("posi", run["prompt"]), ("nega", run["negative_prompt"]))}
        multi = MultiControlNet([infusenet.their_net])
        x = latents.clone()
        for step, sigma in enumerate(sigmas):
            v = {side: model_fn(dit=infusenet.their_dit, controlnet=multi, latents=x,
                                timestep=torch.tensor([sigma * 1000]), prompt_emb=emb, pooled_prompt_emb=pooled,
                                guidance=torch.tensor([3.5]), text_ids=torch.zeros(1, emb.shape[1], 3),
                                controlnet_inputs=[TheirInput(image=black, processor_id="None")],
                                controlnet_conditionings=[control], id_emb=id_emb,
                                infinityou_guidance=torch.tensor([0.8]), progress_id=step,
                                num_inference_steps=len(sigmas))
                 for side, (emb, pooled) in sides.items()}
            x = x + (v["nega"] + 2.0 * (v["posi"] - v["nega"])) * ((sigmas + [0.0])[step + 1] - sigma)
    text_controlled = ours(**run)   # InfuseNet given the prompt instead of the identity
    # Measured 2.6e-6 (the bound: 1e-4); the identity (instead of the prompt) moves the latents by 3.2. Caught:
    # identity tokens with text ids of ones (8.0e-3), the DiT's 3.5 instead of infinityou_guidance (2.1).
    assert (got - x).abs().max().item() < 1e-4
    assert (got - text_controlled).abs().max().item() > 1e-2
