"""Import Pascal VOC (``VOCdevkit/VOC20XX``) as a multi-label dataset.

Conventions:

* ``root`` is one year's directory (``VOCdevkit/VOC2007``) holding ``Annotations/<id>.xml``,
  ``ImageSets/Main/<set>.txt`` and ``JPEGImages/<id>.jpg``; ``image_root`` is ``root`` and
  ``path`` is ``JPEGImages/<id>.jpg``. ``image_id`` is the VOC id (``000005``, ``2008_000008``).
* The caller picks which image sets become which split, e.g. ``{"trainval": "train",
  "test": "test"}`` for VOC2007 (the usual multi-label benchmark) or ``{"train": "train",
  "val": "val"}`` for VOC2012 (its test annotations are not public). An image in two chosen
  sets is an error.
* Classes: the 20 standard classes in the standard (alphabetical) order, :data:`VOC_CLASSES`.
* Objects marked ``<difficult>1</difficult>`` are not labels by default
  (``include_difficult=False``): a class only present as difficult objects is left out of that
  image, as in the VOC classification evaluation, and the number of such (image, class) pairs
  is recorded. ``include_difficult=True`` counts them as positives (ML-GCN-style training
  treats difficult labels as positive).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from mlcore.data.importers._common import (
    DEFAULT_OPTIONS,
    ImportOptions,
    ImportResult,
    Rows,
    check_out_dir,
    finalize,
    read_lines,
    split_sources,
)
from mlcore.data.manifest import ManifestError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


def _objects(xml_path: Path) -> list[tuple[int, bool]]:
    """``(class index, difficult)`` of every object in one annotation file."""
    try:
        tree = ET.parse(xml_path)
    except FileNotFoundError:
        raise ManifestError(f"VOC annotation file not found: {xml_path}") from None
    except ET.ParseError as e:
        line, col = e.position
        raise ManifestError(f"{xml_path}: malformed XML (line {line}, column {col})") from None
    except OSError as e:
        raise ManifestError(f"{xml_path}: cannot read: {e.strerror}") from None
    out = []
    for k, obj in enumerate(tree.getroot().iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in _INDEX:
            raise ManifestError(f"{xml_path}: object {k} has unknown class name {name!r}")
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ManifestError(
                f"{xml_path}: object {k} has <difficult> {difficult!r}, expected 0 or 1"
            )
        out.append((_INDEX[name], difficult == "1"))
    return out


def import_voc(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: Mapping[str, str],
    include_difficult: bool = False,
    options: ImportOptions = DEFAULT_OPTIONS,
) -> ImportResult:
    """Write a dataset from a VOC year directory (see the module docstring).

    Args:
        root: ``VOCdevkit/VOC20XX``.
        out: Dataset directory to write.
        splits: Image set (``ImageSets/Main/<set>.txt``) → split name, e.g.
            ``{"trainval": "train", "test": "test"}``.
        include_difficult: Count difficult objects as labels.
        options: What every importer takes; the default name is the year directory's name
            lower-cased (``voc2007``).

    Returns:
        What was written.

    Raises:
        ManifestError: missing set or annotation files, malformed XML or unknown class names
            (naming the file), an image in two sets, missing images without ``skip_missing``.
    """
    root = Path(root).resolve()
    out = check_out_dir(out, options)
    sets_dir = root / "ImageSets" / "Main"
    if not sets_dir.is_dir():
        raise ManifestError(f"{root} is not a VOC year directory: no ImageSets/Main")
    available = sorted(p.stem for p in sets_dir.glob("*.txt") if "_" not in p.stem)
    splits = split_sources(splits, available, f"VOC in {root}")

    rows = Rows()
    counts: dict[str, int] = {}
    difficult_objects = 0
    difficult_only = 0
    for image_set, split in splits.items():
        set_file = sets_dir / f"{image_set}.txt"
        lines = read_lines(set_file, "VOC image set")
        counts[image_set] = 0
        for lineno, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            image_id = fields[0]
            objects = _objects(root / "Annotations" / f"{image_id}.xml")
            plain = {c for c, hard in objects if not hard}
            hard = {c for c, is_hard in objects if is_hard}
            difficult_objects += sum(is_hard for _, is_hard in objects)
            difficult_only += len(hard - plain)
            labels = plain | hard if include_difficult else plain
            rows.add(image_id, f"JPEGImages/{image_id}.jpg", labels, split, f"{set_file}:{lineno}")
            counts[image_set] += 1

    source = {
        "kind": "voc",
        "inputs": {"root": str(root), "image_sets": dict(splits)},
        "options": options.recorded(include_difficult=include_difficult),
        "counts": {
            "images_per_set": counts,
            "difficult_objects": difficult_objects,
            # (image, class) pairs present only through difficult objects.
            "difficult_only_labels": difficult_only,
            "difficult_only_labels_excluded": 0 if include_difficult else difficult_only,
        },
    }
    return finalize(
        out,
        rows,
        options,
        class_names=VOC_CLASSES,
        image_root=root,
        name=options.name or root.name.lower(),
        source=source,
    )
