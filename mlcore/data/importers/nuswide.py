"""Import NUS-WIDE (81 concepts) as distributed by its authors.

Expected files under ``root`` (each looked for in the places the official archives unpack to):

* ``ImageList/TrainImagelist.txt``, ``ImageList/TestImagelist.txt``: one image per line,
  Windows-style ``actor\\0001_2124494179.jpg``; some copies hold absolute paths
  (``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg``) and ``/`` works too, so only the
  last two components (``concept/file``) are used;
* ``Concepts81.txt`` (or ``ConceptsList/Concepts81.txt``): the concept names, one per line, in
  label index order;
* ``TrainTestLabels/Labels_<concept>_Train.txt`` / ``_Test.txt`` (or under ``Groundtruth/``):
  one ``0``/``1`` per line, aligned with the image list;
* the images, by default under ``Flickr/`` (``Flickr/actor/0001_2124494179.jpg``).

Conventions: ``image_id`` is the listed path without extension (``actor/0001_2124494179``) and
``path`` the listed path with ``/`` separators, relative to ``image_dir``. The part → split
mapping defaults to ``{"train": "train", "test": "test"}``. Images without any concept (a
sizeable share of NUS-WIDE) are kept unless ``drop_empty=True``; many circulated copies lack
some images, so ``skip_missing=True`` is usually needed (the count is recorded).

The official ``Labels_lake_Train.txt`` is known to hold one value that is neither 0 nor 1
(line 78372, ``-1130179``). Such values are errors by default, naming file and line;
``invalid_labels="negative"`` reads them as 0 and records their number and first locations.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from mlcore.data.importers._common import (
    DEFAULT_OPTIONS,
    MAX_EXAMPLES,
    ImportOptions,
    ImportResult,
    Rows,
    check_out_dir,
    finalize,
    read_lines,
    read_name_list,
    relative_posix,
    split_sources,
    stem_id,
)
from mlcore.data.manifest import ManifestError

_PARTS = {"train": "Train", "test": "Test"}


def _locate(root: Path, candidates: list[str], what: str) -> Path:
    for rel in candidates:
        if (root / rel).exists():
            return root / rel
    raise ManifestError(
        f"NUS-WIDE {what} not found under {root} (looked for {', '.join(candidates)})"
    )


def _label_column(path: Path, n_images: int, list_file: Path, invalid: list[str]) -> np.ndarray:
    """Positives of one concept file as a bool vector; records invalid values in ``invalid``."""
    lines = read_lines(path, "NUS-WIDE label file")
    if len(lines) != n_images:
        raise ManifestError(
            f"{path} has {len(lines)} lines but {list_file} lists {n_images} images"
        )
    values = np.array([line.strip() for line in lines])
    positive = values == "1"
    for i in np.flatnonzero(~positive & (values != "0")):
        invalid.append(f"{path.name}:{i + 1}: {str(values[i])!r}")
    return positive


def _concept_matrix(
    labels_dir: Path,
    file_names: list[str],
    n_images: int,
    list_file: Path,
    invalid: list[str],
    invalid_labels: str,
) -> np.ndarray:
    """(n_images, concepts) bool matrix of the concept files; invalid values are appended to
    ``invalid`` and, with ``invalid_labels="error"``, raise."""
    matrix = np.stack(
        [_label_column(labels_dir / name, n_images, list_file, invalid) for name in file_names],
        axis=1,
    )
    if invalid and invalid_labels == "error":
        raise ManifestError(
            f"{labels_dir}: {len(invalid)} label values are neither 0 nor 1 (first: "
            f"{'; '.join(invalid[:MAX_EXAMPLES])}); pass invalid_labels='negative' / "
            "--invalid-labels negative to read them as 0"
        )
    return matrix


def import_nuswide(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    splits: Mapping[str, str] | None = None,
    invalid_labels: Literal["error", "negative"] = "error",
    options: ImportOptions = DEFAULT_OPTIONS,
) -> ImportResult:
    """Write a dataset from the NUS-WIDE distribution (see the module docstring).

    Args:
        root: The NUS-WIDE directory.
        out: Dataset directory to write.
        image_dir: Directory the image list paths are relative to; default ``root/Flickr``.
        splits: Part (``"train"``, ``"test"``) → split name; default both, to themselves.
        invalid_labels: ``"error"`` or ``"negative"`` (read values other than 0/1 as 0).
        options: What every importer takes; the default name is ``nus-wide``.

    Returns:
        What was written.

    Raises:
        ManifestError: missing files, a label file whose line count differs from its image
            list, invalid label values (with ``invalid_labels="error"``), missing images without
            ``skip_missing``; each naming the file.
    """
    if invalid_labels not in ("error", "negative"):
        raise ManifestError(f"invalid_labels must be 'error' or 'negative', not {invalid_labels!r}")
    root = Path(root).resolve()
    out = check_out_dir(out, options)
    splits = split_sources(splits or {p: p for p in _PARTS}, list(_PARTS), "NUS-WIDE")
    image_root = Path(image_dir).resolve() if image_dir is not None else root / "Flickr"
    if not image_root.is_dir():
        raise ManifestError(f"NUS-WIDE image directory {image_root} not found (pass image_dir)")
    concepts_file = _locate(root, ["Concepts81.txt", "ConceptsList/Concepts81.txt"], "concept list")
    concepts = read_name_list(concepts_file, "concept list")
    labels_dir = _locate(
        root, ["TrainTestLabels", "Groundtruth/TrainTestLabels"], "TrainTestLabels directory"
    )

    rows = Rows()
    invalid: list[str] = []
    inputs: dict[str, str] = {"concepts": str(concepts_file), "labels_dir": str(labels_dir)}
    for part, split in splits.items():
        tag = _PARTS[part]
        list_file = _locate(
            root, [f"ImageList/{tag}Imagelist.txt", f"{tag}Imagelist.txt"], f"{tag} image list"
        )
        inputs[f"{part}_list"] = str(list_file)
        listed = read_lines(list_file, "NUS-WIDE image list")
        paths = ["/".join(relative_posix(line.strip()).split("/")[-2:]) for line in listed]
        for lineno, rel in enumerate(paths, start=1):
            if not rel:
                raise ManifestError(f"{list_file} line {lineno}: blank line inside the image list")
        names = [f"Labels_{c}_{tag}.txt" for c in concepts]
        matrix = _concept_matrix(labels_dir, names, len(paths), list_file, invalid, invalid_labels)
        for i, rel in enumerate(paths):
            rows.add(
                stem_id(rel), rel, np.flatnonzero(matrix[i]).tolist(), split, f"{list_file}:{i + 1}"
            )

    source = {
        "kind": "nus-wide",
        "inputs": {"root": str(root), **inputs},
        "options": options.recorded(invalid_labels=invalid_labels),
        "counts": {
            "invalid_label_values": len(invalid),
            "invalid_label_examples": invalid[:MAX_EXAMPLES],
        },
    }
    return finalize(
        out,
        rows,
        options,
        class_names=concepts,
        image_root=image_root,
        name=options.name or "nus-wide",
        source=source,
    )
