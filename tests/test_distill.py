"""Logit merging, the student objective, and cached vs online teachers."""

import numpy as np
import pytest
import torch

from mlcore.data.dataset import MultiLabelDataset, build_transform
from mlcore.data.loading import resolve_dataset
from mlcore.data.manifest import Manifest
from mlcore.distill import (
    CachedTeachers,
    DistillationLoss,
    Ensemble,
    LogitStore,
    OnlineTeachers,
    iter_logits,
    load_cached_ensemble,
    merge_logits,
    write_logits,
)
from mlcore.losses.asl import AsymmetricLoss
from mlcore.models import build_model
from mlcore.train import Batch


def test_merge_logits_round_trip_with_shuffled_subsets():
    rng = np.random.default_rng(0)
    full = torch.randn(5, 11, dtype=torch.float64)
    order = rng.permutation(11)
    subsets = [order[:4].tolist(), order[4:5].tolist(), order[5:].tolist()]
    blocks = [full[:, s] for s in subsets]
    assert torch.equal(merge_logits(blocks, subsets, 11), full)


@pytest.mark.parametrize(
    ("subsets", "message"),
    [
        ([[0, 1], [1, 2]], r"repeated \[1\]"),
        ([[0], [2]], r"missing \[1\]"),
        ([[0, 1], [2, 5]], r"out of range \[5\]"),
    ],
)
def test_merge_logits_rejects_non_partitions(subsets, message):
    blocks = [torch.zeros(1, len(s)) for s in subsets]
    with pytest.raises(ValueError, match=message):
        merge_logits(blocks, subsets, 3)


def test_merge_logits_shape_mismatch():
    with pytest.raises(ValueError, match="teacher 1: 1 logits for a subset of 2"):
        merge_logits([torch.zeros(1, 1), torch.zeros(1, 1)], [[0], [1, 2]], 3)


def test_distillation_loss_by_hand():
    s = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([[0.0, -1.0]], dtype=torch.float64)
    neg = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    bce = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    cls = bce(s, y).item()
    # ‖s − ŷ⁺‖² = 1 + 1 = 2; ‖s − ŷ⁻‖² = 1 + 4 = 5
    both = DistillationLoss(bce, cls_weight=0.5, alpha=0.5)(s, y, pos, neg).item()
    assert both == pytest.approx(0.5 * cls + 0.25 * 2 + 0.25 * 5)
    skew = DistillationLoss(bce, cls_weight=1.0, alpha=0.8)(s, y, pos, neg).item()
    assert skew == pytest.approx(cls + 0.4 * 2 + 0.1 * 5)
    single = DistillationLoss(bce, cls_weight=0.5)(s, y, None, neg).item()
    assert single == pytest.approx(0.5 * cls + 0.5 * 5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_logit_store_round_trip_in_blocks(tmp_path, dtype):
    logits = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    ids = list("abcdefg")
    write_logits(tmp_path / "a", ids, [logits[:4], logits[4:]], [5, 0, 2], dtype=dtype)
    store = LogitStore(tmp_path / "a")
    assert store.class_indices == [5, 0, 2] and (store.num_rows, store.width) == (7, 3)
    rows = np.array([6, 0, 3, 3])
    back = store.rows(rows)
    assert back.dtype == np.float32
    # float16 keeps ~3 significant digits: relative error at most 2^-11.
    tol = 0 if dtype == "float32" else 2.0**-11
    np.testing.assert_allclose(back, logits[rows], rtol=tol, atol=tol)
    assert np.load(tmp_path / "a" / "values.npy").dtype == np.dtype(dtype)  # a plain .npy
    with pytest.raises(IndexError, match="row 7 outside"):
        store.rows(np.array([7]))
    with pytest.raises(ValueError, match="do not match"):
        load_cached_ensemble([tmp_path / "a"], list("abcdefx"), 6)
    with pytest.raises(ValueError, match="6 logit rows for 7 image ids"):
        write_logits(tmp_path / "b", ids, [logits[:6]], [5, 0, 2])
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_online_and_cached_teachers_agree_on_unaugmented_inputs(tiny_config, tmp_path):
    manifest = Manifest.load(resolve_dataset(tiny_config.data))
    c = manifest.num_classes
    subsets = [list(range(0, c, 2)), list(range(1, c, 2))]
    torch.manual_seed(0)
    teachers = [build_model("test_resnet", len(s)).eval() for s in subsets]
    # Un-augmented: the eval transform for both the cache and the "training" batches.
    dataset = MultiLabelDataset(
        manifest, "train", build_transform(tiny_config.data, train=False), return_index=True
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=dataset.collate_fn)
    paths = []
    for t, (model, subset) in enumerate(zip(teachers, subsets, strict=True)):
        logits = iter_logits(model, loader, torch.device("cpu"))
        paths.append(write_logits(tmp_path / f"t{t}", dataset.ids, logits, subset))
    cached = CachedTeachers(load_cached_ensemble(paths, dataset.ids, c), None)
    online = OnlineTeachers(Ensemble(tuple(map(tuple, subsets)), tuple(teachers)), None, c)
    batch_loader = torch.utils.data.DataLoader(
        dataset, batch_size=16, shuffle=True, collate_fn=dataset.collate_fn
    )
    images, targets, indices = next(iter(batch_loader))
    batch = Batch(images, targets, indices)
    (from_cache, none_a), (from_online, none_b) = cached(batch), online(batch)
    assert none_a is None and none_b is None
    torch.testing.assert_close(from_online, from_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["cpsd", "dgpd"])
def test_ensemble_target_row_is_what_the_student_regresses_to(mode, tiny_config, tmp_path):
    """The ``ensemble-target`` row's logits equal the student's target as its loss defines
    it: with the KD terms summed, their gradient is s − target, so target = s − gradient."""
    from mlcore import configlib
    from mlcore.cpsd import (
        cache_teacher_logits,
        combined_logits,
        compute_partitions,
        plan_teachers,
        student_objective,
        student_teachers,
        target_combination,
    )
    from mlcore.data.loading import open_dataset
    from mlcore.distill import LOGIT_STORE
    from mlcore.models import build_model_from_config

    # α ≠ ½ so that swapping the CGP and DGP shares would show.
    cfg = configlib.replace(tiny_config, [f"cpsd.mode={mode}", "cpsd.kd_alpha=0.3"])
    dataset = open_dataset(cfg.data)
    specs = plan_teachers(compute_partitions(cfg, dataset))
    checkpoints, stores = [], []
    for i, spec in enumerate(specs):
        torch.manual_seed(i)  # untrained teachers with distinct weights are enough here
        model = build_model_from_config(cfg.model, len(spec.subset))
        checkpoint = tmp_path / f"{spec.name}.pt"
        torch.save({"model": model.state_dict()}, checkpoint)
        checkpoints.append(checkpoint)
        stores.append(
            cache_teacher_logits(cfg, dataset, spec, checkpoint, tmp_path / spec.name / LOGIT_STORE)
        )

    manifest = dataset.manifest
    rows = manifest.split_rows(cfg.data.train_split)
    targets = torch.from_numpy(manifest.multi_hot(rows)).float()
    cls_loss = AsymmetricLoss()
    objective = student_objective(
        cfg, student_teachers(cfg, dataset, specs, teacher_logits=stores)
    )(cls_loss)
    student = torch.randn(len(rows), manifest.num_classes, requires_grad=True)
    batch = Batch(torch.empty(0), targets, torch.arange(len(rows)))
    objective(student, batch).backward()
    alone = student.detach().clone().requires_grad_(True)
    (cfg.cpsd.cls_weight * cls_loss(alone, targets)).backward()  # the same summed ASL
    target = student.detach() - (student.grad - alone.grad)

    logits, row_targets = combined_logits(
        cfg, dataset, target_combination(cfg, specs, checkpoints), cfg.data.train_split
    )
    np.testing.assert_array_equal(row_targets, targets.numpy())
    np.testing.assert_allclose(logits, target.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits, 0.0, atol=1e-3)  # a real target, not a degenerate one
