"""FLUX IP-Adapters as a loadable kind (flux_core.models.ipadapter), in every published layout:

- "instantx": InstantX's `ip-adapter.bin` (a torch file of two dicts, read with weights_only=True and flattened to
  `image_proj.proj.0.weight`, `ip_adapter.<i>.to_k_ip.weight`, ...), or the same keys converted to safetensors;
- "diffsynth": DiffSynth-Studio's names (`image_proj.*`, `ipadapter_modules.<i>.*`), as its converter and its
  IP-Adapter training (`--remove_prefix_in_ckpt pipe.ipadapter.`) write them; also under `pipe.ipadapter.`/`ipadapter.`;
- "xlabs": XLabs' `flux-ip-adapter.safetensors` (`ip_adapter_proj_model.*`,
  `double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj.*`), the format diffusers reads.
"""
from __future__ import annotations

from typing import Mapping

from ..models.ipadapter import INSTANTX, XLABS, FluxIPAdapter, IPAdapterParams
from .files import rename_keys, strip_prefix
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

IPADAPTER_PREFIXES = ("pipe.ipadapter.", "ipadapter.")

RULES = {
    "instantx": [(r"^ip_adapter\.(\d+)\.", r"ipadapter_modules.\1.")],
    "diffsynth": [],
    "xlabs": [(r"^ip_adapter_proj_model\.", "image_proj."),
              (r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_k_proj\.", r"ipadapter_modules.\1.to_k_ip."),
              (r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_v_proj\.", r"ipadapter_modules.\1.to_v_ip.")],
}


def detect_ipadapter_layout(sd: Mapping[str, LazyTensor]) -> str | None:
    if "ip_adapter_proj_model.proj.weight" in sd and "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight" in sd:
        return "xlabs"
    if "image_proj.norm.weight" not in sd:
        return None
    if "ip_adapter.0.to_k_ip.weight" in sd:
        return "instantx"
    if "ipadapter_modules.0.to_k_ip.weight" in sd:
        return "diffsynth"
    return None


def ipadapter_family(sd: Mapping[str, LazyTensor]) -> str:
    """INSTANTX (a two-layer projector) or XLABS (one linear layer), from canonical names."""
    return INSTANTX if "image_proj.proj.0.weight" in sd else XLABS


def select_ipadapter(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for prefix in ("",) + IPADAPTER_PREFIXES:
        sub = strip_prefix(sd, [prefix]) if prefix else dict(sd)
        layout = detect_ipadapter_layout(sub)
        if layout:
            return layout, rename_keys(sub, RULES[layout])
    return None


def build_ipadapter(sd: StateDict, config: dict) -> FluxIPAdapter:
    family = ipadapter_family(sd)
    return FluxIPAdapter(IPAdapterParams.from_state_dict_shapes(family, {k: v.shape for k, v in sd.items()}))


IPADAPTER_KIND = ModelKind(name="ipadapter", title="FLUX IP-Adapter", select=select_ipadapter, build=build_ipadapter)
