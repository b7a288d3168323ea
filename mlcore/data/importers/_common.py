"""Shared plumbing of the importers: their options, the row accumulator, file checks and the
closing step that writes the dataset."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mlcore.data.check import find_missing_files, image_problem
from mlcore.data.manifest import (
    MANIFEST_FILE,
    ManifestError,
    ManifestInfo,
    build_table,
    write_manifest,
)

# How many offending paths an error message or the metadata lists before "...".
MAX_EXAMPLES = 5


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    """What every importer takes besides its own inputs (``cpsd data import`` flags)."""

    drop_empty: bool = False
    """Leave out images without a label; counted in ``source["skipped"]["empty"]``."""
    skip_missing: bool = False
    """Leave out rows whose image file is missing (or undecodable with ``verify_decode``)
    instead of failing; counted in ``source["skipped"]``."""
    verify_decode: bool = False
    """Also check every image with PIL ``Image.verify`` (slow)."""
    name: str | None = None
    """Dataset name stored in the metadata; None or empty: the importer's default."""
    overwrite: bool = False
    """Replace an existing ``out/manifest.parquet``."""

    def recorded(self, **own: Any) -> dict[str, Any]:
        """``source["options"]``: the importer's own settings and ``drop_empty`` (the other
        options leave their trace in ``source["skipped"]``)."""
        return {**own, "drop_empty": self.drop_empty}


DEFAULT_OPTIONS = ImportOptions()


@dataclass(frozen=True)
class ImportResult:
    """What an importer wrote.

    Attributes:
        manifest: Path of the written ``manifest.parquet``.
        info: The dataset metadata stored with it (``info.source`` holds the skip counts).
        rows_per_split: Number of images per split, in first-seen order.
    """

    manifest: Path
    info: ManifestInfo
    rows_per_split: dict[str, int]

    def summary(self) -> str:
        """One line for the CLI, e.g. ``wrote 3 images (train 2, val 1), 80 classes to DIR``."""
        splits = ", ".join(f"{s} {n}" for s, n in self.rows_per_split.items())
        total = sum(self.rows_per_split.values())
        return (
            f"wrote {total} images ({splits}), {self.info.num_classes} classes "
            f"to {self.manifest.parent}"
        )


@dataclass
class Rows:
    """Rows collected by an importer before the common checks.

    ``origins[i]`` says where row ``i`` came from (``"train.csv line 4"``) so that errors found
    after collection (duplicates) still name the file and entry.
    """

    image_ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def add(self, image_id: str, path: str, labels: Iterable[int], split: str, origin: str) -> None:
        self.image_ids.append(image_id)
        self.paths.append(path)
        self.labels.append(sorted(set(labels)))
        self.splits.append(split)
        self.origins.append(origin)

    def __len__(self) -> int:
        return len(self.image_ids)

    def keep(self, mask: Sequence[bool]) -> Rows:
        """The rows where ``mask`` is true."""
        out = Rows()
        for i in itertools.compress(range(len(self)), mask):
            out.add(
                self.image_ids[i], self.paths[i], self.labels[i], self.splits[i], self.origins[i]
            )
        return out


def check_out_dir(out: str | os.PathLike, options: ImportOptions) -> Path:
    """Refuse to replace an existing dataset unless asked to (before any slow work)."""
    out = Path(out)
    if (out / MANIFEST_FILE).exists() and not options.overwrite:
        raise ManifestError(
            f"{out / MANIFEST_FILE} already exists "
            "(pass overwrite=True / --overwrite to replace it)"
        )
    return out


def read_lines(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file with line endings and trailing blank lines removed.

    Raises:
        ManifestError: the file is absent, unreadable or not UTF-8.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read {what}: {e.strerror}") from None
    return text.rstrip().splitlines()


def read_name_list(path: Path, what: str) -> list[str]:
    """One name per line; blank lines inside the list or repeated names are errors.

    A blank line inside the list would silently shift every later class index, so it is refused
    rather than skipped.
    """
    names = [line.strip() for line in read_lines(path, what)]
    seen: dict[str, int] = {}
    for lineno, name in enumerate(names, start=1):
        if not name:
            raise ManifestError(f"{path} line {lineno}: blank line inside the {what}")
        if name in seen:
            raise ManifestError(
                f"{path} line {lineno}: class {name!r} already listed at line {seen[name]}"
            )
        seen[name] = lineno
    if not names:
        raise ManifestError(f"{path}: the {what} is empty")
    return names


def relative_posix(path: str) -> str:
    """Normalise a listed image path: backslashes to ``/``, no leading ``./`` or ``/``."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def stem_id(rel_path: str) -> str:
    """Image id derived from a relative path: the path without its extension."""
    return str(PurePosixPath(rel_path).with_suffix(""))


def parse_source_entry(spec: str, what: str, form: str) -> tuple[Path, str, Path]:
    """Parse the CLI form ``FILE:SPLIT:IMAGE_DIR`` of one labels file of an importer.

    Args:
        spec: What the user wrote.
        what: The dataset, for the message (``"COCO"``).
        form: The expected form, for the message (``"ANNOTATIONS.json:SPLIT:IMAGE_DIR"``).

    Raises:
        ManifestError: not exactly three non-empty ``:``-separated fields.
    """
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise ManifestError(f"bad {what} entry {spec!r}: expected {form}")
    return Path(parts[0]), parts[1], Path(parts[2])


def parse_split_map(specs: Iterable[str]) -> dict[str, str]:
    """Parse CLI ``SOURCE:SPLIT`` pairs (``trainval:train``); a bare ``NAME`` maps to itself.

    Raises:
        ManifestError: a malformed pair or a source named twice.
    """
    out: dict[str, str] = {}
    for spec in specs:
        source, sep, split = spec.partition(":")
        if not sep:
            split = source
        if not source or not split or ":" in split:
            raise ManifestError(f"bad split mapping {spec!r}: expected SOURCE:SPLIT")
        if source in out:
            raise ManifestError(f"split source {source!r} given twice")
        out[source] = split
    if not out:
        raise ManifestError("no split given")
    return out


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_EXAMPLES])
    return shown + (", ..." if len(items) > MAX_EXAMPLES else "")


def finalize(
    out: Path,
    rows: Rows,
    options: ImportOptions,
    *,
    class_names: Sequence[str],
    image_root: Path,
    name: str,
    source: dict[str, Any],
) -> ImportResult:
    """Apply the checks every importer shares, then write the dataset (:func:`close`).

    In order: duplicate image ids (error naming both origins), ``drop_empty``, missing image files
    and, with ``verify_decode``, undecodable ones (error, or skipped and counted with
    ``skip_missing``). Counts land in ``source["skipped"]``.
    """
    first_seen: dict[str, int] = {}
    for i, image_id in enumerate(rows.image_ids):
        j = first_seen.setdefault(image_id, i)
        if j != i:
            raise ManifestError(
                f"{rows.origins[i]}: image id {image_id!r} already imported from {rows.origins[j]}"
            )
    skipped: dict[str, Any] = {"empty": 0, "missing_images": 0, "corrupt_images": 0}
    if options.drop_empty:
        keep = [bool(labels) for labels in rows.labels]
        skipped["empty"] = keep.count(False)
        rows = rows.keep(keep)
    rows = _without_missing(rows, image_root, options, skipped)
    if options.verify_decode:
        rows = _without_corrupt(rows, image_root, options, skipped)
    if not len(rows):
        raise ManifestError(f"nothing to import: no image left ({skipped})")

    table = build_table(rows.image_ids, rows.labels, rows.splits, paths=rows.paths)
    return close(
        lambda info: write_manifest(out, table, info),
        class_names=class_names,
        image_root=image_root,
        name=name,
        source={**source, "skipped": skipped},
        rows_per_split=dict(Counter(rows.splits)),
    )


def _without_missing(
    rows: Rows, image_root: Path, options: ImportOptions, skipped: dict[str, Any]
) -> Rows:
    missing = find_missing_files(image_root, rows.paths)
    described = [rows.paths[i] for i in missing]
    problem = f"image files are missing under {image_root}"
    return _drop_or_refuse(rows, missing, described, problem, "missing", options, skipped)


def _without_corrupt(
    rows: Rows, image_root: Path, options: ImportOptions, skipped: dict[str, Any]
) -> Rows:
    problems = [(i, image_problem(image_root / p)) for i, p in enumerate(rows.paths)]
    corrupt = [i for i, msg in problems if msg is not None]
    described = [f"{rows.paths[i]} ({problems[i][1]})" for i in corrupt]
    problem = "image files cannot be decoded"
    return _drop_or_refuse(rows, corrupt, described, problem, "corrupt", options, skipped)


def _drop_or_refuse(
    rows: Rows,
    bad: list[int],
    described: list[str],
    problem: str,
    kind: str,
    options: ImportOptions,
    skipped: dict[str, Any],
) -> Rows:
    """Rows ``bad`` left out and counted in ``skipped`` (``skip_missing``), else an error
    naming the first of them."""
    if not bad:
        return rows
    if not options.skip_missing:
        raise ManifestError(
            f"{len(bad)} of {len(rows)} {problem} (first: {_examples(described)}); pass "
            "skip_missing=True / --skip-missing to leave those rows out (the count is recorded "
            "in the metadata)"
        )
    skipped[f"{kind}_images"] = len(bad)
    skipped[f"{kind}_examples"] = [rows.paths[i] for i in bad[:MAX_EXAMPLES]]
    gone = set(bad)
    return rows.keep([i not in gone for i in range(len(rows))])


def close(
    write: Callable[[ManifestInfo], Path],
    *,
    class_names: Sequence[str],
    image_root: Path,
    name: str,
    source: dict[str, Any],
    rows_per_split: dict[str, int],
) -> ImportResult:
    """The last step of every importer: the dataset's metadata, written by ``write`` with the
    rows (at once, or streamed before), and what the command reports."""
    info = ManifestInfo(
        class_names=tuple(class_names), name=name, image_root=str(image_root), source=source
    )
    return ImportResult(manifest=write(info), info=info, rows_per_split=rows_per_split)


def split_sources(splits: Mapping[str, str], known: Sequence[str], where: str) -> dict[str, str]:
    """Validate a caller's ``{source part: split name}`` mapping against the parts that exist."""
    if not splits:
        raise ManifestError(f"no split selected for {where}")
    unknown = [s for s in splits if s not in known]
    if unknown:
        raise ManifestError(
            f"unknown split source {unknown[0]!r} for {where} (available: {', '.join(known)})"
        )
    return dict(splits)
