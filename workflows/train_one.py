"""``cpsd train``: one model from a config; outputs next to its checkpoints, run in MLflow."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from mlcore import configlib
from mlcore.experiment import train_classifier, training_fingerprint
from mlcore.train import TrainResult, check_resumable
from workflows.config import Config
from workflows.tracking import NullRunLogger, flat_params, git_commit, parent_run


def train_one(cfg: Config, out_dir: str | Path | None = None) -> TrainResult:
    """Train the configured model on all classes; write config, metrics and scores.

    The output goes to ``out_dir``, by default ``<storage_path>/<name>/train-<fingerprint>``:
    the same config resumes its own run, another config gets another folder. An ``out_dir``
    holding another config's checkpoint is refused before anything is written
    (``ResumeMismatchError``). With ``mlflow.enabled`` the run is logged as ``<name>-train``
    (params, per-epoch metrics under the pipeline's names, the best checkpoint).
    """
    fingerprint = training_fingerprint(cfg)
    out = Path(out_dir) if out_dir else Path(cfg.storage_path) / cfg.name / f"train-{fingerprint}"
    check_resumable(out, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
    params = {**flat_params(cfg), "git_commit": git_commit()}
    tracking = (
        parent_run(cfg.mlflow, f"{cfg.name}-train", params, {"cpsd.kind": "train"})
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    history: list[dict[str, float]] = []
    with tracking as (_, run):

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append({"epoch": epoch, **metrics})
            (out / "metrics.json").write_text(json.dumps(history, indent=1))
            run.metrics(metrics, step=epoch)

        result = train_classifier(cfg, out, on_epoch=on_epoch)
        (out / "metrics.json").write_text(json.dumps(result.history, indent=1))
        if cfg.mlflow.log_checkpoints:
            run.artifact(result.best_checkpoint, "checkpoints")
    return result
