"""Import COCO ``instances_*.json`` files (2014 and 2017 layouts) as a multi-label dataset.

Conventions:

* One row per entry of ``images``; ``image_id`` is the COCO id as a string, ``path`` is the
  image file relative to ``image_root``, the deepest directory holding every entry's image
  directory (``/data/coco`` for ``train2014/`` + ``val2014/``). COCO ids are global, so an image
  listed by two annotation files (2014 train + 2017 val) is an error naming both.
* Classes: ``class_order="id"`` (default) sorts categories by category id, giving indices
  0..79 for the 80 COCO categories (ids 1..90 with gaps). ``class_order="name"`` sorts them
  alphabetically, the order the CPSD / ML-GCN COCO-2014 label files use; pick the one matching
  any checkpoint or label file you compare with.
* A label is every category with at least one annotation on the image, crowd annotations
  (``iscrowd=1``) included, as ASL's COCO loader (pycocotools ``getAnnIds``) does; their
  number is recorded in the metadata.
* Images without any annotation are kept with an empty label list (about 1% of COCO train);
  ``drop_empty=True`` leaves them out and records how many.
* A file without an ``annotations`` key (``image_info_test*.json``) imports every image with an
  empty label list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlcore.data.importers._common import (
    DEFAULT_OPTIONS,
    ImportOptions,
    ImportResult,
    Rows,
    check_out_dir,
    finalize,
    parse_source_entry,
    relative_posix,
)
from mlcore.data.manifest import ManifestError


@dataclass(frozen=True)
class CocoEntry:
    """One annotation file and where its split and images go.

    Attributes:
        annotations: ``instances_<set>.json``.
        split: Split name its images get (``"train"``, ``"val"``, ...).
        image_dir: Directory holding its images (the ``file_name`` values are relative to it).
    """

    annotations: Path
    split: str
    image_dir: Path

    @classmethod
    def parse(cls, spec: str) -> CocoEntry:
        """Parse the CLI form ``ANNOTATIONS.json:SPLIT:IMAGE_DIR``.

        Raises:
            ManifestError: not exactly three non-empty ``:``-separated fields.
        """
        return cls(*parse_source_entry(spec, "COCO", "ANNOTATIONS.json:SPLIT:IMAGE_DIR"))


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"COCO annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 JSON ({e.reason})") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{path}: not a COCO annotation file (no 'images' list)")
    for key in ("categories", "annotations"):
        if key in data and not isinstance(data[key], list):
            raise ManifestError(f"{path}: {key!r} must be a list")
    return data


def _field(path: Path, where: str, obj: Any, key: str, kind: type) -> Any:
    """``obj[key]`` checked to be a ``kind`` (bool is refused where an int is expected)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{path}: {where} needs {kind.__name__} {key!r}, got {value!r}")
    return value


def _categories(path: Path, data: dict[str, Any]) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, cat in enumerate(data.get("categories") or []):
        cat_id = _field(path, f"categories[{i}]", cat, "id", int)
        if cat_id in cats:
            raise ManifestError(f"{path}: categories[{i}] repeats category id {cat_id}")
        cats[cat_id] = _field(path, f"categories[{i}]", cat, "name", str)
    if not cats:
        raise ManifestError(f"{path}: no 'categories'")
    return cats


def _read_entry(
    entry: CocoEntry, image_dir: Path
) -> tuple[dict[int, str], list[tuple[int, str, set[int]]], dict[str, Any]]:
    """One annotation file: its categories, ``(image id, file name, category ids)`` per image,
    and its record in ``source["inputs"]``."""
    path = entry.annotations
    data = _load_json(path)
    cats = _categories(path, data)
    images: dict[int, tuple[str, set[int]]] = {}
    for i, img in enumerate(data["images"]):
        img_id = _field(path, f"images[{i}]", img, "id", int)
        if img_id in images:
            raise ManifestError(f"{path}: images[{i}] repeats image id {img_id}")
        images[img_id] = (_field(path, f"images[{i}]", img, "file_name", str), set())
    crowd = 0
    annotations = data.get("annotations") or []
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        img_id = _field(path, where, ann, "image_id", int)
        cat_id = _field(path, where, ann, "category_id", int)
        if img_id not in images:
            raise ManifestError(f"{path}: {where} refers to unknown image id {img_id}")
        if cat_id not in cats:
            raise ManifestError(f"{path}: {where} refers to unknown category id {cat_id}")
        images[img_id][1].add(cat_id)
        crowd += bool(ann.get("iscrowd"))
    record = {
        "annotations": str(path.resolve()),
        "split": entry.split,
        "image_dir": str(image_dir),
        "images": len(images),
        "annotations_count": len(annotations),
        "crowd_annotations": crowd,
        "unannotated_images": sum(not cs for _, cs in images.values()),
    }
    return cats, [(k, fn, cs) for k, (fn, cs) in images.items()], record


def import_coco(
    entries: Sequence[CocoEntry | tuple[str | os.PathLike, str, str | os.PathLike]],
    out: str | os.PathLike,
    *,
    class_order: Literal["id", "name"] = "id",
    options: ImportOptions = DEFAULT_OPTIONS,
) -> ImportResult:
    """Write a dataset from one or more COCO instances files (see the module docstring).

    Args:
        entries: ``(annotations_json, split, image_dir)`` per file, e.g.
            ``("instances_train2014.json", "train", "/data/coco/train2014")``.
        out: Dataset directory to write.
        class_order: ``"id"`` (category id order) or ``"name"`` (alphabetical).
        options: What every importer takes; the default name is ``coco``.

    Returns:
        What was written.

    Raises:
        ManifestError: unreadable or malformed JSON (naming the file and entry), differing
            category lists, an image in two files, missing images without ``skip_missing``.
    """
    if class_order not in ("id", "name"):
        raise ManifestError(f"class_order must be 'id' or 'name', not {class_order!r}")
    out = check_out_dir(out, options)
    parsed = [
        e if isinstance(e, CocoEntry) else CocoEntry(Path(e[0]), e[1], Path(e[2])) for e in entries
    ]
    if not parsed:
        raise ManifestError("no COCO annotation file given")
    image_dirs = [e.image_dir.resolve() for e in parsed]
    image_root = Path(os.path.commonpath(image_dirs))

    categories: dict[int, str] | None = None
    raw: list[tuple[CocoEntry, Path, list[tuple[int, str, set[int]]]]] = []
    inputs: list[dict[str, Any]] = []
    for entry, image_dir in zip(parsed, image_dirs, strict=True):
        cats, images, record = _read_entry(entry, image_dir)
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ManifestError(
                f"{entry.annotations}: categories differ from those of {parsed[0].annotations}"
            )
        raw.append((entry, image_dir, images))
        inputs.append(record)

    assert categories is not None  # parsed is non-empty
    cat_ids = sorted(categories, key=(lambda c: c) if class_order == "id" else categories.get)
    index = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    rows = Rows()
    for entry, image_dir, images in raw:
        prefix = image_dir.relative_to(image_root).as_posix()
        for img_id, file_name, cat_set in images:
            rel = relative_posix(f"{prefix}/{file_name}")
            rows.add(
                str(img_id),
                rel,
                (index[c] for c in cat_set),
                entry.split,
                f"{entry.annotations} (image id {img_id})",
            )
    source = {
        "kind": "coco",
        "inputs": inputs,
        "options": options.recorded(class_order=class_order),
        "category_ids": cat_ids,
    }
    return finalize(
        out,
        rows,
        options,
        class_names=[categories[c] for c in cat_ids],
        image_root=image_root,
        name=options.name or "coco",
        source=source,
    )
