"""Class-aware re-sampling for multi-label data (Shen et al. 2016, as used by the DB loss paper).

Each draw first picks a class, then an image containing it. Which image and which class, and how
the stream is split across data-parallel workers, is documented on :class:`ClassAwareSampler`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

LabelLists = Sequence[Sequence[int]]
CSRLabels = tuple[np.ndarray, np.ndarray]


def _to_csr(labels: LabelLists | CSRLabels) -> tuple[np.ndarray, np.ndarray]:
    """Normalise per-image label lists or ``(offsets, values)`` to int64 CSR arrays."""
    if isinstance(labels, tuple) and len(labels) == 2 and isinstance(labels[0], np.ndarray):
        offsets = np.asarray(labels[0], dtype=np.int64)
        values = np.asarray(labels[1], dtype=np.int64)
        if (
            offsets.ndim != 1
            or offsets.size == 0
            or offsets[0] != 0
            or offsets[-1] != values.size
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(
                "CSR offsets must be 1-D, start at 0, be non-decreasing and end at len(values)"
            )
        return offsets, values
    lengths = np.fromiter((len(row) for row in labels), dtype=np.int64, count=len(labels))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.fromiter(itertools.chain.from_iterable(labels), dtype=np.int64, count=offsets[-1])
    return offsets, values


class ClassAwareSampler(Sampler[int]):
    """Class-aware sampler: pick a class, then an image that contains it.

    Class order. Classes are visited in rounds: each round is a fresh random permutation of all
    classes that have at least one image, so every class is drawn with frequency 1/C over the
    epoch (exactly, up to the last incomplete round). This is what the authors of the DB loss
    do (``wutong16/DistributionBalancedLoss``, ``mllt/datasets/loader/sampler.py``:
    ``RandomCycleIter`` over classes) and has lower variance than i.i.d. uniform class draws.

    Image within a class. Each class cycles through its images in a random order that is
    reshuffled every time the list is exhausted (the authors' ``RandomCycleIter``), so images of
    a class are used evenly. Each class draw yields ``samples_per_class`` consecutive images of
    that cycle (the authors' ``num_samples_cls``, 3 in their code; the paper describes 1).

    Determinism and epochs. The whole epoch is a pure function of ``(seed, epoch)``:
    :meth:`set_epoch` selects the epoch, and the per-class cycles restart every epoch (unlike
    the authors' code, which keeps iterators alive across epochs). Their epoch length was
    ``max_i n_i * C / 4``; pass that as ``num_samples`` to reproduce it.

    Distributed training (e.g. under Ray Train, one sampler per worker). Every rank generates
    the same global sequence of ``total_size = num_replicas * ceil(num_samples / num_replicas)``
    draws from ``(seed, epoch)`` and rank ``r`` takes positions ``r, r + num_replicas, ...``. The
    shards are disjoint and together cover the global sequence; instead of repeating indices,
    the padding up to ``total_size`` consists of extra draws. As with ``DistributedSampler``,
    call :meth:`set_epoch` on every rank at the start of each epoch.

    Classes without any image are skipped (they can never be drawn); see
    :attr:`empty_classes`.

    Args:
        labels: Per-image class indices, either ``list[list[int]]`` or a CSR pair
            ``(offsets, values)`` of numpy arrays where image ``k`` has the labels
            ``values[offsets[k]:offsets[k + 1]]``. Duplicate labels in an image count once.
        num_classes: Number of classes ``C``.
        num_samples: Global epoch length (all ranks together); defaults to the number of images.
            ``len(sampler)`` and the attribute ``num_samples`` are this rank's share,
            ``ceil(num_samples / num_replicas)``, as in ``DistributedSampler``.
        samples_per_class: Consecutive images taken from a class per class draw.
        seed: Base seed, shared by all ranks.
        num_replicas: Number of data-parallel ranks.
        rank: This rank, in ``[0, num_replicas)``.

    Raises:
        ValueError: If no class has any image, a label is outside ``[0, num_classes)``, the CSR
            arrays are malformed, or a size/rank/seed argument is out of range.
    """

    def __init__(
        self,
        labels: LabelLists | CSRLabels,
        num_classes: int,
        *,
        num_samples: int | None = None,
        samples_per_class: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        offsets, values = _to_csr(labels)
        num_images = offsets.size - 1
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got {values.min()}..{values.max()}"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {rank}")
        if samples_per_class < 1 or seed < 0:
            raise ValueError("samples_per_class must be >= 1 and seed >= 0")
        num_samples = num_images if num_samples is None else num_samples
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

        # (class, image) pairs sorted by class, then image, without duplicates. Sort + mask rather
        # than np.unique, which is ~100x slower on millions of int64 keys with NumPy 2.4.
        image_of_value = np.repeat(np.arange(num_images, dtype=np.int64), np.diff(offsets))
        pairs = np.sort(values * num_images + image_of_value)
        first = np.ones(pairs.size, dtype=bool)
        first[1:] = pairs[1:] != pairs[:-1]
        pairs = pairs[first]
        pair_class, self._class_images = np.divmod(pairs, max(num_images, 1))
        counts = np.bincount(pair_class, minlength=num_classes)
        self._class_ptr = np.concatenate([[0], np.cumsum(counts)])
        self.classes = np.flatnonzero(counts)
        if self.classes.size == 0:
            raise ValueError("no class has any image: class-aware sampling is impossible")
        self.empty_classes = np.flatnonzero(counts == 0)

        self.num_classes = num_classes
        self.num_images = num_images
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.num_samples = math.ceil(num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose sequence the next iteration yields (same on every rank)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def draws(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The global sequence of an epoch, before sharding.

        Args:
            epoch: Epoch to generate; defaults to the one selected by :meth:`set_epoch`.

        Returns:
            ``(classes, images)``, both int64 of length :attr:`total_size`: the class drawn at
            each position and the image index yielded there (which contains that class).
        """
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        per_draw = self.samples_per_class
        num_draws = math.ceil(self.total_size / per_draw)
        rounds = math.ceil(num_draws / self.classes.size)
        class_seq = rng.permuted(np.tile(self.classes, (rounds, 1)), axis=1).ravel()[:num_draws]

        # Fill the draws of one class at a time from that class's reshuffled cycle.
        images = np.empty((num_draws, per_draw), dtype=np.int64)
        positions = np.argsort(class_seq, kind="stable")
        draws_per_class = np.bincount(class_seq, minlength=self.num_classes)
        start = 0
        for cls in self.classes:
            count = draws_per_class[cls]
            if count == 0:
                continue
            pool = self._class_images[self._class_ptr[cls] : self._class_ptr[cls + 1]]
            needed = count * per_draw
            cycles = rng.permuted(np.tile(pool, (math.ceil(needed / pool.size), 1)), axis=1)
            images[positions[start : start + count]] = cycles.ravel()[:needed].reshape(count, -1)
            start += count
        classes = np.repeat(class_seq, per_draw)[: self.total_size]
        return classes, images.ravel()[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        _, images = self.draws()
        return iter(images[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
