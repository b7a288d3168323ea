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
from typing import Any, Literal

from mlcore import configlib
from mlcore.config import UNSEEN_FROM_MANIFEST, ExperimentConfig
from mlcore.configlib import ConfigError
from mlcore.errors import ManifestError, ResumeMismatchError

CONFIG_DIR = Path(__file__).parent / "configs"


class TrackingUnavailable(RuntimeError):
    """The tracking server or store cannot be reached; raised before any training starts."""


# What a command reports as one line and exit code 2: the user's config, data or setup.
USER_ERRORS = (
    ConfigError,
    ManifestError,
    TrackingUnavailable,
    FileNotFoundError,
    ResumeMismatchError,
)


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
    """GPUs per teacher; None: 1 when the cluster has GPUs, else 0 (the paper: one per GPU).
    ``pipeline`` and ``tune`` also count a GPU node the autoscaler can add
    (``workflows.autoscaling``)."""
    teacher_cpus: float = 1.0
    """CPUs per teacher task."""
    student_gpus: float | None = None
    """GPUs of the student task (None: like teachers)."""
    student_cpus: float = 1.0
    """CPUs of the student task."""
    max_retries: int = 2
    """Retries of a stage whose worker died; a teacher resumes from its last epoch. With
    ``train_workers > 1`` also the restarts of a worker group (Ray Train ``FailureConfig``)."""
    train_workers: int = 1
    """Data-parallel workers per model (Ray Train ``TorchTrainer``, DDP: nccl on GPUs, gloo on
    CPUs) for teachers, student, baseline and Tune trials; each worker holds the stage's
    ``*_cpus`` / ``*_gpus`` (trials: ``tune.resources_per_trial``). 1: the stage trains in its
    Ray task. Changes where a model trains, not what it computes."""
    student_train_workers: int | None = None
    """Workers of the student and the baseline (None: like ``train_workers``)."""
    prewarm: bool | None = None
    """Ask the autoscaler up front for the stages that can run at once (2k teachers and the
    baseline) and release them as they finish; None: on where an autoscaler can add nodes."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError("ray.max_retries must be >= 0")
        if self.train_workers < 1 or (
            self.student_train_workers is not None and self.student_train_workers < 1
        ):
            raise ConfigError("ray.train_workers and ray.student_train_workers must be >= 1")


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
    log_models: bool = True
    """Log each trained model as an MLflow model (PyTorch flavour + an image pyfunc; see
    ``workflows.mlflow_model``), linked to its run at the best epoch."""
    registered_model: str | None = None
    """Register trained models in the Model Registry under this name, with an alias per role
    (``models:/<name>@train``, ``@student``, ``@baseline``); None: do not register."""

    def __post_init__(self) -> None:
        if self.registered_model is not None and not self.registered_model.strip():
            raise ConfigError("mlflow.registered_model must be a non-empty name or null")
        if self.registered_model is not None and not self.log_models:
            raise ConfigError("mlflow.registered_model needs mlflow.log_models: true")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Early stopping of sweep trials."""

    name: Literal["asha", "fifo"] = "asha"
    """``asha``: asynchronous successive halving; ``fifo``: run every trial to the end."""
    grace_period: int = 1
    """Epochs every trial gets before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A Ray Tune sweep over config fields (``cpsd tune`` / ``python -m workflows.tune``)."""

    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted config key -> one distribution: ``{uniform: [lo, hi]}``, ``{loguniform: [lo,
    hi]}``, ``{randint: [lo, hi]}``, ``{choice: [a, b, ...]}`` or ``{grid: [a, b, ...]}``."""
    search: Literal["random", "grid"] = "random"
    """``random``: ``num_samples`` draws (grid keys crossed with them); ``grid``: every
    combination once (only ``grid``/``choice`` keys allowed)."""
    num_samples: int = 4
    """Trials (random search) or repeats of the grid."""
    max_concurrent_trials: int | None = None
    """Cap on trials running at once (None: as many as resources allow)."""
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources of one trial, e.g. ``{CPU: 4, GPU: 0.5}`` (fractional GPUs pack trials);
    on an autoscaling cluster these requests drive scale-up. Without a ``GPU`` key a trial
    gets the GPU default of ``ray.teacher_gpus`` when that is unset (one where the cluster has
    or can add GPUs)."""
    metric: str = "val_mAP"
    """Reported metric the scheduler and the best-trial choice use."""
    mode: Literal["max", "min"] = "max"
    """Whether ``metric`` is maximised or minimised."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Early stopping."""
    max_failures: int = 1
    """Retries of a trial that failed (it resumes from its last epoch checkpoint)."""
    class_subset: tuple[int, ...] | None = None
    """Train on these classes only (tune a teacher's sub-task); None: all classes."""
    target: Literal["model", "student"] = "model"
    """What a trial trains. ``model``: the configured model. ``student``: the CPSD student of
    ``cpsd`` against the config's teachers, which the stage graph trains (with their cached
    logits) before the trials start, or reuses from ``<storage_path>/<name>/stages``; the space
    may only hold student settings (``cpsd.cls_weight``, ``cpsd.kd_alpha``,
    ``cpsd.kd_reduction``, ``cpsd.student_lr_scale``, ``cpsd.student_epochs``), so every trial
    shares the same teachers."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("tune.num_samples must be >= 1")
        if self.max_failures < 0:
            raise ConfigError("tune.max_failures must be >= 0")
        if self.scheduler.grace_period < 1 or self.scheduler.reduction_factor <= 1:
            raise ConfigError("tune.scheduler: grace_period >= 1 and reduction_factor > 1")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """An ablation study: a grid of pipeline variants, each run over seeds (``cpsd study``)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted config key -> the values to try, e.g. ``cpsd.mode: [baseline, cgpd, cpsd]``;
    the variants are every combination of the keys' values."""
    variants: tuple[dict[str, Any], ...] = ()
    """Explicit variants, each a mapping of dotted keys to values, for combinations a grid
    cannot express (``{loss.name: db, data.class_aware_sampling: true}``); crossed with
    ``grid`` when both are set."""
    reference: str | None = None
    """Variant the others are compared with, paired by seed (e.g. ``loss=bce``); None: each
    variant's own baseline (the plain model trained with the same seed)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Each variant runs once per seed; a seed sets ``train.seed`` and ``cpsd.partition_seed``
    (and the generated data's seed with ``vary_data_seed``)."""
    vary_data_seed: bool = False
    """Also set ``data.synth.seed`` per seed (a fresh generated dataset per seed)."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("study.seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds repeats a seed: {list(self.seeds)}")
        for key, values in self.grid.items():
            if not isinstance(values, list | tuple) or not values:
                raise ConfigError(f"study.grid.{key}: needs a non-empty list of values")
        for i, variant in enumerate(self.variants):
            if not variant:
                raise ConfigError(f"study.variants[{i}]: an empty variant")


@dataclass(frozen=True, kw_only=True)
class Config(ExperimentConfig):
    """Top-level config: the ML sections plus where and how the workflows run.

    What ``cpsd train``, ``run-local``, ``pipeline``, ``tune`` and ``demo`` read; ``mlcore``
    functions take it as the :class:`ExperimentConfig` it extends.
    """

    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement and retries."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """Tracking."""
    tune: SweepConfig = field(default_factory=SweepConfig)
    """Sweep definition (``workflows.tune``)."""
    study: StudyConfig = field(default_factory=StudyConfig)
    """Ablation grid over seeds (``workflows.study``)."""
    verbose: bool = False
    """Console: forward every worker's output (epoch lines, with Ray's prefixes) and
    third-party INFO logging to the driver. Off: one line per stage and a progress line; each
    stage's epoch lines go to ``stage.log`` in its folder (``workflows.console``).
    ``--verbose`` sets it."""
    stale: Literal["reuse", "retrain", "error"] = "reuse"
    """A finished stage made by another product version or other ``mlcore`` code
    (``workflows.versions``): ``reuse`` it (one line names it; summaries mark its row),
    ``retrain`` it, or stop with an ``error``. ``--retrain-stale`` sets ``retrain``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # Imported here: the head registry imports torch and timm, which commands that fail
        # before reading a config (a wrong --model) must not wait for.
        from mlcore.models.family import check_family

        check_family(self)


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
        class_embeddings=(
            None if data.class_embeddings is None else _absolute(data.class_embeddings)
        ),
    )
    model = cfg.model
    if model.pretrained_file is not None:
        model = dataclasses.replace(model, pretrained_file=_absolute(model.pretrained_file))
    if model.encoder_checkpoint is not None:
        model = dataclasses.replace(model, encoder_checkpoint=_absolute(model.encoder_checkpoint))
    zsl = cfg.zsl
    if isinstance(zsl.unseen_classes, str) and zsl.unseen_classes != UNSEEN_FROM_MANIFEST:
        zsl = dataclasses.replace(zsl, unseen_classes=_absolute(zsl.unseen_classes))
    return dataclasses.replace(
        cfg, storage_path=_absolute(cfg.storage_path), data=data, model=model, zsl=zsl
    )


def config_path(name: str | None) -> Path | None:
    """A path, or the name of a bundled config (``tiny`` -> workflows/configs/tiny.yaml)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name!r} not found (bundled configs: {available})")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Load, override, check and resolve a config; errors are :class:`ConfigError`."""
    return resolve_paths(configlib.load(Config, path, overrides))


__all__ = [
    "CONFIG_DIR",
    "USER_ERRORS",
    "Config",
    "ConfigError",
    "MlflowConfig",
    "RayConfig",
    "StudyConfig",
    "SweepConfig",
    "TrackingUnavailable",
    "config_path",
    "load_config",
    "resolve_paths",
]
