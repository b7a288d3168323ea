"""The "random" decomposition baseline of CPSD (§4, Fig. 3): classes split at random.

The authors' script (``partition/generate_rand_partirion.py`` in Robbie-Xu/CPSD) shuffles the
class indices and cuts the shuffled list at k − 1 random positions. It draws cut points with
replacement from [0, m], so it can produce empty subsets (and then asserts). Here the k − 1
cuts are drawn *without* replacement from 1..m − 1, i.e. uniformly over the ways to write m as
k positive sizes, so no subset is ever empty. Passing ``sizes`` (e.g. the subset sizes of a
CGP partition) instead fixes the sizes, so random and spectral partitions compare at equal
sizes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np


def random_partition(
    num_classes: int, k: int, seed: int = 0, sizes: Sequence[int] | None = None
) -> np.ndarray:
    """Assign m classes to k non-empty subsets uniformly at random.

    Args:
        num_classes: m >= 1.
        k: number of subsets, 1 <= k <= m.
        seed: seed of the generator; equal arguments give equal outputs.
        sizes: optional length-k subset sizes, each >= 1, summing to m. When omitted the sizes
            are themselves random (a uniformly drawn composition of m into k positive parts).

    Returns:
        Integer array of shape (m,) with ids 0..k-1, where subset t holds ``sizes[t]``
        classes (when ``sizes`` is given).

    Raises:
        ValueError: if m < 1, k is not an integer in [1, m], or ``sizes`` does not have k
            positive entries summing to m.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an integer in [1, {num_classes}], got {k!r}")
    rng = np.random.default_rng(seed)
    if sizes is None:
        cuts = np.sort(rng.choice(np.arange(1, num_classes), size=k - 1, replace=False))
        counts = np.diff(np.concatenate(([0], cuts, [num_classes])))
    else:
        counts = np.asarray(sizes)
        if (
            counts.shape != (k,)
            or not np.issubdtype(counts.dtype, np.integer)
            or (counts < 1).any()
            or counts.sum() != num_classes
        ):
            raise ValueError(
                f"sizes must be {k} positive integers summing to {num_classes}, got {list(sizes)}"
            )
    assignment = np.empty(num_classes, dtype=np.int64)
    assignment[rng.permutation(num_classes)] = np.repeat(np.arange(k), counts)
    return assignment
