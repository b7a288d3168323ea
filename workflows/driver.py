"""What every driver (pipeline, study, sweep, ``cpsd train``) does before anything starts.

:func:`preflight` finds the user's mistakes while they are cheap: a missing dataset, labels out
of range, a ``cpsd.k`` larger than the class count, a backbone that does not build, a
``storage_path`` that cannot be written. Each is one line and exit 2, before Ray starts, before
an MLflow run or a stage folder exists.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mlcore.configlib import ConfigError
from mlcore.cpsd import ENSEMBLES
from mlcore.data.manifest import check_label_range, read_info
from mlcore.partition.kinds import check_k
from workflows.config import Config
from workflows.storage import Storage


def preflight(cfg: Config, *, uses_stages: bool = True) -> int:
    """The checks that need no Ray (module docstring); returns the number of classes.

    Raises:
        ConfigError, ManifestError: The first problem found, in one line.
    """
    num_classes = _num_classes(cfg)
    uses_partition = any(kind != "full" for kind in ENSEMBLES[cfg.cpsd.mode])
    if uses_stages and uses_partition:
        check_k(cfg.cpsd.k, num_classes)
    check_model_builds(cfg, num_classes)
    check_writable(cfg.storage_path)
    return num_classes


def _num_classes(cfg: Config) -> int:
    if cfg.data.root is not None:
        num_classes = read_info(cfg.data.root).num_classes  # ManifestError names the problem
        check_label_range(cfg.data.root, num_classes)
        return num_classes
    if cfg.data.synth.labels_from is not None:
        path = Path(cfg.data.synth.labels_from)
        if not path.is_file():
            raise ConfigError(f"data.synth.labels_from: no such file {path}")
        with np.load(path) as stats:
            key = "labels" if "labels" in stats else "class_counts"
            return int(stats[key].shape[-1])
    return cfg.data.synth.num_classes


def check_model_builds(cfg: Config, num_classes: int) -> None:
    """Build the configured model and run it on one tiny image.

    Word queries need the class embeddings, which training loads; here their backbone is
    built with a plain head, which is what can fail (an unknown name, bad backbone_args).
    """
    import torch

    from mlcore.models import build_model_from_config, family_of

    model_cfg = cfg.model
    if family_of(model_cfg.head).class_embeddings(model_cfg):
        model_cfg = dataclasses.replace(model_cfg, head="gap")
    try:
        model = build_model_from_config(model_cfg, num_classes).eval()
        size = cfg.data.image_size
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # timm and torch say "what" in many exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model (backbone {cfg.model.backbone!r}) does not build: {first}"
        ) from err


def check_writable(storage_path: str) -> None:
    """Write and delete a probe file under ``storage_path`` (local or object storage)."""
    probe = f".cpsd-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        storage = Storage(storage_path)
        if storage.is_local:
            Path(storage.path("")).mkdir(parents=True, exist_ok=True)
        storage.write_json(probe, {"probe": True})
        storage.fs.delete_file(storage.path(probe))
    except (OSError, ValueError) as err:
        raise ConfigError(f"storage_path {storage_path} is not writable: {err}") from err


def spill_dir_for(storage: Storage, name: str) -> Path:
    """Where the job's own unsent MLflow records go: its storage folder, or on object
    storage a local folder of the driver (``./mlflow-unsent/<name>``)."""
    if storage.is_local:
        return Path(storage.path(name))
    return Path.cwd() / "mlflow-unsent" / name


def report_unsent(storage: Storage, rels: Sequence[str], log: Callable[[str], None]) -> int:
    """Name the stages whose MLflow records are still unsent (``unsent-mlflow.json``); the
    next job that reuses such a stage sends them. Returns how many."""
    from workflows.tracking import UNSENT_FILE

    unsent = [rel for rel in rels if storage.exists(f"{rel}/{UNSENT_FILE}")]
    if unsent:
        log(f"MLflow: {len(unsent)} stages have records still unsent; a rerun sends them:")
        for rel in unsent:
            log(f"  {storage.uri_of(rel)}/{UNSENT_FILE}")
    return len(unsent)
