"""Tests for mlcore.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_score, recall_score

from mlcore import metrics
from mlcore.metrics import average_precision, mean_average_precision, multilabel_report

REPORT_KEYS = {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"}


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class sklearn AP, NaN where a class has no positives (sklearn warns and returns 0)."""
    return np.array(
        [
            average_precision_score(targets[:, j], scores[:, j]) if targets[:, j].any() else np.nan
            for j in range(targets.shape[1])
        ]
    )


def _random_case(
    rng: np.random.Generator, n: int, c: int, decimals: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scores correlated with targets; rounding creates ties across positives and negatives."""
    prevalence = rng.uniform(0.02, 0.6, size=c)
    targets = (rng.random((n, c)) < prevalence).astype(np.int64)
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 1.5 * targets)))
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, targets


@pytest.mark.parametrize(
    ("n", "c", "decimals"),
    [(500, 12, 1), (500, 12, 2), (300, 9, None), (2000, 4, 0), (37, 5, 1)],
)
def test_average_precision_matches_sklearn_with_ties(n: int, c: int, decimals: int | None) -> None:
    rng = np.random.default_rng(n * 31 + c)
    scores, targets = _random_case(rng, n, c, decimals)
    np.testing.assert_allclose(
        average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=1e-12, atol=1e-14
    )


def test_average_precision_small_blocks_match_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks exercise the multi-block column and row loops on a small matrix.
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 50)
    rng = np.random.default_rng(3)
    scores, targets = _random_case(rng, 40, 11, 1)
    np.testing.assert_allclose(
        average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=1e-12, atol=1e-14
    )
    monkeypatch.undo()
    small_blocks = multilabel_report(scores, targets)
    assert small_blocks == pytest.approx(multilabel_report(scores, targets), rel=1e-12)


def test_all_tied_column_ap_is_prevalence() -> None:
    # One threshold admits everything: P = prevalence, R = 1.
    targets = np.array([[1], [0], [0], [1], [0]])
    scores = np.full((5, 1), 0.3)
    assert average_precision(scores, targets)[0] == pytest.approx(0.4)
    assert average_precision(scores, targets)[0] == pytest.approx(
        average_precision_score(targets[:, 0], scores[:, 0])
    )


def test_no_positive_class_is_nan_and_ignored_by_map() -> None:
    rng = np.random.default_rng(7)
    scores, targets = _random_case(rng, 200, 5, 1)
    targets[:, 2] = 0
    ap = average_precision(scores, targets)
    assert np.isnan(ap[2])
    assert np.isfinite(np.delete(ap, 2)).all()
    assert mean_average_precision(scores, targets) == pytest.approx(np.mean(np.delete(ap, 2)))


def test_all_positive_class_has_ap_one() -> None:
    rng = np.random.default_rng(11)
    scores, targets = _random_case(rng, 50, 3, 1)
    targets[:, 1] = 1
    ap = average_precision(scores, targets)
    assert ap[1] == 1.0
    assert ap[1] == average_precision_score(targets[:, 1], scores[:, 1])


def test_single_sample() -> None:
    scores = np.array([[0.9, 0.2, 0.4]])
    targets = np.array([[1, 0, 1]])
    ap = average_precision(scores, targets)
    np.testing.assert_array_equal(ap, [1.0, np.nan, 1.0])
    assert mean_average_precision(scores, targets) == 1.0


def test_perfect_and_hand_computed_ap() -> None:
    # Ranking 1,0,1,0 (descending scores): AP = (1/1 + 2/3) / 2.
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision(scores, targets)[0] == pytest.approx((1 + 2 / 3) / 2)
    # A positive tied with a negative at the top: both counted at the shared threshold.
    scores = np.array([[0.9], [0.9], [0.5]])
    targets = np.array([[1], [0], [1]])
    assert average_precision(scores, targets)[0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_report_hand_computed() -> None:
    # Predictions at threshold 0.5 (inclusive):
    #   class 0: pred [1,1,0,0], truth [1,0,1,0] -> Nc=1, Np=2, Ng=2: P=1/2, R=1/2
    #   class 1: pred [0,0,0,0], truth [1,0,0,0] -> Nc=0, Np=0, Ng=1: P=0 (no predictions), R=0
    #   class 2: pred [1,0,1,0], truth [1,0,1,1] -> Nc=2, Np=2, Ng=3: P=1,   R=2/3
    #   class 3: pred [0,1,0,0], truth [0,0,0,0] -> Ng=0: excluded from CP/CR, counted in OP
    scores = np.array(
        [
            [0.9, 0.4, 0.5, 0.1],
            [0.6, 0.3, 0.2, 0.7],
            [0.4, 0.2, 0.8, 0.2],
            [0.1, 0.1, 0.3, 0.3],
        ]
    )
    targets = np.array(
        [
            [1, 1, 1, 0],
            [0, 0, 0, 0],
            [1, 0, 1, 0],
            [0, 0, 1, 0],
        ]
    )
    report = multilabel_report(scores, targets)
    assert set(report) == REPORT_KEYS
    cp, cr = (1 / 2 + 0 + 1) / 3, (1 / 2 + 0 + 2 / 3) / 3
    op, o_r = 3 / 5, 3 / 6
    assert report["CP"] == pytest.approx(cp)
    assert report["CR"] == pytest.approx(cr)
    assert report["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert report["OP"] == pytest.approx(op)
    assert report["OR"] == pytest.approx(o_r)
    assert report["OF1"] == pytest.approx(2 * op * o_r / (op + o_r))
    # AP: class 0 ranks +,-,+,- -> (1 + 2/3)/2; class 1 ranks its positive first -> 1;
    # class 2 ranks 0.8+, 0.5+, 0.3+, 0.2- -> 1; class 3 has no positive and is skipped.
    assert report["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)


def test_report_matches_sklearn_macro_micro() -> None:
    rng = np.random.default_rng(5)
    scores, targets = _random_case(rng, 400, 10, 2)
    report = multilabel_report(scores, targets, threshold=0.6)
    pred = (scores >= 0.6).astype(np.int64)
    assert report["CP"] == pytest.approx(
        precision_score(targets, pred, average="macro", zero_division=0)
    )
    assert report["CR"] == pytest.approx(recall_score(targets, pred, average="macro"))
    assert report["OP"] == pytest.approx(precision_score(targets, pred, average="micro"))
    assert report["OR"] == pytest.approx(recall_score(targets, pred, average="micro"))
    assert report["mAP"] == pytest.approx(mean_average_precision(scores, targets))
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_report_nothing_predicted_is_zero_not_nan() -> None:
    scores = np.array([[0.1, 0.2], [0.3, 0.4]])
    targets = np.array([[1, 0], [0, 1]])
    report = multilabel_report(scores, targets, threshold=0.9)
    assert {k: report[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")} == dict.fromkeys(
        ("CP", "CR", "CF1", "OP", "OR", "OF1"), 0.0
    )
    assert report["mAP"] == pytest.approx((1 / 2 + 1) / 2)


def test_logit_threshold_zero_equals_probability_half() -> None:
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(100, 6))
    targets = (rng.random((100, 6)) < 0.3).astype(np.int64)
    probs = 1 / (1 + np.exp(-logits))
    assert multilabel_report(logits, targets, threshold=0.0) == pytest.approx(
        multilabel_report(probs, targets, threshold=0.5)
    )


def test_accepts_torch_tensors_and_other_dtypes() -> None:
    rng = np.random.default_rng(13)
    scores, targets = _random_case(rng, 60, 4, 1)
    expected = average_precision(scores, targets)
    tensor_scores = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(average_precision(tensor_scores, torch.tensor(targets)), expected)
    np.testing.assert_allclose(
        average_precision(scores.astype(np.float32), targets.astype(bool)),
        _sklearn_ap(scores.astype(np.float32), targets),
        rtol=1e-12,
    )
    np.testing.assert_allclose(average_precision(scores, targets.astype(np.float32)), expected)
    assert multilabel_report(scores.tolist(), targets.tolist()) == pytest.approx(
        multilabel_report(scores, targets)
    )


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.array([[0.1, np.nan]]), np.array([[0, 1]]), "NaN or infinite"),
        (np.array([[0.1, np.inf]]), np.array([[0, 1]]), "NaN or infinite"),
        (np.zeros((3, 2)), np.zeros((3, 3)), "does not match"),
        (np.zeros(3), np.zeros(3), "must be 2-D"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "must be 2-D"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "at least one sample"),
        (np.zeros((2, 2)), np.array([[0, 2], [1, 0]]), "binary"),
        (np.zeros((2, 2)), np.array([[0, -1], [1, 0]]), "binary"),
        (np.zeros((2, 2)), np.array([[0, 0.5], [1, 0]]), "binary"),
        (np.zeros((2, 2)), np.array([[0, np.nan], [1, 0]]), "binary"),
        (np.array([["a", "b"]]), np.array([[0, 1]]), "real numeric"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "no class has a positive"),
    ],
)
def test_invalid_input_raises(scores: np.ndarray, targets: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mean_average_precision(scores, targets)
    with pytest.raises(ValueError, match=message):
        multilabel_report(scores, targets)


def test_average_precision_all_negative_is_nan_not_error() -> None:
    assert np.isnan(average_precision(np.zeros((2, 2)), np.zeros((2, 2)))).all()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf")])
def test_non_finite_threshold_raises(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold must be finite"):
        multilabel_report(np.array([[0.2]]), np.array([[1]]), threshold=threshold)


def _f1_at_k_brute(scores, targets, k):
    tp = 0
    for row_s, row_t in zip(scores, targets, strict=True):
        order = sorted(range(len(row_s)), key=lambda j: (-row_s[j], j))[:k]
        tp += sum(int(row_t[j]) for j in order)
    precision = tp / (k * len(scores))
    recall = tp / targets.sum()
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_f1_at_k_matches_brute_force_with_ties(k):
    from mlcore.metrics import f1_at_k

    rng = np.random.default_rng(k)
    scores = rng.integers(0, 4, size=(60, 9)).astype(np.float64)  # many ties
    targets = (rng.random((60, 9)) < 0.3).astype(np.int64)
    targets[0] = 0  # an image without positives still counts in P@k's denominator
    got = f1_at_k(scores, targets, k)
    want = _f1_at_k_brute(scores, targets, k)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(want, abs=1e-12)


def test_f1_at_k_rejects_bad_k_and_no_positives():
    from mlcore.metrics import f1_at_k

    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k must be in"):
        f1_at_k(scores, np.ones((3, 4)), 5)
    with pytest.raises(ValueError, match="no positive"):
        f1_at_k(scores, np.zeros((3, 4)), 2)


def test_mean_interval_matches_scipy_and_never_invents_bounds():
    from scipy import stats as scipy_stats

    from mlcore.stats import mean_interval, paired_interval

    xs = [0.61, 0.64, 0.58, 0.66]
    got = mean_interval(xs)
    low, high = scipy_stats.t.interval(
        0.95, len(xs) - 1, loc=np.mean(xs), scale=scipy_stats.sem(xs)
    )
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    single = mean_interval([0.5])
    assert single.low is None and single.high is None and single.n == 1
    paired = paired_interval([0.70, 0.72, 0.69], [0.63, 0.67, 0.63])
    assert paired.mean == pytest.approx(0.06) and paired.excludes_zero()
    assert not paired_interval([0.6, 0.7, 0.5], [0.65, 0.6, 0.55]).excludes_zero()
    with pytest.raises(ValueError, match="against"):
        paired_interval([0.1], [0.1, 0.2])


def test_frequency_buckets_follow_the_db_paper_and_bucket_map_averages_them():
    from mlcore.metrics import bucket_map, frequency_buckets

    buckets = frequency_buckets([500, 101, 100, 20, 19, 0])
    assert buckets.tolist() == ["head", "head", "medium", "medium", "tail", "tail"]
    rng = np.random.default_rng(0)
    targets = (rng.random((50, 6)) < 0.3).astype(int)
    targets[:, 5] = 0  # no positive: left out of its bucket's mean
    scores = rng.random((50, 6))
    ap = average_precision(scores, targets)
    got = bucket_map(scores, targets, buckets)
    assert got["head"] == pytest.approx(ap[:2].mean())
    assert got["medium"] == pytest.approx(ap[2:4].mean())
    assert got["tail"] == pytest.approx(ap[4])
    assert bucket_map(scores, targets, ["head"] * 6)["tail"] is None
