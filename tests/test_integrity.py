"""Outputs match the config that produced them: resume fingerprints, content-only stage keys,
determinism with DataLoader workers, crash-safe best checkpoints, one loss scale for the
student, class-aware sampling over a teacher's classes."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from mlcore import configlib
from mlcore.cpsd import TeacherSpec, baseline_fingerprint, held_out_splits, teacher_fingerprint
from mlcore.data.loading import OpenDataset, build_loaders, open_dataset, resolve_dataset
from mlcore.experiment import train_classifier
from mlcore.train import BEST, LAST, PENDING, SCORES, load_checkpoint
from workflows.cli import run as cli
from workflows.config import config_path, load_config


class _Stop(Exception):
    pass


def _config(tiny_overrides, tmp_path, *extra):
    return load_config(
        config_path("tiny"),
        [*tiny_overrides, f"storage_path={tmp_path / 'runs'}", "mlflow.enabled=false", *extra],
    )


# ---------------------------------------------------------------------------------------------
# 1. A run resumes only its own checkpoint


def test_train_never_resumes_another_configs_checkpoint(tiny_overrides, tmp_path, capsys):
    base = [*(a for o in tiny_overrides for a in ("--set", o))]
    common = ["train", "--config", "tiny", *base, "--set", f"storage_path={tmp_path / 'runs'}"]
    common += ["--set", "mlflow.enabled=false", "--set", "train.epochs=1"]
    assert cli(common) == 0
    first = capsys.readouterr().out
    # Another loss and lr: a new content-keyed folder, trained from scratch, never "resumed".
    assert cli([*common, "--set", "loss.name=bce", "--set", "train.lr=1e-5"]) == 0
    second = capsys.readouterr().out
    assert "resumed" not in second
    folders = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert len(folders) == 2 and all(f.startswith("train-") for f in folders)
    assert first.splitlines()[-1] != second.splitlines()[-1]  # different output folders

    # The same folder named explicitly for another config: refused, with what to do.
    out = tmp_path / "runs" / "tiny" / folders[0]
    for change in (["--set", "loss.name=bce"], ["--set", "train.epochs=3"]):
        capsys.readouterr()
        assert cli([*common, "--out", str(out), *change]) == 2
        err = capsys.readouterr().err
        assert "holds the checkpoint of another run" in err and "delete that one" in err
    # The same config resumes (here: is complete) in its own folder.
    capsys.readouterr()
    assert cli([*common, "--set", "loss.name=bce", "--set", "train.lr=1e-5"]) == 0
    assert "resumed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 2. Stage keys depend on content only


def _opened(cfg) -> OpenDataset:
    return open_dataset(cfg.data, with_bytes=False)


def _baseline_key(cfg) -> str:
    return baseline_fingerprint(cfg, _opened(cfg))


def _teacher_key(cfg, spec: TeacherSpec) -> str:
    return teacher_fingerprint(cfg, _opened(cfg), spec)


def test_stage_keys_follow_content_not_location_or_logging(tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path)
    root = resolve_dataset(cfg.data)
    copy = tmp_path / "elsewhere" / "same-bytes"
    shutil.copytree(root, copy)
    at_copy = configlib.replace(cfg, [f"data.root={copy}", "data.synth=null"])
    spec = TeacherSpec("cgp", 0, (0, 3, 5))
    assert _teacher_key(at_copy, spec) == _teacher_key(cfg, spec)
    assert _baseline_key(at_copy) == _baseline_key(cfg)

    for harmless in ("loss.asl.adaptive.log_every=3", "data.num_workers=1", "train.device=cpu"):
        assert _baseline_key(configlib.replace(cfg, [harmless])) == _baseline_key(cfg), harmless
    assert _baseline_key(configlib.replace(cfg, ["train.lr=1e-3"])) != (_baseline_key(cfg))

    # A context-shift split added to the same data: training keys unchanged, held-out changed.
    shifted = configlib.replace(cfg, ["data.synth.num_test_shift=40"])
    assert _baseline_key(shifted) == _baseline_key(cfg)
    assert _teacher_key(shifted, spec) == _teacher_key(cfg, spec)
    assert held_out_splits(_opened(shifted))[1] != held_out_splits(_opened(cfg))[1]


def test_pretrained_file_is_keyed_by_its_bytes(tiny_overrides, tmp_path):
    import timm

    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    cfg = _config(tiny_overrides, tmp_path, f"model.pretrained_file={weights}")
    before = _baseline_key(cfg)
    torch.manual_seed(1)
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), weights)
    assert _baseline_key(cfg) != before  # same path, new weights: a new key


def test_fields_leave_keys_only_by_their_own_mark():
    @dataclass(frozen=True, kw_only=True)
    class Section:
        device: str = "cpu"  # same name as a non-result field elsewhere, but not marked
        cache: str = field(default="/tmp", metadata=configlib.NOT_RESULT)

    assert configlib.result_content(Section()) == {"device": "cpu"}
    ignored = {
        f"{section}.{f.name}"
        for section, cls in [
            ("data", load_config(None).data),
            ("train", load_config(None).train),
            ("model", load_config(None).model),
            ("loss", load_config(None).loss),
        ]
        for f in dataclasses.fields(cls)
        if f.metadata.get(configlib.KEY_ROLE) == "ignore"
    }
    assert ignored == {
        "data.root",
        "data.synth",
        "data.cache_dir",
        "data.cache_remote",
        "data.num_workers",
        "data.decoder",
        "data.decode_on",
        "train.num_threads",
        "train.device",
        "train.eval_batch_size",
        "loss.source",
    }


# ---------------------------------------------------------------------------------------------
# 3. DataLoader workers change nothing, resumed or not


def _weights(path):
    state = load_checkpoint(path / LAST)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_resume_with_a_worker_is_bit_identical_to_no_worker(tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path, "data.randaugment=true", "data.cutout=0.25")
    plain = train_classifier(cfg, open_dataset(cfg.data), tmp_path / "plain", log=lambda _: None)
    one_worker = configlib.replace(cfg, ["data.num_workers=1"])

    def stop(epoch, metrics):
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train_classifier(
            one_worker,
            open_dataset(one_worker.data),
            tmp_path / "cut",
            on_epoch=stop,
            log=lambda _: None,
        )
    resumed = train_classifier(
        one_worker, open_dataset(one_worker.data), tmp_path / "cut", log=lambda _: None
    )
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0
    assert resumed.best_metrics["val_mAP"] == plain.best_metrics["val_mAP"]


# ---------------------------------------------------------------------------------------------
# Decision: best.pt always holds the epoch the record names


def test_a_crash_between_checkpoint_writes_never_leaves_a_stray_best(tiny_config, tmp_path):
    from mlcore.train import settle_best

    cfg = configlib.replace(tiny_config, ["train.epochs=1"])
    train_classifier(cfg, open_dataset(cfg.data), tmp_path, log=lambda _: None)
    recorded = load_checkpoint(tmp_path / LAST)["best"]["epoch"]
    good = load_checkpoint(tmp_path / BEST)
    assert good["epoch"] == recorded

    # Crash after the new best was staged but before last.pt recorded it: rolled back.
    torch.save({**good, "epoch": recorded + 1}, tmp_path / (BEST + PENDING))
    np.savez(tmp_path / "tmp.npz", scores=np.zeros(1), targets=np.zeros(1))
    shutil.move(tmp_path / "tmp.npz", tmp_path / (SCORES + PENDING))
    settle_best(tmp_path)
    assert load_checkpoint(tmp_path / BEST)["epoch"] == recorded
    assert not (tmp_path / (BEST + PENDING)).exists()
    assert not (tmp_path / (SCORES + PENDING)).exists()

    # Crash after last.pt recorded it but before the rename: completed.
    state = load_checkpoint(tmp_path / LAST)
    state["best"] = {**state["best"], "epoch": recorded + 1}
    torch.save(state, tmp_path / LAST)
    torch.save({**good, "epoch": recorded + 1}, tmp_path / (BEST + PENDING))
    settle_best(tmp_path)
    assert load_checkpoint(tmp_path / BEST)["epoch"] == recorded + 1


# ---------------------------------------------------------------------------------------------
# 4. Classification and distillation on one scale, for every loss


@pytest.mark.parametrize("loss_name", ["bce", "focal", "asl", "db"])
def test_distillation_and_classification_share_one_reduction(loss_name):
    from mlcore.config import LossConfig
    from mlcore.distill import DistillationLoss
    from mlcore.losses import LossInputs, build_loss

    def ratio(batch: int, classes: int, reduction: str) -> float:
        g = torch.Generator().manual_seed(batch * classes)
        student = torch.randn(batch, classes, generator=g)
        teacher = torch.randn(batch, classes, generator=g)
        targets = (torch.rand(batch, classes, generator=g) < 0.1).float()
        targets[0] = 1.0  # every class has a positive (DB needs frequencies > 0)
        freq = targets.sum(0).numpy()
        loss = build_loss(LossConfig(name=loss_name), LossInputs(freq, train_size=batch))
        kd = DistillationLoss(loss, cls_weight=0.5, alpha=0.5, reduction=reduction)
        cls_term = kd.cls_weight * kd.cls_loss(student, targets)
        total = kd(student, targets, teacher, None)
        return ((total - cls_term) / cls_term).item()

    for reduction in ("sum", "mean"):
        big, small = ratio(32, 80, reduction), ratio(8, 20, reduction)
        # The balance no longer depends on B·C (it was 2,900 for DB at B=32, C=80)...
        assert 0.2 < big < 20 and 0.2 < small < 20, (reduction, big, small)
        # DB's re-balancing weights depend on the drawn frequencies, hence not equal; a term
        # summed against a mean would differ 16x between these two sizes.
        assert 1 / 3 < big / small < 3, (reduction, big, small)
    # ...nor on the convention chosen.
    assert ratio(32, 80, "sum") == pytest.approx(ratio(32, 80, "mean"), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. Class-aware sampling balances over the classes the model learns


def test_class_aware_sampling_of_a_teacher_draws_only_its_classes(tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path, "data.class_aware_sampling=true")
    subset = [0, 1, 2]
    train_loader, _ = build_loaders(open_dataset(cfg.data), cfg.train, class_subset=subset)
    drawn = 0
    for _, targets in train_loader:
        drawn += len(targets)
        # Before: 31% of drawn images carried no label of [0, 1, 2].
        assert bool((targets.sum(1) > 0).all())
    assert drawn >= len(train_loader.dataset) - cfg.train.batch_size
