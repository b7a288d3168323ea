"""``cpsd train``: one model from a config; outputs next to its checkpoints, run in MLflow."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from mlcore import configlib
from mlcore.experiment import resolve_dataset, train_classifier
from mlcore.train import TrainResult
from mlcore.zsl import evaluate_zero_shot
from workflows.config import Config
from workflows.tracking import NullRunLogger, flat_params, git_commit, parent_run


def train_one(cfg: Config, out_dir: str | Path | None = None) -> TrainResult:
    """Train the configured model on all classes; write config, metrics and scores.

    ``metrics.json`` holds one record per epoch. With ``zsl.unseen_classes`` set the model
    trains on the seen classes only, and the selected weights are then evaluated under the
    zero-shot protocol (``mlcore.zsl``): a last record ``{"evaluation": "zero_shot", "split":
    ..., "best_epoch": ..., "zsl_mAP": ..., ...}`` is appended, and the same numbers go to the
    MLflow run at the best epoch's step.

    With ``mlflow.enabled`` the run is logged as ``<name>-train`` (params, per-epoch metrics
    under the pipeline's names, the best checkpoint).
    """
    out = Path(out_dir) if out_dir else Path(cfg.storage_path) / cfg.name / "train"
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
        records: list[dict] = list(result.history)
        if cfg.zsl.enabled:
            zero_shot = evaluate_zero_shot(cfg, result.best_checkpoint, resolve_dataset(cfg.data))
            records.append(
                {
                    "evaluation": "zero_shot",
                    "split": cfg.zsl.eval_split,
                    "best_epoch": result.best_epoch,
                    **zero_shot,
                }
            )
            run.metrics(zero_shot, step=result.best_epoch)
        (out / "metrics.json").write_text(json.dumps(records, indent=1))
        if cfg.mlflow.log_checkpoints:
            run.artifact(result.best_checkpoint, "checkpoints")
    return result
