"""Tiny FLUX models written as the single files a ComfyUI user puts into the model folders, under the real file
names the example workflows name, so that the workflows run exactly as shipped:

    files = write_model_files(tmp / "models")   # models/diffusion_models/flux1-dev.safetensors, ... (see FILES)

The DiTs (and the ControlNets, IP-Adapter and InfuseNet made for them) attend with one head of 16 (RoPE axes 4/6/6),
which the weights cannot tell: a diffusers-style config.json with `axes_dims_rope` lies beside them, as beside the
bundled demo DiT. (At the workflows' 1024x1024 every block attends over 4608 tokens; with FLUX's head of 128
attention was ~75 % of a workflow test.) Every other size a loader cannot read from the weights' shapes takes
FLUX's own value: CLIP-L head size 64, 77 CLIP positions, VAE widths that are multiples of 32 (FLUX's 32 GroupNorm
groups; ComfyUI's own VAE code has no other). Everything else is as small as that allows (one block of each kind).
The tokenizers of tests/tiny_text.py go beside the text encoders (text_encoders/tokenizer and tokenizer_2), where
the text-encoder loader node and FluxImagePipeline both look for them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tests.tiny_dit import make_diffusers_dit, write_bfl_dit
from tests.tiny_text import T5_VOCAB, clip_vocab, write_clip, write_t5, write_tokenizers
from tests.tiny_vae import SCALE_FACTOR, SHIFT_FACTOR, write_bfl_file

# model folder and file name per component (the names the example workflows use)
FILES = {
    "dit": ("diffusion_models", "flux1-dev.safetensors"),
    "kontext_dit": ("diffusion_models", "flux1-kontext-dev.safetensors"),
    "clip": ("text_encoders", "clip_l.safetensors"),
    "t5": ("text_encoders", "t5xxl_fp16.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
# The models of the FLUX.1-Fill, FLEX.2, Step1X-Edit and Nexus-Gen examples (write_edit_model_files), by their
# published names.
EDIT_FILES = {
    "fill_dit": ("diffusion_models", "flux1-fill-dev.safetensors"),
    "flex_dit": ("diffusion_models", "Flex.2-preview.safetensors"),
    "step1x_dit": ("diffusion_models", "step1x-edit-i1258.safetensors"),   # the DiT and the connector
    "qwen_vl": ("text_encoders", "Qwen2.5-VL-7B-Instruct"),                # a folder, as published
    "nexus_gen_decoder": ("diffusion_models", "generation_decoder.bin"),  # the DiT and the generation adapter
    "nexus_gen": ("text_encoders", "Nexus-GenV2"),                         # the AR model's folder, processor/ in it
}
CLIP_HIDDEN, T5_DIM = 64, 32
# The DiTs' attention: one head of 16 and its RoPE axes (in the config.json beside them: write_dit_config).
HEAD_DIM, AXES_DIMS_ROPE = 16, (4, 6, 6)
DIT_SHAPE = dict(num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM, num_attention_heads=1,
                 axes_dims_rope=AXES_DIMS_ROPE, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_HIDDEN)
VAE_WIDTHS = (32, 32, 32, 32)
# Step1X-Edit's connector: Qwen2.5-VL's width in (tests/tiny_qwen_vl.py: 16), the DiT's text width out. 32 heads
# (DiffSynth's heads_num, which the shapes do not hold) of width 1; 2 refiner blocks and an MLP 4x wide, as published.
CONNECTOR = dict(in_channels=16, hidden=T5_DIM, heads=32, depth=2, mlp_hidden=4 * T5_DIM)


def make_flux_shaped_dit(seed: int, **overrides):
    """A diffusers FluxTransformer2DModel with one head of HEAD_DIM, one block of each kind (`overrides`: other
    input channels, no guidance embedder, another text or pooled width)."""
    return make_diffusers_dit(seed=seed, **{**DIT_SHAPE, **overrides})


def write_dit_config(folder: Path) -> Path:
    """config.json beside the DiT files of a folder: diffusers' class name and the RoPE axes, nothing the shapes
    tell (one config.json serves the Fill, FLEX.2 and Step1X-Edit DiTs beside flux1-dev's; a full diffusers config
    would give them all its in_channels, and Step1X-Edit's connector reads in_channels from a config too)."""
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "axes_dims_rope": list(AXES_DIMS_ROPE)}),
                    encoding="utf-8")
    return path


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:  # variance preserving, so activations neither vanish nor explode through the layers
                p.copy_(noise / p[0].numel() ** 0.5)


def make_flux_shaped_clip(seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(clip_vocab()[0]), hidden_size=CLIP_HIDDEN, intermediate_size=128,
                            num_hidden_layers=1, num_attention_heads=CLIP_HIDDEN // 64, max_position_embeddings=77,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, projection_dim=CLIP_HIDDEN)
    model = CLIPTextModel(config).eval()
    _randomise(model, seed)
    return model


def make_flux_shaped_t5(seed: int) -> T5EncoderModel:
    config = T5Config(vocab_size=T5_VOCAB, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    _randomise(model, seed)
    return model


def make_flux_shaped_vae(seed: int):
    from diffusers import AutoencoderKL
    n = len(VAE_WIDTHS)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=VAE_WIDTHS, layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=SCALE_FACTOR,
                        shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False,
                        force_upcast=False)
    _randomise(vae, seed)
    return vae.eval().requires_grad_(False)


def write_model_files(models_dir: Path) -> dict[str, Path]:
    """Writes every file of FILES (and the tokenizer folders) into a ComfyUI-style models folder; returns the
    path of each component."""
    models_dir = Path(models_dir)
    paths = {kind: models_dir / folder / name for kind, (folder, name) in FILES.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_bfl_dit(make_flux_shaped_dit(seed=11), paths["dit"])
    write_bfl_dit(make_flux_shaped_dit(seed=12), paths["kontext_dit"])
    write_dit_config(paths["dit"].parent)
    text = paths["clip"].parent
    scratch = text / "_written"
    shutil.move(write_clip(make_flux_shaped_clip(seed=13), scratch, "clip_l"), paths["clip"])
    shutil.move(write_t5(make_flux_shaped_t5(seed=14), scratch, "t5xxl_fp16"), paths["t5"])
    shutil.rmtree(scratch)
    write_tokenizers(text)
    write_bfl_file(make_flux_shaped_vae(seed=15), paths["vae"])
    return paths


def make_step1x_connector(seed: int):
    """Step1X-Edit's connector (flux_core's module, DiffSynth's names and the published layout) with random weights:
    N(0, 0.2) everywhere, so the zero-initialised gates of a fresh one do not hide its refiner blocks."""
    from flux_core.models.step1x_connector import ConnectorParams, Step1XConnector
    connector = Step1XConnector(ConnectorParams(**CONNECTOR)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in connector.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return connector


def write_edit_model_files(models_dir: Path) -> dict[str, Path]:
    """The files of the FLUX.1-Fill, FLEX.2 and Step1X-Edit examples under their published names (EDIT_FILES): the
    Fill DiT (384 input channels) and FLEX.2's (196; one double block here, 8 published), FLUX-shaped as
    write_model_files' DiT; step1x-edit-i1258.safetensors as published (a DiT without guidance embedder, pooled
    width 768, and its connector under `connector.`); the Qwen2.5-VL-7B-Instruct folder (sharded weights,
    config.json and the processor files of tests/tiny_qwen_vl.py); Nexus-GenV2's generation_decoder.bin
    (write_nexus_gen_decoder) and its AR model's folder (tests/tiny_nexus_gen.py's layout, processor/ inside)."""
    from safetensors.torch import save_file
    from tests.tiny_dit import bfl_state_dict
    from tests.tiny_nexus_gen import make_ar, write_ar_folder
    from tests.tiny_qwen_vl import make_qwen_vl, write_qwen_vl_folder
    models_dir = Path(models_dir)
    paths = {kind: models_dir / folder / name for kind, (folder, name) in EDIT_FILES.items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    write_dit_config(paths["fill_dit"].parent)
    write_bfl_dit(make_flux_shaped_dit(seed=51, in_channels=384, out_channels=64), paths["fill_dit"])
    write_bfl_dit(make_flux_shaped_dit(seed=52, in_channels=196, out_channels=64), paths["flex_dit"])
    step1x = make_flux_shaped_dit(seed=53, guidance_embeds=False, pooled_projection_dim=768)
    sd = {k: v.contiguous() for k, v in bfl_state_dict(step1x).items()}
    sd.update({"connector." + k: v.detach().clone().contiguous()
               for k, v in make_step1x_connector(seed=54).state_dict().items()})
    save_file(sd, str(paths["step1x_dit"]))
    write_qwen_vl_folder(make_qwen_vl(seed=55, conditional_generation=True), paths["qwen_vl"])
    write_nexus_gen_decoder(make_flux_shaped_dit(seed=56), paths["nexus_gen_decoder"], seed=57)
    write_ar_folder(make_ar(seed=58), paths["nexus_gen"])
    return paths


def write_nexus_gen_decoder(dit, path: Path, seed: int) -> Path:
    """Nexus-GenV2's generation_decoder.bin (a torch pickle): the DiT in DiffSynth-Studio's names under `pipe.dit.`,
    its final AdaLN halves in Nexus-Gen's (scale, shift) order, and the generation adapter's `adapter.*` (Qwen's
    width in, the DiT's text width out) at random weights. The DiffSynth names come from flux_core's own table (its
    Nexus-Gen loading is checked against DiffSynth-Studio's converter in tests/test_nexus_gen.py); here the file
    only has to be one both the workflow and the pipeline read."""
    from flux_core.loading.dit_layouts import DIFFSYNTH_RULES
    from flux_core.loading.files import invert_rules, rename_keys
    from flux_core.models.nexus_gen import NexusGenAdapter, NexusGenAdapterParams
    from tests.tiny_dit import bfl_state_dict
    from tests.tiny_nexus_gen import AR_HIDDEN
    from tests.tiny_qwen_vl import randomised
    bfl = bfl_state_dict(dit)
    for key in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        shift, scale = bfl[key].chunk(2)
        bfl[key] = torch.cat((scale, shift))
    sd = {"pipe.dit." + k: v.contiguous() for k, v in rename_keys(bfl, invert_rules(DIFFSYNTH_RULES)).items()}
    adapter = NexusGenAdapter(NexusGenAdapterParams(input_dim=AR_HIDDEN, output_dim=T5_DIM))
    adapter = randomised(adapter, seed, scale=0.3)
    sd.update({k: v.detach().clone() for k, v in adapter.state_dict().items()})
    torch.save(sd, path)
    return Path(path)


def write_controlnet_files(models_dir: Path) -> dict[str, Path]:
    """Tiny ControlNets as published (config.json + diffusion_pytorch_model.safetensors) in the folders the example
    workflows name (example_workflows.build_workflows.CONTROLNET_FILES), shaped for the DiTs above (one head of
    HEAD_DIM; their RoPE axes in config.json): alimama's inpainting (68-wide input), InstantX's union (10 modes) and
    jasperai's upscaler. Alimama's and jasperai's have no single blocks, as published; the union one keeps one.
    Returns the path of each weights file by kind."""
    from example_workflows.build_workflows import CONTROLNET_FILES
    from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
    variants = {"inpainting": dict(seed=31, extra_condition_channels=4, num_single_layers=0),
                "union": dict(seed=32, num_mode=10), "upscaler": dict(seed=33, num_single_layers=0)}
    paths = {}
    for kind, name in CONTROLNET_FILES.items():
        path = Path(models_dir) / "controlnet" / name
        model = make_diffusers_controlnet(**{**DIT_SHAPE, **variants[kind]})
        write_diffusers_controlnet(model, path.parent)
        assert path.is_file(), f"diffusers wrote no {path.name}"
        paths[kind] = path
    return paths


def write_adapter_files(models_dir: Path) -> dict[str, Path]:
    """The IP-Adapter and InfiniteYou files of the example workflows, where README tells a user to put them
    (example_workflows.build_workflows.IPADAPTER_FILES, INFINITEYOU_FILES), shaped for the DiTs above (width
    HEAD_DIM, one double and one single block, text width T5_DIM; InfuseNet without single blocks): InstantX's
    ip-adapter.bin in models/ipadapter/, a SigLIP folder (config.json: the head count of a 24-wide tower is not in
    its shapes) in models/clip_vision/, and ByteDance's image_proj_model.bin and sharded InfuseNetModel/ in
    models/infinite_you/. Returns the path of each by key ("ipadapter", "image_encoder", "projector", "infusenet")."""
    from example_workflows.build_workflows import INFINITEYOU_FILES, IPADAPTER_FILES
    from tests.tiny_controlnet import make_diffusers_controlnet, write_diffusers_controlnet
    from tests.tiny_ipadapter import (instantx_state_dict, make_siglip, projector_state_dict, write_instantx,
                                      write_projector, write_siglip)
    models_dir = Path(models_dir)
    paths = {"ipadapter": models_dir / "ipadapter" / IPADAPTER_FILES["ipadapter"],
             "image_encoder": models_dir / "clip_vision" / IPADAPTER_FILES["image_encoder"],
             "projector": models_dir / "infinite_you" / INFINITEYOU_FILES["projector"],
             "infusenet": models_dir / "infinite_you" / INFINITEYOU_FILES["infusenet"]}
    for key in ("ipadapter", "projector"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    write_instantx(instantx_state_dict(seed=41, hidden=HEAD_DIM, blocks=2), paths["ipadapter"])
    write_siglip(make_siglip(seed=42), paths["image_encoder"])
    write_projector(projector_state_dict(seed=43, output_dim=T5_DIM), paths["projector"])
    infusenet = make_diffusers_controlnet(seed=44, **{**DIT_SHAPE, "num_single_layers": 0})
    write_diffusers_controlnet(infusenet, paths["infusenet"], max_shard_size="40KB")  # sharded, as published
    return paths


def example_image_source() -> Path:
    from example_workflows.make_example_image import HERE, NAME
    return HERE / NAME


def write_native_lora(models: Path, dit: Path) -> Path:
    """The native-sampler example's LoRA (loras/, its published name) for the tiny FLUX.1-dev: kohya keys over every
    block matrix of the DiT file, random."""
    from safetensors import safe_open
    from example_workflows.build_workflows import NATIVE_LORA
    from tests.tiny_lora import random_pairs, write_kohya
    with safe_open(str(dit), "pt") as f:
        shapes = {k[:-len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                  if k.endswith(".weight") and "blocks." in k and len(f.get_slice(k).get_shape()) == 2}
    (models / "loras").mkdir(parents=True, exist_ok=True)
    # std 1: at the example's strength 0.125 it moves the tiny model's picture visibly (the test compares with 0)
    return write_kohya(models / "loras" / NATIVE_LORA, random_pairs(shapes, seed=808, std=1.0))


def set_up_like_a_user(base: Path) -> dict[str, Path]:
    """A ComfyUI base directory as a user prepares it for the example workflows (README, "Example workflows"):
    the model files in models/<folder>/ under the names the workflows use (the ControlNets in models/controlnet/
    under their published names, the IP-Adapter and InfiniteYou files as write_adapter_files puts them,
    the Fill, FLEX.2 and Step1X-Edit files of write_edit_model_files),
    and the pack's example images copied into input/. Returns the component paths (ControlNets as
    "controlnet_<kind>"; "ipadapter", "image_encoder", "projector", "infusenet"; EDIT_FILES' keys) plus "input" and
    "output"."""
    from example_workflows.build_workflows import INPUT_IMAGES
    from example_workflows.make_example_image import HERE
    base = Path(base)
    paths = write_model_files(base / "models")
    paths.update(write_edit_model_files(base / "models"))
    paths.update({f"controlnet_{kind}": path for kind, path in write_controlnet_files(base / "models").items()})
    paths.update(write_adapter_files(base / "models"))
    paths["native_lora"] = write_native_lora(base / "models", paths["dit"])
    (base / "input").mkdir(parents=True, exist_ok=True)
    (base / "output").mkdir(parents=True, exist_ok=True)
    for name in INPUT_IMAGES:  # the pack's example images (fluxcore_example.png and the adapters' two)
        shutil.copy(HERE / name, base / "input" / name)
    return {**paths, "input": base / "input", "output": base / "output"}
