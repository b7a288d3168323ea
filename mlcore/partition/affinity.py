"""Category-graph affinities of CPSD's two task-decomposition strategies (§3.2, Eq. 1).

With ``S_ij = e_ij / n_i`` (the probability of c_j given c_i) the paper defines::

    P⁺ = (S^{1/τ} + (S^{1/τ})ᵀ) / 2          co-occurrence graph G⁺  (CGP)
    P⁻ = 1 − P⁺                               dis-occurrence graph G⁻ (DGP)

Two deliberate departures from the printed equation, both matching what the authors' public
partition script (``partition/generate_with_adj.py`` in Robbie-Xu/CPSD) actually computes:

* The paper prints ``P⁻ = I − …``; taken literally that makes every off-diagonal affinity
  negative (no graph cut is defined on it). The script uses the all-ones matrix, ``1 − P⁺``,
  and so do we.
* The diagonal is set to zero for both kinds. Self-loops never cross a cut but inflate a
  class's degree, so they would only bias the normalised cut; the authors' sklearn/scipy path
  (``csgraph.laplacian(normed=True)``) ignores the diagonal for the same reason, so zeroing it
  reproduces their effective graph.

τ smooths the long-tailed probabilities (larger τ lifts tail classes). The paper's experiments
state τ = 3 (our default); the public script hard-codes a square root, τ = 2, and most of the
published partition files were made with it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

Kind = Literal["cgp", "dgp"]


def affinity(
    pair_counts: np.ndarray | sp.sparray | sp.spmatrix,
    class_counts: np.ndarray,
    tau: float = 3.0,
    kind: Kind = "cgp",
) -> np.ndarray | sp.csr_array:
    """Affinity matrix P⁺ (CGP) or P⁻ (DGP) of the category graph, paper Eq. 1.

    Classes with ``n_i = 0`` get ``S_i· = 0`` (no division happens): under CGP they are
    isolated vertices (zero degree), under DGP they dis-occur with every other class
    (affinity 1), which is what "never seen together" means. The diagonal of the result is 0
    for both kinds and the diagonal of ``pair_counts`` is ignored, so ``YᵀY`` may be passed
    as is.

    Memory: CGP keeps a sparse ``pair_counts`` sparse (nnz ≈ observed pairs). DGP is dense by
    nature (1 − P⁺ is non-zero wherever P⁺ is not 1), so it always returns an m × m float64
    array: 8·m² bytes, e.g. 51 KB for COCO (m = 80) but 737 MB for OpenImages (m = 9,600).

    Args:
        pair_counts: e, shape (m, m), non-negative counts (dense or scipy sparse); need not be
            symmetric (the symmetrisation step makes P symmetric anyway).
        class_counts: n, shape (m,), non-negative counts with ``e_ij <= n_i``.
        tau: τ > 0, root applied to S.
        kind: ``"cgp"`` for P⁺, ``"dgp"`` for P⁻.

    Returns:
        P of shape (m, m), float64, symmetric, zero diagonal, entries in [0, 1]: a
        ``scipy.sparse.csr_array`` for CGP with sparse ``pair_counts``, else a dense ndarray.

    Raises:
        ValueError: on a bad ``kind`` or ``tau``, mismatched shapes, negative or non-finite
            counts, or a pair count larger than its class count (S would leave [0, 1]).
    """
    if kind not in ("cgp", "dgp"):
        raise ValueError(f"kind must be 'cgp' or 'dgp', got {kind!r}")
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    if not sp.issparse(pair_counts):
        pair_counts = np.asarray(pair_counts)
    counts = np.asarray(class_counts, dtype=np.float64)
    m = counts.shape[0] if counts.ndim == 1 else -1
    if counts.ndim != 1 or pair_counts.shape != (m, m):
        raise ValueError(
            f"pair_counts must be (m, m) and class_counts (m,); got {pair_counts.shape} and "
            f"{np.shape(class_counts)}"
        )
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("class_counts must be finite and non-negative")

    sparse = sp.issparse(pair_counts)
    # Private float copies: the diagonal is cleared in place below.
    e = (
        sp.csr_array(pair_counts, dtype=np.float64, copy=True)
        if sparse
        else np.array(pair_counts, dtype=np.float64)
    )
    entries = e.data if sparse else e
    if not np.isfinite(entries).all() or (entries < 0).any():
        raise ValueError("pair_counts must be finite and non-negative")
    if sparse:
        e.setdiag(0)
        e.eliminate_zeros()
    else:
        np.fill_diagonal(e, 0)
    row_max = e.max(axis=1)
    row_max = row_max.toarray().ravel() if sp.issparse(row_max) else np.asarray(row_max)
    over = np.flatnonzero(row_max > counts)
    if over.size:
        i = int(over[0])
        raise ValueError(
            f"class {i}: a pair count ({row_max[i]:g}) exceeds its class count ({counts[i]:g}); "
            "e_ij <= n_i must hold so that S = e/n lies in [0, 1]"
        )

    # Rows with n_i = 0 are all-zero (checked above), so any finite divisor leaves them 0.
    inv_n = 1.0 / np.where(counts > 0, counts, 1.0)
    if sparse:
        root = (sp.diags_array(inv_n) @ e).power(1.0 / tau)
        p = ((root + root.T) / 2).tocsr()
    else:
        root = np.power(e * inv_n[:, None], 1.0 / tau)
        p = (root + root.T) / 2
    if kind == "cgp":
        if sparse:
            p.eliminate_zeros()
            p.sort_indices()
        return p

    # In place: at m = 9,600 every extra m × m temporary is another 737 MB.
    p = p.toarray() if sparse else p
    np.subtract(1.0, p, out=p)
    np.fill_diagonal(p, 0.0)
    return p
