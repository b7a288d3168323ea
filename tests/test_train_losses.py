"""Every loss and head of the config trains on generated data without NaN."""

import math

import pytest

from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier
from workflows.config import config_path, load_config


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.name=bce"],
        ["loss.name=focal", "loss.focal.gamma=2"],
        ["loss.name=asl"],
        ["loss.name=asl", "loss.asl.adaptive.enabled=true", "loss.asl.adaptive.log_every=1"],
        ["loss.name=asl", "loss.asl.adaptive.enabled=true", "loss.asl.adaptive.adapt=margin"],
        ["loss.name=db"],
        ["loss.name=db", "loss.db.focal=false", "data.class_aware_sampling=true"],
        ["model.head=ml_decoder", "model.ml_decoder.embed_dim=64", "model.ml_decoder.ff_dim=128"],
    ],
    ids=[
        "bce",
        "focal",
        "asl",
        "asl-adaptive",
        "asl-adaptive-margin",
        "db",
        "db-cas",
        "ml-decoder",
    ],
)
def test_loss_and_head_train_without_nan(overrides, tiny_overrides, tmp_path):
    cfg = load_config(config_path("tiny"), [*tiny_overrides, "train.epochs=1", *overrides])
    steps = []
    result = train_classifier(
        cfg, open_dataset(cfg.data), tmp_path, on_step=lambda step, stats: steps.append(stats),
        log=lambda _: None,
    )  # fmt: skip
    metrics = result.history[-1]
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_mAP"] <= 1.0
    if cfg.loss.name == "asl" and cfg.loss.settings.adaptive.enabled:
        asl = cfg.loss.settings
        assert steps and {"gamma_neg", "clip", "p_pos", "p_neg", "delta_p"} <= set(steps[-1])
        moved = "gamma_neg" if asl.adaptive.adapt == "gamma_neg" else "clip"
        start = asl.gamma_neg if moved == "gamma_neg" else asl.clip
        assert steps[-1][moved] != start  # the controller acted
