"""Tests for mlcore.data.sampler.ClassAwareSampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlcore.data.sampler import ClassAwareSampler

# Single-label, long-tailed: class c has SIZES[c] images.
SIZES = [500, 200, 80, 30, 10, 3]
SINGLE = [[c] for c, size in enumerate(SIZES) for _ in range(size)]


def multi_label_set(num_images: int = 400, num_classes: int = 12, seed: int = 0) -> list[list[int]]:
    """Long-tailed multi-label lists (prevalence ~ 1/(c+1)), some images without labels."""
    rng = np.random.default_rng(seed)
    prevalence = 0.5 / np.arange(1, num_classes + 1)
    hits = rng.random((num_images, num_classes)) < prevalence
    return [np.flatnonzero(row).tolist() for row in hits]


def test_deterministic_for_seed_and_epoch():
    labels = multi_label_set()
    a = ClassAwareSampler(labels, 12, seed=7)
    b = ClassAwareSampler(labels, 12, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first  # a pure function of (seed, epoch)
    assert list(ClassAwareSampler(labels, 12, seed=8)) != first


def test_class_balance_on_long_tailed_labels():
    n = 60_000
    sampler = ClassAwareSampler(SINGLE, len(SIZES), num_samples=n, seed=0)
    classes, images = sampler.draws()
    label_of = np.array([row[0] for row in SINGLE])
    # The drawn class is exactly balanced (rounds of permutations) ...
    class_counts = np.bincount(classes, minlength=len(SIZES))
    assert class_counts.max() - class_counts.min() <= 1
    # ... so each class makes up 1/C of the yielded images, although the data is 500:3.
    frequency = np.bincount(label_of[images], minlength=len(SIZES)) / n
    np.testing.assert_allclose(frequency, 1 / len(SIZES), atol=0.002)


def test_images_are_used_evenly_within_a_class():
    sampler = ClassAwareSampler(SINGLE, len(SIZES), num_samples=6_000, seed=1)
    _, images = sampler.draws()
    start = 0
    for size in SIZES:
        uses = np.bincount(images, minlength=len(SINGLE))[start : start + size]
        # 1000 draws per class cycle through reshuffled lists: counts differ by at most 1.
        assert uses.max() - uses.min() <= 1
        start += size


def test_drawn_image_contains_drawn_class():
    labels = multi_label_set()
    sampler = ClassAwareSampler(labels, 12, num_samples=3_000, samples_per_class=3, seed=2)
    classes, images = sampler.draws()
    assert all(c in labels[i] for c, i in zip(classes.tolist(), images.tolist(), strict=True))
    # samples_per_class=3: consecutive triples come from one class draw.
    assert (classes.reshape(-1, 3) == classes[::3, None]).all()


@pytest.mark.parametrize(("num_samples", "replicas"), [(100, 3), (90, 3), (7, 4), (64, 1)])
def test_shards_are_disjoint_and_cover_the_global_sequence(num_samples, replicas):
    labels = multi_label_set()
    shards = [
        ClassAwareSampler(
            labels, 12, num_samples=num_samples, seed=3, num_replicas=replicas, rank=r
        )
        for r in range(replicas)
    ]
    for s in shards:
        s.set_epoch(5)
    per_rank = -(-num_samples // replicas)
    assert all(len(s) == per_rank and len(list(s)) == per_rank for s in shards)
    _, global_images = shards[0].draws()
    assert global_images.size == per_rank * replicas  # padded with extra draws
    # Rank r holds positions r, r + R, ...: interleaving the shards rebuilds the sequence.
    rebuilt = np.empty_like(global_images)
    for rank, shard in enumerate(shards):
        rebuilt[rank::replicas] = list(shard)
    np.testing.assert_array_equal(rebuilt, global_images)


def test_epoch_length_and_dataloader():
    labels = multi_label_set(num_images=250)
    sampler = ClassAwareSampler(labels, 12)
    assert len(sampler) == 250  # default: number of images
    loader = DataLoader(torch.arange(250), batch_size=32, sampler=sampler)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 250 and len(batches) == 8


def test_csr_input_matches_lists():
    labels = multi_label_set()
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in labels])])
    values = np.array([c for row in labels for c in row])
    from_lists = ClassAwareSampler(labels, 12, seed=4)
    from_csr = ClassAwareSampler((offsets, values), 12, seed=4)
    assert list(from_lists) == list(from_csr)
    with pytest.raises(ValueError, match="CSR"):
        ClassAwareSampler((offsets[:-1], values), 12)


def test_empty_classes_are_skipped_and_all_empty_is_an_error():
    labels = [[0], [0, 3], [3], [], [0]]
    sampler = ClassAwareSampler(labels, 5, num_samples=200)
    classes, images = sampler.draws()
    assert set(classes.tolist()) == {0, 3}
    assert sampler.empty_classes.tolist() == [1, 2, 4]
    assert 3 not in images.tolist()  # the unlabelled image can never be drawn
    with pytest.raises(ValueError, match="no class has any image"):
        ClassAwareSampler([[], []], 4)


def test_duplicate_labels_count_once():
    # Image 0 lists class 0 twice; with two images in class 0 each must get half of its draws.
    sampler = ClassAwareSampler([[0, 0, 1], [0]], 2, num_samples=400, seed=0)
    classes, images = sampler.draws()
    assert np.bincount(images[classes == 0], minlength=2).tolist() == [100, 100]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="labels must lie"):
        ClassAwareSampler([[0], [5]], 5)
    with pytest.raises(ValueError, match="rank"):
        ClassAwareSampler([[0]], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_samples"):
        ClassAwareSampler([[0]], 1, num_samples=0)
