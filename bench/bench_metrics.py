"""Benchmark ``mlcore.metrics.average_precision`` against scikit-learn's per-class loop.

Run from the repository root (``PYTHONPATH=.`` unless the package is installed)::

    PYTHONPATH=. python bench/bench_metrics.py [--sklearn-columns 50] [--seed 0]

For each size it times the vectorised per-class AP on float32 scores (what a model emits) with
scores rounded to 3 decimals so ties occur, then scikit-learn's ``average_precision_score``
called once per class. On the large size scikit-learn runs on the first ``--sklearn-columns``
columns only and its time is extrapolated linearly to all columns (each class is an independent
call, so cost is linear in the column count); the output says so. Max abs difference is over the
columns both computed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

from mlcore.metrics import average_precision


def _make_case(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label-like data: per-class prevalence 0.5–20 %, informative float32 scores."""
    prevalence = rng.uniform(0.005, 0.2, size=c).astype(np.float32)
    targets = np.empty((n, c), dtype=np.uint8)
    scores = np.empty((n, c), dtype=np.float32)
    # Filled in row blocks so generation itself never needs a full float64 temporary.
    step = 10_000
    for start in range(0, n, step):
        stop = min(start + step, n)
        block_targets = rng.random((stop - start, c), dtype=np.float32) < prevalence
        logits = rng.standard_normal((stop - start, c), dtype=np.float32) + 2.0 * block_targets
        scores[start:stop] = np.round(1.0 / (1.0 + np.exp(-logits)), 3)
        targets[start:stop] = block_targets
    return scores, targets


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray, columns: int) -> np.ndarray:
    """scikit-learn AP of the first ``columns`` classes, one call per class."""
    return np.array([average_precision_score(targets[:, j], scores[:, j]) for j in range(columns)])


def _bench(rng: np.random.Generator, n: int, c: int, sklearn_columns: int) -> None:
    scores, targets = _make_case(rng, n, c)
    t0 = time.perf_counter()
    ours = average_precision(scores, targets)
    ours_s = time.perf_counter() - t0

    columns = min(c, sklearn_columns)
    t0 = time.perf_counter()
    reference = _sklearn_ap(scores, targets, columns)
    sk_measured_s = time.perf_counter() - t0
    sk_s = sk_measured_s * c / columns
    diff = np.max(np.abs(ours[:columns] - reference))

    print(f"{n:,} samples x {c:,} classes (float32 scores, 3-decimal ties)")
    print(f"  mlcore.metrics.average_precision : {ours_s:8.3f} s  (all {c:,} classes)")
    if columns < c:
        print(
            f"  sklearn per-class loop           : {sk_s:8.3f} s  "
            f"(extrapolated: {sk_measured_s:.3f} s measured on {columns} of {c:,} classes)"
        )
    else:
        print(f"  sklearn per-class loop           : {sk_s:8.3f} s  (all {c:,} classes)")
    print(f"  speed-up                         : {sk_s / ours_s:8.1f}x")
    print(f"  max |AP difference|              : {diff:.3e}  (over {columns} classes)")


def main() -> None:
    """Parse arguments and run the small and large benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sklearn-columns", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    _bench(rng, 10_000, 80, sklearn_columns=80)
    _bench(rng, 100_000, 1_000, sklearn_columns=args.sklearn_columns)


if __name__ == "__main__":
    main()
