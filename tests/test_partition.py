"""Tests for mlcore.partition: co-occurrence counts, CGP/DGP affinities, Ncut partitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from mlcore.data.manifest import ManifestInfo, build_table, write_manifest
from mlcore.partition.affinity import affinity
from mlcore.partition.cooccurrence import cooccurrence, cooccurrence_from_manifest, to_dense
from mlcore.partition.random_partition import random_partition
from mlcore.partition.report import label_stats_hash, partition_report, plot_affinity_heatmap
from mlcore.partition.spectral import normalized_cut, spectral_partition

LABEL_STATS = Path(__file__).resolve().parents[2] / "shared" / "data" / "label_stats"

# Image label lists of a 5-class toy set; image 4 is empty, image 5 repeats class 1.
TOY = [[0, 1], [0, 1, 2], [2], [0, 3], [], [1, 1, 4], [0, 1, 4]]


def _multi_hot(rows: list[list[int]], m: int) -> np.ndarray:
    y = np.zeros((len(rows), m), dtype=np.int64)
    for i, row in enumerate(rows):
        y[i, row] = 1
    return y


def _blocks(sizes: list[int], inside: float, between: float, seed: int) -> np.ndarray:
    """Symmetric affinity: ``inside`` ± noise within blocks, ``between`` ± noise across."""
    rng = np.random.default_rng(seed)
    block = np.repeat(np.arange(len(sizes)), sizes)
    m = block.size
    noise = rng.uniform(0.0, 0.02, (m, m))
    p = np.where(block[:, None] == block[None, :], inside, between) + (noise + noise.T) / 2
    np.fill_diagonal(p, 0.0)
    return p


def _expected_blocks(sizes: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


# --- co-occurrence -------------------------------------------------------------------------


def test_cooccurrence_matches_dense_gram() -> None:
    y = _multi_hot(TOY, 5)
    gram = y.T @ y
    pairs, counts = cooccurrence(TOY, 5)
    assert isinstance(pairs, sp.csr_array)
    assert pairs.dtype == np.int64 and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, np.diag(gram))
    np.testing.assert_array_equal(to_dense(pairs), gram - np.diag(np.diag(gram)))
    assert to_dense(pairs)[0, 1] == 3  # images 0, 1 and 6


def test_cooccurrence_arrow_batches_match_lists() -> None:
    expected_pairs, expected_counts = cooccurrence(TOY, 5)
    arr = pa.array(TOY, pa.list_(pa.int32()))
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3, 2)])
    large = pa.array(TOY[5:], pa.large_list(pa.int64()))
    # A sliced ListArray must not leak values outside its window; lists may be mixed in.
    pairs, counts = cooccurrence([chunked, large], 5)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(to_dense(pairs), to_dense(expected_pairs))
    pairs, counts = cooccurrence([arr.slice(0, 2), *TOY[2:4], arr.slice(4)], 5)
    np.testing.assert_array_equal(to_dense(pairs), to_dense(expected_pairs))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([[0, 1], [2, 5]], r"image 1: label index 5 out of range \[0, 5\)"),
        ([[0], [1], [-1]], r"image 2: label index -1"),
        ([pa.array([[0], [1, 7]], pa.list_(pa.int32()))], r"image 1: label index 7"),
        ([[0.5]], "must be integers"),
        ([[[0, 1]]], "1-D list"),
        ([pa.array([[0], None], pa.list_(pa.int32()))], "null lists"),
        ([pa.array([1, 2])], "list array"),
    ],
)
def test_cooccurrence_rejects_bad_labels(labels: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cooccurrence(labels, 5)


def test_cooccurrence_rejects_no_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        cooccurrence([[]], 0)


def test_cooccurrence_from_manifest_streams_one_split(tmp_path: Path) -> None:
    splits = ["train", "val", "train", "train", "val", "train", "train"]
    table = build_table(
        [f"img{i}" for i in range(len(TOY))], TOY, splits, paths=[f"{i}.jpg" for i in range(7)]
    )
    info = ManifestInfo(class_names=("a", "b", "c", "d", "e"))
    write_manifest(tmp_path, table, info, row_group_size=2)
    train = [row for row, split in zip(TOY, splits, strict=True) if split == "train"]
    expected_pairs, expected_counts = cooccurrence(train, 5)
    pairs, counts = cooccurrence_from_manifest(tmp_path, split="train", batch_rows=2)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(to_dense(pairs), to_dense(expected_pairs))
    _, all_counts = cooccurrence_from_manifest(tmp_path, split=None)
    np.testing.assert_array_equal(all_counts, _multi_hot(TOY, 5).sum(0))


# --- affinity ------------------------------------------------------------------------------


def test_affinity_formula_by_hand() -> None:
    # 3 classes: n = (4, 2, 1); e_01 = 2, e_02 = 1, e_12 = 0.
    labels = [[0, 1], [0, 1], [0, 2], [0]]
    pairs, counts = cooccurrence(labels, 3)
    np.testing.assert_array_equal(counts, [4, 2, 1])
    # S = e/n row-wise: S_01 = 2/4, S_10 = 2/2, S_02 = 1/4, S_20 = 1/1; τ = 2 takes square roots.
    p01 = (np.sqrt(0.5) + 1.0) / 2
    p02 = (np.sqrt(0.25) + 1.0) / 2
    expected = np.array([[0.0, p01, p02], [p01, 0.0, 0.0], [p02, 0.0, 0.0]])
    np.testing.assert_allclose(to_dense(affinity(pairs, counts, tau=2.0, kind="cgp")), expected)
    dgp = np.array([[0.0, 1 - p01, 1 - p02], [1 - p01, 0.0, 1.0], [1 - p02, 1.0, 0.0]])
    np.testing.assert_allclose(affinity(to_dense(pairs), counts, tau=2.0, kind="dgp"), dgp)
    # τ = 1 is the plain conditional probability, τ = 3 the cube root.
    tau1 = to_dense(affinity(pairs, counts, tau=1.0))
    assert tau1[0, 1] == pytest.approx((0.5 + 1.0) / 2)
    tau3 = to_dense(affinity(pairs, counts, tau=3.0))
    assert tau3[0, 2] == pytest.approx((0.25 ** (1 / 3) + 1.0) / 2)


def test_affinity_sparse_stays_sparse_and_matches_dense() -> None:
    pairs, counts = cooccurrence(TOY, 5)
    sparse_cgp = affinity(pairs, counts, tau=3.0)
    assert sp.issparse(sparse_cgp)
    dense_cgp = affinity(to_dense(pairs), counts, tau=3.0)
    assert isinstance(dense_cgp, np.ndarray)
    np.testing.assert_allclose(to_dense(sparse_cgp), dense_cgp)
    np.testing.assert_allclose(affinity(pairs, counts, kind="dgp"), 1 - dense_cgp - np.eye(5))


def test_affinity_diagonal_zero_and_unseen_class() -> None:
    # Class 3 never appears (n_3 = 0); passing YᵀY with its diagonal must be accepted.
    labels = [[0, 1], [1, 2], [0, 2], [0]]
    y = _multi_hot(labels, 4)
    gram = y.T @ y
    counts = np.diag(gram)
    cgp = affinity(gram, counts)
    dgp = affinity(gram, counts, kind="dgp")
    for p in (cgp, dgp):
        assert np.isfinite(p).all()
        np.testing.assert_array_equal(np.diag(p), 0.0)
        np.testing.assert_array_equal(p, p.T)
        assert p.min() >= 0.0 and p.max() <= 1.0
    np.testing.assert_array_equal(cgp[3], 0.0)
    np.testing.assert_array_equal(dgp[3], [1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "xgp"}, "kind"),
        ({"tau": 0.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"counts": np.array([1, 1])}, r"\(m, m\)"),
        ({"counts": np.array([1, -1, 1])}, "non-negative"),
        ({"pairs": np.array([[0, 2, 0], [2, 0, 0], [0, 0, 0]])}, "exceeds its class count"),
        ({"pairs": -np.eye(3)}, "non-negative"),
    ],
)
def test_affinity_errors(kwargs: dict, message: str) -> None:
    pairs = kwargs.pop("pairs", np.zeros((3, 3)))
    counts = kwargs.pop("counts", np.ones(3))
    with pytest.raises(ValueError, match=message):
        affinity(pairs, counts, **kwargs)


# --- normalised cut ------------------------------------------------------------------------

HAND = np.array(
    [[0.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 2.0], [0.0, 0.0, 2.0, 0.0]]
)


def test_normalized_cut_by_hand() -> None:
    # {0,1} | {2,3}: degrees 1.5, 1, 2.5, 2 → vol 2.5 and 4.5, cut 0.5 → 0.5/2.5 + 0.5/4.5.
    expected = 0.5 / 2.5 + 0.5 / 4.5
    assert normalized_cut(HAND, np.array([0, 0, 1, 1])) == pytest.approx(expected)
    # Ids need not be contiguous; sparse input and a non-zero diagonal change nothing.
    assert normalized_cut(HAND, np.array([7, 7, 3, 3])) == pytest.approx(expected)
    assert normalized_cut(sp.csr_array(HAND + 5 * np.eye(4)), np.array([0, 0, 1, 1])) == (
        pytest.approx(expected)
    )
    # {0} | {1,2,3}: cut 1.5, vol 1.5 and 5.5.
    assert normalized_cut(HAND, np.array([0, 1, 1, 1])) == pytest.approx(1 + 1.5 / 5.5)
    assert normalized_cut(HAND, np.zeros(4, dtype=int)) == 0.0


def test_normalized_cut_zero_volume_subset_counts_zero() -> None:
    p = np.zeros((3, 3))
    p[0, 1] = p[1, 0] = 1.0
    assert normalized_cut(p, np.array([0, 0, 1])) == 0.0
    assert normalized_cut(p, np.array([0, 1, 1])) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        (np.array([0, 1, 1]), "shape"),
        (np.array([0.0, 1, 1, 0]), "integer"),
        ([0, -1, 1, 1], "non-negative"),
    ],
)
def test_normalized_cut_rejects_bad_assignment(assignment: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalized_cut(HAND, np.asarray(assignment))


# --- spectral partition --------------------------------------------------------------------


def test_cgp_recovers_blocks() -> None:
    sizes = [4, 7, 5, 6]
    p = _blocks(sizes, inside=0.8, between=0.05, seed=1)
    perm = np.random.default_rng(0).permutation(p.shape[0])
    shuffled = p[perm][:, perm]
    labels = spectral_partition(shuffled, 4, seed=3)
    recovered = np.empty_like(labels)
    recovered[perm] = labels
    # Canonical ids are not block ids here, so compare the partitions as sets of sets.
    as_sets = {frozenset(np.flatnonzero(recovered == t)) for t in range(4)}
    truth = _expected_blocks(sizes)
    assert as_sets == {frozenset(np.flatnonzero(truth == t)) for t in range(4)}
    assert normalized_cut(shuffled, labels) <= normalized_cut(shuffled, truth[perm]) + 1e-12


def test_dgp_groups_classes_that_never_cooccur() -> None:
    # 3 scenes × 3 classes: classes co-occur only within their scene.
    rng = np.random.default_rng(0)
    images = []
    for _ in range(600):
        scene = rng.integers(3)
        members = [3 * scene + c for c in range(3) if rng.random() < 0.7]
        images.append(members)
    pairs, counts = cooccurrence(images, 9)
    dgp = affinity(pairs, counts, tau=3.0, kind="dgp")
    labels = spectral_partition(dgp, 3)
    scenes = np.arange(9) // 3
    for t in range(3):
        # Each subset takes exactly one class of every scene: no two of its classes co-occur.
        np.testing.assert_array_equal(np.sort(scenes[labels == t]), [0, 1, 2])
    cgp_labels = spectral_partition(affinity(pairs, counts, tau=3.0), 3)
    np.testing.assert_array_equal(cgp_labels, scenes)


def test_spectral_partition_is_deterministic_and_canonical() -> None:
    p = _blocks([5, 5, 6, 4, 8], inside=0.3, between=0.2, seed=2)
    first = spectral_partition(p, 5, seed=11)
    np.testing.assert_array_equal(first, spectral_partition(p, 5, seed=11))
    np.testing.assert_array_equal(first, spectral_partition(sp.csr_array(p), 5, seed=11))
    _, first_index = np.unique(first, return_index=True)
    assert np.all(np.diff(first_index) > 0)  # subset t starts before subset t + 1
    assert first[0] == 0


def test_k_equal_one_and_k_equal_m() -> None:
    p = _blocks([3, 3], inside=0.5, between=0.1, seed=0)
    np.testing.assert_array_equal(spectral_partition(p, 1), np.zeros(6, dtype=int))
    np.testing.assert_array_equal(spectral_partition(p, 6), np.arange(6))


def test_isolated_classes_fill_smallest_subsets() -> None:
    p = np.zeros((14, 14))
    p[:12, :12] = _blocks([6, 4, 2], inside=0.9, between=0.01, seed=5)
    labels = spectral_partition(p, 3)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.min() >= 1 and sizes.sum() == 14
    # Both isolated classes (12, 13) join the 2-class block: sizes 6, 4, 2 → 6, 4, 3 → 6, 4, 4.
    assert labels[12] == labels[13] == labels[10]
    assert np.isfinite(normalized_cut(p, labels))
    # With no edges at all every class is isolated; subsets are still non-empty and balanced.
    empty = spectral_partition(np.zeros((7, 7)), 3)
    np.testing.assert_array_equal(np.bincount(empty), [3, 2, 2])
    # Fewer connected classes than subsets: isolated classes fill the remaining subsets.
    few = np.zeros((5, 5))
    few[0, 1] = few[1, 0] = 1.0
    np.testing.assert_array_equal(spectral_partition(few, 4), [0, 1, 2, 3, 0])


def test_arpack_path_on_large_sparse_affinity() -> None:
    # More than 2,048 classes takes the matrix-free ARPACK branch.
    rng = np.random.default_rng(0)
    m, k = 2400, 4
    block = rng.integers(k, size=m)
    rows = rng.integers(m, size=40 * m)
    cols = rng.integers(m, size=40 * m)
    weight = np.where(block[rows] == block[cols], 1.0, 0.02)
    p = sp.coo_array((weight, (rows, cols)), shape=(m, m)).tocsr()
    p = ((p + p.T) / 2).tocsr()
    labels = spectral_partition(p, k, n_init=3)
    assert {frozenset(np.flatnonzero(labels == t)) for t in range(k)} == {
        frozenset(np.flatnonzero(block == t)) for t in range(k)
    }


@pytest.mark.parametrize(
    ("matrix", "k", "message"),
    [
        (HAND, 0, r"k must be an integer in \[1, 4\]"),
        (HAND, 5, "k must be"),
        (HAND, 2.5, "k must be"),
        (HAND, True, "k must be"),
        (np.ones((3, 4)), 2, "square"),
        (np.zeros((0, 0)), 1, "square"),
        (np.array([[0.0, 1.0], [0.5, 0.0]]), 2, "symmetric"),
        (sp.csr_array(np.array([[0.0, 1.0], [0.5, 0.0]])), 2, "symmetric"),
        (np.array([[0.0, -1.0], [-1.0, 0.0]]), 2, "non-negative"),
        (np.array([[0.0, np.nan], [np.nan, 0.0]]), 2, "NaN"),
        (np.array([[0.0, np.inf], [np.inf, 0.0]]), 2, "NaN or infinite"),
    ],
)
def test_spectral_partition_errors(matrix: np.ndarray, k: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spectral_partition(matrix, k)
    if "k must" not in message:
        with pytest.raises(ValueError, match=message):
            normalized_cut(matrix, np.zeros(matrix.shape[0], dtype=int))


def test_spectral_partition_rejects_bad_n_init() -> None:
    with pytest.raises(ValueError, match="n_init"):
        spectral_partition(HAND, 2, n_init=0)


def test_spectral_partition_does_not_modify_input() -> None:
    p = sp.csr_array(HAND + np.eye(4))
    spectral_partition(p, 2)
    np.testing.assert_array_equal(p.diagonal(), 1.0)


# --- random partition ----------------------------------------------------------------------


def test_random_partition_sizes_and_seed() -> None:
    labels = random_partition(80, 5, seed=4, sizes=[27, 23, 4, 7, 19])
    np.testing.assert_array_equal(np.bincount(labels), [27, 23, 4, 7, 19])
    np.testing.assert_array_equal(labels, random_partition(80, 5, seed=4, sizes=[27, 23, 4, 7, 19]))
    assert not np.array_equal(labels, random_partition(80, 5, seed=5, sizes=[27, 23, 4, 7, 19]))
    for seed in range(20):
        free = random_partition(10, 10 if seed == 0 else 4, seed=seed)
        assert np.bincount(free).min() >= 1
    np.testing.assert_array_equal(random_partition(3, 1), [0, 0, 0])


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 1), {}),
        ((5, 0), {}),
        ((5, 6), {}),
        ((5, 2), {"sizes": [2, 2]}),
        ((5, 2), {"sizes": [5, 0]}),
        ((5, 2), {"sizes": [1, 2, 2]}),
        ((5, 2), {"sizes": [2.5, 2.5]}),
    ],
)
def test_random_partition_errors(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        random_partition(*args, **kwargs)


# --- report --------------------------------------------------------------------------------


def test_partition_report_is_json_ready() -> None:
    labels = np.array([1, 0, 1, 2])
    report = partition_report(
        labels, ["a", "b", "c", "d"], k=3, tau=3, kind="cgp", seed=0, ncut=np.float64(1.5),
        stats_hash="abc",
    )  # fmt: skip
    assert json.loads(json.dumps(report)) == report
    assert report["subsets"] == [
        [{"index": 1, "name": "b"}],
        [{"index": 0, "name": "a"}, {"index": 2, "name": "c"}],
        [{"index": 3, "name": "d"}],
    ]
    assert (report["k"], report["tau"], report["ncut"]) == (3, 3.0, 1.5)
    with pytest.raises(ValueError, match="at least one class"):
        partition_report(labels, "abcd", k=4, tau=3, kind="cgp", seed=0, ncut=0, stats_hash="")
    with pytest.raises(ValueError, match="class names"):
        partition_report(labels, "abc", k=3, tau=3, kind="cgp", seed=0, ncut=0, stats_hash="")


def test_label_stats_hash_is_canonical() -> None:
    pairs, counts = cooccurrence(TOY, 5)
    digest = label_stats_hash(pairs, counts)
    assert len(digest) == 64
    assert label_stats_hash(to_dense(pairs), counts.tolist()) == digest
    assert label_stats_hash(to_dense(pairs).astype(float), counts) == digest
    bumped = counts.copy()
    bumped[0] += 1
    assert label_stats_hash(pairs, bumped) != digest
    with pytest.raises(ValueError, match="integer"):
        label_stats_hash(to_dense(pairs) * 0.5, counts)


def test_plot_affinity_heatmap_writes_png(tmp_path: Path) -> None:
    p = _blocks([3, 4], inside=0.9, between=0.1, seed=0)
    out = plot_affinity_heatmap(
        p, np.array([0, 1, 0, 1, 1, 0, 1]), list("abcdefg"), tmp_path / "a.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = 1100  # above the tick-label and pixel limits: block means of a sparse matrix
    big = sp.random_array((m, m), density=0.002, random_state=0, format="csr")
    big = (big + big.T) / 2
    out = plot_affinity_heatmap(
        big, np.arange(m) % 3, [str(i) for i in range(m)], tmp_path / "b.png"
    )
    assert out.stat().st_size > 0


# --- real label statistics (shared data; skipped where absent) -----------------------------


@pytest.mark.skipif(
    not LABEL_STATS.is_dir(), reason=f"real label statistics not available at {LABEL_STATS}"
)
@pytest.mark.parametrize("dataset", ["coco2014", "nuswide"])
@pytest.mark.parametrize("kind", ["cgp", "dgp"])
def test_real_statistics_partition(dataset: str, kind: str) -> None:
    stats = np.load(LABEL_STATS / f"{dataset}.npz")
    p = affinity(stats["pair_counts"], stats["class_counts"], tau=3.0, kind=kind)
    m = p.shape[0]
    for k in (2, 5, 13):
        labels = spectral_partition(p, k)
        assert labels.shape == (m,)
        np.testing.assert_array_equal(np.unique(labels), np.arange(k))
        plain = spectral_partition(p, k, refine=False)
        assert normalized_cut(p, labels) <= normalized_cut(p, plain) + 1e-12


def test_a_registered_partition_kind_is_used_by_name_and_k_is_checked_once():
    from mlcore.configlib import ConfigError
    from mlcore.partition.kinds import (
        PARTITION_KINDS,
        LabelStatistics,
        PartitionKind,
        label_partition,
        register_partition_kind,
    )

    counts = np.array([5, 4, 3, 2])
    pairs = np.outer(counts, counts) // 5
    stats = LabelStatistics(pairs, counts, ["a", "b", "c", "d"])

    def alternate(graph, k, seed):
        return np.arange(graph.shape[0]) % k

    register_partition_kind(PartitionKind(name="alternate", graph="cgp", assign=alternate))
    try:
        part = label_partition("alternate", stats, k=2, tau=3.0, seed=0)
        assert part.subsets == ((0, 2), (1, 3)) and part.report["kind"] == "alternate"
        with pytest.raises(ConfigError, match=r"cpsd.k = 5 is larger than the number of classes"):
            label_partition("alternate", stats, k=5, tau=3.0, seed=0)
        # ``full`` is one subset whatever k says.
        assert label_partition("full", stats, k=9, tau=3.0, seed=0).subsets == ((0, 1, 2, 3),)
    finally:
        del PARTITION_KINDS["alternate"]
