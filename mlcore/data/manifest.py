"""The canonical on-disk dataset format: one Parquet file per dataset.

A dataset is a directory::

    DIR/
      manifest.parquet   # one row per image (schema below)
      images/...         # optional: image files the rows point at

``manifest.parquet`` columns:

============  =================  ==========================================================
column        arrow type         meaning
============  =================  ==========================================================
image_id      string             unique id of the image (file stem, COCO id, VOC id, ...)
path          string (nullable)  image file, relative to the image root (see below)
image_bytes   binary (nullable)  the encoded image (PNG/JPEG) when embedded instead of a path
labels        list<int32>        sorted, unique class indices present in the image
split         string             "train", "val", "test" or any other split name
============  =================  ==========================================================

Optional columns (:data:`OPTIONAL_FIELDS`), written by importers whose source has them:

============  =================  ==========================================================
neg_labels    list<int32>        sorted, unique class indices *verified absent* (Open Images
                                 human-verified negatives); disjoint from ``labels``. A class
                                 in neither list is unverified (usually: absent).
============  =================  ==========================================================

Every row has exactly one of ``path`` / ``image_bytes``. Dataset-level metadata is stored as
JSON in the Parquet schema metadata under the key ``cpsd``::

    {"format_version": 1, "name": str, "class_names": [str, ...],
     "image_root": str, "source": {...}}

``image_root`` is absolute (a path or a URI), or relative to ``DIR``; the default ``"."`` means
paths are relative to the dataset directory itself. Importers of datasets that live elsewhere
(COCO on a shared disk) store the absolute root, so no image is copied.

``DIR`` may be an object-store URI (``s3://bucket/prefix``, ``gs://...``): everything here reads
through ``pyarrow.fs``, which takes credentials and endpoints from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...; see
``cluster/README.md``).

Importers of very large sources write through :class:`ManifestWriter`, batch by batch
with bounded memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mlcore.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.parquet"
METADATA_KEY = b"cpsd"

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("image_bytes", pa.binary()),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
OPTIONAL_FIELDS = {"neg_labels": pa.field("neg_labels", pa.list_(pa.int32()), nullable=False)}
"""Columns a manifest may add to :data:`SCHEMA` (see the module docstring)."""


def _schema_for(table: pa.Table) -> pa.Schema:
    """:data:`SCHEMA` plus the optional columns ``table`` has; other columns are refused."""
    extra = [n for n in table.column_names if n not in SCHEMA.names]
    unknown = [n for n in extra if n not in OPTIONAL_FIELDS]
    if unknown:
        raise ManifestError(
            f"unknown manifest columns {unknown} (optional: {list(OPTIONAL_FIELDS)})"
        )
    return pa.schema([*SCHEMA, *(OPTIONAL_FIELDS[n] for n in OPTIONAL_FIELDS if n in extra)])


@dataclass(frozen=True)
class ManifestInfo:
    """Dataset-level metadata stored alongside the rows."""

    class_names: tuple[str, ...]
    name: str = "dataset"
    image_root: str = "."
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "name": self.name,
                "class_names": list(self.class_names),
                "image_root": self.image_root,
                "source": self.source,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ManifestInfo:
        meta = json.loads(raw)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"unsupported manifest format_version {meta.get('format_version')!r} "
                f"(this version reads {FORMAT_VERSION})"
            )
        return cls(
            class_names=tuple(meta["class_names"]),
            name=meta.get("name", "dataset"),
            image_root=meta.get("image_root", "."),
            source=meta.get("source", {}),
        )


def manifest_path(root: str | os.PathLike) -> Path:
    return Path(root) / MANIFEST_FILE


def is_uri(location: str | os.PathLike) -> bool:
    """An object-store (or other pyarrow.fs) URI rather than a local path."""
    return "://" in str(location)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI, and the path within it."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(str(location))
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def _manifest_file(root: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    fs, base = filesystem(root)
    path = f"{base}/{MANIFEST_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ManifestError(f"no {MANIFEST_FILE} in {root}: not a dataset directory")
    return fs, path


def manifest_digest(root: str | os.PathLike) -> str:
    """Content identity of a dataset: sha256 of its manifest's bytes, local or remote (first 16
    hex digits); ``write_manifest`` is byte-deterministic, so equal rows give equal digests."""
    fs, path = _manifest_file(root)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def cached_copy(root: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """A local copy of a remote dataset's manifest, refreshed when the remote file changes.

    Returns the local manifest file. Keyed by the URI; the remote size and modification time
    decide whether the copy is current.
    """
    fs, path = _manifest_file(root)
    info = fs.get_file_info(path)
    stamp = f"{info.size}-{info.mtime_ns}"
    folder = Path(cache_dir).expanduser() / "remote-manifests"
    local = folder / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}-{stamp}.parquet"
    if not local.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        pafs.copy_files(path, tmp, source_filesystem=fs)
        os.replace(tmp, local)
    return local


def build_table(
    image_ids: Sequence[str],
    labels: Sequence[Sequence[int]],
    splits: Sequence[str],
    *,
    paths: Sequence[str | None] | None = None,
    image_bytes: Sequence[bytes | None] | None = None,
    neg_labels: Sequence[Sequence[int]] | None = None,
) -> pa.Table:
    """Assemble rows into a table with :data:`SCHEMA` (label lists sorted and de-duplicated),
    plus the optional ``neg_labels`` column when given."""
    n = len(image_ids)
    if len(labels) != n or len(splits) != n:
        raise ManifestError("image_ids, labels and splits must have the same length")
    paths = list(paths) if paths is not None else [None] * n
    image_bytes = list(image_bytes) if image_bytes is not None else [None] * n
    columns = {
        "image_id": pa.array(list(image_ids), pa.string()),
        "path": pa.array(paths, pa.string()),
        "image_bytes": pa.array(image_bytes, pa.binary()),
        "labels": pa.array(_sorted_unique(labels), pa.list_(pa.int32())),
        "split": pa.array(list(splits), pa.string()),
    }
    if neg_labels is not None:
        if len(neg_labels) != n:
            raise ManifestError("neg_labels must have one list per image")
        columns["neg_labels"] = pa.array(_sorted_unique(neg_labels), pa.list_(pa.int32()))
    table = pa.table(columns)
    return table.cast(_schema_for(table))


def _sorted_unique(lists: Sequence[Sequence[int]]) -> list[list[int]]:
    return [sorted({int(c) for c in row}) for row in lists]


def validate_rows(table: pa.Table, num_classes: int) -> None:
    """Raise :class:`ManifestError` naming the first offending row.

    Checks: exactly one of path/image_bytes per row, label indices in ``[0, num_classes)``,
    ``neg_labels`` (when present) in range and disjoint from ``labels``, unique image ids.
    """
    has_path = table.column("path").is_valid().to_numpy(zero_copy_only=False)
    has_bytes = table.column("image_bytes").is_valid().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(has_path == has_bytes)
    ids = table.column("image_id").to_pylist()
    if bad.size:
        i = int(bad[0])
        raise ManifestError(
            f"row {i} (image_id={ids[i]!r}): needs exactly one of 'path' or 'image_bytes'"
        )
    flat = table.column("labels").combine_chunks()
    values = flat.values.to_numpy(zero_copy_only=False)
    out = np.flatnonzero((values < 0) | (values >= num_classes))
    if out.size:
        offsets = flat.offsets.to_numpy()
        row = int(np.searchsorted(offsets, out[0], side="right") - 1)
        raise ManifestError(
            f"row {row} (image_id={ids[row]!r}): label index {int(values[out[0]])} out of range "
            f"[0, {num_classes})"
        )
    if "neg_labels" in table.column_names:
        negatives = table.column("neg_labels").to_pylist()
        positives = table.column("labels").to_pylist()
        for i, (neg, pos) in enumerate(zip(negatives, positives, strict=True)):
            bad = [c for c in neg if not 0 <= c < num_classes]
            if bad:
                raise ManifestError(
                    f"row {i} (image_id={ids[i]!r}): neg_labels index {bad[0]} out of range "
                    f"[0, {num_classes})"
                )
            both = set(neg) & set(pos)
            if both:
                raise ManifestError(
                    f"row {i} (image_id={ids[i]!r}): classes {sorted(both)} in both labels and "
                    "neg_labels"
                )
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        for i, image_id in enumerate(ids):
            if image_id in first:
                raise ManifestError(
                    f"row {i}: duplicate image_id {image_id!r} (first at row {first[image_id]})"
                )
            first[image_id] = i


def write_manifest(
    root: str | os.PathLike,
    table: pa.Table,
    info: ManifestInfo,
    *,
    row_group_size: int | None = None,
) -> Path:
    """Validate ``table`` and write it atomically to ``root/manifest.parquet``.

    Row groups hold up to 65,536 rows, fewer when images are embedded, so that a group stays
    near 64 MB and streaming readers keep bounded memory.
    """
    root = Path(root)
    if row_group_size is None:
        bytes_per_row = table.nbytes / max(1, table.num_rows)
        row_group_size = int(min(65_536, max(64, (64 << 20) // max(1, bytes_per_row))))
    root.mkdir(parents=True, exist_ok=True)
    table = table.cast(_schema_for(table))
    validate_rows(table, info.num_classes)
    table = table.replace_schema_metadata({METADATA_KEY: info.to_json()})
    target = manifest_path(root)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".parquet.tmp")
    os.close(fd)
    try:
        # Fixed writer options keep the file byte-identical for identical input.
        pq.write_table(
            table, tmp, row_group_size=row_group_size, compression="zstd", write_statistics=False
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class ManifestWriter:
    """Write a manifest batch by batch, memory bounded by one batch (huge imports).

    Each :meth:`write` validates its rows as :func:`write_manifest` does; image ids must be
    unique *across* batches, which the caller guarantees (an importer reading sorted input can
    check it in constant memory). :meth:`close` stores the metadata and moves the file into
    place atomically: the metadata lives in the Parquet schema, which is written first, so the
    rows go to a temporary file and are copied row group by row group into the final one.

    Args:
        root: Dataset directory.
        num_classes: Number of classes (label range check).
        neg_labels: Rows carry the optional ``neg_labels`` column.
        row_group_size: Rows per Parquet row group.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        num_classes: int,
        *,
        neg_labels: bool = False,
        row_group_size: int = 65_536,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.num_classes = num_classes
        self.row_group_size = row_group_size
        fields = [*SCHEMA, OPTIONAL_FIELDS["neg_labels"]] if neg_labels else list(SCHEMA)
        self.schema = pa.schema(fields)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".rows.parquet.tmp")
        os.close(fd)
        self._rows_path = Path(tmp)
        self._writer = pq.ParquetWriter(self._rows_path, self.schema, compression="zstd")
        self._finished = False
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        """Validate and append rows (a table with the writer's columns)."""
        table = table.cast(self.schema)
        validate_rows(table, self.num_classes)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows_written += table.num_rows

    def close(self, info: ManifestInfo) -> Path:
        """Write ``root/manifest.parquet`` with ``info`` as its metadata; returns its path."""
        if info.num_classes != self.num_classes:
            raise ManifestError(f"info has {info.num_classes} classes, rows {self.num_classes}")
        source = self.finish()
        target = manifest_path(self.root)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".parquet.tmp")
        os.close(fd)
        try:
            schema = self.schema.with_metadata({METADATA_KEY: info.to_json()})
            with pq.ParquetWriter(
                tmp, schema, compression="zstd", write_statistics=False
            ) as writer:
                for i in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(i, use_threads=False).cast(schema))
            os.replace(tmp, target)
        finally:
            for leftover in (tmp, self._rows_path):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return target

    def finish(self) -> pq.ParquetFile:
        """Stop writing rows; returns them, readable row group by row group (each
        :meth:`write` of up to ``row_group_size`` rows is one group), e.g. to check ids."""
        if not self._finished:
            self._writer.close()
            self._finished = True
        return pq.ParquetFile(self._rows_path)

    def abort(self) -> None:
        """Drop everything written so far (an importer failed half-way)."""
        self.finish()
        self._rows_path.unlink(missing_ok=True)


def read_info(root: str | os.PathLike) -> ManifestInfo:
    """Read only the dataset metadata (cheap: no row data)."""
    fs, path = _manifest_file(root)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
    except (OSError, pa.ArrowException) as err:
        raise ManifestError(f"{path} is not a readable Parquet file: {err}") from err
    if METADATA_KEY not in meta:
        raise ManifestError(f"{path} has no '{METADATA_KEY.decode()}' metadata")
    try:
        return ManifestInfo.from_json(meta[METADATA_KEY])
    except (ValueError, KeyError, TypeError) as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(f"{path}: invalid '{METADATA_KEY.decode()}' metadata: {err}") from err


def iter_label_batches(
    root: str | os.PathLike, split: str | None = "train", batch_rows: int = 65_536
) -> Iterator[pa.ListArray]:
    """Stream the ``labels`` column row group by row group, optionally for one split.

    Memory stays bounded by ``batch_rows`` whatever the dataset size.
    """
    fs, path = _manifest_file(root)
    pf = pq.ParquetFile(fs.open_input_file(path))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["labels", "split"]):
        labels = batch.column("labels")
        if split is not None:
            mask = pc.equal(batch.column("split"), split)
            labels = labels.filter(mask)
        if len(labels):
            yield labels


def check_label_range(root: str | os.PathLike, num_classes: int) -> None:
    """Stream every split's labels and raise :class:`ManifestError` if any index falls outside
    ``[0, num_classes)`` (memory bounded as in :func:`iter_label_batches`)."""
    bad, example = 0, None
    for labels in iter_label_batches(root, split=None):
        values = labels.values.to_numpy(zero_copy_only=False)
        out = values[(values < 0) | (values >= num_classes)]
        if out.size:
            bad += int(out.size)
            example = int(out[0]) if example is None else example
    if bad:
        raise ManifestError(
            f"{manifest_path(root)}: {bad} label indices out of range [0, {num_classes}), "
            f"e.g. {example} (cpsd data check names the rows)"
        )


@dataclass(frozen=True)
class Manifest:
    """A dataset loaded in memory (without image bytes unless asked for).

    ``root`` is the dataset directory as given: a local path or a URI.
    """

    root: str | Path
    info: ManifestInfo
    table: pa.Table

    @classmethod
    def load(
        cls,
        root: str | os.PathLike,
        *,
        with_bytes: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> Manifest:
        """Read the rows; a remote manifest is read through a local copy under ``cache_dir``."""
        info = read_info(root)
        columns = [f.name for f in SCHEMA if with_bytes or f.name != "image_bytes"]
        if is_uri(root) and cache_dir is not None:
            table = pq.read_table(cached_copy(root, cache_dir), columns=columns)
        else:
            fs, path = _manifest_file(root)
            table = pq.read_table(path, columns=columns, filesystem=fs)
        return cls(root=root if is_uri(root) else Path(root), info=info, table=table)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_root(self) -> Path | str:
        """Where ``path`` values are relative to: a local directory, or a URI (a string)."""
        root = self.info.image_root
        if is_uri(root):
            return root
        if is_uri(self.root):
            base = str(self.root).rstrip("/")
            return base if root == "." else f"{base}/{root}"
        return Path(root) if Path(root).is_absolute() else Path(self.root) / root

    def splits(self) -> list[str]:
        return sorted(set(self.table.column("split").to_pylist()))

    def split_rows(self, split: str) -> np.ndarray:
        """Row indices (into :attr:`table`) of one split, in file order."""
        mask = pc.equal(self.table.column("split"), split)
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False))

    def label_lists(self, rows: np.ndarray | None = None) -> list[list[int]]:
        labels = self.table.column("labels")
        if rows is not None:
            labels = labels.take(pa.array(rows))
        return labels.to_pylist()

    def multi_hot(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Dense (num_rows, num_classes) uint8 matrix; for small/medium datasets only."""
        lists = self.label_lists(rows)
        out = np.zeros((len(lists), self.num_classes), dtype=np.uint8)
        for i, row in enumerate(lists):
            out[i, row] = 1
        return out

    def positives_per_class(self, split: str = "train") -> np.ndarray:
        """Number of images of ``split`` containing each class, shape (num_classes,)."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for labels in iter_label_batches(self.root, split):
            np.add.at(counts, labels.values.to_numpy(zero_copy_only=False), 1)
        return counts
