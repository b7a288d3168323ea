"""Import Open Images (V6/V7) human-verified image-level labels, streaming.

Inputs, in the distributed formats:

* the class descriptions CSV, ``LabelName,DisplayName`` rows (``oidv6-class-descriptions.csv``
  has that header, older ``class-descriptions.csv`` none: a first row whose id does not start
  with ``/`` is read as the header). Ids (MIDs such as ``/m/01g317``) must be unique;
* one human-verified labels CSV per split (``oidv6-train-annotations-human-imagelabels.csv``,
  ``validation-annotations-human-imagelabels.csv``, V7 ``oidv7-*``), header
  ``ImageID,Source,LabelName,Confidence``: ``Confidence`` 1 is a verified positive, 0 a
  verified negative;
* optionally the trainable classes (``oidv6-classes-trainable.txt``, one MID per line).

Classes are the trainable MIDs in that file's order, else every described MID in the
descriptions' order. The id → name mapping is explicit and checked (the mix-ups of ASL#26 and
#83): every trainable id and every label row's id must be described (an unknown id is an error
naming the file and line); label rows of described but untrainable classes are skipped and
counted. ``source["class_ids"]`` lists the MID of every class index. Display names shared by
several chosen classes get their MID appended (``"Jaguar (/m/0449p)"``), so class names stay
unique; ``source["renamed_classes"]`` lists them.

Rows: one per image, ``image_id`` the ImageID, ``path`` ``<split image dir>/<ImageID>.jpg``
relative to ``image_root`` (the deepest directory holding every split's image directory, as
for COCO). ``labels`` holds the verified positives, the optional ``neg_labels`` column the
verified negatives (``docs/data-format.md``); a class verified both ways (two sources
disagreeing) counts as positive, and such conflicts are counted.

Streaming: the distributed files are sorted by ImageID, so one image's rows are contiguous.
The importer reads each CSV once, keeps one image's labels and one batch of output rows
(``batch_rows``) in memory, and writes through :class:`~mlcore.data.manifest.ManifestWriter`:
peak memory does not grow with the number of rows (``bench/bench_openimages_import.py``).
A file not sorted by ImageID is an error naming the line (sort it with
``LC_ALL=C sort -t, -k1,1 -s``, keeping the header); an image listed in two splits is found by
merging the sorted ids of the splits after writing, again in constant memory.

Images: ``check_images=True`` (default) requires every image file (one ``stat`` per image, no
directory listing held in memory), with ``skip_missing``/``verify_decode`` as for the other
importers; ``check_images=False`` imports the labels before the images are downloaded
(``cpsd data check`` finds missing files later).

Malformed rows (wrong number of fields, an empty ImageID, a Confidence other than 0/1), unknown
class ids and unsorted files are :class:`~mlcore.data.manifest.ManifestError` naming the file
and line.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlcore.data.check import image_problem
from mlcore.data.importers._common import (
    DEFAULT_OPTIONS,
    MAX_EXAMPLES,
    ImportOptions,
    ImportResult,
    check_out_dir,
    close,
    parse_source_entry,
    read_name_list,
)
from mlcore.data.manifest import ManifestError, ManifestWriter, build_table

HEADER = ("ImageID", "Source", "LabelName", "Confidence")
# CSV rows between progress lines.
PROGRESS_EVERY = 1_000_000


@dataclass(frozen=True)
class OpenImagesEntry:
    """One labels CSV and where its split and images go.

    Attributes:
        labels: Human-verified image-level labels CSV.
        split: Split name its images get (``"train"``, ``"val"``, ...).
        image_dir: Directory holding its images as ``<ImageID>.jpg``.
    """

    labels: Path
    split: str
    image_dir: Path

    @classmethod
    def parse(cls, spec: str) -> OpenImagesEntry:
        """Parse the CLI form ``LABELS.csv:SPLIT:IMAGE_DIR``.

        Raises:
            ManifestError: not exactly three non-empty ``:``-separated fields.
        """
        return cls(*parse_source_entry(spec, "Open Images", "LABELS.csv:SPLIT:IMAGE_DIR"))


def _open_csv(path: Path, what: str):
    try:
        return path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise ManifestError(f"Open Images {what} not found: {path}") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read {what}: {e.strerror}") from None


def read_class_descriptions(path: Path) -> dict[str, str]:
    """MID → display name, in file order (see the module docstring).

    Raises:
        ManifestError: Unreadable file, a row without exactly two fields, an empty or
            malformed id, an empty name, a repeated id; naming the line.
    """
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    with _open_csv(path, "class descriptions") as f:
        reader = csv.reader(f)
        try:
            for cells in reader:
                lineno = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != 2:
                    raise ManifestError(
                        f"{path} line {lineno}: {len(cells)} fields, expected LabelName,DisplayName"
                    )
                mid, display = cells[0].strip(), cells[1].strip()
                if not mid.startswith("/"):
                    if lineno == 1:
                        continue  # the header row
                    raise ManifestError(
                        f"{path} line {lineno}: {mid!r} is not a class id (MIDs look like /m/0abc)"
                    )
                if not display:
                    raise ManifestError(f"{path} line {lineno}: class {mid} has an empty name")
                if mid in out:
                    raise ManifestError(
                        f"{path} line {lineno}: class id {mid} already described at line "
                        f"{lines[mid]}"
                    )
                out[mid], lines[mid] = display, lineno
        except csv.Error as e:
            raise ManifestError(f"{path} line {reader.line_num}: malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not out:
        raise ManifestError(f"{path}: no class described")
    return out


def _unique_names(mids: Sequence[str], described: dict[str, str]) -> tuple[list[str], dict]:
    """Display names of ``mids``; names shared by several get their MID appended."""
    counts = Counter(described[m] for m in mids)
    renamed = {m: f"{described[m]} ({m})" for m in mids if counts[described[m]] > 1}
    return [renamed.get(m, described[m]) for m in mids], renamed


@dataclass
class _EntryStats:
    csv_rows: int = 0
    images: int = 0
    positives: int = 0
    negatives: int = 0
    untrainable_rows: int = 0
    conflicts: int = 0


@dataclass
class _Batch:
    """Output rows waiting to be checked and written."""

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    negatives: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _grouped_rows(
    path: Path,
    class_index: dict[str, int],
    described: dict[str, str],
    stats: _EntryStats,
    progress: Callable[[str], None] | None,
) -> Iterator[tuple[str, set[int], set[int]]]:
    """``(image_id, positives, negatives)`` per image of one sorted labels CSV."""
    with _open_csv(path, "labels CSV") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not set(HEADER) <= set(header):
                raise ManifestError(
                    f"{path} line 1: header must name {', '.join(HEADER)} (got {header!r})"
                )
            col = {name: header.index(name) for name in HEADER}
            current: str | None = None
            positives: set[int] = set()
            negatives: set[int] = set()
            for cells in reader:
                lineno = reader.line_num
                if not cells:
                    continue
                stats.csv_rows += 1
                if progress is not None and stats.csv_rows % PROGRESS_EVERY == 0:
                    progress(f"{path.name}: {stats.csv_rows:,} rows, {stats.images:,} images")
                if len(cells) != len(header):
                    raise ManifestError(
                        f"{path} line {lineno}: {len(cells)} fields, the header has {len(header)}"
                    )
                image_id = cells[col["ImageID"]].strip()
                mid = cells[col["LabelName"]].strip()
                confidence = cells[col["Confidence"]].strip()
                if not image_id:
                    raise ManifestError(f"{path} line {lineno}: empty ImageID")
                if confidence not in ("0", "1"):
                    raise ManifestError(
                        f"{path} line {lineno}: Confidence {confidence!r} is not 0 or 1 "
                        "(human-verified labels: 1 positive, 0 verified negative)"
                    )
                cls = class_index.get(mid)
                if cls is None and mid not in described:
                    raise ManifestError(
                        f"{path} line {lineno}: unknown class id {mid!r} (not in the class "
                        "descriptions)"
                    )
                if image_id != current:
                    if current is not None:
                        if image_id < current:
                            raise ManifestError(
                                f"{path} line {lineno}: image {image_id} comes after {current}: "
                                "rows must be sorted by ImageID, as distributed (sort with "
                                "LC_ALL=C sort -t, -k1,1 -s, keeping the header)"
                            )
                        yield current, positives, negatives
                    current, positives, negatives = image_id, set(), set()
                    stats.images += 1
                if cls is None:
                    stats.untrainable_rows += 1
                elif confidence == "1":
                    positives.add(cls)
                else:
                    negatives.add(cls)
            if current is not None:
                yield current, positives, negatives
        except csv.Error as e:
            raise ManifestError(f"{path} line {reader.line_num}: malformed CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text ({e.reason})") from None


def _check_across_splits(
    writer: ManifestWriter, bounds: list[int], entries: Sequence[OpenImagesEntry]
) -> None:
    """An image in two labels files: merge their sorted ids (one row group each in memory)."""
    rows = writer.finish()
    groups: list[list[int]] = [[] for _ in entries]
    start = 0
    for g in range(rows.num_row_groups):
        entry = next(e for e, end in enumerate(bounds) if start < end)
        groups[entry].append(g)
        start += rows.metadata.row_group(g).num_rows

    def ids(entry: int) -> Iterator[tuple[str, int]]:
        for g in groups[entry]:
            for image_id in rows.read_row_group(g, columns=["image_id"]).column(0).to_pylist():
                yield image_id, entry

    merged = heapq.merge(*(ids(e) for e in range(len(entries))))
    for (a, ea), (b, eb) in itertools.pairwise(merged):
        if a == b:
            raise ManifestError(
                f"image {a} is listed in both {entries[ea].labels} and {entries[eb].labels}"
            )


def _classes(
    descriptions_path: Path, trainable_classes: str | os.PathLike | None
) -> tuple[dict[str, str], list[str]]:
    """The described classes (MID → display name) and the MIDs chosen, in class order."""
    described = read_class_descriptions(descriptions_path)
    if trainable_classes is None:
        return described, list(described)
    trainable_path = Path(trainable_classes)
    mids = read_name_list(trainable_path, "trainable classes list")
    for lineno, mid in enumerate(mids, start=1):
        if mid not in described:
            raise ManifestError(
                f"{trainable_path} line {lineno}: unknown class id {mid!r} (not in "
                f"{descriptions_path})"
            )
    return described, mids


@dataclass
class _Output:
    """Where the rows go: their images checked (or not), then the writer; counts what was
    left out."""

    writer: ManifestWriter
    image_root: Path
    check_images: bool
    options: ImportOptions
    skipped: dict[str, int] = field(
        default_factory=lambda: {"empty": 0, "missing_images": 0, "corrupt_images": 0}
    )
    examples: dict[str, list[str]] = field(
        default_factory=lambda: {"missing_images": [], "corrupt_images": []}
    )
    splits: Counter[str] = field(default_factory=Counter)

    def _problem(self, rel: str) -> str | None:
        if not self.check_images:
            return None
        if not os.path.isfile(self.image_root / rel):
            return "missing"
        return image_problem(self.image_root / rel) if self.options.verify_decode else None

    def write(self, batch: _Batch, split: str) -> None:
        keep = []
        for i, rel in enumerate(batch.paths):
            problem = self._problem(rel)
            if problem is None:
                keep.append(i)
                continue
            if not self.options.skip_missing:
                what = "is missing" if problem == "missing" else f"cannot be decoded ({problem})"
                raise ManifestError(
                    f"image {self.image_root / rel} {what}; pass skip_missing=True / "
                    "--skip-missing to leave such rows out (counted in the metadata), or "
                    "check_images=False / --no-check-images to import labels only"
                )
            kind = "missing_images" if problem == "missing" else "corrupt_images"
            self.skipped[kind] += 1
            if len(self.examples[kind]) < MAX_EXAMPLES:
                self.examples[kind].append(rel)
        if keep:
            self.writer.write(
                build_table(
                    [batch.ids[i] for i in keep],
                    [batch.labels[i] for i in keep],
                    [split] * len(keep),
                    paths=[batch.paths[i] for i in keep],
                    neg_labels=[batch.negatives[i] for i in keep],
                )
            )
            self.splits[split] += len(keep)

    def recorded_skips(self) -> dict[str, Any]:
        """``source["skipped"]``."""
        return {
            **self.skipped,
            "missing_examples": self.examples["missing_images"],
            "corrupt_examples": self.examples["corrupt_images"],
        }


def _read_entry(
    entry: OpenImagesEntry,
    image_dir: Path,
    output: _Output,
    class_index: dict[str, int],
    described: dict[str, str],
    batch_rows: int,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Stream one labels CSV into ``output``; returns its record in ``source["inputs"]``."""
    prefix = image_dir.relative_to(output.image_root).as_posix()
    stats = _EntryStats()
    batch = _Batch()
    for image_id, positives, negatives in _grouped_rows(
        entry.labels, class_index, described, stats, progress
    ):
        stats.positives += len(positives)
        stats.conflicts += len(positives & negatives)
        negatives -= positives
        stats.negatives += len(negatives)
        if output.options.drop_empty and not positives:
            output.skipped["empty"] += 1
            continue
        batch.ids.append(image_id)
        batch.paths.append(f"{prefix}/{image_id}.jpg" if prefix != "." else f"{image_id}.jpg")
        batch.labels.append(sorted(positives))
        batch.negatives.append(sorted(negatives))
        if len(batch) >= batch_rows:
            output.write(batch, entry.split)
            batch = _Batch()
    output.write(batch, entry.split)
    if progress is not None:
        progress(f"{entry.labels.name}: {stats.csv_rows:,} rows, {stats.images:,} images")
    return {
        "labels": str(entry.labels.resolve()),
        "split": entry.split,
        "image_dir": str(image_dir),
        "csv_rows": stats.csv_rows,
        "images": stats.images,
        "positives": stats.positives,
        "verified_negatives": stats.negatives,
        "untrainable_label_rows": stats.untrainable_rows,
        "positive_negative_conflicts": stats.conflicts,
    }


def import_openimages(
    entries: Sequence[OpenImagesEntry | tuple[str | os.PathLike, str, str | os.PathLike]],
    out: str | os.PathLike,
    *,
    class_descriptions: str | os.PathLike,
    trainable_classes: str | os.PathLike | None = None,
    check_images: bool = True,
    options: ImportOptions = DEFAULT_OPTIONS,
    batch_rows: int = 65_536,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Write a dataset from Open Images label CSVs (see the module docstring).

    Args:
        entries: ``(labels_csv, split, image_dir)`` per file.
        out: Dataset directory to write.
        class_descriptions: The class descriptions CSV.
        trainable_classes: Optional list of trainable MIDs (class order).
        check_images: Require every image file (see the module docstring).
        options: What every importer takes (``drop_empty``: images without a positive); the
            default name is ``open-images``.
        batch_rows: Output rows held in memory before they are checked and written.
        progress: Called with a progress line every million CSV rows and per file.

    Returns:
        What was written.

    Raises:
        ManifestError: Malformed input, unknown class ids, unsorted files, an image in two
            files, missing images without ``skip_missing``; naming the file and line.
    """
    out = check_out_dir(out, options)
    parsed = [
        e if isinstance(e, OpenImagesEntry) else OpenImagesEntry(Path(e[0]), e[1], Path(e[2]))
        for e in entries
    ]
    if not parsed:
        raise ManifestError("no Open Images labels file given")
    if batch_rows < 1:
        raise ManifestError(f"batch_rows must be >= 1, got {batch_rows}")
    descriptions_path = Path(class_descriptions)
    described, mids = _classes(descriptions_path, trainable_classes)
    class_names, renamed = _unique_names(mids, described)
    class_index = {mid: i for i, mid in enumerate(mids)}
    image_dirs = [e.image_dir.resolve() for e in parsed]
    image_root = Path(os.path.commonpath(image_dirs))

    writer = ManifestWriter(out, len(mids), neg_labels=True, row_group_size=batch_rows)
    output = _Output(writer, image_root, check_images, options)
    inputs, bounds = [], []
    try:
        for entry, image_dir in zip(parsed, image_dirs, strict=True):
            inputs.append(
                _read_entry(entry, image_dir, output, class_index, described, batch_rows, progress)
            )
            bounds.append(writer.rows_written)
        _check_across_splits(writer, bounds, parsed)
        if writer.rows_written == 0:
            raise ManifestError(f"nothing to import: no image left ({output.skipped})")
        source = {
            "kind": "open-images",
            "inputs": inputs,
            "class_descriptions": str(descriptions_path.resolve()),
            "trainable_classes": (
                None if trainable_classes is None else str(Path(trainable_classes).resolve())
            ),
            "options": options.recorded(check_images=check_images),
            "class_ids": mids,
            "renamed_classes": renamed,
            "skipped": output.recorded_skips(),
        }
        return close(
            writer.close,
            class_names=class_names,
            image_root=image_root,
            name=options.name or "open-images",
            source=source,
            rows_per_split=dict(output.splits),
        )
    except BaseException:
        writer.abort()
        raise
