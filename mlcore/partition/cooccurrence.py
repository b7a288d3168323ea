"""Label co-occurrence counts (the e_ij and n_i of CPSD, §3.2), streamed in bounded memory.

For a binary label matrix Y of shape (N images, m classes), ``YᵀY`` holds the pair counts
e_ij off the diagonal and the class counts n_i on it. Y is never materialised densely: each
batch of images becomes a CSR matrix built straight from the Arrow list offsets/values, and the
per-batch products ``Y_bᵀY_b`` are summed. Memory is therefore bounded by one batch plus the
(sparse) m × m result, which is what lets the same code run on OpenImages-sized label sets
(1.7M images × 9,600 classes).

``pair_counts`` is *always* returned as a ``scipy.sparse.csr_array`` (int64, symmetric, zero
diagonal, explicit zeros removed), whatever m is: one return type keeps callers simple, and a
dense m × m array is a single ``to_dense(pair_counts)`` away when m is small (COCO, NUS-WIDE).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from mlcore.data.manifest import iter_label_batches, read_info

# Per-image lists are buffered into CSR blocks of this many rows; matches the manifest's
# default row-group size so both input paths do the same amount of work per product.
_ROWS_PER_BLOCK = 65_536

LabelBatch = pa.ListArray | pa.LargeListArray | pa.ChunkedArray


def to_dense(matrix: np.ndarray | sp.sparray | sp.spmatrix) -> np.ndarray:
    """Return ``matrix`` as a dense ndarray (a no-op view for arrays that already are).

    Args:
        matrix: dense array or scipy sparse matrix/array of shape (m, m).

    Returns:
        Dense ndarray of shape (m, m) with the input's dtype.
    """
    if sp.issparse(matrix):
        return matrix.toarray()
    return np.asarray(matrix)


def cooccurrence(
    labels: Iterable[Sequence[int] | np.ndarray | LabelBatch], num_classes: int
) -> tuple[sp.csr_array, np.ndarray]:
    """Count images per class and per class pair.

    ``e_ij = #{images containing both c_i and c_j}`` (i ≠ j) and ``n_i = #{images containing
    c_i}``. A label repeated within one image counts once.

    Args:
        labels: an iterable whose items are either one image's class indices (a list/tuple/1-D
            integer array) or a whole batch of images as a pyarrow ``ListArray`` /
            ``LargeListArray`` / ``ChunkedArray`` of integer lists (as yielded by
            :func:`mlcore.data.manifest.iter_label_batches`). Both kinds may be mixed.
        num_classes: m, the number of classes; every index must lie in ``[0, m)``.

    Returns:
        ``(pair_counts, class_counts)``: ``pair_counts`` is a ``scipy.sparse.csr_array`` of
        shape (m, m), dtype int64, symmetric with a zero diagonal; ``class_counts`` is an
        int64 array of shape (m,).

    Raises:
        ValueError: if ``num_classes < 1``, an index is outside ``[0, num_classes)`` (the
            message names the image's position in the stream), an index is not an integer,
            an image's indices are not 1-D, or an Arrow batch is not a list array or holds
            null lists.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    gram = sp.csr_array((num_classes, num_classes), dtype=np.int64)
    pending: list[np.ndarray] = []
    n_rows = 0  # images consumed so far, to name the offending image in errors

    def flush() -> None:
        nonlocal gram, n_rows
        if not pending:
            return
        lengths = np.fromiter((len(r) for r in pending), dtype=np.int64, count=len(pending))
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        values = np.concatenate(pending)
        gram = gram + _batch_gram(offsets, values, num_classes, n_rows)
        n_rows += len(pending)
        pending.clear()

    for item in labels:
        if isinstance(item, pa.Array | pa.ChunkedArray):
            flush()
            chunks = item.chunks if isinstance(item, pa.ChunkedArray) else [item]
            for chunk in chunks:
                offsets, values = _arrow_offsets_values(chunk, n_rows)
                gram = gram + _batch_gram(offsets, values, num_classes, n_rows)
                n_rows += len(chunk)
        else:
            pending.append(_index_row(item, n_rows + len(pending)))
            if len(pending) >= _ROWS_PER_BLOCK:
                flush()
    flush()

    class_counts = gram.diagonal().astype(np.int64)
    gram.setdiag(0)
    gram.eliminate_zeros()
    gram.sort_indices()
    return gram, class_counts


def cooccurrence_from_manifest(
    root: str | os.PathLike, split: str | None = "train", batch_rows: int = _ROWS_PER_BLOCK
) -> tuple[sp.csr_array, np.ndarray]:
    """:func:`cooccurrence` over one split of a dataset directory, streamed row group-wise.

    Args:
        root: dataset directory holding ``manifest.parquet``.
        split: split to count (``None`` counts every row).
        batch_rows: images per streamed batch; bounds the working memory.

    Returns:
        ``(pair_counts, class_counts)`` as in :func:`cooccurrence`, with m taken from the
        manifest's ``class_names``.

    Raises:
        mlcore.data.manifest.ManifestError: if ``root`` is not a dataset directory.
        ValueError: if a label index is out of range.
    """
    num_classes = read_info(root).num_classes
    return cooccurrence(iter_label_batches(root, split=split, batch_rows=batch_rows), num_classes)


def _index_row(item: Sequence[int] | np.ndarray, row: int) -> np.ndarray:
    """One image's class indices as a 1-D int64 array."""
    arr = np.asarray(item)
    if arr.ndim != 1:
        raise ValueError(
            f"image {row}: expected a 1-D list of class indices, got shape {arr.shape}"
        )
    # An empty list comes out as float64; anything else must already be integral.
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"image {row}: class indices must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _arrow_offsets_values(array: pa.Array, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (rebased to 0) and the values they index, honouring slices of ``array``."""
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise ValueError(f"expected a pyarrow list array of class indices, got type {array.type}")
    if not pa.types.is_integer(array.type.value_type):
        raise ValueError(f"class indices must be integers, got Arrow type {array.type}")
    if array.null_count:
        raise ValueError(
            f"label batch starting at image {first_row} holds {array.null_count} null lists; "
            "every image needs a (possibly empty) list of class indices"
        )
    offsets = array.offsets.to_numpy().astype(np.int64)
    # ``.values`` ignores the array's slice offset, so cut the used window out explicitly.
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def _batch_gram(
    offsets: np.ndarray, values: np.ndarray, num_classes: int, first_row: int
) -> sp.csr_array:
    """``Y_bᵀY_b`` for one batch given CSR row pointers and column indices of Y_b."""
    n = len(offsets) - 1
    if values.size:
        bad = np.flatnonzero((values < 0) | (values >= num_classes))
        if bad.size:
            row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
            raise ValueError(
                f"image {first_row + row}: label index {int(values[bad[0]])} out of range "
                f"[0, {num_classes})"
            )
    y = sp.csr_array(
        (np.ones(values.size, dtype=np.int64), values.astype(np.int64), offsets),
        shape=(n, num_classes),
    )
    # A repeated index within an image must count once: merge duplicates, then binarise.
    y.sum_duplicates()
    y.data[:] = 1
    return (y.T @ y).tocsr()
