"""``cpsd train``: one model from a config; outputs next to its checkpoints, run in MLflow."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import yaml

from mlcore import configlib
from mlcore.bundle import BUNDLE_FILE
from mlcore.configlib import ConfigError
from mlcore.cpsd import evaluate_model
from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier, training_fingerprint
from mlcore.train import TrainResult, check_resumable
from mlcore.zsl import evaluate_zero_shot, zero_shot_split
from workflows.config import Config
from workflows.tracking import (
    NullRunLogger,
    describe_experiment,
    final_metrics_of,
    flat_params,
    git_commit,
    parent_run,
    record_trained_model,
    runs_page_link,
    share_runs_view,
    source_tags,
)

ROLE = "train"


def run_description(cfg: Config, num_classes: int, dataset: str) -> str:
    """What the run's numbers cover (shown as the run's description in MLflow)."""
    classes = f"all {num_classes} classes"
    zero_shot = ""
    if cfg.zsl.enabled:
        classes = f"the {num_classes} seen classes"
        zero_shot = (
            " zsl_* and gzsl_* are the zero-shot metrics of the kept epoch on the test split "
            "(ZSL: the unseen classes, GZSL: all classes; see docs/zsl.md)."
        )
    return (
        f"cpsd train: {cfg.model.backbone} with a {cfg.model.head} head and {cfg.loss.name} "
        f"loss on {classes} of '{dataset}'. val_mAP is the selected weights' "
        "mAP each epoch (the better of val_mAP_plain, the trained weights, and val_mAP_ema, "
        "their moving average); best_val_mAP and best_epoch are the kept epoch; test_mAP and "
        "shift_mAP evaluate it on the 'test' and 'test_shift' splits when the dataset has them; "
        "num_classes_evaluated is how many classes every mAP averages over." + zero_shot
    )


def train_one(cfg: Config, out_dir: str | Path | None = None) -> TrainResult:
    """Train the configured model on all classes; write config, metrics and scores.

    The output goes to ``out_dir``, by default ``<storage_path>/<name>/train-<fingerprint>``:
    the same config resumes its own run, another config gets another folder. An ``out_dir``
    holding another config's checkpoint is refused before anything is written
    (``ResumeMismatchError``). With ``mlflow.enabled`` the run ``<name>-train`` gets params,
    per-epoch metrics, the final keys, its datasets, the best checkpoint, an MLflow model
    (``mlflow.log_models``) and a Model Registry version with alias ``train``
    (``mlflow.registered_model``).

    ``metrics.json`` holds one record per epoch. With ``zsl.unseen_classes`` set the model
    trains on the seen classes only (``test_mAP`` and the final keys then cover the seen
    classes), and the selected weights are evaluated under the zero-shot protocol
    (``mlcore.zsl``): a last record ``{"evaluation": "zero_shot", "split": ..., "best_epoch":
    ..., "zsl_mAP": ..., ...}`` is appended, and the same numbers go to the MLflow run at the
    best epoch's step.
    """
    if cfg.pretrain.enabled:
        raise ConfigError(
            "pretrain.enabled runs in cpsd pipeline, study and run-local; for cpsd train set "
            "model.pretrained_file to a pretrain stage's backbone.pt"
        )
    dataset = open_dataset(cfg.data)
    fingerprint = training_fingerprint(cfg, dataset)
    out = Path(out_dir) if out_dir else Path(cfg.storage_path) / cfg.name / f"train-{fingerprint}"
    check_resumable(out, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
    params = {**flat_params(cfg), "git_commit": git_commit()}
    tags = {"cpsd.kind": "train", **source_tags("cpsd train")}
    tracking = (
        parent_run(cfg.mlflow, f"{cfg.name}-train", params, tags)
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    history: list[dict[str, float]] = []
    with tracking as (tracker, run):
        info = dataset.info
        if tracker is not None:
            describe_experiment(run.client, tracker.experiment_id)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append({"epoch": epoch, **metrics})
            (out / "metrics.json").write_text(json.dumps(history, indent=1))
            run.metrics(metrics, step=epoch)

        result = train_classifier(cfg, dataset, out, on_epoch=on_epoch)
        seen = zero_shot_split(cfg.zsl, info).seen if cfg.zsl.enabled else None
        held_out = evaluate_model(cfg, dataset, result.best_checkpoint, out, class_subset=seen)
        test = held_out.get("test")
        num_classes = info.num_classes if seen is None else len(seen)
        final = final_metrics_of(
            result.best_metrics["val_mAP"], result.best_epoch, num_classes, held_out
        )
        (out / "final.json").write_text(json.dumps(final, indent=1))
        records: list[dict] = list(result.history)
        if cfg.zsl.enabled:
            zero_shot = evaluate_zero_shot(cfg, dataset, result.best_checkpoint)
            records.append(
                {
                    "evaluation": "zero_shot",
                    "split": cfg.data.test_split,
                    "best_epoch": result.best_epoch,
                    **zero_shot,
                }
            )
            run.metrics(zero_shot, step=result.best_epoch)
        (out / "metrics.json").write_text(json.dumps(records, indent=1))
        if tracker is None:
            return result
        if cfg.mlflow.log_checkpoints:
            run.artifact(result.best_checkpoint, "checkpoints")
        splits = {cfg.data.train_split: "training", cfg.data.val_split: "validation"}
        if test is not None:
            splits[cfg.data.test_split] = "test"
        recorded = record_trained_model(
            tracker.uri,
            run.run_id,
            role=ROLE,
            stage=ROLE,
            description=run_description(cfg, num_classes, info.name),
            bundle=out / BUNDLE_FILE,
            final=final,
            best_epoch=result.best_epoch,
            dataset_root=dataset.root,
            splits=splits,
            log_models=cfg.mlflow.log_models,
            registered_model=cfg.mlflow.registered_model,
        )
        if recorded.registered:
            print(
                f"registered {recorded.registered} = models:/{cfg.mlflow.registered_model}@{ROLE}"
            )
        view = share_runs_view(run.client, tracker.experiment_id)
        link = runs_page_link(tracker.uri, tracker.experiment_id, view=view)
        if not tracker.uri.startswith(("http://", "https://")):
            link += f"  (after: mlflow ui --backend-store-uri {tracker.uri})"
        print(f"MLflow runs: {link}")
    return result
