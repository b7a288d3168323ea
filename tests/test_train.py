"""The training loop on generated data: learns, resumes exactly, fails loudly."""

import json

import numpy as np
import pytest
import torch

from mlcore import configlib
from mlcore.data.loading import build_loaders, open_dataset
from mlcore.experiment import train_classifier
from mlcore.metrics import mean_average_precision
from mlcore.models import build_model
from mlcore.train import BEST, LAST, NonFiniteLossError, Supervised, load_checkpoint, train


class _Stop(Exception):
    pass


def test_tiny_model_beats_random_scores(tiny_config, tmp_path):
    exp = configlib.replace(tiny_config, ["train.epochs=4"])
    result = train_classifier(exp, open_dataset(exp.data), tmp_path / "run")
    targets = result.val_targets
    rng = np.random.default_rng(0)
    random_map = np.mean(
        [mean_average_precision(rng.random(targets.shape), targets) for _ in range(20)]
    )
    learned = result.best_metrics["val_mAP"]
    assert learned > random_map + 0.1, (learned, random_map)
    assert len(result.history) == 4
    assert {"train_loss", "val_mAP", "val_CF1", "val_OF1", "lr"} <= set(result.history[-1])
    best = load_checkpoint(tmp_path / "run" / BEST)
    assert best["epoch"] + 1 == result.best_epoch  # checkpoints index epochs; records count


def test_resume_gives_identical_weights(tiny_config, tmp_path):
    exp = tiny_config
    full = train_classifier(exp, open_dataset(exp.data), tmp_path / "full", log=lambda _: None)

    def stop_after_first_epoch(epoch, metrics):
        if epoch == 1:  # epochs count from 1 in callbacks and records
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(
            exp,
            open_dataset(exp.data),
            tmp_path / "cut",
            on_epoch=stop_after_first_epoch,
            log=lambda _: None,
        )
    assert load_checkpoint(tmp_path / "cut" / LAST)["epoch"] == 0
    lines = []
    resumed = train_classifier(exp, open_dataset(exp.data), tmp_path / "cut", log=lines.append)
    assert any("resumed" in line for line in lines)
    a = load_checkpoint(tmp_path / "full" / LAST)
    b = load_checkpoint(tmp_path / "cut" / LAST)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert resumed.best_metrics["val_mAP"] == full.best_metrics["val_mAP"]


def test_non_finite_loss_names_epoch_and_step(tiny_config, tmp_path):
    exp = tiny_config
    dataset = open_dataset(exp.data)
    train_loader, val_loader = build_loaders(dataset, exp.train)
    model = build_model(exp.model.backbone, dataset.num_classes)
    calls = {"n": 0}

    def exploding(logits, batch):
        calls["n"] += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.targets)
        return loss * (float("nan") if calls["n"] > len(train_loader) + 2 else 1.0)

    with pytest.raises(
        NonFiniteLossError, match=r"epoch 2 step 3; last good checkpoint: .*last.pt"
    ):
        train(model, train_loader, val_loader, exploding, exp.train, tmp_path, log=lambda _: None)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 0  # the good epoch is kept


def test_supervised_objective_and_checkpoint_is_weights_only(tiny_config, tmp_path):
    exp = configlib.replace(tiny_config, ["train.epochs=1"])
    result = train_classifier(
        exp, open_dataset(exp.data), tmp_path, class_subset=[3, 1], log=lambda _: None
    )
    state = torch.load(tmp_path / LAST, weights_only=True)
    assert state["epoch"] == 0
    assert result.val_scores.shape[1] == 2
    json.dumps(state["history"])  # plain data only
    assert isinstance(Supervised(torch.nn.BCEWithLogitsLoss()), Supervised)
