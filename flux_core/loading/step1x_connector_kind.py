"""Step1X-Edit's connector (flux_core.models.step1x_connector) as a loadable kind.

Layouts:
- "step1x": `connector.*` keys, as `stepfun-ai/Step1X-Edit:step1x-edit-i1258.safetensors` holds them beside its DiT
  (the DiT kind takes the same file without them);
- "diffsynth": the same names without the prefix (a connector saved from DiffSynth-Studio's Qwen2Connector).
The head count is not in the shapes: config `heads_num` (DiffSynth's name), default 32.
"""
from __future__ import annotations

from typing import Mapping

from ..models.step1x_connector import ConnectorParams, Step1XConnector
from .kinds import ModelKind, StateDict
from .lazy import LazyTensor

CONNECTOR_PREFIX = "connector."
_PROBES = ("S.input_embedder.weight", "S.t_embedder.mlp.0.weight", "global_proj_out.weight", "scale_factor")


def select_step1x_connector(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    for layout, prefix in (("step1x", CONNECTOR_PREFIX), ("diffsynth", "")):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else dict(sd)
        if all(p in sub for p in _PROBES):
            return layout, sub
    return None


def build_step1x_connector(sd: StateDict, config: dict) -> Step1XConnector:
    if config.get("model_type") is not None:   # a config.json beside the file belongs to another model
        config = {}
    return Step1XConnector(ConnectorParams.from_state_dict_shapes({k: v.shape for k, v in sd.items()}, config))


STEP1X_CONNECTOR_KIND = ModelKind(name="step1x_connector", title="Step1X-Edit connector",
                                  select=select_step1x_connector, build=build_step1x_connector)
