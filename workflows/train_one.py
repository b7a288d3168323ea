"""``cpsd train``: one model from a config, its outputs written next to its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mlcore import configlib
from mlcore.config import ExperimentConfig
from mlcore.experiment import train_classifier
from mlcore.train import TrainResult
from workflows.config import Config


def experiment_of(cfg: Config) -> ExperimentConfig:
    """The ML sections of a full config."""
    return ExperimentConfig(
        name=cfg.name,
        output_dir=cfg.storage_path,
        data=cfg.data,
        model=cfg.model,
        loss=cfg.loss,
        train=cfg.train,
        cpsd=cfg.cpsd,
    )


def train_one(cfg: Config, out_dir: str | Path | None = None) -> TrainResult:
    """Train the configured model on all classes; write config, metrics and scores."""
    out = Path(out_dir) if out_dir else Path(cfg.storage_path) / cfg.name / "train"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
    history: list[dict[str, float]] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        history.append({"epoch": epoch, **metrics})
        (out / "metrics.json").write_text(json.dumps(history, indent=1))

    result = train_classifier(experiment_of(cfg), out, on_epoch=on_epoch)
    (out / "metrics.json").write_text(json.dumps(result.history, indent=1))
    return result
