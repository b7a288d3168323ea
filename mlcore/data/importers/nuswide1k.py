"""Import NUS-WIDE with its 1,000 tags as the zero-shot benchmark: 925 seen tags, 81 unseen.

The split of Zhang et al. (Fast0Tag, CVPR 2016), used by LESA, BiAM and ML-Decoder (Table 6):
the seen classes are the tags of ``TagList1k.txt`` that are not one of the 81 concepts
(1,000 − 75 = 925 in the official files), labelled by the noisy user tags of
``AllTags1k.txt``; the unseen classes are the 81 concepts of ``Concepts81.txt``, labelled by the
human annotation ``Groundtruth/AllLabels/Labels_<concept>.txt``.

Expected files under ``root`` (each looked for where the official archives unpack to):

* ``NUS_WID_Tags/TagList1k.txt`` (or ``TagList1k.txt``): the 1,000 tags, one per line;
* ``NUS_WID_Tags/AllTags1k.txt`` (or ``AllTags1k.txt``): one line per image of the full image
  list, 1,000 whitespace-separated 0/1 values in tag order;
* ``Concepts81.txt`` (or ``ConceptsList/Concepts81.txt``): the 81 concepts;
* ``Groundtruth/AllLabels/Labels_<concept>.txt`` (or ``AllLabels/``): one 0/1 per line of the
  full image list;
* ``ImageList/Imagelist.txt``: the full image list (269,648 lines in the official files), and
  ``ImageList/TrainImagelist.txt`` / ``TestImagelist.txt``: the official split;
* the images, by default under ``Flickr/``.

Image paths follow :mod:`~mlcore.data.importers.nuswide`: only the last two components
(``concept/file``) of a listed path are used, ``\\`` or ``/`` separated; ``image_id`` is that
path without extension. Train/test list entries are matched to the full list by that path.

Classes: the seen tags (``TagList1k`` order) then the 81 concepts (``Concepts81`` order);
``source["zsl"]`` records ``{"seen": [...], "unseen": [...]}``, which ``zsl.unseen_classes:
manifest`` reads. ``val_fraction`` moves that fraction of the training images, chosen by a hash
of the image id (so the choice does not depend on order or seed), to a ``val`` split: model
selection on seen data, never on the unseen test labels.

Errors name the file and line: a tag row with the wrong number of values or a value other than
0/1, a label file whose length differs from the image list, a split-list entry missing from the
full list, a repeated image. Values other than 0/1 in a concept file follow ``invalid_labels``
as in :func:`~mlcore.data.importers.import_nuswide`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
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
    stem_id,
)
from mlcore.data.importers.nuswide import _concept_matrix, _locate
from mlcore.data.manifest import ManifestError

_SPLIT_LISTS = {"train": "TrainImagelist.txt", "test": "TestImagelist.txt"}


def _listed_paths(path: Path) -> list[str]:
    """``concept/file`` of every line of an image list; blank lines are errors."""
    out = []
    for lineno, line in enumerate(read_lines(path, "NUS-WIDE image list"), start=1):
        rel = "/".join(relative_posix(line.strip()).split("/")[-2:])
        if not rel:
            raise ManifestError(f"{path} line {lineno}: blank line inside the image list")
        out.append(rel)
    return out


def _tag_rows(path: Path, num_images: int, num_tags: int) -> list[np.ndarray]:
    """Positive tag indices of every line of ``AllTags1k.txt``."""
    lines = read_lines(path, "NUS-WIDE tag file")
    if len(lines) != num_images:
        raise ManifestError(f"{path} has {len(lines)} lines but the image list has {num_images}")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        values = line.split()
        if len(values) != num_tags:
            raise ManifestError(
                f"{path} line {lineno}: {len(values)} values, TagList1k has {num_tags} tags"
            )
        # One character per value when the row is well formed: a fast 0/1 check.
        joined = "".join(values)
        codes = np.frombuffer(joined.encode(), dtype=np.uint8)
        if codes.size != num_tags or not np.isin(codes, (48, 49)).all():
            bad = next(i for i, v in enumerate(values) if v not in ("0", "1"))
            raise ManifestError(
                f"{path} line {lineno}: value {values[bad]!r} for tag {bad + 1} is not 0 or 1"
            )
        rows.append(np.flatnonzero(codes == 49))
    return rows


def _in_val(image_id: str, fraction: float) -> bool:
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass(frozen=True)
class _Classes:
    """The 925 seen tags then the 81 concepts, and where each tag's column goes."""

    tags: list[str]
    seen: list[str]
    concepts: list[str]
    tag_to_class: np.ndarray
    """Class index of each column of the tag matrix; -1 for tags that are concepts."""

    @property
    def names(self) -> list[str]:
        return self.seen + self.concepts

    def labels(self, tag_row: np.ndarray, concept_row: np.ndarray) -> list[int]:
        """Class indices of one image: its seen tags (positive tag columns), then its concepts
        (a 0/1 row)."""
        tag_classes = self.tag_to_class[tag_row]
        return [
            *tag_classes[tag_classes >= 0].tolist(),
            *(len(self.seen) + np.flatnonzero(concept_row)).tolist(),
        ]


def _classes(tag_file: Path, concepts_file: Path) -> _Classes:
    tags = read_name_list(tag_file, "1k tag list")
    concepts = read_name_list(concepts_file, "concept list")
    concept_set = set(concepts)
    seen_columns = [i for i, t in enumerate(tags) if t not in concept_set]
    tag_to_class = np.full(len(tags), -1)
    tag_to_class[seen_columns] = np.arange(len(seen_columns))
    return _Classes(tags, [tags[i] for i in seen_columns], concepts, tag_to_class)


def _positions(list_file: Path) -> tuple[list[str], dict[str, int]]:
    """The full image list, and each image's line index in it; a repeated image is an error."""
    all_paths = _listed_paths(list_file)
    position: dict[str, int] = {}
    for i, rel in enumerate(all_paths):
        if rel in position:
            raise ManifestError(
                f"{list_file} line {i + 1}: image {rel!r} already listed at line "
                f"{position[rel] + 1}"
            )
        position[rel] = i
    return all_paths, position


def _split_rows(
    root: Path,
    list_file: Path,
    position: dict[str, int],
    labels: Callable[[int], list[int]],
    val_fraction: float,
) -> tuple[Rows, dict[str, str]]:
    """Rows of the official train and test lists (``labels(i)``: those of line ``i`` of the
    full list), and where the lists are, for ``source["inputs"]``."""
    rows = Rows()
    lists = {}
    for part, file_name in _SPLIT_LISTS.items():
        split_file = _locate(root, [f"ImageList/{file_name}", file_name], f"{part} image list")
        lists[f"{part}_list"] = str(split_file)
        for lineno, rel in enumerate(_listed_paths(split_file), start=1):
            where = f"{split_file}:{lineno}"
            if rel not in position:
                raise ManifestError(f"{where}: image {rel!r} is not in {list_file}")
            image_id = stem_id(rel)
            split = "val" if part == "train" and _in_val(image_id, val_fraction) else part
            rows.add(image_id, rel, labels(position[rel]), split, where)
    return rows, lists


def import_nuswide1k(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    invalid_labels: Literal["error", "negative"] = "error",
    options: ImportOptions = DEFAULT_OPTIONS,
) -> ImportResult:
    """Write the NUS-WIDE 925/81 zero-shot dataset (see the module docstring).

    Args:
        root: The NUS-WIDE directory (tags, concepts, ground truth and image lists).
        out: Dataset directory to write.
        image_dir: Directory the image list paths are relative to; default ``root/Flickr``.
        val_fraction: Fraction of the training images moved to a ``val`` split, by image-id
            hash, in ``[0, 1)``.
        invalid_labels: ``"error"`` or ``"negative"`` for concept values other than 0/1.
        options: What every importer takes; the default name is ``nus-wide-1k``.

    Returns:
        What was written.

    Raises:
        ManifestError: Missing or malformed files, naming the file and line (module docstring).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ManifestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if invalid_labels not in ("error", "negative"):
        raise ManifestError(f"invalid_labels must be 'error' or 'negative', not {invalid_labels!r}")
    root = Path(root).resolve()
    out = check_out_dir(out, options)
    image_root = Path(image_dir).resolve() if image_dir is not None else root / "Flickr"
    if not image_root.is_dir():
        raise ManifestError(f"NUS-WIDE image directory {image_root} not found (pass image_dir)")

    tag_file = _locate(root, ["NUS_WID_Tags/TagList1k.txt", "TagList1k.txt"], "1k tag list")
    concepts_file = _locate(root, ["Concepts81.txt", "ConceptsList/Concepts81.txt"], "concept list")
    classes = _classes(tag_file, concepts_file)
    list_file = _locate(root, ["ImageList/Imagelist.txt", "Imagelist.txt"], "full image list")
    all_paths, position = _positions(list_file)
    tags_file = _locate(root, ["NUS_WID_Tags/AllTags1k.txt", "AllTags1k.txt"], "1k tag matrix")
    tag_rows = _tag_rows(tags_file, len(all_paths), len(classes.tags))
    labels_dir = _locate(root, ["Groundtruth/AllLabels", "AllLabels"], "AllLabels directory")
    invalid: list[str] = []
    concept_matrix = _concept_matrix(
        labels_dir,
        [f"Labels_{c}.txt" for c in classes.concepts],
        len(all_paths),
        list_file,
        invalid,
        invalid_labels,
    )

    rows, lists = _split_rows(
        root,
        list_file,
        position,
        lambda i: classes.labels(tag_rows[i], concept_matrix[i]),
        val_fraction,
    )
    source = {
        "kind": "nus-wide-1k",
        "inputs": {
            "root": str(root),
            "tags": str(tag_file),
            "tag_matrix": str(tags_file),
            "concepts": str(concepts_file),
            "labels_dir": str(labels_dir),
            "image_list": str(list_file),
            **lists,
        },
        "options": options.recorded(val_fraction=val_fraction, invalid_labels=invalid_labels),
        "counts": {
            "tags": len(classes.tags),
            "tags_that_are_concepts": len(classes.tags) - len(classes.seen),
            "images_in_full_list": len(all_paths),
            "images_in_neither_split": len(all_paths) - len(rows),
            "invalid_label_values": len(invalid),
            "invalid_label_examples": invalid[:MAX_EXAMPLES],
        },
        "zsl": {"seen": classes.seen, "unseen": classes.concepts},
    }
    return finalize(
        out,
        rows,
        options,
        class_names=classes.names,
        image_root=image_root,
        name=options.name or "nus-wide-1k",
        source=source,
    )
