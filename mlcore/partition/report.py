"""Serialisable records and a picture of a label partition.

A partition is only reproducible together with the statistics it was computed from, so the
report carries a hash of the exact label counts next to k, τ, kind, seed and the Ncut.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Above this many classes names are unreadable at any sane figure size.
_MAX_TICK_LABELS = 150
# Above this many classes the heatmap shows block means, keeping the image (and memory) small.
_MAX_PIXELS = 1024
_HASH_DOMAIN = b"cpsd-label-stats-v1"


def label_stats_hash(
    pair_counts: np.ndarray | sp.sparray | sp.spmatrix, class_counts: np.ndarray
) -> str:
    """SHA-256 of the label statistics in a canonical byte form.

    The bytes are: a domain tag, m, the class counts, then the pair counts as canonical CSR
    (sorted indices, no explicit zeros), all little-endian int64. Dense and sparse inputs of
    equal values therefore hash equal.

    Args:
        pair_counts: e, shape (m, m), integer-valued counts (dense or scipy sparse).
        class_counts: n, shape (m,), integer-valued counts.

    Returns:
        The hex digest (64 characters).

    Raises:
        ValueError: on mismatched shapes or non-integral counts.
    """
    counts = np.asarray(class_counts)
    m = counts.shape[0] if counts.ndim == 1 else -1
    if counts.ndim != 1 or pair_counts.shape != (m, m):
        raise ValueError(
            f"pair_counts must be (m, m) and class_counts (m,); got {pair_counts.shape} and "
            f"{counts.shape}"
        )
    pairs = sp.csr_array(pair_counts, copy=True)
    for name, values in (("class_counts", counts), ("pair_counts", pairs.data)):
        if values.size and not np.array_equal(values, np.round(values)):
            raise ValueError(f"{name} must hold integer counts")
    pairs = sp.csr_array(pairs, dtype=np.int64)
    pairs.sum_duplicates()
    pairs.eliminate_zeros()
    pairs.sort_indices()
    digest = hashlib.sha256(_HASH_DOMAIN)
    digest.update(np.array([m], dtype="<i8").tobytes())
    for part in (counts, pairs.indptr, pairs.indices, pairs.data):
        digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    return digest.hexdigest()


def partition_report(
    assignment: np.ndarray,
    class_names: Sequence[str],
    *,
    k: int,
    tau: float,
    kind: str,
    seed: int,
    ncut: float,
    stats_hash: str,
) -> dict[str, Any]:
    """A JSON-ready description of a partition.

    Args:
        assignment: shape (m,), subset id in 0..k-1 per class.
        class_names: m names in class-index order.
        k: number of subsets.
        tau: τ of the affinity.
        kind: ``"cgp"``, ``"dgp"`` or ``"random"``.
        seed: seed the partition was computed with.
        ncut: its normalised cut.
        stats_hash: :func:`label_stats_hash` of the statistics used.

    Returns:
        ``{"k", "tau", "kind", "seed", "ncut", "stats_hash", "subsets"}`` where ``subsets[t]``
        lists ``{"index": i, "name": class_names[i]}`` of subset t in class-index order.
        Only built-in types, so ``json.dumps`` takes it as is.

    Raises:
        ValueError: if the lengths differ or some id is outside 0..k-1 or unused.
    """
    labels = np.asarray(assignment)
    if labels.shape != (len(class_names),):
        raise ValueError(
            f"assignment has shape {labels.shape} but there are {len(class_names)} class names"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"assignment ids must lie in [0, {k})")
    subsets = [np.flatnonzero(labels == t) for t in range(k)]
    if any(s.size == 0 for s in subsets):
        raise ValueError("every subset 0..k-1 must hold at least one class")
    return {
        "k": int(k),
        "tau": float(tau),
        "kind": str(kind),
        "seed": int(seed),
        "ncut": float(ncut),
        "stats_hash": str(stats_hash),
        "subsets": [
            [{"index": int(i), "name": str(class_names[i])} for i in members] for members in subsets
        ],
    }


def plot_affinity_heatmap(
    affinity: np.ndarray | sp.sparray | sp.spmatrix,
    assignment: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Category affinity by subset",
) -> Path:
    """Write a PNG of P with classes grouped by subset and subset borders drawn.

    Classes are ordered by (subset id, class index). Up to 150 classes the class names label
    both axes; above that the tick labels are dropped, and above 1,024 classes each pixel is
    the mean of a block of P (computed sparsely); the title says when either happens.

    Args:
        affinity: P, shape (m, m), dense or scipy sparse.
        assignment: shape (m,), subset id per class.
        class_names: m names in class-index order.
        path: output file (PNG).
        title: first line of the figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: on inconsistent shapes.
    """
    labels = np.asarray(assignment)
    m = labels.shape[0]
    if labels.ndim != 1 or affinity.shape != (m, m) or len(class_names) != m:
        raise ValueError(
            f"need affinity (m, m), assignment (m,) and m class names; got {affinity.shape}, "
            f"{labels.shape} and {len(class_names)}"
        )
    order = np.lexsort((np.arange(m), labels))
    borders = np.cumsum(np.unique(labels, return_counts=True)[1])[:-1]
    notes = [f"{m} classes, {len(borders) + 1} subsets"]
    if m <= _MAX_PIXELS:
        image = (affinity.toarray() if sp.issparse(affinity) else np.asarray(affinity))[order]
        image = image[:, order]
        scale = 1.0
    else:
        # Averaging operator R (pixels × m): image = R P Rᵀ never densifies P.
        pixel = np.arange(m) * _MAX_PIXELS // m
        per_pixel = np.bincount(pixel, minlength=_MAX_PIXELS)
        r = sp.csr_array((1.0 / per_pixel[pixel], (pixel, order)), shape=(_MAX_PIXELS, m))
        image = r @ affinity @ r.T
        image = image.toarray() if sp.issparse(image) else np.asarray(image)
        scale = _MAX_PIXELS / m
        notes.append(f"{_MAX_PIXELS}×{_MAX_PIXELS} block means")
    labelled = m <= _MAX_TICK_LABELS
    if not labelled:
        notes.append("class names omitted")

    side = min(max(6.0, 0.14 * m + 2.5), 24.0) if labelled else 10.0
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = ax.imshow(image, cmap="viridis", interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="affinity")
    for b in borders * scale - 0.5:
        ax.axhline(b, color="red", linewidth=0.8)
        ax.axvline(b, color="red", linewidth=0.8)
    if labelled:
        names = [str(class_names[i]) for i in order]
        fontsize = float(np.clip(640.0 / m, 4.0, 9.0))
        ax.set_xticks(np.arange(m), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(np.arange(m), names, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"{title}\n({'; '.join(notes)})")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
