"""DiffSynth-Studio 2.1.12's own Nexus-Gen code as a test reference, on the installed transformers 5.x.

What runs as DiffSynth wrote it, and what stands in for what does not:
- The generation adapter: `nexus_gen_projector.NexusGenAdapter` itself (it takes its sizes as arguments).
- The editing adapter: `nexus_gen_projector.NexusGenImageEmbeddingMerger`'s own forward, position ids, decoder
  layer, attention, MLP, RMSNorm and rotary embedding, in a tiny subclass. Its __init__ cannot run on transformers
  5.x (it reads `hidden_size` etc. at the top level of `Qwen2_5_VLConfig`, which 5.x keeps in `text_config`, and its
  rotary embedding imports `transformers.modeling_rope_utils._compute_default_rope_parameters`, gone in 5.x): the
  subclass hands DiffSynth's classes a plain namespace config with the attributes they read, and the rotary
  embedding gets transformers 4.49's default inverse frequencies (1 / theta^(2i/d)) for the removed function.
- The autoregressive model: `nexus_gen_ar_model.py` does not import on transformers 5.x (it imports
  `QWEN2_5_VL_INPUTS_DOCSTRING`, removed in 5.x). `NexusGenAutoregressiveModel.get_target_embeddings` (in
  models/nexus_gen.py, which imports) runs as it is; the two methods it calls on the AR model,
  `Qwen2_5_VLForConditionalGeneration.get_rope_index` and `.forward`, are compiled from DiffSynth's own source
  file (decorators dropped) and bound to `DiffSynthARView`, which gives transformers 5.x's modules the 4.49
  attribute names that code reads (`model` = the text model, `visual` returning the merged embeddings).
"""
from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from tests.diffsynth_ref import diffsynth_flux


def diffsynth_nexus_gen():
    """(DiffSynth's nexus_gen_projector module, its NexusGenAutoregressiveModel class, FluxImageUnit_NexusGen);
    skips the test without diffsynth."""
    diffsynth_flux()
    from diffsynth.models import nexus_gen_projector
    from diffsynth.models.nexus_gen import NexusGenAutoregressiveModel
    from diffsynth.pipelines.flux_image import FluxImageUnit_NexusGen
    return nexus_gen_projector, NexusGenAutoregressiveModel, FluxImageUnit_NexusGen


def _legacy_default_rope(config, device=None, seq_len=None, **kwargs):
    """transformers 4.49's `_compute_default_rope_parameters` (removed in 5.x): inv_freq_i = 1 / theta^(2i / d)."""
    dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


def merger_config(hidden=3584, heads=28, kv_heads=4, intermediate=18944, mrope=(16, 24, 24)) -> SimpleNamespace:
    """The attributes DiffSynth's merger classes read from their Qwen2_5_VLConfig (4.49 layout), DiffSynth's
    values except the sizes."""
    return SimpleNamespace(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
        attention_dropout=0.0, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=128000, rope_scaling={"mrope_section": list(mrope), "rope_type": "default",
                                                      "type": "default"},
        vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2))


def tiny_diffsynth_merger(hidden=32, heads=2, kv_heads=1, intermediate=48, mrope=(2, 3, 3), out_channel=24,
                          expand_ratio=4, num_layers=1) -> nn.Module:
    """DiffSynth's NexusGenImageEmbeddingMerger at a given size, built from its own classes (see the module doc)."""
    p, _, _ = diffsynth_nexus_gen()
    import transformers.modeling_rope_utils as rope_utils
    from transformers.activations import ACT2FN
    config = merger_config(hidden, heads, kv_heads, intermediate, mrope)

    class TinyMerger(p.NexusGenImageEmbeddingMerger):
        def __init__(self):
            nn.Module.__init__(self)
            self.config = config
            self.num_layers = num_layers
            self.layers = nn.ModuleList([p.Qwen2_5_VLDecoderLayer(config, i) for i in range(num_layers)])
            wide = out_channel * expand_ratio
            self.projector = nn.Sequential(p.Qwen2RMSNorm(hidden, eps=config.rms_norm_eps), nn.Linear(hidden, wide),
                                           p.Qwen2RMSNorm(wide, eps=config.rms_norm_eps), ACT2FN[config.hidden_act],
                                           nn.Linear(wide, out_channel),
                                           p.Qwen2RMSNorm(out_channel, eps=config.rms_norm_eps))
            self.base_grid = torch.tensor([[1, 72, 72]])
            rope_utils._compute_default_rope_parameters = _legacy_default_rope
            try:
                self.rotary_emb = p.Qwen2_5_VLRotaryEmbedding(config=config)
            finally:
                del rope_utils._compute_default_rope_parameters

    return TinyMerger().eval()


def merger_key_shapes(**sizes) -> dict[str, tuple]:
    """{name: shape} of DiffSynth's merger at Nexus-GenV2's sizes (default) on the meta device: the published
    `embedding_merger.*` names without the prefix."""
    with torch.device("meta"):
        model = tiny_diffsynth_merger(**{"hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944,
                                         "mrope": (16, 24, 24), "out_channel": 4096, **sizes})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ar_source_function(name: str, class_name: str = "Qwen2_5_VLForConditionalGeneration"):
    """A method of DiffSynth's nexus_gen_ar_model.py compiled from its source, without importing the file (its imports
    fail on transformers 5.x) and without its docstring decorators."""
    import diffsynth
    path = Path(diffsynth.__file__).parent / "models" / "nexus_gen_ar_model.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    from torch.nn import CrossEntropyLoss
    namespace = dict(torch=torch, nn=nn, Optional=Optional, Tuple=Tuple, List=List, Union=Union, Any=Any, Dict=Dict,
                     CrossEntropyLoss=CrossEntropyLoss, math=math)
    namespace.update(_OUTPUT_CLASS)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


# DiffSynth's output dataclass declares `past_key_values`, which transformers 5.x's ModelOutput renames to `cache`
# on construction (then refused): its forward's outputs are collected in a plain namespace instead.
_OUTPUT_CLASS = {"Qwen2_5_VLCausalLMOutputWithPast": SimpleNamespace}


class DiffSynthARView:
    """transformers 5.x's Qwen2.5-VL modules under the names DiffSynth's 4.49-era code reads (see the module doc):
    `model` the text model, `visual(pixel_values, grid_thw)` the merged image embeddings, `lm_head`, `vision_head`,
    `image_prefill_embeds`, `config`; `get_rope_index` and `__call__` are DiffSynth's own methods."""

    def __init__(self, vl_model: nn.Module, vision_head: nn.Module, image_prefill_embeds: nn.Module):
        self.config = vl_model.config
        self.model = vl_model.model.language_model
        self._visual = vl_model.model.visual
        # FluxCore's model keeps no LM head; DiffSynth's forward computes logits (unused for the image embeddings)
        # with one: a random one of the right shape.
        text = vl_model.config.text_config
        self.lm_head = vl_model.lm_head or nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vision_head = vision_head
        self.image_prefill_embeds = image_prefill_embeds
        self.rope_deltas = None
        self.device = vl_model.device
        self._get_rope_index = _ar_source_function("get_rope_index")
        self._forward = _ar_source_function("forward")

    def visual(self, pixel_values, grid_thw):
        return self._visual(pixel_values, grid_thw=grid_thw).pooler_output

    def get_rope_index(self, *args, **kwargs):
        return self._get_rope_index(self, *args, **kwargs)

    def __call__(self, **kwargs):
        return self._forward(self, **kwargs)


def diffsynth_target_embeddings(vl_model: nn.Module, vision_head: nn.Module, image_prefill_embeds: nn.Module,
                                processor, images, messages):
    """DiffSynth's `get_target_embeddings(images, messages, processor, model)`: (target (81, D), reference embeds,
    image_grid_thw)."""
    _, ar_class, _ = diffsynth_nexus_gen()
    view = DiffSynthARView(vl_model, vision_head, image_prefill_embeds)
    with torch.no_grad():
        return ar_class.get_target_embeddings(None, images, messages, processor, view, 81)


def diffsynth_messages(prompt: str, editing: bool) -> list[dict]:
    """DiffSynth's own chat messages (its get_editing_msg / get_generation_msg, which do not use self)."""
    _, ar_class, _ = diffsynth_nexus_gen()
    return ar_class.get_editing_msg(None, prompt) if editing else ar_class.get_generation_msg(None, prompt)


def diffsynth_editing_text_ids(latents, target_grid, ref_grid) -> torch.Tensor:
    """FluxImageUnit_NexusGen.get_editing_text_ids (plain torch) for grids (t, h, w)."""
    _, _, unit = diffsynth_nexus_gen()
    return unit().get_editing_text_ids(latents, target_grid[1], target_grid[2], ref_grid[1], ref_grid[2])




def diffsynth_ar_config() -> dict:
    """The Qwen2_5_VLConfig keywords DiffSynth's NexusGenAutoregressiveModel hard-codes (Nexus-GenV2's config), read
    from its source (its __init__ imports the AR file, which fails on transformers 5.x)."""
    _, ar_class, _ = diffsynth_nexus_gen()
    import diffsynth
    tree = ast.parse((Path(diffsynth.__file__).parent / "models" / "nexus_gen.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == ar_class.__name__)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    call = next(n for n in ast.walk(init)
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Qwen2_5_VLConfig")
    return ast.literal_eval(call.keywords[0].value)   # Qwen2_5_VLConfig(**{...})
