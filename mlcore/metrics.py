"""Multi-label classification metrics: per-class AP, mAP and the CP/CR/CF1/OP/OR/OF1 report.

Notation for ``N`` samples and ``C`` classes: ``scores`` is an ``(N, C)`` real matrix (higher
means "more likely positive"), ``targets`` an ``(N, C)`` 0/1 matrix.

**Average precision** of class ``j`` is the non-interpolated area under its precision-recall step
curve, with tied scores forming one threshold (scikit-learn's ``average_precision_score``)::

    AP_j = Σ_n (R_n − R_{n−1}) · P_n

over the distinct scores ``t_1 > t_2 > …`` of column ``j``, where ``P_n`` and ``R_n`` are the
precision and recall of the rule "positive iff score ≥ t_n" and ``R_0 = 0``. Recall only grows at
thresholds that admit positives, so the sum equals the mean, over the ``G_j`` positive samples
``i``, of the precision at that sample's own score::

    AP_j = (1 / G_j) · Σ_{i : y_ij = 1} |{k : y_kj = 1, s_kj ≥ s_ij}| / |{k : s_kj ≥ s_ij}|

which needs only a sorted copy of the column (a binary search gives the denominator) and of its
positive scores (its tie runs give the numerator), never a per-sample loop. ``AP_j`` is undefined
(NaN) when ``G_j = 0``.

**Thresholded report** (the convention of ML-GCN, Chen et al., CVPR 2019, which the CPSD paper,
§4.1, follows). With prediction ``ŷ_ij = [s_ij ≥ τ]`` and per-class counts ``Nc_j`` (true
positives), ``Np_j`` (predicted positives) and ``Ng_j`` (ground-truth positives)::

    CP = mean_j Nc_j / Np_j     CR = mean_j Nc_j / Ng_j     CF1 = 2·CP·CR / (CP + CR)
    OP = Σ_j Nc_j / Σ_j Np_j    OR = Σ_j Nc_j / Σ_j Ng_j    OF1 = 2·OP·OR / (OP + OR)

Edge conventions, checked against ``AveragePrecisionMeter.evaluation`` in the CPSD authors' code
(github.com/Robbie-Xu/CPSD, ``helper_functions/helper_functions.py``, copied from ML-GCN):

* A class with no predicted positives has precision 0 (the authors set ``Np = 1`` there, and
  ``Nc = 0``).
* The per-class means (CP, CR) and mAP run over the classes with at least one positive. The
  authors average over all classes, which gives NaN recall for a class without positives;
  restricting all three to one class set keeps them defined and equals the authors' values
  whenever every class has a positive (as on MS-COCO val and NUS-WIDE test).
* OP divides by the true ``Σ_j Np_j``; the authors' ``Np = 1`` substitution also inflates this
  denominator by the number of classes with no predictions, a deviation of that size.
* An F1 whose precision and recall are both 0 is 0, and OP is 0 when nothing is predicted.
* The authors threshold logits at 0; here ``τ`` applies to whatever ``scores`` hold, so
  probabilities with ``τ = 0.5`` (the default) or logits with ``τ = 0`` give the same report.

Their mAP sorts without grouping ties; this module groups ties as above, which changes AP only
when a class has tied scores across positives and negatives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "average_precision",
    "bucket_map",
    "f1_at_k",
    "frequency_buckets",
    "mean_average_precision",
    "multilabel_report",
]

# Elements per working block: 4 Mi float64 values are 32 MiB, so the transposed, sorted and
# boolean copies of a block stay small even when the full matrices are several hundred MiB.
_BLOCK_ELEMENTS = 1 << 22
# Rows per tile when transposing a column block: a 256-row tile of the block stays in cache while
# it is written out class by class, whereas a one-shot transposed copy misses cache on every read.
_TILE_ROWS = 256


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert an array-like (numpy array, torch tensor, nested lists) to a numpy array.

    Args:
        x: The input; objects with a ``detach`` method are treated as torch tensors.
        name: Argument name for error messages.

    Returns:
        A numpy view or copy of ``x``.

    Raises:
        ValueError: If ``x`` is not a real numeric or boolean array.
    """
    if hasattr(x, "detach"):
        # Tensors that require grad or live on a GPU refuse ``np.asarray``; duck-typing keeps
        # torch out of this module's imports.
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric or boolean array, got dtype {arr.dtype}")
    return arr


def _block_length(width: int) -> int:
    """Slices of length ``width`` that fit in a block of ``_BLOCK_ELEMENTS`` (at least one)."""
    return max(1, _BLOCK_ELEMENTS // width)


def _validate(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert a ``(scores, targets)`` pair.

    Args:
        scores: ``(N, C)`` finite real scores.
        targets: ``(N, C)`` binary labels (0/1 of any numeric or boolean dtype).

    Returns:
        ``(scores, targets)`` as numpy arrays; ``scores`` keeps its dtype (sorting and comparing
        are exact in any real dtype), ``targets`` too (converted to boolean block by block later).

    Raises:
        ValueError: On non-2-D input, mismatched shapes, an empty matrix, non-finite scores or
            targets with values other than 0 and 1.
    """
    s = _to_numpy(scores, "scores")
    t = _to_numpy(targets, "targets")
    if s.ndim != 2 or t.ndim != 2:
        raise ValueError(
            f"scores and targets must be 2-D (samples, classes), got {s.ndim}-D and {t.ndim}-D"
        )
    if s.shape != t.shape:
        raise ValueError(f"scores shape {s.shape} does not match targets shape {t.shape}")
    n, c = s.shape
    if n == 0 or c == 0:
        raise ValueError(f"need at least one sample and one class, got shape {s.shape}")
    rows = _block_length(c)
    # Row blocks bound the boolean temporaries for large matrices.
    for start in range(0, n, rows):
        if s.dtype.kind == "f" and not np.isfinite(s[start : start + rows]).all():
            raise ValueError("scores contain NaN or infinite values")
        if t.dtype.kind != "b":
            block = t[start : start + rows]
            if not ((block == 0) | (block == 1)).all():
                raise ValueError("targets must be binary (only 0 and 1)")
    return s, t


def _transposed_columns(a: np.ndarray, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """Contiguous ``(stop − start, N)`` copy of columns ``start:stop`` of ``a``, cast to ``dtype``.

    Args:
        a: ``(N, C)`` array.
        start: First column.
        stop: One past the last column.
        dtype: Output dtype.

    Returns:
        Row ``k`` holds column ``start + k`` of ``a``.
    """
    out = np.empty((stop - start, a.shape[0]), dtype=dtype)
    for row in range(0, a.shape[0], _TILE_ROWS):
        out[:, row : row + _TILE_ROWS] = a[row : row + _TILE_ROWS, start:stop].T
    return out


def _column_ap(column: np.ndarray, sorted_column: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of one class with tied scores grouped into one threshold.

    Args:
        column: ``(N,)`` scores of the class.
        sorted_column: ``(N,)`` the same scores in ascending order.
        positive: ``(N,)`` boolean ground truth.

    Returns:
        ``AP = (1/G) Σ_{positives i} #{positives ≥ s_i} / #{samples ≥ s_i}``, or NaN if ``G = 0``.
    """
    pos_scores = np.sort(column[positive])
    n_pos = pos_scores.size
    if n_pos == 0:
        return float("nan")
    # side="left" counts every sample tied with s_i as predicted positive: ties share a threshold.
    n_at_or_above = column.size - np.searchsorted(sorted_column, pos_scores, side="left")
    # Positives at or above s_i = n_pos − (index where s_i's run of tied positives starts); the
    # running maximum of run-start indices finds it in one linear pass.
    run_start = np.empty(n_pos, dtype=bool)
    run_start[0] = True
    np.not_equal(pos_scores[1:], pos_scores[:-1], out=run_start[1:])
    first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(n_pos), 0))
    pos_at_or_above = n_pos - first_of_run
    return float(np.sum(pos_at_or_above / n_at_or_above) / n_pos)


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class average precision, equal to scikit-learn's ``average_precision_score``.

    ``AP_j = Σ_n (R_n − R_{n−1}) P_n`` over the distinct scores of column ``j`` (tied scores are
    one threshold); see the module docstring for the equivalent form computed here. Each column
    is sorted once (plus a sort of its positive scores); columns are processed in blocks so the
    working memory stays bounded for matrices such as 100k × 1,000.

    Args:
        scores: ``(N, C)`` finite real scores (numpy array, torch tensor or array-like).
        targets: ``(N, C)`` binary ground truth.

    Returns:
        ``(C,)`` float64 AP per class, NaN for a class without positives.

    Raises:
        ValueError: On invalid input (see :func:`multilabel_report`).
    """
    return _average_precision_unchecked(*_validate(scores, targets))


def _average_precision_unchecked(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """:func:`average_precision` on arrays that :func:`_validate` has already accepted."""
    n, c = s.shape
    ap = np.empty(c, dtype=np.float64)
    cols_per_block = _block_length(n)
    for start in range(0, c, cols_per_block):
        stop = min(start + cols_per_block, c)
        # Transposing a block makes every class a contiguous row, so sorting is cache-friendly.
        block = _transposed_columns(s, start, stop, s.dtype)
        positive = _transposed_columns(t, start, stop, np.dtype(bool))
        sorted_block = np.sort(block, axis=1)
        for k in range(stop - start):
            ap[start + k] = _column_ap(block[k], sorted_block[k], positive[k])
    return ap


def _mean_over_defined(per_class: np.ndarray) -> float:
    """Mean of the non-NaN entries; ValueError if every class lacks positives."""
    defined = ~np.isnan(per_class)
    if not defined.any():
        raise ValueError("no class has a positive sample; mAP is undefined")
    return float(per_class[defined].mean())


def mean_average_precision(scores: Any, targets: Any) -> float:
    """Mean of :func:`average_precision` over the classes that have at least one positive.

    Args:
        scores: ``(N, C)`` finite real scores.
        targets: ``(N, C)`` binary ground truth.

    Returns:
        mAP in ``[0, 1]``.

    Raises:
        ValueError: On invalid input, or if no class has a positive sample.
    """
    return _mean_over_defined(average_precision(scores, targets))


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean ``2PR / (P + R)``, 0 when both are 0."""
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0


def multilabel_report(scores: Any, targets: Any, threshold: float = 0.5) -> dict[str, float]:
    """mAP and the thresholded per-class / overall precision, recall and F1 (ML-GCN convention).

    With ``ŷ_ij = [s_ij ≥ threshold]``, per-class true positives ``Nc_j``, predicted positives
    ``Np_j`` and positives ``Ng_j``:

    * ``CP = mean_j Nc_j / Np_j`` (0 for a class with ``Np_j = 0``),
      ``CR = mean_j Nc_j / Ng_j``, ``CF1 = 2·CP·CR / (CP + CR)``, the means running over the
      classes with ``Ng_j > 0`` (the classes mAP averages over);
    * ``OP = Σ Nc / Σ Np`` (0 if nothing is predicted), ``OR = Σ Nc / Σ Ng``,
      ``OF1 = 2·OP·OR / (OP + OR)``, summed over all classes;
    * F1 is 0 when its precision and recall are both 0.

    The module docstring lists where these conventions match or deviate from the CPSD authors'
    code.

    Args:
        scores: ``(N, C)`` finite scores, normally sigmoid probabilities.
        targets: ``(N, C)`` binary ground truth.
        threshold: Decision threshold applied to ``scores`` (inclusive).

    Returns:
        ``{"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}``, each a float in ``[0, 1]``.

    Raises:
        ValueError: On non-2-D input, mismatched shapes, an empty matrix, NaN/inf scores,
            non-binary targets, a non-finite threshold, or when no class has a positive sample.
    """
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    s, t = _validate(scores, targets)
    m_ap = _mean_over_defined(_average_precision_unchecked(s, t))

    n, c = s.shape
    true_pos = np.zeros(c, dtype=np.int64)
    predicted = np.zeros(c, dtype=np.int64)
    actual = np.zeros(c, dtype=np.int64)
    rows = _block_length(c)
    for start in range(0, n, rows):
        pred = s[start : start + rows] >= threshold
        truth = t[start : start + rows] != 0
        true_pos += np.count_nonzero(pred & truth, axis=0)
        predicted += np.count_nonzero(pred, axis=0)
        actual += np.count_nonzero(truth, axis=0)

    evaluated = actual > 0
    class_precision = true_pos / np.maximum(predicted, 1)
    class_recall = true_pos[evaluated] / actual[evaluated]
    cp = float(class_precision[evaluated].mean())
    cr = float(class_recall.mean())
    total_tp, total_pred, total_actual = true_pos.sum(), predicted.sum(), actual.sum()
    op = float(total_tp / total_pred) if total_pred > 0 else 0.0
    o_r = float(total_tp / total_actual)
    return {
        "mAP": m_ap,
        "CP": cp,
        "CR": cr,
        "CF1": _f1(cp, cr),
        "OP": op,
        "OR": o_r,
        "OF1": _f1(op, o_r),
    }


def f1_at_k(scores: Any, targets: Any, k: int) -> dict[str, float]:
    """Top-k precision, recall and F1, as the zero-shot multi-label literature reports them.

    Each image predicts its ``k`` highest-scoring classes (ties broken by the lower class
    index). With ``TP`` the number of those predictions that are positives, summed over the
    ``N`` images, and ``G`` the number of positives::

        P@k = TP / (k · N)      R@k = TP / G      F1@k = 2·P·R / (P + R)

    Args:
        scores: ``(N, C)`` finite scores.
        targets: ``(N, C)`` binary ground truth with at least one positive.
        k: Predictions per image, ``1 <= k <= C``.

    Returns:
        ``{"precision", "recall", "f1"}``.

    Raises:
        ValueError: On invalid input, ``k`` out of range, or no positive at all.
    """
    s, t = _validate(scores, targets)
    n, c = s.shape
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    positives = int(np.count_nonzero(t))
    if positives == 0:
        raise ValueError("targets have no positive; recall@k is undefined")
    true_pos = 0
    rows = _block_length(c)
    for start in range(0, n, rows):
        block = s[start : start + rows]
        # A stable sort of the negated scores keeps the lower index first among ties.
        top = np.argsort(-block, axis=1, kind="stable")[:, :k]
        true_pos += int(np.count_nonzero(np.take_along_axis(t[start : start + rows], top, 1)))
    precision = true_pos / (k * n)
    recall = true_pos / positives
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


# The Distribution-Balanced loss paper's split of COCO-LT classes by training images.
HEAD_MIN, TAIL_MAX = 100, 20


def frequency_buckets(
    train_counts: Any, head_min: int = HEAD_MIN, tail_max: int = TAIL_MAX
) -> np.ndarray:
    """``"head"`` (more than ``head_min`` training images), ``"tail"`` (fewer than
    ``tail_max``) or ``"medium"`` per class: the DB paper's buckets (100 and 20 on COCO-LT)."""
    counts = np.asarray(train_counts)
    return np.where(counts > head_min, "head", np.where(counts < tail_max, "tail", "medium"))


def bucket_map(scores: Any, targets: Any, buckets: Any) -> dict[str, float | None]:
    """mAP over the classes of each bucket (``head``, ``medium``, ``tail``); None when a bucket
    has no class with a positive."""
    ap = average_precision(scores, targets)
    buckets = np.asarray(buckets)
    out: dict[str, float | None] = {}
    for name in ("head", "medium", "tail"):
        values = ap[(buckets == name) & ~np.isnan(ap)]
        out[name] = float(values.mean()) if values.size else None
    return out
