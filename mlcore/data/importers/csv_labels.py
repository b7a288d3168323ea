"""Import a CSV label file (``image,labels[,split]``) as a multi-label dataset.

Format: a header row naming at least ``image`` and ``labels`` (extra columns are ignored), then
one row per image. ``image`` is a path relative to ``image_dir`` (default: the CSV's directory;
an absolute path must lie inside it). ``labels`` holds class names or class indices separated
by ``label_delimiter`` (default: whitespace); an empty cell means no label. The optional
``split`` column gives each row's split, empty cells and a missing column meaning
``default_split``.

Classes come from ``classes_file`` (one name per line, index order) when given, otherwise they
are the sorted unique names found. ``label_format="auto"`` reads the labels as names when a
classes file is given and every token is one of its names, as indices when every token is an
integer, else as names. Indices need ``classes_file`` or ``num_classes`` (a number of classes
cannot be guessed from the indices present). Unknown names, non-integer or out-of-range
indices, and duplicated images are errors naming the CSV line.

``image_id`` is the image path without extension; backslashes in paths are read as ``/`` so
that CSVs written on Windows work.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from mlcore.data.importers._common import (
    DEFAULT_OPTIONS,
    ImportOptions,
    ImportResult,
    Rows,
    check_out_dir,
    finalize,
    read_name_list,
    relative_posix,
    stem_id,
)
from mlcore.data.manifest import ManifestError

LabelFormat = Literal["auto", "names", "indices"]


def _read_csv(path: Path, delimiter: str) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """``(line number, row)`` pairs and the header; blank lines are skipped."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            if "image" not in header or "labels" not in header:
                raise ManifestError(
                    f"{path} line 1: header must name the columns 'image' and 'labels' "
                    f"(got {header!r})"
                )
            if len(set(header)) != len(header):
                raise ManifestError(f"{path} line 1: repeated column name in {header!r}")
            rows = []
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise ManifestError(
                        f"{path} line {reader.line_num}: {len(cells)} fields, the header has "
                        f"{len(header)}"
                    )
                rows.append((reader.line_num, dict(zip(header, cells, strict=True))))
    except FileNotFoundError:
        raise ManifestError(f"CSV file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise ManifestError(f"{path}: malformed CSV: {e}") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
    return rows, header


def _is_index(token: str) -> bool:
    return token.lstrip("-").isdigit()


def _classes(
    csv_path: Path,
    tokens: Iterable[str],
    classes_file: str | os.PathLike | None,
    num_classes: int | None,
    label_format: LabelFormat,
) -> tuple[list[str], LabelFormat]:
    """The class names and the label format ``"auto"`` resolves to (module docstring)."""
    class_names = (
        read_name_list(Path(classes_file), "classes file") if classes_file is not None else None
    )
    all_tokens = set(tokens)
    if label_format == "auto":
        if class_names is not None and all_tokens <= set(class_names):
            label_format = "names"
        elif all_tokens and all(_is_index(t) for t in all_tokens):
            label_format = "indices"
        else:
            label_format = "names"

    if label_format == "indices":
        if class_names is None:
            if num_classes is None or num_classes < 1:
                raise ManifestError(
                    f"{csv_path}: labels are class indices; give classes_file (--classes) or "
                    "num_classes (--num-classes), or label_format='names' if the numbers are "
                    "class names"
                )
            class_names = [str(i) for i in range(num_classes)]
    elif class_names is None:
        class_names = sorted(all_tokens)
        if not class_names:
            raise ManifestError(f"{csv_path}: no label in any row and no classes file")
    if num_classes is not None and num_classes != len(class_names):
        raise ManifestError(f"num_classes={num_classes} but there are {len(class_names)} classes")
    return class_names, label_format


def _labels(where: str, tokens: list[str], index: dict[str, int], label_format: str) -> list[int]:
    """Class indices of one row's label tokens."""
    labels = []
    for t in tokens:
        if label_format == "names":
            if t not in index:
                raise ManifestError(f"{where}: unknown class name {t!r}")
            labels.append(index[t])
        else:
            if not _is_index(t):
                raise ManifestError(f"{where}: label {t!r} is not a class index")
            if not 0 <= int(t) < len(index):
                raise ManifestError(f"{where}: class index {t} out of range [0, {len(index)})")
            labels.append(int(t))
    return labels


def _image_path(where: str, image: str, image_root: Path) -> str:
    """One row's ``image`` cell as a path relative to ``image_root``."""
    image = image.strip()
    if not image:
        raise ManifestError(f"{where}: empty 'image' field")
    if os.path.isabs(image):
        try:
            image = Path(image).resolve().relative_to(image_root).as_posix()
        except ValueError:
            raise ManifestError(
                f"{where}: absolute image path {image!r} is not inside {image_root}"
            ) from None
    return relative_posix(image)


def import_csv(
    csv_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    num_classes: int | None = None,
    label_format: LabelFormat = "auto",
    label_delimiter: str | None = None,
    csv_delimiter: str = ",",
    default_split: str = "train",
    options: ImportOptions = DEFAULT_OPTIONS,
) -> ImportResult:
    """Write a dataset from a CSV label file (see the module docstring).

    Args:
        csv_path: The CSV file.
        out: Dataset directory to write.
        image_dir: Directory the ``image`` column is relative to; default the CSV's directory.
        classes_file: Class names, one per line, in index order.
        num_classes: Number of classes when labels are indices and no ``classes_file`` is
            given (names become ``"0"``, ``"1"``, ...).
        label_format: ``"auto"``, ``"names"`` or ``"indices"``.
        label_delimiter: Separator inside the ``labels`` cell; None (default) splits on runs
            of whitespace.
        csv_delimiter: Field separator of the CSV.
        default_split: Split of rows without a ``split`` value.
        options: What every importer takes; the default name is the CSV file's stem.

    Returns:
        What was written.

    Raises:
        ManifestError: a bad header, unknown class names, bad or out-of-range indices,
            repeated images (naming the CSV line), missing images without ``skip_missing``.
    """
    if label_format not in ("auto", "names", "indices"):
        raise ManifestError(
            f"label_format must be 'auto', 'names' or 'indices', not {label_format!r}"
        )
    if label_delimiter == "":
        raise ManifestError("label_delimiter must not be empty (None splits on whitespace)")
    csv_path = Path(csv_path)
    out = check_out_dir(out, options)
    image_root = (Path(image_dir) if image_dir is not None else csv_path.parent).resolve()
    records, header = _read_csv(csv_path, csv_delimiter)
    if not records:
        raise ManifestError(f"{csv_path}: no data rows after the header")

    def tokens(cell: str) -> list[str]:
        return [t.strip() for t in cell.split(label_delimiter) if t.strip()]

    parsed = [(lineno, row, tokens(row["labels"])) for lineno, row in records]
    all_tokens = (t for _, _, ts in parsed for t in ts)
    class_names, label_format = _classes(
        csv_path, all_tokens, classes_file, num_classes, label_format
    )
    index = {n: i for i, n in enumerate(class_names)}
    rows = Rows()
    for lineno, row, toks in parsed:
        where = f"{csv_path} line {lineno}"
        labels = _labels(where, toks, index, label_format)
        rel = _image_path(where, row["image"], image_root)
        split = (row.get("split") or "").strip() or default_split
        rows.add(stem_id(rel), rel, labels, split, where)

    source = {
        "kind": "csv",
        "inputs": {
            "csv": str(csv_path.resolve()),
            "classes_file": str(Path(classes_file).resolve()) if classes_file else None,
            "columns": header,
        },
        "options": options.recorded(
            label_format=label_format,
            label_delimiter=label_delimiter,
            default_split=default_split,
        ),
    }
    return finalize(
        out,
        rows,
        options,
        class_names=class_names,
        image_root=image_root,
        name=options.name or csv_path.stem,
        source=source,
    )
