"""Step1X-Edit's connector as a loadable kind. Being written in this issue (issue 13): recognises no file yet."""
from __future__ import annotations

from typing import Mapping

from .kinds import ModelKind, StateDict
from .lazy import LazyTensor


def select_step1x_connector(sd: Mapping[str, LazyTensor]) -> tuple[str, StateDict] | None:
    return None


def build_step1x_connector(sd: StateDict, config: dict):
    raise NotImplementedError


STEP1X_CONNECTOR_KIND = ModelKind(name="step1x_connector", title="Step1X-Edit connector",
                                  select=select_step1x_connector, build=build_step1x_connector)
