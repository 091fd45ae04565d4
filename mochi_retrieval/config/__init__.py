"""Experiment configuration, read only at the edge (the training program).

- :mod:`~mochi_retrieval.config.engine`: the strict YAML engine (unknown keys, types and ranges are errors
  naming the dotted key), for any dataclass;
- :mod:`~mochi_retrieval.config.schema`: :class:`ExperimentConfig`, whose library sections are the
  library's own settings dataclasses.

Usage::

    cfg = load_config("configs/fmnist.yaml", ["train.lr=0.06", "mochi.enabled=false"])
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

from ..errors import ConfigError, ConfigValueError
from . import engine
from .engine import from_dict, save_config, to_dict
from .schema import (
    TEXT_DATASETS,
    BankSection,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    MoCHiSection,
    MoCoConfig,
    ModelConfig,
    TrainConfig,
)

T = TypeVar("T")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), cls: type[T] | None = None) -> T:
    """Read a YAML config, apply ``dotted.key=value`` overrides and build ``cls`` (:class:`ExperimentConfig`
    by default); see :func:`mochi_retrieval.config.engine.load_config`."""
    return engine.load_config(path, overrides, ExperimentConfig if cls is None else cls)


__all__ = ["BankSection", "ConfigError", "ConfigValueError", "DataConfig", "EvalConfig", "ExperimentConfig",
           "MoCHiSection", "MoCoConfig", "ModelConfig", "TEXT_DATASETS", "TrainConfig", "from_dict", "load_config",
           "save_config", "to_dict"]
