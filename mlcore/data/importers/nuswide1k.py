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
from pathlib import Path
from typing import Literal

import numpy as np

from mlcore.data.importers._common import (
    MAX_EXAMPLES,
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


def import_nuswide1k(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    invalid_labels: Literal["error", "negative"] = "error",
    drop_empty: bool = False,
    skip_missing: bool = False,
    verify_decode: bool = False,
    name: str = "nus-wide-1k",
    overwrite: bool = False,
) -> ImportResult:
    """Write the NUS-WIDE 925/81 zero-shot dataset (see the module docstring).

    Args:
        root: The NUS-WIDE directory (tags, concepts, ground truth and image lists).
        out: Dataset directory to write.
        image_dir: Directory the image list paths are relative to; default ``root/Flickr``.
        val_fraction: Fraction of the training images moved to a ``val`` split, by image-id
            hash, in ``[0, 1)``.
        invalid_labels: ``"error"`` or ``"negative"`` for concept values other than 0/1.
        drop_empty: Leave out images without any label (counted in the metadata).
        skip_missing: Leave out rows whose image is missing (or undecodable with
            ``verify_decode``) instead of failing; counted in the metadata.
        verify_decode: Also check every image with PIL ``Image.verify`` (slow).
        name: Dataset name stored in the metadata.
        overwrite: Replace an existing ``out/manifest.parquet``.

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
    out = check_out_dir(out, overwrite)
    image_root = Path(image_dir).resolve() if image_dir is not None else root / "Flickr"
    if not image_root.is_dir():
        raise ManifestError(f"NUS-WIDE image directory {image_root} not found (pass image_dir)")

    tag_file = _locate(root, ["NUS_WID_Tags/TagList1k.txt", "TagList1k.txt"], "1k tag list")
    tags = read_name_list(tag_file, "1k tag list")
    concepts_file = _locate(root, ["Concepts81.txt", "ConceptsList/Concepts81.txt"], "concept list")
    concepts = read_name_list(concepts_file, "concept list")
    concept_set = set(concepts)
    seen_columns = [i for i, t in enumerate(tags) if t not in concept_set]
    seen = [tags[i] for i in seen_columns]
    class_names = seen + concepts
    tag_to_class = np.full(len(tags), -1)
    tag_to_class[seen_columns] = np.arange(len(seen))

    list_file = _locate(root, ["ImageList/Imagelist.txt", "Imagelist.txt"], "full image list")
    all_paths = _listed_paths(list_file)
    position: dict[str, int] = {}
    for i, rel in enumerate(all_paths):
        if rel in position:
            raise ManifestError(
                f"{list_file} line {i + 1}: image {rel!r} already listed at line "
                f"{position[rel] + 1}"
            )
        position[rel] = i
    tags_file = _locate(root, ["NUS_WID_Tags/AllTags1k.txt", "AllTags1k.txt"], "1k tag matrix")
    tag_rows = _tag_rows(tags_file, len(all_paths), len(tags))
    labels_dir = _locate(root, ["Groundtruth/AllLabels", "AllLabels"], "AllLabels directory")
    invalid: list[str] = []
    concept_matrix = _concept_matrix(
        labels_dir,
        [f"Labels_{c}.txt" for c in concepts],
        len(all_paths),
        list_file,
        invalid,
        invalid_labels,
    )

    rows = Rows()
    listed = 0
    inputs = {
        "tags": str(tag_file),
        "tag_matrix": str(tags_file),
        "concepts": str(concepts_file),
        "labels_dir": str(labels_dir),
        "image_list": str(list_file),
    }
    for part, file_name in _SPLIT_LISTS.items():
        split_file = _locate(root, [f"ImageList/{file_name}", file_name], f"{part} image list")
        inputs[f"{part}_list"] = str(split_file)
        for lineno, rel in enumerate(_listed_paths(split_file), start=1):
            where = f"{split_file}:{lineno}"
            if rel not in position:
                raise ManifestError(f"{where}: image {rel!r} is not in {list_file}")
            i = position[rel]
            tag_classes = tag_to_class[tag_rows[i]]
            labels = [
                *tag_classes[tag_classes >= 0].tolist(),
                *(len(seen) + np.flatnonzero(concept_matrix[i])).tolist(),
            ]
            image_id = stem_id(rel)
            split = "val" if part == "train" and _in_val(image_id, val_fraction) else part
            rows.add(image_id, rel, labels, split, where)
            listed += 1

    source = {
        "kind": "nus-wide-1k",
        "inputs": {"root": str(root), **inputs},
        "options": {
            "val_fraction": val_fraction,
            "invalid_labels": invalid_labels,
            "drop_empty": drop_empty,
        },
        "counts": {
            "tags": len(tags),
            "tags_that_are_concepts": len(tags) - len(seen),
            "images_in_full_list": len(all_paths),
            "images_in_neither_split": len(all_paths) - listed,
            "invalid_label_values": len(invalid),
            "invalid_label_examples": invalid[:MAX_EXAMPLES],
        },
        "zsl": {"seen": seen, "unseen": concepts},
    }
    return finalize(
        out,
        rows,
        class_names=class_names,
        image_root=image_root,
        name=name,
        source=source,
        drop_empty=drop_empty,
        skip_missing=skip_missing,
        verify_decode=verify_decode,
    )
