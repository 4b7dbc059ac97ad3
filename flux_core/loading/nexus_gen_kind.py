"""Nexus-Gen's models as loadable kinds. Being written in this issue (issue 13): recognise no file yet."""
from __future__ import annotations

from typing import Mapping

from .kinds import ModelKind, StateDict
from .lazy import LazyTensor


def select_nothing(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    return None


def build_nothing(sd: StateDict, config: dict):
    raise NotImplementedError


NEXUS_GEN_KIND = ModelKind(name="nexus_gen", title="Nexus-Gen autoregressive model", select=select_nothing,
                           build=build_nothing)
NEXUS_GEN_ADAPTER_KIND = ModelKind(name="nexus_gen_adapter", title="Nexus-Gen generation adapter",
                                   select=select_nothing, build=build_nothing)
NEXUS_GEN_MERGER_KIND = ModelKind(name="nexus_gen_merger", title="Nexus-Gen editing adapter (embedding merger)",
                                  select=select_nothing, build=build_nothing)
