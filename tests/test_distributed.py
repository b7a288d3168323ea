"""Data-parallel training on Ray Train worker groups (two gloo workers on this CPU machine).

Tolerance. ``train_workers`` must change where a model trains, not what it computes: the same
samples form each global batch, augmentations are seeded per sample, the ranks' gradients are
summed and BatchNorm statistics cover the global batch. What is left are float rounding
differences (other summation orders in the all-reduces and in BatchNorm's statistics), which
training amplifies: Adam turns the rounding noise of gradients that are zero in exact arithmetic
(parameters whose effect BatchNorm cancels) into full-size steps. Stated tolerance, per epoch:
validation mAP within 2e-3, training loss within 1e-3 relative, and all weights within 1e-2 in
relative L2 distance. Measured on the tiny config: 2 epochs, identical metrics and weights 2e-7
apart (relative); 3 epochs, mAP 7e-4 apart and weights 3e-3 apart; the tiny CPSD student
(distillation's summed MSE makes larger steps), mAP 6e-4 apart. Thresholded metrics (CF1, OF1)
move more (0.035 for that student): scores near the 0.5 threshold flip, so they are not compared.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from torch import nn

from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier
from mlcore.train import LAST, Supervised, load_checkpoint
from workflows.config import config_path, load_config
from workflows.distributed import CrossRankBatchNorm, _cross_rank_batchnorm, fit_group
from workflows.storage import Storage
from workflows.tracking import RunLogger, experiment_id

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

MAP_TOL = 2e-3
LOSS_RTOL = 1e-3
WEIGHT_RTOL = 1e-2


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


def _config(tiny_overrides, tmp_path, *extra):
    return load_config(
        config_path("tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


def _mlflow_run(tmp_path) -> RunLogger:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, uri, "cpsd"), run_name="group")
    return RunLogger(client, run.info.run_id)


def _assert_same_training(reference_dir: Path, result_dir: Path, reference, result) -> None:
    a = load_checkpoint(reference_dir / LAST)
    b = load_checkpoint(result_dir / LAST)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        ours = torch.cat([b[key][n].double().flatten() for n in a[key]])
        ref = torch.cat([a[key][n].double().flatten() for n in a[key]])
        assert ((ours - ref).norm() / ref.norm()).item() < WEIGHT_RTOL, key
    assert len(result.history) == len(reference.history)
    for ours, ref in zip(result.history, reference.history, strict=True):
        assert ours["val_mAP"] == pytest.approx(ref["val_mAP"], abs=MAP_TOL)
        assert ours["train_loss"] == pytest.approx(ref["train_loss"], rel=LOSS_RTOL)


def test_cross_rank_batchnorm_equals_batchnorm_on_one_rank():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        cross = _cross_rank_batchnorm(nn.Sequential(*[m for m in plain]))
        assert isinstance(cross[1], CrossRankBatchNorm)
        assert cross[1].weight is plain[1].weight  # the same parameters, not copies
        reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        reference.load_state_dict(plain.state_dict())
        x = torch.randn(6, 3, 8, 8) * 3 + 5
        out_ref, out = reference(x), cross(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        for p_ref, p in zip(reference.parameters(), cross.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cross[1].running_var, reference[1].running_var)
        torch.testing.assert_close(cross[1].running_mean, reference[1].running_mean)
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_match_one_process(local_ray, tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path)
    reference = train_classifier(
        cfg, open_dataset(cfg.data), tmp_path / "reference", log=lambda _: None
    )
    logger = _mlflow_run(tmp_path)

    def run(out, **hooks):
        return train_classifier(cfg, open_dataset(cfg.data), out, **hooks)

    result = fit_group(
        run,
        tmp_path / "group",
        workers=2,
        resources={"num_cpus": 1},
        max_failures=0,
        logger=logger,
        storage=Storage(str(tmp_path / "storage")),
        rel="ray_train/equal",
    )
    _assert_same_training(tmp_path / "reference", tmp_path / "group", reference, result)
    mlflow_run = logger.client.get_run(logger.run_id)
    assert mlflow_run.data.tags["ray.world_size"] == "2"
    history = logger.client.get_metric_history(logger.run_id, "val_mAP")
    assert sorted(m.step for m in history) == [1, 2]  # rank 0 only: one value per epoch
    assert not (tmp_path / "storage" / "ray_train" / "equal").exists()  # removed when done


def test_killed_worker_resumes_the_group_from_the_last_epoch(local_ray, tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path)
    reference = train_classifier(
        cfg, open_dataset(cfg.data), tmp_path / "reference", log=lambda _: None
    )
    marker = tmp_path / "killed.json"
    steps_per_epoch = 10  # 320 images, global batch 32

    def run(out, *, placement, **hooks):
        calls = {"n": 0}

        def kill_rank1_in_epoch_1(loss):
            objective = Supervised(loss)

            def call(logits, batch):
                calls["n"] += 1
                # Mid-epoch 1 (after epoch 0's checkpoint), once: SIGKILL, no clean-up.
                mid_epoch_1 = calls["n"] == steps_per_epoch + 3
                if placement.rank == 1 and mid_epoch_1 and not marker.exists():
                    marker.write_text(json.dumps({"pid": os.getpid()}))
                    os.kill(os.getpid(), signal.SIGKILL)
                return objective(logits, batch)

            return call

        return train_classifier(
            cfg,
            open_dataset(cfg.data),
            out,
            make_objective=kill_rank1_in_epoch_1,
            placement=placement,
            **hooks,
        )

    logger = _mlflow_run(tmp_path)
    result = fit_group(
        run,
        tmp_path / "group",
        workers=2,
        resources={"num_cpus": 1},
        max_failures=2,
        logger=logger,
        storage=Storage(str(tmp_path / "storage")),
        rel="ray_train/killed",
    )
    assert marker.is_file(), "the fault was not injected"
    # Resumed after epoch 0 with the same MLflow run: each epoch logged exactly once (a restart
    # from scratch would have logged epoch 0 twice), and the same weights as without the kill.
    history = logger.client.get_metric_history(logger.run_id, "val_mAP")
    assert sorted(m.step for m in history) == [1, 2]
    _assert_same_training(tmp_path / "reference", tmp_path / "group", reference, result)


# The pipeline's student on two workers, against the one-process reference, is tested together
# with object storage in tests/test_object_storage.py: one pipeline run covers both.
