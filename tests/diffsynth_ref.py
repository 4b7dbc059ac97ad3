"""DiffSynth-Studio 2.1.12's own FLUX DiT code as a test reference (reference notes, diffsynth_flux.md section 7):
its BFL -> DiffSynth state-dict converter, a tiny `FluxDiT` built from its own blocks, and its real forward
(`model_fn_flux_image`).

Importing the package runs its data loaders' imports (torchvision, imageio, ftfy, pandas: not installed here); empty
placeholder modules stand in for them while `diffsynth` imports and are removed right after. transformers and
diffusers are imported first: their availability checks would take a placeholder torchvision for the real one.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

_PLACEHOLDERS = ("torchvision", "imageio", "imageio.v3", "ftfy", "pandas")


def diffsynth_flux():
    """(model_fn_flux_image, FluxDiTStateDictConverter, the flux_dit module); skips the test without diffsynth."""
    if importlib.util.find_spec("diffsynth") is None:
        pytest.skip("diffsynth is not installed (pip install --no-deps diffsynth==2.1.12)")
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    stubs = {n: types.ModuleType(n) for n in _PLACEHOLDERS
             if n not in sys.modules and importlib.util.find_spec(n.split(".")[0]) is None}
    sys.modules.update(stubs)
    try:
        from diffsynth.models import flux_dit
        from diffsynth.pipelines.flux_image import model_fn_flux_image
        from diffsynth.utils.state_dict_converters.flux_dit import FluxDiTStateDictConverter
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return model_fn_flux_image, FluxDiTStateDictConverter, flux_dit


def diffsynth_training_pipe(model_fn, in_iteration_models: tuple[str, ...] = ("dit",),
                            **models) -> types.SimpleNamespace:
    """What DiffSynth-Studio's FlowMatchSFTLoss and its units read of a FluxImagePipeline in training: its FLUX.1
    FlowMatchScheduler with the 1000 training timesteps, float32 on the CPU, `model_fn` (model_fn_flux_image, from
    diffsynth_flux()), the models the loss runs each step and the modules it reads (`dit=...`, `controlnet=...`, ...),
    BasePipeline's `preprocess_image`, and no device moves."""
    from diffsynth.diffusion.base_pipeline import BasePipeline
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    scheduler = FlowMatchScheduler("FLUX.1")
    scheduler.set_timesteps(1000, training=True)
    pipe = types.SimpleNamespace(scheduler=scheduler, torch_dtype=torch.float32, device="cpu", model_fn=model_fn,
                                 in_iteration_models=tuple(in_iteration_models),
                                 load_models_to_device=lambda names: None, **models)
    pipe.preprocess_image = types.MethodType(BasePipeline.preprocess_image, pipe)
    return pipe


def _build_trunk(module, m, dim, heads, axes, text_dim, pooled_dim, double, single, guidance) -> None:
    """The embedders and blocks DiffSynth's FluxDiT and FluxControlNet share, from DiffSynth's own modules."""
    module.pos_embedder = m.RoPEEmbedding(dim, 10000, list(axes))
    module.time_embedder = m.TimestepEmbeddings(256, dim)
    module.guidance_embedder = m.TimestepEmbeddings(256, dim) if guidance else None
    module.pooled_text_embedder = torch.nn.Sequential(torch.nn.Linear(pooled_dim, dim), torch.nn.SiLU(),
                                                      torch.nn.Linear(dim, dim))
    module.context_embedder = torch.nn.Linear(text_dim, dim)
    module.x_embedder = torch.nn.Linear(64, dim)
    module.blocks = torch.nn.ModuleList([m.FluxJointTransformerBlock(dim, heads) for _ in range(double)])
    module.single_blocks = torch.nn.ModuleList([m.FluxSingleTransformerBlock(dim, heads) for _ in range(single)])


def tiny_diffsynth_dit(dim=32, heads=2, axes=(4, 6, 6), text_dim=32, pooled_dim=32, double=2, single=2,
                       guidance=True) -> torch.nn.Module:
    """DiffSynth's FluxDiT at a tiny size: its __init__ hard-codes FLUX's 3072 width, so this builds the same
    attributes from DiffSynth's own modules (the forward, `model_fn_flux_image`, reads only these)."""
    _, _, m = diffsynth_flux()

    class TinyFluxDiT(m.FluxDiT):
        def __init__(self):
            torch.nn.Module.__init__(self)
            _build_trunk(self, m, dim, heads, axes, text_dim, pooled_dim, double, single, guidance)
            self.final_norm_out = m.AdaLayerNormContinuous(dim)
            self.final_proj_out = torch.nn.Linear(dim, 64)
            self.input_dim = 64

    return TinyFluxDiT().eval()


def full_size_key_names() -> set[str]:
    """DiffSynth's real FluxDiT's parameter names with block numbers replaced by N (built on the meta device)."""
    import re
    _, _, m = diffsynth_flux()
    with torch.device("meta"):
        names = m.FluxDiT().state_dict().keys()
    return {re.sub(r"\.\d+\.", ".N.", k) for k in names}


def diffsynth_controlnet():
    """(the flux_controlnet module, DiffSynth 2.1.12's ControlNet state-dict converter); skips without diffsynth."""
    diffsynth_flux()  # imports the package with its placeholders (and skips the test without it)
    from diffsynth.models import flux_controlnet
    from diffsynth.utils.state_dict_converters.flux_controlnet import FluxControlNetStateDictConverter
    return flux_controlnet, FluxControlNetStateDictConverter


def tiny_diffsynth_controlnet(dim=32, heads=2, axes=(4, 6, 6), text_dim=32, pooled_dim=32, double=2, single=2,
                              num_mode=0, additional_input_dim=0, guidance=True) -> torch.nn.Module:
    """DiffSynth's FluxControlNet at a tiny size: its __init__ hard-codes FLUX's 3072 width, so this builds the same
    attributes from DiffSynth's own modules; the forward and `align_res_stack_to_original_blocks` are DiffSynth's.
    With `num_mode`, its mode_dict is the union one DiffSynth's registry gives InstantX Union-alpha."""
    cn, _ = diffsynth_controlnet()
    _, _, m = diffsynth_flux()

    class TinyFluxControlNet(cn.FluxControlNet):
        def __init__(self):
            torch.nn.Module.__init__(self)
            _build_trunk(self, m, dim, heads, axes, text_dim, pooled_dim, double, single, guidance)
            self.controlnet_blocks = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(double)])
            self.controlnet_single_blocks = torch.nn.ModuleList([torch.nn.Linear(dim, dim) for _ in range(single)])
            self.mode_dict = ({"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}
                              if num_mode else {})
            self.controlnet_mode_embedder = torch.nn.Embedding(num_mode, dim) if num_mode else None
            self.controlnet_x_embedder = torch.nn.Linear(64 + additional_input_dim, dim)

    return TinyFluxControlNet().eval()


def controlnet_key_names(**kwargs) -> set[str]:
    """DiffSynth's real FluxControlNet's parameter names (kwargs as its registry passes them) with block numbers
    replaced by N (built on the meta device)."""
    import re
    cn, _ = diffsynth_controlnet()
    with torch.device("meta"):
        names = cn.FluxControlNet(**kwargs).state_dict().keys()
    return {re.sub(r"\.\d+\.", ".N.", k) for k in names}


def diffsynth_ipadapter():
    """(the flux_ipadapter module, DiffSynth 2.1.12's IP-Adapter state-dict converter: the function its model registry
    applies to InstantX's ip-adapter.bin); skips without diffsynth."""
    diffsynth_flux()
    from diffsynth.models import flux_ipadapter
    from diffsynth.utils.state_dict_converters.flux_ipadapter import FluxIpAdapterStateDictConverter
    return flux_ipadapter, FluxIpAdapterStateDictConverter


def tiny_diffsynth_ipadapter(heads=2, head_dim=16, text_dim=32, num_tokens=3, num_blocks=4,
                             image_dim=24) -> torch.nn.Module:
    """DiffSynth's FluxIpAdapter at a tiny size: its __init__ hard-codes SigLIP's 1152 features for the projector, so
    this builds the same attributes from DiffSynth's own IpAdapterModule and MLPProjModel; forward (one token
    sequence for all images, keys and values per block, the scale) is DiffSynth's."""
    ip, _ = diffsynth_ipadapter()

    class TinyFluxIpAdapter(ip.FluxIpAdapter):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.ipadapter_modules = torch.nn.ModuleList(
                [ip.IpAdapterModule(heads, head_dim, text_dim) for _ in range(num_blocks)])
            self.image_proj = ip.MLPProjModel(cross_attention_dim=text_dim, id_embeddings_dim=image_dim,
                                              num_tokens=num_tokens)
            self.set_adapter()

    return TinyFluxIpAdapter().eval()


def ipadapter_key_names() -> set[str]:
    """DiffSynth's real FluxIpAdapter's parameter names with block numbers replaced by N (built on the meta device)."""
    import re
    ip, _ = diffsynth_ipadapter()
    with torch.device("meta"):
        names = ip.FluxIpAdapter().state_dict().keys()
    return {re.sub(r"\.\d+\.", ".N.", k) for k in names}


def diffsynth_infiniteyou():
    """(DiffSynth 2.1.12's InfiniteYouImageProjector class, its state-dict converter); skips without diffsynth. The
    class takes its sizes as arguments, so a tiny one needs no subclass."""
    diffsynth_flux()
    from diffsynth.models.flux_infiniteyou import InfiniteYouImageProjector
    from diffsynth.utils.state_dict_converters.flux_infiniteyou import FluxInfiniteYouImageProjectorStateDictConverter
    return InfiniteYouImageProjector, FluxInfiniteYouImageProjectorStateDictConverter


def diffsynth_lora_models():
    """(DiffSynth 2.1.12's flux_lora_encoder module, its flux_lora_patcher module, its FluxLoRALoader: the loader its
    pipeline's LoRA-Encoder unit and load_lora use); skips without diffsynth."""
    diffsynth_flux()
    from diffsynth.models import flux_lora_encoder, flux_lora_patcher
    from diffsynth.utils.lora.flux import FluxLoRALoader
    return flux_lora_encoder, flux_lora_patcher, FluxLoRALoader


def tiny_lora_patterns(depth=2, single=2, hidden=32, mlp_hidden=128) -> list[dict]:
    """DiffSynth's own LoRA-Encoder site list (LoRAEmbedder.default_lora_patterns: names, order, (in, out), type) for
    a tiny DiT: its blocks cut to `depth` / `single` and its FLUX widths (3072, 12288 and their multiples) replaced by
    the tiny ones."""
    enc, _, _ = diffsynth_lora_models()
    d, m = hidden, mlp_hidden
    widths = {3072: d, 12288: m, 9216: 3 * d, 18432: 6 * d, 21504: 3 * d + m, 15360: d + m}
    out = []
    for p in enc.LoRAEmbedder.default_lora_patterns(None):
        group, index = p["name"].split(".")[:2]
        if int(index) < (depth if group == "blocks" else single):
            out.append({**p, "dim": tuple(widths[x] for x in p["dim"])})
    return out


def tiny_diffsynth_lora_encoder(lora_patterns, embed_dim=32, intermediate=64, heads=2, head_dim=128, rows=4,
                                special=1, layers=1) -> torch.nn.Module:
    """DiffSynth's FluxLoRAEncoder at a tiny size: its __init__ hard-codes FLUX's sites and 32 heads x 128, so this
    builds the same attributes from DiffSynth's own LoRAEmbedder (which takes the site list) and CLIPEncoderLayer;
    the forward is DiffSynth's."""
    enc, _, _ = diffsynth_lora_models()

    class TinyFluxLoRAEncoder(enc.FluxLoRAEncoder):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_embeds_per_lora = rows
            self.embedder = enc.LoRAEmbedder(lora_patterns, L=rows, out_dim=embed_dim)
            self.encoders = torch.nn.ModuleList([enc.CLIPEncoderLayer(embed_dim, intermediate, num_heads=heads,
                                                                      head_dim=head_dim) for _ in range(layers)])
            self.special_embeds = torch.nn.Parameter(torch.randn(1, special, embed_dim))
            self.num_special_embeds = special
            self.final_layer_norm = torch.nn.LayerNorm(embed_dim)
            self.final_linear = torch.nn.Linear(embed_dim, embed_dim)

    return TinyFluxLoRAEncoder().eval()


def tiny_diffsynth_lora_patcher(lora_patterns) -> torch.nn.Module:
    """DiffSynth's FluxLoraPatcher (it takes its site list) for a tiny DiT: `lora_patterns` as tiny_lora_patterns
    gives them, each site's width its output size (as its default_lora_patterns has it)."""
    _, patcher, _ = diffsynth_lora_models()
    return patcher.FluxLoraPatcher([{"name": p["name"], "dim": p["dim"][1]} for p in lora_patterns]).eval()


def lora_model_key_names() -> tuple[dict, dict]:
    """({name: shape}, {name: shape}) of DiffSynth's real FluxLoRAEncoder and FluxLoraPatcher (built on the meta
    device): the published checkpoints' names and shapes."""
    enc, patcher, _ = diffsynth_lora_models()
    with torch.device("meta"):
        encoder_sd = {k: tuple(v.shape) for k, v in enc.FluxLoRAEncoder().state_dict().items()}
        patcher_sd = {k: tuple(v.shape) for k, v in patcher.FluxLoraPatcher().state_dict().items()}
    return encoder_sd, patcher_sd


def tiny_diffsynth_channel_dit(input_dim: int, **sizes) -> torch.nn.Module:
    """DiffSynth's tiny FluxDiT (tiny_diffsynth_dit) with more input channels: FLEX.2's 196 (its real FluxDiT takes
    `input_dim=196, num_blocks=8`) or FLUX.1-Fill's 384. Its units read `dit.input_dim`; `x_embedder` takes the
    latent with the extra channels concatenated before patchify."""
    dit = tiny_diffsynth_dit(**sizes)
    dit.x_embedder = torch.nn.Linear(input_dim, dit.x_embedder.out_features)
    dit.input_dim = input_dim
    return dit.eval()
