"""The one config schema every command reads: the ML sections plus Ray, Tune and MLflow.

Load with :func:`load_config` (YAML + ``--set dotted.key=value`` overrides). Relative local
paths are resolved against the current directory when loading, because Ray workers run with a
different working directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlcore import configlib
from mlcore.config import (
    CPSDConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from mlcore.configlib import ConfigError


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where and how the pipeline's stages run on Ray."""

    address: str | None = None
    """Cluster to join; None: ``RAY_ADDRESS`` if set, else start a local instance."""
    num_cpus: int | None = None
    """CPUs of a local instance (None: all)."""
    num_gpus: int | None = None
    """GPUs of a local instance (None: detected; logical GPUs allowed for testing)."""
    teacher_gpus: float | None = None
    """GPUs per teacher; None: 1 when the cluster has GPUs, else 0 (the paper: one per GPU)."""
    teacher_cpus: float = 1.0
    """CPUs per teacher task."""
    student_gpus: float | None = None
    """GPUs of the student task (None: like teachers)."""
    student_cpus: float = 1.0
    """CPUs of the student task."""
    max_retries: int = 2
    """Retries of a stage whose worker died; a teacher resumes from its last epoch."""


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    """Experiment tracking."""

    enabled: bool = True
    """Log runs to MLflow."""
    tracking_uri: str | None = None
    """None: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db``. Multi-node
    clusters need a server (``http://...``): SQLite files are not shared between nodes."""
    experiment: str = "cpsd"
    """MLflow experiment name."""
    log_checkpoints: bool = True
    """Upload each run's best checkpoint as an artifact."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Top-level config: what ``cpsd train``, ``pipeline``, ``tune`` and ``demo`` read."""

    name: str = "experiment"
    """Run name: MLflow parent run name and the folder under ``storage_path``."""
    storage_path: str = "runs"
    """Artifacts root every node can reach: a local directory, or ``s3://``/``gs://``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Classification loss (teachers, student, baseline)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    cpsd: CPSDConfig = field(default_factory=CPSDConfig)
    """CPSD algorithm and ablation mode."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement and retries."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """Tracking."""
    tune: dict[str, Any] | None = None
    """Sweep definition (``workflows.tune``); validated by the tune command."""


def _is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def resolve_paths(cfg: Config) -> Config:
    """Make every local path absolute (Ray workers do not share the driver's cwd)."""
    data = cfg.data
    synth = data.synth
    if synth is not None and synth.labels_from is not None:
        synth = dataclasses.replace(synth, labels_from=_absolute(synth.labels_from))
    data = dataclasses.replace(
        data,
        root=None if data.root is None else _absolute(data.root),
        cache_dir=_absolute(data.cache_dir),
        synth=synth,
    )
    model = cfg.model
    if model.pretrained_file is not None:
        model = dataclasses.replace(model, pretrained_file=_absolute(model.pretrained_file))
    return dataclasses.replace(
        cfg, storage_path=_absolute(cfg.storage_path), data=data, model=model
    )


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load, override, check and resolve a config; errors are :class:`ConfigError`."""
    return resolve_paths(configlib.load(Config, path, overrides))


__all__ = ["Config", "ConfigError", "MlflowConfig", "RayConfig", "load_config", "resolve_paths"]
