"""Qwen2.5-VL (Step1X-Edit's conditioning encoder) as a loadable kind. Being written in this issue (issue 13):
`select_qwen_vl` recognises no file yet."""
from __future__ import annotations

from typing import Mapping

from .kinds import ModelKind, StateDict
from .lazy import LazyTensor


def select_qwen_vl(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    return None


def build_qwen_vl(sd: StateDict, config: dict):
    raise NotImplementedError


QWEN_VL_KIND = ModelKind(name="qwen_vl", title="Qwen2.5-VL", select=select_qwen_vl, build=build_qwen_vl)
