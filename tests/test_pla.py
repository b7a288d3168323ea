"""The orderless CNN-RNN (PLA) end to end: `cpsd train --config pla_tiny`, its metrics in
metrics.json and MLflow, every order and the teacher-forced control, the two-stage recipe,
exact resume with SWA, and clear errors."""

import json

import pytest
import torch
from mlflow import MlflowClient

from mlcore import configlib
from mlcore.configlib import ConfigError
from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier
from mlcore.train import LAST, load_checkpoint
from workflows.cli import run
from workflows.config import config_path, load_config

SEQUENCE_METRICS = {
    "val_mAP",
    "val_CP",
    "val_CR",
    "val_CF1",
    "val_OP",
    "val_OR",
    "val_OF1",
    "val_duplicate_ratio",
    "val_order_rigidness",
    "val_pred_length",
    "val_true_length",
    "val_mla_loss",
    "train_loss",
}


@pytest.fixture()
def pla_config(tiny_overrides, tmp_path):
    return load_config(
        config_path("pla_tiny"),
        [*tiny_overrides, f"storage_path={tmp_path / 'runs'}", "mlflow.enabled=false"],
    )


def test_cpsd_train_pla_tiny_writes_the_sequence_metrics(tmp_path, tiny_overrides, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*tiny_overrides, f"mlflow.tracking_uri={uri}", "train.epochs=3"]
    argv = ["train", "--config", "pla_tiny", "--out", str(tmp_path / "t")]
    assert run(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert "best val OF1" in capsys.readouterr().out
    history = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for row in history:
        assert set(row) >= SEQUENCE_METRICS, SEQUENCE_METRICS - set(row)
        assert 0 <= row["val_duplicate_ratio"] <= 1 and 0 <= row["val_OF1"] <= 1
    assert "val_OF1_swa" not in history[0] and "val_OF1_swa" in history[1]  # SWA from epoch 2
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_pred_length"] > 0  # the decoder learnt to emit labels
    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("cpsd").experiment_id])
    assert logged.info.run_name == "pla_tiny-train" and logged.info.status == "FINISHED"
    assert {k for k in SEQUENCE_METRICS if k != "val_order_rigidness"} <= set(logged.data.metrics)
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "val_mla_loss")] == [
        1,
        2,
        3,
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.orderless.order=frequent", "loss.orderless.teacher_forcing=true"],
        ["loss.orderless.order=rare"],
        ["loss.orderless.order=dictionary"],
        ["loss.orderless.order=random"],
        ["loss.orderless.order=mla"],
        ["loss.orderless.order=pla", "loss.orderless.pla_variant=code"],
    ],
    ids=lambda o: "-".join(x.split("=")[1] for x in o),
)
def test_every_order_trains(pla_config, tmp_path, overrides):
    cfg = configlib.replace(pla_config, ["train.epochs=1", "train.swa.enabled=false", *overrides])
    result = train_classifier(cfg, open_dataset(cfg.data), tmp_path / "run", log=lambda _: None)
    assert set(result.best_metrics) >= SEQUENCE_METRICS
    assert result.val_scores.shape == (128, 10)


def test_two_stages_share_the_encoder_checkpoint(tiny_config, pla_config, tmp_path):
    bce = configlib.replace(tiny_config, ["loss.name=bce", "train.epochs=1"])
    stage1 = train_classifier(bce, open_dataset(bce.data), tmp_path / "stage1", log=lambda _: None)
    cfg = configlib.replace(
        pla_config,
        ["train.epochs=1", f"model.encoder_checkpoint={stage1.best_checkpoint}"],
    )
    result = train_classifier(cfg, open_dataset(cfg.data), tmp_path / "stage2", log=lambda _: None)
    assert result.best_epoch == 1
    missing = configlib.replace(cfg, [f"model.encoder_checkpoint={tmp_path / 'none.pt'}"])
    with pytest.raises(FileNotFoundError, match=r"none\.pt"):
        train_classifier(
            missing, open_dataset(missing.data), tmp_path / "stage2b", log=lambda _: None
        )


def test_resume_with_swa_gives_identical_weights(pla_config, tmp_path):
    cfg = configlib.replace(pla_config, ["train.epochs=3", "loss.orderless.order=random"])

    class Stop(Exception):
        pass

    def stop(epoch, metrics):  # after the second epoch: SWA (start_epoch 1, 0-based) has begun
        if epoch == 2:
            raise Stop

    full = train_classifier(cfg, open_dataset(cfg.data), tmp_path / "full", log=lambda _: None)
    with pytest.raises(Stop):
        train_classifier(
            cfg, open_dataset(cfg.data), tmp_path / "cut", on_epoch=stop, log=lambda _: None
        )
    resumed = train_classifier(cfg, open_dataset(cfg.data), tmp_path / "cut", log=lambda _: None)
    a, b = load_checkpoint(tmp_path / "full" / LAST), load_checkpoint(tmp_path / "cut" / LAST)
    for key in ("model", "swa"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    timing = {"epoch_time_s"}
    assert {k: v for k, v in resumed.best_metrics.items() if k not in timing} == {
        k: v for k, v in full.best_metrics.items() if k not in timing
    }


def test_too_many_labels_is_one_line_naming_the_row(tiny_overrides, tmp_path, capsys):
    sets = [*tiny_overrides, "mlflow.enabled=false", "model.rnn.max_steps=2"]
    argv = ["train", "--config", "pla_tiny", "--out", str(tmp_path / "t")]
    assert run(argv + [a for s in sets for a in ("--set", s)]) == 2
    err = capsys.readouterr().err
    assert "train row" in err and "image_id='train_" in err and "model.rnn.max_steps = 2" in err
    assert "Traceback" not in err
    assert not (tmp_path / "t" / LAST).exists()  # raised before training started


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.name=asl"], "model.head: rnn and loss.name: orderless go together"),
        (["cpsd.mode=cpsd"], "model.head: rnn needs cpsd.mode: baseline"),
        (["loss.orderless.teacher_forcing=true"], "loss.orderless.teacher_forcing needs a fixed"),
        (["loss.orderless.order=best"], "loss.orderless.order: 'best' is not one of"),
        (["model.rnn.max_steps=0"], "model.rnn.max_steps must be >= 1"),
        (["train.swa.every_steps=0"], "train.swa.every_steps must be >= 1"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(config_path("pla_tiny"), overrides)


def test_encoder_checkpoint_needs_the_rnn_head():
    with pytest.raises(ConfigError, match=r"model\.encoder_checkpoint needs model\.head: rnn"):
        load_config(config_path("tiny"), ["model.encoder_checkpoint=x.pt"])
