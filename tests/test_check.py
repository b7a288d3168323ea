"""check_dataset / format_report on a good dataset and on deliberately broken ones."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mlcore.data.check import check_dataset, format_report, image_problem
from mlcore.data.manifest import (
    MANIFEST_FILE,
    METADATA_KEY,
    SCHEMA,
    ManifestError,
    ManifestInfo,
    build_table,
    write_manifest,
)


def png_bytes(color: tuple[int, int, int] = (0, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def good_dataset(root: Path, num_classes: int = 3) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (root / "images" / f"{name}.png").write_bytes(png_bytes())
    table = build_table(
        ["a", "b", "c", "d"],
        [[0, 1], [1], [], [0]],
        ["train", "train", "val", "val"],
        paths=["images/a.png", "images/b.png", "images/c.png", None],
        image_bytes=[None, None, None, png_bytes()],
    )
    names = tuple(f"class{i}" for i in range(num_classes))
    write_manifest(root, table, ManifestInfo(class_names=names, name="tiny"))
    return root


def write_raw(root: Path, rows: list[dict], class_names: list[str]) -> Path:
    """Write rows with plain pyarrow, bypassing validate_rows."""
    root.mkdir(parents=True, exist_ok=True)
    meta = ManifestInfo(class_names=tuple(class_names), name="broken").to_json()
    # All columns nullable, so that null labels survive the Parquet round trip.
    schema = pa.schema([f.with_nullable(True) for f in SCHEMA], metadata={METADATA_KEY: meta})
    table = pa.Table.from_pylist(rows, schema=schema)
    # Small row groups so the checks run across several batches.
    pq.write_table(table, root / MANIFEST_FILE, row_group_size=2)
    return root


def test_good_dataset(tmp_path: Path) -> None:
    report = check_dataset(good_dataset(tmp_path / "ds"), verify_images="decode")
    assert report.ok, format_report(report)
    assert report.rows_per_split == {"train": 2, "val": 2}
    assert report.num_rows == 4 and report.num_classes == 3
    assert report.positives == {"train": (1, 2, 0), "val": (1, 0, 0)}
    stats = report.label_stats
    assert (stats.mean, stats.min, stats.max, stats.zero) == (1.0, 0, 2, 1)
    assert {i.code for i in report.warnings} == {"zero_positive_train", "zero_label_images"}
    assert report.issue("zero_positive_train").examples == ("2: class2",)
    text = format_report(report)
    assert "images: 4 (train 2, val 2); classes: 3" in text
    assert "class1" in text and text.endswith("OK: 0 error kind(s), 2 warning kind(s)")


def test_broken_dataset_reports_every_problem(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    (root / "img").mkdir(parents=True)
    for name in ("ok", "dup", "x", "both"):
        (root / "img" / f"{name}.png").write_bytes(png_bytes())
    (root / "img/corrupt.png").write_bytes(png_bytes()[:40])
    row = {"image_bytes": None, "split": "train"}
    write_raw(
        root,
        [
            {**row, "image_id": "ok", "path": "img/ok.png", "labels": [0, 1]},
            {**row, "image_id": "oor", "path": "img/x.png", "labels": [1, 7]},
            {**row, "image_id": "dup", "path": "img/dup.png", "labels": [0]},
            {**row, "image_id": "dup", "path": "img/dup.png", "labels": [0]},
            {**row, "image_id": "gone", "path": "img/gone.png", "labels": [1]},
            {**row, "image_id": "bad", "path": "img/corrupt.png", "labels": [0]},
            {
                **row,
                "image_id": "both",
                "path": "img/both.png",
                "image_bytes": b"\x00",
            },  # no labels
            {**row, "image_id": "neither", "path": None, "labels": [2, 1, 1]},
            {**row, "image_id": "leak", "path": "img/ok.png", "labels": [0], "split": "val"},
        ],
        ["a", "b", "c"],
    )
    report = check_dataset(root, verify_images="decode")
    assert not report.ok
    codes = {i.code: i for i in report.errors}
    assert set(codes) == {
        "label_out_of_range",
        "duplicate_image_id",
        "missing_image",
        "corrupt_image",
        "path_xor_bytes",
        "labels_not_sorted_unique",
        "duplicate_path_across_splits",
        "null_labels",
    }
    assert codes["label_out_of_range"].examples == ("row 1 (image_id='oor'): label 7",)
    assert (
        codes["duplicate_image_id"]
        .examples[0]
        .startswith("row 3 (image_id='dup') repeats row 2 (same path/split/labels")
    )
    assert codes["missing_image"].examples == ("row 4 (image_id='gone'): img/gone.png",)
    assert "img/corrupt.png" in codes["corrupt_image"].examples[0]
    assert codes["path_xor_bytes"].count == 2
    assert {e.split(": ")[-1] for e in codes["path_xor_bytes"].examples} == {"both", "neither"}
    assert "img/ok.png" in codes["duplicate_path_across_splits"].examples[0]
    assert report.issue("duplicate_path").count == 1  # dup rows share a path within train
    # the repeated index 1 of "neither" counts once; the out-of-range 7 not at all
    assert report.positives["train"] == (4, 4, 1)
    text = format_report(report)
    assert "[label_out_of_range] 1 label indices outside [0, 3)" in text
    assert "FAILED" in text

    exists_only = check_dataset(root)
    assert exists_only.issue("corrupt_image") is None and exists_only.issue("missing_image")
    assert check_dataset(root, verify_images="none").issue("missing_image") is None


def test_embedded_bytes_decoded(tmp_path: Path) -> None:
    row = {"path": None, "split": "train", "labels": [0]}
    root = write_raw(
        tmp_path / "emb",
        [
            {**row, "image_id": "good", "image_bytes": png_bytes()},
            {**row, "image_id": "bad", "image_bytes": png_bytes()[:50]},
        ],
        ["only"],
    )
    report = check_dataset(root, verify_images="decode")
    assert report.issue("corrupt_image").examples[0].startswith("row 1 (image_id='bad')")
    assert check_dataset(root).ok  # bytes are only decoded in decode mode


def test_image_root_and_schema_problems(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    meta = json.dumps(
        {"format_version": 1, "class_names": ["a", "a"], "image_root": "/does/not/exist"}
    ).encode()
    table = pa.table(
        {"image_id": ["x"], "path": ["x.png"], "labels": [[0]], "split": ["test"], "extra": [1]}
    )
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta}), root / MANIFEST_FILE)
    report = check_dataset(root)
    errors = {i.code for i in report.errors}
    assert {"duplicate_class_name", "image_root_missing", "schema"} <= errors
    assert report.issue("schema").examples == ("column 'image_bytes' missing",)
    assert re.match(
        r"column 'labels' has type list<\w+: int64>", report.issue("schema_type").examples[0]
    )
    assert {"extra_column", "no_train_split"} <= {i.code for i in report.warnings}


def test_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a dataset directory"):
        check_dataset(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(b"definitely not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        check_dataset(tmp_path)
    pq.write_table(pa.table({"a": [1]}), tmp_path / MANIFEST_FILE)
    with pytest.raises(ManifestError, match="has no 'cpsd' metadata"):
        check_dataset(tmp_path)
    table = pa.table({"a": [1]}).replace_schema_metadata({METADATA_KEY: b"{not json"})
    pq.write_table(table, tmp_path / MANIFEST_FILE)
    with pytest.raises(ManifestError, match="unreadable 'cpsd' metadata"):
        check_dataset(tmp_path)
    with pytest.raises(ValueError, match="verify_images"):
        check_dataset(tmp_path, verify_images="maybe")  # type: ignore[arg-type]


def test_positives_table_is_compact(tmp_path: Path) -> None:
    root = tmp_path / "many"
    names = [f"c{i:02d}" for i in range(30)]
    labels = [list(range(k)) for k in range(1, 31)]  # class i is in 30 - i images
    table = build_table(
        [str(i) for i in range(30)],
        labels,
        ["train"] * 30,
        image_bytes=[b"x"] * 30,
    )
    write_manifest(root, table, ManifestInfo(class_names=tuple(names)))
    report = check_dataset(root, verify_images="none")
    text = format_report(report)
    assert "c00" in text and "c29" in text and "c15" not in text
    assert "... 20 more classes ..." in text


def test_image_problem_truncated_png(tmp_path: Path) -> None:
    data = png_bytes()
    assert image_problem(data) is None
    assert image_problem(data[:-20], full_decode=True) is not None


def test_cli_exit_codes_are_as_documented(tmp_path: Path, capsys) -> None:
    """README: exit 1 on errors in the data (an unreadable manifest included), 2 when the folder
    is not a dataset (a corrupt manifest used to exit 2)."""
    from workflows.cli import run

    assert run(["data", "check", str(tmp_path)]) == 2
    assert "not a dataset directory" in capsys.readouterr().err
    (tmp_path / MANIFEST_FILE).write_bytes(b"definitely not parquet")
    assert run(["data", "check", str(tmp_path)]) == 1
    assert "not a readable Parquet file" in capsys.readouterr().out
