"""Sanity checks of a dataset directory, reading its Parquet file directly.

:func:`check_dataset` never trusts the manifest: rows written by other tools (or by hand with
pyarrow, bypassing :func:`mlcore.data.manifest.validate_rows`) are inspected batch by batch and
every problem becomes an :class:`Issue` in the returned :class:`CheckReport` instead of an
exception. Only a directory that is not a dataset at all (no ``manifest.parquet``, a file that
is not Parquet, missing or unparsable ``cpsd`` metadata) raises
:class:`~mlcore.data.manifest.ManifestError`.

Severity: an *error* makes the dataset unusable or its numbers wrong (missing images, label
indices out of range, duplicate ids, the same image in two splits, ...); a *warning* is legal
but worth a look (classes without a positive in ``train``, images with no label, the same file
in two rows of one split). ``CheckReport.ok`` is true when there is no error.

Memory is bounded by the batch size except for the duplicate checks, which keep one dictionary
entry per image id and per path.

The module also holds the image-file helpers the importers share (:func:`find_missing_files`,
:func:`image_problem`).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from mlcore.data.manifest import (
    MANIFEST_FILE,
    METADATA_KEY,
    OPTIONAL_FIELDS,
    SCHEMA,
    ManifestError,
    ManifestInfo,
)

VerifyMode = Literal["exists", "decode", "none"]
Severity = Literal["error", "warning"]

# Examples kept per issue: enough to locate the problem, bounded for huge broken datasets.
MAX_EXAMPLES = 5
# Rows of the positives table shown at each end (all rows when the class list is short).
TABLE_ENDS = 5


@dataclass(frozen=True)
class Issue:
    """One kind of problem found, with how often and where.

    Attributes:
        code: Stable identifier, e.g. ``"label_out_of_range"`` (see :func:`check_dataset`).
        severity: ``"error"`` or ``"warning"``.
        count: Number of occurrences (rows, values or classes, as the summary says).
        summary: One human sentence.
        examples: The first occurrences, each naming its row / image id / path.
    """

    code: str
    severity: Severity
    count: int
    summary: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelStats:
    """Number of distinct, in-range labels per image over the whole dataset."""

    mean: float
    min: int
    max: int
    zero: int


@dataclass(frozen=True)
class CheckReport:
    """Everything :func:`check_dataset` found. The mappings must be treated as read-only.

    Attributes:
        root: The dataset directory.
        name: Dataset name from the metadata.
        class_names: Class names in index order.
        image_root: Resolved directory the ``path`` column is relative to.
        verify_images: The image verification mode used.
        rows_per_split: Number of rows per split, in first-seen order.
        label_stats: Labels per image.
        positives: Per split, the number of images containing each class (index order).
        issues: Errors and warnings, errors first.
    """

    root: Path
    name: str
    class_names: tuple[str, ...]
    image_root: Path
    verify_images: VerifyMode
    rows_per_split: Mapping[str, int]
    label_stats: LabelStats
    positives: Mapping[str, tuple[int, ...]]
    issues: tuple[Issue, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.rows_per_split.values())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return not self.errors

    def issue(self, code: str) -> Issue | None:
        """The issue with this code, or None when that problem was not found."""
        return next((i for i in self.issues if i.code == code), None)


class FileIndex:
    """Answers "is ROOT/rel an existing file?" by listing each directory once.

    One ``scandir`` per directory instead of one ``stat`` per image matters on network file
    systems holding 100k+ images. Names are compared exactly, so a case mismatch counts as
    missing even on a case-insensitive file system (the dataset would break on Linux).
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        # None marks a directory that cannot be listed: nothing in it exists.
        self._listings: dict[str, frozenset[str] | None] = {}

    def exists(self, rel: str) -> bool:
        # os.path string functions, not pathlib: this runs once per image.
        parent, name = os.path.split(os.path.join(self.root, rel))
        if parent not in self._listings:
            try:
                with os.scandir(parent) as it:
                    self._listings[parent] = frozenset(e.name for e in it if e.is_file())
            except OSError:
                self._listings[parent] = None
        names = self._listings[parent]
        return names is not None and name in names


def find_missing_files(image_root: Path, paths: Sequence[str]) -> list[int]:
    """Indices of ``paths`` (relative to ``image_root``) that are not existing files."""
    index = FileIndex(image_root)
    return [i for i, rel in enumerate(paths) if not index.exists(rel)]


def image_problem(source: Path | bytes, *, full_decode: bool = False) -> str | None:
    """Why an image cannot be read, or None when it can.

    Args:
        source: An image file, or encoded image bytes.
        full_decode: Also decode all pixels. ``Image.verify`` alone checks the container (PNG
            chunk CRCs, JPEG markers) but misses e.g. a truncated JPEG body.

    Returns:
        ``"ExceptionType: message"`` for an unreadable image, else None.
    """
    opener = (lambda: io.BytesIO(source)) if isinstance(source, bytes) else (lambda: source)
    try:
        with Image.open(opener()) as im:
            im.verify()
        if full_decode:
            # verify() leaves the image unusable, so decoding needs a fresh open.
            with Image.open(opener()) as im:
                im.load()
    # PIL signals bad data with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...); any of them means "unreadable" here.
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _read_info(pf: pq.ParquetFile, path: Path) -> ManifestInfo:
    meta = pf.schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise ManifestError(
            f"{path} has no '{METADATA_KEY.decode()}' metadata: not written by write_manifest"
        )
    try:
        info = ManifestInfo.from_json(meta[METADATA_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"{path}: unreadable '{METADATA_KEY.decode()}' metadata: {e}") from None
    if not all(isinstance(c, str) for c in info.class_names) or not isinstance(
        info.image_root, str
    ):
        raise ManifestError(
            f"{path}: '{METADATA_KEY.decode()}' metadata needs string class_names and image_root"
        )
    return info


@dataclass
class _Found:
    """Occurrences of one problem while streaming."""

    severity: Severity
    summary: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


def _column_usable(field_type: pa.DataType, name: str) -> tuple[bool, str | None]:
    """Whether a column's type can be checked, and a note when it differs from the schema."""
    expected = SCHEMA.field(name).type
    if field_type == expected:
        return True, None
    if name == "labels":
        usable = (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)) and (
            pa.types.is_integer(field_type.value_type)
        )
    elif name == "image_bytes":
        usable = pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type)
    else:
        usable = pa.types.is_string(field_type) or pa.types.is_large_string(field_type)
    return usable, f"column {name!r} has type {field_type}, expected {expected}"


class _Checker:
    """Accumulates findings over record batches."""

    def __init__(self, info: ManifestInfo, image_root: Path, verify: VerifyMode) -> None:
        self.num_classes = info.num_classes
        self.image_root = image_root
        self.verify = verify
        # None: no file checks (mode "none", or an image root reported missing once).
        self.files = FileIndex(image_root) if verify != "none" and image_root.is_dir() else None
        self.found: dict[str, _Found] = {}
        self.rows = 0
        self.split_rows: Counter[str] = Counter()
        self.positives: dict[str, np.ndarray] = {}
        self.label_sum = 0
        self.label_min: int | None = None
        self.label_max = 0
        self.zero_labels = 0
        # image_id -> (first row, its split, hash of its content) for the duplicate report.
        self.ids: dict[str, tuple[int, str | None, int]] = {}
        self.paths: dict[str, tuple[int, str | None]] = {}

    def note(self, code: str, severity: Severity, summary: str, example: str) -> None:
        self.found.setdefault(code, _Found(severity, summary)).add(example)

    def add(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        cols = batch.schema.names
        ids = batch.column("image_id").to_pylist() if "image_id" in cols else [None] * n
        splits = batch.column("split").to_pylist() if "split" in cols else [None] * n
        paths = batch.column("path").to_pylist() if "path" in cols else [None] * n
        labels = batch.column("labels").to_pylist() if "labels" in cols else [None] * n
        # Embedded bytes are left out of the hash: reading them all would be costly.
        content = [
            hash((p, s, tuple(ls or ()))) for p, s, ls in zip(paths, splits, labels, strict=True)
        ]
        offset = self.rows

        def where(i: int) -> str:
            return f"row {offset + i} (image_id={ids[i]!r})"

        self._check_keys(ids, splits, content, where)
        if "labels" in cols:
            self._check_labels(batch.column("labels"), splits, where)
        if "neg_labels" in cols:
            self._check_negatives(batch.column("neg_labels").to_pylist(), labels, where)
        self._check_images(batch, paths, splits, where)
        self.rows += n

    def _check_keys(
        self, ids: list, splits: list, content: list[int], where: Callable[[int], str]
    ) -> None:
        for i, (image_id, split) in enumerate(zip(ids, splits, strict=True)):
            if split is None:
                self.note("null_split", "error", "rows without a split", where(i))
            else:
                self.split_rows[split] += 1
            if image_id is None:
                self.note("null_image_id", "error", "rows without an image_id", where(i))
                continue
            first = self.ids.setdefault(image_id, (self.rows + i, split, content[i]))
            if first[0] != self.rows + i:
                same = "same" if first[2] == content[i] else "differing"
                self.note(
                    "duplicate_image_id",
                    "error",
                    "rows repeating an earlier image_id",
                    f"{where(i)} repeats row {first[0]} ({same} path/split/labels; "
                    f"splits {first[1]!r} / {split!r})",
                )

    def _check_negatives(self, negatives: list, labels: list, where: Callable[[int], str]) -> None:
        """The optional verified-negative lists: in range and disjoint from the positives."""
        for i, (neg, pos) in enumerate(zip(negatives, labels, strict=True)):
            bad = [c for c in neg or () if c is None or not 0 <= c < self.num_classes]
            if bad:
                self.note(
                    "neg_label_out_of_range",
                    "error",
                    f"neg_labels indices outside [0, {self.num_classes})",
                    f"{where(i)}: neg_label {bad[0]}",
                )
            both = set(neg or ()) & set(pos or ())
            if both:
                self.note(
                    "label_positive_and_negative",
                    "error",
                    "classes in both labels and neg_labels",
                    f"{where(i)}: classes {sorted(both)}",
                )

    def _check_labels(self, labels: pa.Array, splits: list, where: Callable[[int], str]) -> None:
        n = len(labels)
        valid_rows = labels.is_valid().to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~valid_rows):
            self.note("null_labels", "error", "rows whose labels list is null", where(i))
        values = labels.flatten()
        parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
        null_values = values.is_null().to_numpy(zero_copy_only=False)
        for j in np.flatnonzero(null_values):
            self.note("null_label_value", "error", "null entries inside labels", where(parents[j]))
        # Unsafe cast: a uint64 beyond int64 wraps negative and is then reported out of range.
        vals = pc.cast(values, pa.int64(), safe=False).fill_null(-1).to_numpy(zero_copy_only=False)
        in_range = (vals >= 0) & (vals < self.num_classes)
        for j in np.flatnonzero(~in_range & ~null_values):
            self.note(
                "label_out_of_range",
                "error",
                f"label indices outside [0, {self.num_classes})",
                f"{where(parents[j])}: label {vals[j]}",
            )
        same_row = parents[1:] == parents[:-1]
        unsorted = np.unique(parents[1:][same_row & (vals[1:] <= vals[:-1])])
        for r in unsorted:
            self.note(
                "labels_not_sorted_unique", "error", "labels lists not sorted and unique", where(r)
            )
        # Unique (row, class) pairs: a repeated index must not count twice as a positive.
        keys = np.unique(parents[in_range] * self.num_classes + vals[in_range])
        rows, classes = np.divmod(keys, self.num_classes) if self.num_classes else (keys, keys)
        per_row = np.bincount(rows, minlength=n)[valid_rows]
        if per_row.size:
            self.label_sum += int(per_row.sum())
            low = int(per_row.min())
            self.label_min = low if self.label_min is None else min(self.label_min, low)
            self.label_max = max(self.label_max, int(per_row.max()))
            self.zero_labels += int((per_row == 0).sum())
        for r in np.flatnonzero(valid_rows)[per_row == 0]:
            self.note("zero_label_images", "warning", "images with no label", where(r))
        row_split = np.array(splits, dtype=object)[rows]
        for split in set(splits) - {None}:
            counts = np.bincount(classes[row_split == split], minlength=self.num_classes)
            acc = self.positives.setdefault(split, np.zeros(self.num_classes, np.int64))
            acc += counts[: self.num_classes]

    def _check_images(
        self, batch: pa.RecordBatch, paths: list, splits: list, where: Callable[[int], str]
    ) -> None:
        has_bytes = (
            batch.column("image_bytes").is_valid().to_numpy(zero_copy_only=False)
            if "image_bytes" in batch.schema.names
            else np.zeros(batch.num_rows, bool)
        )
        for i, path in enumerate(paths):
            if (path is not None) == bool(has_bytes[i]):
                which = "both" if path is not None else "neither"
                self.note(
                    "path_xor_bytes",
                    "error",
                    "rows without exactly one of path / image_bytes",
                    f"{where(i)}: {which}",
                )
            if path is None:
                continue
            first = self.paths.setdefault(path, (self.rows + i, splits[i]))
            if first[0] != self.rows + i:
                cross = first[1] != splits[i]
                self.note(
                    "duplicate_path_across_splits" if cross else "duplicate_path",
                    "error" if cross else "warning",
                    "image files used in more than one split"
                    if cross
                    else "image files listed in several rows of one split",
                    f"{where(i)}: {path!r} also in row {first[0]} (splits {first[1]!r} / "
                    f"{splits[i]!r})",
                )
            if self.files is None:
                continue
            if not self.files.exists(path):
                self.note("missing_image", "error", "image files missing", f"{where(i)}: {path}")
            elif self.verify == "decode":
                problem = image_problem(self.image_root / path, full_decode=True)
                if problem:
                    self.note(
                        "corrupt_image",
                        "error",
                        "image files that cannot be decoded",
                        f"{where(i)}: {path}: {problem}",
                    )
        if self.verify == "decode" and has_bytes.any():
            for i in np.flatnonzero(has_bytes):
                problem = image_problem(batch.column("image_bytes")[i].as_py(), full_decode=True)
                if problem:
                    self.note(
                        "corrupt_image",
                        "error",
                        "image files that cannot be decoded",
                        f"{where(i)}: embedded bytes: {problem}",
                    )


def check_dataset(
    root: str | os.PathLike,
    *,
    verify_images: VerifyMode = "exists",
    batch_rows: int = 1024,
) -> CheckReport:
    """Inspect a dataset directory and report every problem found.

    Issue codes. Errors: ``no_rows``, ``no_classes``, ``duplicate_class_name``, ``schema``,
    ``null_image_id``, ``null_split``, ``duplicate_image_id``, ``null_labels``,
    ``null_label_value``, ``label_out_of_range``, ``labels_not_sorted_unique``,
    ``path_xor_bytes``, ``duplicate_path_across_splits``, ``image_root_missing``,
    ``missing_image``, ``corrupt_image``. Warnings: ``schema_type``, ``extra_column``,
    ``duplicate_path``, ``no_train_split``, ``zero_positive_train``, ``zero_label_images``.

    Args:
        root: The dataset directory (holding ``manifest.parquet``).
        verify_images: ``"exists"`` checks that every ``path`` is a file; ``"decode"`` also
            decodes every image (files and embedded bytes; slow); ``"none"`` skips image checks.
        batch_rows: Rows read per batch (small by default: batches carry embedded images).

    Returns:
        The report; ``report.ok`` is False when any error was found.

    Raises:
        ManifestError: ``root`` is not a dataset directory or its Parquet file or metadata
            cannot be read.
        ValueError: an unknown ``verify_images`` mode.
    """
    if verify_images not in ("exists", "decode", "none"):
        raise ValueError(
            f"verify_images must be 'exists', 'decode' or 'none', not {verify_images!r}"
        )
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_FILE} in {root}: not a dataset directory")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: not a readable Parquet file ({e})") from None
    info = _read_info(pf, path)
    image_root = Path(info.image_root)
    image_root = image_root if image_root.is_absolute() else root / image_root

    checker = _Checker(info, image_root, verify_images)
    columns = []
    for name in SCHEMA.names:
        if name not in pf.schema_arrow.names:
            checker.note("schema", "error", "schema problems", f"column {name!r} missing")
            continue
        usable, note = _column_usable(pf.schema_arrow.field(name).type, name)
        if note:
            code, severity = ("schema_type", "warning") if usable else ("schema", "error")
            checker.note(code, severity, "column types differ from the schema", note)
        if usable:
            columns.append(name)
    for name in pf.schema_arrow.names:
        if name in OPTIONAL_FIELDS:
            columns.append(name)
        elif name not in SCHEMA.names:
            checker.note("extra_column", "warning", "columns not in the schema", name)
    if not info.class_names:
        checker.note("no_classes", "error", "the class list is empty", "class_names: []")
    for name, n in Counter(info.class_names).items():
        if n > 1:
            checker.note(
                "duplicate_class_name", "error", "class names listed twice", f"{name!r} x{n}"
            )
    if verify_images != "none" and not image_root.is_dir():
        checker.note(
            "image_root_missing",
            "error",
            "the image root is not a directory (files not checked)",
            str(image_root),
        )

    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            checker.add(batch)
    except (OSError, pa.ArrowException) as e:
        raise ManifestError(f"{path}: cannot read rows after row {checker.rows}: {e}") from None

    return _report(root, info, image_root, verify_images, checker)


def _report(
    root: Path, info: ManifestInfo, image_root: Path, verify: VerifyMode, checker: _Checker
) -> CheckReport:
    if not checker.rows:
        checker.note("no_rows", "error", "the dataset has no rows", "0 rows")
    labelled = checker.rows - checker.found.get("null_labels", _Found("error", "")).count
    stats = LabelStats(
        mean=checker.label_sum / labelled if labelled else 0.0,
        min=checker.label_min or 0,
        max=checker.label_max,
        zero=checker.zero_labels,
    )
    if checker.rows and "train" not in checker.split_rows:
        checker.note(
            "no_train_split",
            "warning",
            "no 'train' split",
            "splits: " + ", ".join(checker.split_rows),
        )
    train = checker.positives.get("train")
    if train is not None:
        for c in np.flatnonzero(train == 0):
            checker.note(
                "zero_positive_train",
                "warning",
                "classes without any positive in train",
                f"{c}: {info.class_names[c]}",
            )
    issues = [
        Issue(code, f.severity, f.count, f.summary, tuple(f.examples))
        for code, f in checker.found.items()
    ]
    issues.sort(key=lambda i: i.severity != "error")
    return CheckReport(
        root=root,
        name=info.name,
        class_names=info.class_names,
        image_root=image_root,
        verify_images=verify,
        rows_per_split=dict(checker.split_rows),
        label_stats=stats,
        positives={s: tuple(int(v) for v in a) for s, a in checker.positives.items()},
        issues=tuple(issues),
    )


def _split_order(splits: Iterable[str]) -> list[str]:
    """train, val, test first, then the other splits alphabetically."""
    rank = {"train": 0, "val": 1, "test": 2}
    return sorted(splits, key=lambda s: (rank.get(s, 3), s))


def _positives_table(report: CheckReport) -> list[str]:
    splits = _split_order(report.positives)
    if not splits or not report.num_classes:
        return []
    ref = "train" if "train" in report.positives else splits[0]
    counts = np.array([report.positives[s] for s in splits])  # (splits, classes)
    order = np.argsort(-counts[splits.index(ref)], kind="stable")
    width = min(24, max(len(n) for n in report.class_names))
    lines = [f"  positives per class (sorted by {ref}):"]
    lines.append("    " + "class".ljust(width) + "".join(f"{s:>10}" for s in splits))

    def row(c: int) -> str:
        name = report.class_names[c][:width].ljust(width)
        return "    " + name + "".join(f"{int(v):>10}" for v in counts[:, c])

    if len(order) <= 2 * TABLE_ENDS + 1:
        lines += [row(c) for c in order]
    else:
        lines += [row(c) for c in order[:TABLE_ENDS]]
        lines.append(f"    ... {len(order) - 2 * TABLE_ENDS} more classes ...")
        lines += [row(c) for c in order[-TABLE_ENDS:]]
    return lines


def format_report(report: CheckReport) -> str:
    """Human-readable text of a :class:`CheckReport` (several lines, no trailing newline)."""
    s = report.label_stats
    splits = (
        ", ".join(f"{k} {report.rows_per_split[k]}" for k in _split_order(report.rows_per_split))
        or "none"
    )
    lines = [
        f"dataset {report.name!r} at {report.root}",
        f"  images: {report.num_rows} ({splits}); classes: {report.num_classes}",
        f"  image root: {report.image_root} (images checked: {report.verify_images})",
        f"  labels per image: mean {s.mean:.2f}, min {s.min}, max {s.max}; "
        f"{s.zero} images with no label",
    ]
    lines += _positives_table(report)
    for title, issues in (("ERRORS", report.errors), ("WARNINGS", report.warnings)):
        if not issues:
            continue
        lines.append(f"{title}:")
        for issue in issues:
            lines.append(f"  [{issue.code}] {issue.count} {issue.summary}")
            lines += [f"      {e}" for e in issue.examples]
            if issue.count > len(issue.examples):
                lines.append(f"      ... {issue.count - len(issue.examples)} more")
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "OK" if report.ok else "FAILED"
    lines.append(f"{verdict}: {n_err} error kind(s), {n_warn} warning kind(s)")
    return "\n".join(lines)
