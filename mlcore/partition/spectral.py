"""Normalised-cut label partition of CPSD (§3.2, Eq. 2).

The category graph with affinity P (m × m, from :mod:`mlcore.partition.affinity`) is split into
k subsets A_1..A_k minimising the normalised cut::

    Ncut(A_1..A_k) = Σ_t cut(A_t, Ā_t) / vol(A_t),   cut(A, Ā) = Σ_{i∈A, j∉A} P_ij,
                                                    vol(A) = Σ_{i∈A} d_i,  d_i = Σ_j P_ij.

Eq. 2 relaxes this to ``argmin_F Tr(Fᵀ D^{-½} L D^{-½} F), FᵀF = I`` with L = D − P, solved by
the eigenvectors of the k smallest eigenvalues of the normalised Laplacian, i.e. the k largest
of ``D^{-½} P D^{-½}`` (call them U). The discrete partition is then searched from two standard
embeddings of U: Ng–Jordan–Weiss (rows of U scaled to unit length) and Shi–Malik (D^{-½}U, the
one sklearn's ``SpectralClustering`` clusters). Each is clustered by k-means (k-means++
seeding, ``n_init`` seeded restarts); every k-means result is refined by a greedy local search
that moves single classes between subsets while that strictly lowers the Ncut, and the
candidate with the lowest Ncut wins. The relaxation is only an approximation of the discrete
problem; the two embeddings and the refinement close part of that gap (on COCO/NUS-WIDE the
result's Ncut is at or below the authors' published partitions).

Conventions shared by every function here:

* The diagonal of P is ignored (self-loops cross no cut and would only inflate volumes);
  this is also what ``scipy.sparse.csgraph.laplacian(normed=True)`` does.
* Isolated classes (degree 0) carry no graph information and would each form a zero-eigenvalue
  component of the Laplacian, eating eigenvectors. They are left out of the spectral step and
  afterwards each is put into the currently smallest subset (by class count, lowest id on
  ties), which first fills any subset the connected classes could not fill. A subset of volume
  0 adds 0 to the Ncut (its cut is 0 too), so their placement never changes the objective.
* Cluster ids are canonical: subsets are numbered by their smallest class index.

Eigen-solver: ``scipy.linalg.eigh`` on the dense normalised matrix up to
``_DENSE_EIGH_MAX`` non-isolated classes, above that ARPACK (``scipy.sparse.linalg.eigsh``,
largest algebraic, seeded start vector) through a matrix-free operator, so a sparse CGP
affinity of 9,600 classes is never densified.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

Affinity = np.ndarray | sp.sparray | sp.spmatrix

# Dense eigh is O(m³) but has no convergence risk; ARPACK wins once m is in the thousands.
_DENSE_EIGH_MAX = 2048
_KMEANS_MAX_ITER = 300
# Gains below this are rounding noise relative to an Ncut of order k; stopping there also
# guarantees the local search terminates.
_MOVE_TOL = 1e-12
# Classes re-checked per local-search pass before the O(m·k) gain table is refreshed.
_MOVES_PER_PASS = 256


def normalized_cut(affinity: Affinity, assignment: np.ndarray) -> float:
    """Ncut of a partition: Σ_t cut(A_t, Ā_t) / vol(A_t) (diagonal of P ignored).

    Args:
        affinity: P, shape (m, m), symmetric, non-negative, finite; dense or scipy sparse.
        assignment: shape (m,), non-negative integer subset id per class; ids need not be
            contiguous.

    Returns:
        The normalised cut, in [0, number of subsets]. Subsets of volume 0 contribute 0.

    Raises:
        ValueError: if ``affinity`` is not a valid affinity matrix or ``assignment`` does not
            have one non-negative integer per class.
    """
    a = _validated_affinity(affinity)
    labels = np.asarray(assignment)
    m = a.shape[0]
    if labels.shape != (m,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"assignment must be an integer array of shape ({m},)")
    if (labels < 0).any():
        raise ValueError("assignment ids must be non-negative")
    _, dense_ids = np.unique(labels, return_inverse=True)
    return _ncut(a, dense_ids, _degrees(a))


def spectral_partition(
    affinity: Affinity,
    k: int,
    seed: int = 0,
    n_init: int = 10,
    *,
    refine: bool = True,
) -> np.ndarray:
    """Partition m classes into k subsets by normalised spectral clustering (paper Eq. 2).

    Args:
        affinity: P, shape (m, m), symmetric, non-negative, finite; dense or scipy sparse.
        k: number of subsets, 1 <= k <= m.
        seed: seeds k-means++ and the ARPACK start vector; equal inputs give equal outputs.
        n_init: k-means restarts per embedding (2·n_init candidates in all); the candidate
            with the lowest Ncut is kept.
        refine: run the greedy single-class-move search on every k-means result. ``False``
            gives plain spectral k-means (for comparison); with the same seed its candidates
            are the unrefined versions of the refined ones, so its Ncut is never lower.

    Returns:
        Integer array of shape (m,) with subset ids 0..k-1; every id is used, and subsets are
        numbered by their smallest class index.

    Raises:
        ValueError: if k is not an integer in [1, m], ``n_init < 1``, or ``affinity`` is not
            square, symmetric, non-negative and finite.
    """
    a = _validated_affinity(affinity)
    m = a.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, {m}] (the number of classes), got {k!r}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    k = int(k)
    if k == 1:
        return np.zeros(m, dtype=np.int64)

    degree = _degrees(a)
    active = np.flatnonzero(degree > 0)
    # Non-isolated classes always come at least in pairs, so k_active is 0 or >= 2.
    k_active = min(k, active.size)
    labels = np.full(m, -1, dtype=np.int64)
    if k_active:
        sub = a if active.size == m else a[active][:, active]
        rng = np.random.default_rng(seed)
        found = _partition_connected(sub, degree[active], k_active, rng, n_init, refine)
        # Canonical before placing isolated classes, so ties go to the lowest-index subset.
        labels[active] = _canonical(found, k_active)
    _place_isolated(labels, k)
    return _canonical(labels, k)


def _partition_connected(
    a: np.ndarray | sp.csr_array,
    degree: np.ndarray,
    k: int,
    rng: np.random.Generator,
    n_init: int,
    refine: bool,
) -> np.ndarray:
    """Best-Ncut candidate over both embeddings × ``n_init`` k-means runs (each refined)."""
    vectors = _top_eigenvectors(a, degree, k, rng)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = (
        vectors / np.where(norms > 0, norms, 1.0),  # Ng–Jordan–Weiss
        vectors / np.sqrt(degree)[:, None],  # Shi–Malik (random-walk), as sklearn embeds
    )
    best, best_cut = None, np.inf
    seen: set[bytes] = set()
    for embedding in embeddings:
        for _ in range(n_init):
            labels = _canonical(_kmeans(embedding, k, rng), k)
            # Restarts often converge to the same clustering; evaluate each one once.
            if labels.tobytes() in seen:
                continue
            seen.add(labels.tobytes())
            if refine:
                labels = _refine(a, degree, labels, k)
            cut = _ncut(a, labels, degree)
            if cut < best_cut:
                best, best_cut = labels, cut
    return best


def _top_eigenvectors(
    a: np.ndarray | sp.csr_array, degree: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Eigenvectors of the k largest eigenvalues of D^{-½} P D^{-½}: shape (m, k)."""
    m = a.shape[0]
    inv_sqrt = 1.0 / np.sqrt(degree)
    if m <= _DENSE_EIGH_MAX:
        dense = a.toarray() if sp.issparse(a) else a
        normalized = dense * inv_sqrt[:, None] * inv_sqrt[None, :]
        return scipy.linalg.eigh(normalized, subset_by_index=[m - k, m - 1])[1]
    # Matrix-free, so neither a sparse P nor a dense DGP matrix is copied.
    operator = spla.LinearOperator(
        (m, m), matvec=lambda x: inv_sqrt * (a @ (inv_sqrt * x)), dtype=np.float64
    )
    return spla.eigsh(operator, k=k, which="LA", v0=rng.uniform(-1.0, 1.0, m))[1]


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means from a k-means++ seeding; every one of the k clusters is non-empty."""
    centers = _kmeans_plusplus(x, k, rng)
    labels = np.full(len(x), -1, dtype=np.int64)
    for _ in range(_KMEANS_MAX_ITER):
        dist = _sq_distances(x, centers)
        new = _fill_empty(dist.argmin(axis=1), dist, k)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        onehot = sp.csr_array((np.ones(len(x)), (np.arange(len(x)), labels)), shape=(len(x), k))
        centers = (onehot.T @ x) / counts[:, None]
    return labels


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): centres drawn ∝ squared distance."""
    n = len(x)
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.integers(n)]
    closest = _sq_distances(x, centers[:1])[:, 0]
    for c in range(1, k):
        total = closest.sum()
        # All points coincide with a centre already: any point is as good as another.
        idx = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centers[c] = x[idx]
        closest = np.minimum(closest, _sq_distances(x, centers[c : c + 1])[:, 0])
    return centers


def _sq_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, shape (n, k)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _fill_empty(labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Give each empty cluster the point farthest from its centre, taken from a cluster of >= 2."""
    counts = np.bincount(labels, minlength=k)
    for empty in np.flatnonzero(counts == 0):
        own = dist[np.arange(len(labels)), labels]
        own = np.where(counts[labels] > 1, own, -np.inf)
        donor = int(own.argmax())
        counts[labels[donor]] -= 1
        labels[donor] = empty
        counts[empty] = 1
    return labels


def _refine(
    a: np.ndarray | sp.csr_array, degree: np.ndarray, labels: np.ndarray, k: int
) -> np.ndarray:
    """Greedy local search: move single classes between subsets while that lowers the Ncut.

    With assoc_t = Σ_{i,j∈A_t} P_ij, Ncut = k − Σ_t assoc_t / vol_t, so moving class v from
    subset s to t changes only the s and t terms. With w[v, c] = Σ_{j∈A_c} P_vj the changes
    of the t term ("join") and of the s term ("leave") are::

        join[t, v] = (assoc_t + 2 w[v, t]) / (vol_t + d_v) − assoc_t / vol_t
        leave[v]   = (assoc_s − 2 w[v, s]) / (vol_s − d_v) − assoc_s / vol_s

    and the Ncut drops by join + leave. Each pass ranks all classes by that drop in O(m·k),
    then walks the best ``_MOVES_PER_PASS`` of them, re-evaluating each against the current
    state in O(k) and moving it only if the Ncut still strictly drops; a move changes only
    rows s and t of ``join``, refreshed after the pass. Moves that would empty a subset are
    not allowed. It stops when no class can improve the Ncut on its own (a local optimum).
    """
    labels = labels.copy()
    m = len(labels)
    rows = np.arange(m)
    w = _links(a, labels, k)
    sizes = np.bincount(labels, minlength=k)
    vol = np.bincount(labels, weights=degree, minlength=k)
    assoc = np.bincount(labels, weights=w[rows, labels], minlength=k)

    def join_row(c: int) -> np.ndarray:
        gain = (assoc[c] + 2.0 * w[:, c]) / (vol[c] + degree) - assoc[c] / vol[c]
        gain[labels == c] = -np.inf  # staying put is not a move
        return gain

    # Subset-major layout: the per-class max over subsets is then a fast axis-0 reduction.
    join = np.stack([join_row(c) for c in range(k)])
    while True:
        movable = sizes[labels] > 1
        leave = (assoc[labels] - 2.0 * w[rows, labels]) / np.where(
            movable, vol[labels] - degree, 1.0
        )
        leave -= assoc[labels] / vol[labels]
        gain = np.where(movable, join.max(axis=0) + leave, -np.inf)
        n_improving = int(np.count_nonzero(gain > _MOVE_TOL))
        if not n_improving:
            return labels
        top = min(n_improving, _MOVES_PER_PASS)
        candidates = np.argpartition(-gain, top - 1)[:top]
        touched: set[int] = set()
        for v in candidates[np.argsort(-gain[candidates], kind="stable")]:
            s = labels[v]
            if sizes[s] == 1:
                continue
            ratio = assoc / vol
            to = (assoc + 2.0 * w[v]) / (vol + degree[v]) - ratio
            to[s] = -np.inf
            t = int(to.argmax())
            drop = to[t] + (assoc[s] - 2.0 * w[v, s]) / (vol[s] - degree[v]) - ratio[s]
            if not drop > _MOVE_TOL:
                continue
            assoc[s] -= 2.0 * w[v, s]
            assoc[t] += 2.0 * w[v, t]
            vol[s] -= degree[v]
            vol[t] += degree[v]
            idx, weights = _row(a, v)
            w[idx, s] -= weights
            w[idx, t] += weights
            labels[v] = t
            sizes[s] -= 1
            sizes[t] += 1
            touched.update((int(s), t))
        for c in touched:
            join[c] = join_row(c)


def _row(a: np.ndarray | sp.csr_array, v: int) -> tuple[np.ndarray | slice, np.ndarray]:
    """Column indices and weights of row v (= column v, P being symmetric)."""
    if sp.issparse(a):
        lo, hi = a.indptr[v], a.indptr[v + 1]
        return a.indices[lo:hi], a.data[lo:hi]
    return slice(None), a[v]


def _ncut(a: np.ndarray | sp.csr_array, labels: np.ndarray, degree: np.ndarray) -> float:
    """Ncut for dense ids 0..k-1 on a validated (zero-diagonal) affinity."""
    m = len(labels)
    k = int(labels.max()) + 1
    w = _links(a, labels, k)
    vol = np.bincount(labels, weights=degree, minlength=k)
    cut = vol - np.bincount(labels, weights=w[np.arange(m), labels], minlength=k)
    return float(np.sum(np.divide(cut, vol, out=np.zeros(k), where=vol > 0)))


def _links(a: np.ndarray | sp.csr_array, labels: np.ndarray, k: int) -> np.ndarray:
    """w[v, c] = Σ_{j∈A_c} P_vj, shape (m, k), as a dense array."""
    m = len(labels)
    if sp.issparse(a):
        onehot = sp.csr_array((np.ones(m), (np.arange(m), labels)), shape=(m, k))
        return (a @ onehot).toarray()
    # A dense one-hot keeps this a BLAS product; dense @ sparse would copy P transposed.
    onehot = np.zeros((m, k))
    onehot[np.arange(m), labels] = 1.0
    return a @ onehot


def _degrees(a: np.ndarray | sp.csr_array) -> np.ndarray:
    return np.asarray(a.sum(axis=1)).ravel()


def _place_isolated(labels: np.ndarray, k: int) -> None:
    """Put each unassigned (isolated) class, in index order, into the smallest subset."""
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    for v in np.flatnonzero(labels < 0):
        t = int(sizes.argmin())
        labels[v] = t
        sizes[t] += 1


def _canonical(labels: np.ndarray, k: int) -> np.ndarray:
    """Renumber subsets by their smallest class index."""
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(k)
    return rank[labels]


def _validated_affinity(affinity: Affinity) -> np.ndarray | sp.csr_array:
    """Check P and return it as float64 (CSR if sparse) with a zero diagonal."""
    if sp.issparse(affinity):
        a = sp.csr_array(affinity, dtype=np.float64, copy=True)
        entries = a.data
    else:
        a = np.asarray(affinity, dtype=np.float64)
        entries = a
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"affinity must be a non-empty square (m, m) matrix, got {a.shape}")
    if not np.isfinite(entries).all():
        raise ValueError("affinity contains NaN or infinite entries")
    if (entries < 0).any():
        raise ValueError("affinity must be non-negative (a graph cut needs weights >= 0)")
    scale = max(1.0, float(entries.max(initial=0.0)))
    asym = _max_asymmetry(a)
    if asym > 1e-10 * scale:
        raise ValueError(f"affinity must be symmetric (max |P - Pᵀ| = {asym:.3g})")
    if sp.issparse(a):
        a.setdiag(0)
        a.eliminate_zeros()
        a.sort_indices()
    elif np.diagonal(a).any():
        a = a.copy()
        np.fill_diagonal(a, 0.0)
    return a


def _max_asymmetry(a: np.ndarray | sp.csr_array) -> float:
    if sp.issparse(a):
        diff = abs(a - a.T)
        return float(diff.max()) if diff.nnz else 0.0
    # Row blocks keep the temporary small even for a dense 9,600-class DGP matrix.
    block = 1024
    return max(
        float(np.abs(a[i : i + block] - a[:, i : i + block].T).max())
        for i in range(0, a.shape[0], block)
    )
