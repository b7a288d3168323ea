"""Open Images importer: fixtures in the distributed CSV formats, including bad input."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlcore.data.check import check_dataset
from mlcore.data.importers import ImportOptions, OpenImagesEntry, import_openimages
from mlcore.data.manifest import Manifest, ManifestError, manifest_path
from tests.test_importers import png

DESCRIPTIONS = [
    ("/m/01g317", "Person"),
    ("/m/0449p", "Jaguar"),  # the animal
    ("/m/012x34", "Jaguar"),  # the car: same display name, another class
    ("/m/0k4j", "Car"),
    ("/m/09j2d", "Clothing, accessories"),  # a name with a comma: quoted in the CSV
    ("/m/05s2s", "Plant"),  # described but not trainable
]
TRAINABLE = ["/m/0k4j", "/m/01g317", "/m/0449p", "/m/012x34", "/m/09j2d"]
HEADER = "ImageID,Source,LabelName,Confidence\n"
TRAIN = [
    ("000002b66c9c498e", "verification", "/m/01g317", "1"),
    ("000002b66c9c498e", "verification", "/m/0k4j", "0"),
    ("000002b66c9c498e", "crowdsource-verification", "/m/0k4j", "1"),  # conflict: positive
    ("000002b66c9c498e", "verification", "/m/05s2s", "1"),  # untrainable: skipped
    ("00000c4d2d3f7f4b", "verification", "/m/0449p", "0"),  # only a negative
    ("0000a1b2c3d4e5f6", "verification", "/m/09j2d", "1"),
    ("0000a1b2c3d4e5f6", "verification", "/m/012x34", "0"),
]
VALIDATION = [("0001eeaf4aed83f9", "verification", "/m/0449p", "1")]


def csv_rows(rows: list[tuple[str, ...]]) -> str:
    return "".join(",".join(r) + "\n" for r in rows)


@pytest.fixture()
def oi(tmp_path: Path) -> Path:
    root = tmp_path / "oi"
    root.mkdir()
    (root / "oidv6-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n" + "".join(f'{m},"{n}"\n' for m, n in DESCRIPTIONS)
    )
    (root / "oidv6-classes-trainable.txt").write_text("\n".join(TRAINABLE) + "\n")
    (root / "train-labels.csv").write_text(HEADER + csv_rows(TRAIN))
    (root / "validation-labels.csv").write_text(HEADER + csv_rows(VALIDATION))
    for image_id in {r[0] for r in TRAIN}:
        png(root / "images/train" / f"{image_id}.jpg")
    png(root / "images/validation/0001eeaf4aed83f9.jpg")
    return root


def entries(root: Path) -> list[OpenImagesEntry]:
    return [
        OpenImagesEntry(root / "train-labels.csv", "train", root / "images/train"),
        OpenImagesEntry(root / "validation-labels.csv", "val", root / "images/validation"),
    ]


def run(root: Path, out: Path, **kwargs):
    kwargs.setdefault("trainable_classes", root / "oidv6-classes-trainable.txt")
    return import_openimages(
        entries(root), out, class_descriptions=root / "oidv6-class-descriptions.csv", **kwargs
    )


def test_classes_labels_negatives_and_metadata(oi: Path, tmp_path: Path) -> None:
    result = run(oi, tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    # Trainable order; the two "Jaguar" classes are told apart by their ids.
    assert m.class_names == (
        "Car",
        "Person",
        "Jaguar (/m/0449p)",
        "Jaguar (/m/012x34)",
        "Clothing, accessories",
    )
    source = m.info.source
    assert source["class_ids"] == TRAINABLE
    assert source["renamed_classes"] == {
        "/m/0449p": "Jaguar (/m/0449p)",
        "/m/012x34": "Jaguar (/m/012x34)",
    }
    train = source["inputs"][0]
    assert train["csv_rows"] == 7 and train["images"] == 3
    assert train["untrainable_label_rows"] == 1 and train["positive_negative_conflicts"] == 1
    assert m.info.image_root == str((oi / "images").resolve())
    rows = pq.read_table(manifest_path(tmp_path / "out")).to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["000002b66c9c498e"]["labels"] == [0, 1]  # the car conflict counts positive
    assert by_id["000002b66c9c498e"]["neg_labels"] == []
    assert by_id["000002b66c9c498e"]["path"] == "train/000002b66c9c498e.jpg"
    assert by_id["00000c4d2d3f7f4b"] == {
        **by_id["00000c4d2d3f7f4b"],
        "labels": [],
        "neg_labels": [2],
    }
    assert by_id["0000a1b2c3d4e5f6"]["neg_labels"] == [3]
    assert by_id["0001eeaf4aed83f9"]["split"] == "val"
    assert result.rows_per_split == {"train": 3, "val": 1}
    report = check_dataset(tmp_path / "out")
    assert report.ok and report.issue("extra_column") is None


def test_all_described_classes_without_trainable_list(oi: Path, tmp_path: Path) -> None:
    # An older class-descriptions.csv without header; every described class is a class.
    (oi / "oidv6-class-descriptions.csv").write_text(
        "".join(f'{m},"{n}"\n' for m, n in DESCRIPTIONS)
    )
    run(oi, tmp_path / "out", trainable_classes=None, options=ImportOptions(drop_empty=True))
    m = Manifest.load(tmp_path / "out")
    assert m.info.source["class_ids"] == [mid for mid, _ in DESCRIPTIONS]
    labels = {r["image_id"]: r["labels"] for r in m.table.to_pylist()}
    assert labels["000002b66c9c498e"] == [0, 3, 5]  # Plant counts now
    assert "00000c4d2d3f7f4b" not in labels  # no positive: dropped
    assert m.info.source["skipped"]["empty"] == 1


def test_labels_only_and_missing_images(oi: Path, tmp_path: Path) -> None:
    (oi / "images/train/00000c4d2d3f7f4b.jpg").unlink()
    with pytest.raises(ManifestError, match=r"00000c4d2d3f7f4b\.jpg is missing; pass skip_"):
        run(oi, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind
    run(oi, tmp_path / "out", options=ImportOptions(skip_missing=True))
    assert Manifest.load(tmp_path / "out").info.source["skipped"]["missing_images"] == 1
    run(oi, tmp_path / "labels", check_images=False)
    assert len(Manifest.load(tmp_path / "labels").table) == 4


def test_streams_in_small_batches(oi: Path, tmp_path: Path) -> None:
    run(oi, tmp_path / "a")
    run(oi, tmp_path / "b", batch_rows=1)  # one image per batch and row group
    a = Manifest.load(tmp_path / "a").table
    assert pq.ParquetFile(manifest_path(tmp_path / "b")).num_row_groups == 4
    assert Manifest.load(tmp_path / "b").table.equals(a)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            "000002b66c9c498e,verification,/m/01g317\n",
            r"train-labels\.csv line 2: 3 fields, the header has 4",
        ),
        (
            "000002b66c9c498e,verification,/m/01g317,1\n000002b66c9c498e,verification,/m/0k4j,0.7\n",
            r"train-labels\.csv line 3: Confidence '0\.7' is not 0 or 1",
        ),
        (
            "000002b66c9c498e,verification,/m/zzzz,1\n",
            r"train-labels\.csv line 2: unknown class id '/m/zzzz'",
        ),
        (
            ",verification,/m/01g317,1\n",
            r"train-labels\.csv line 2: empty ImageID",
        ),
        (
            "00000c4d2d3f7f4b,verification,/m/01g317,1\n000002b66c9c498e,verification,/m/0k4j,1\n",
            r"line 3: image 000002b66c9c498e comes after 00000c4d2d3f7f4b: rows must be sorted",
        ),
    ],
)
def test_bad_label_rows_name_the_line(oi: Path, tmp_path: Path, rows: str, message: str) -> None:
    (oi / "train-labels.csv").write_text(HEADER + rows)
    with pytest.raises(ManifestError, match=message):
        run(oi, tmp_path / "out", check_images=False)


def test_bad_header_classes_and_duplicates(oi: Path, tmp_path: Path) -> None:
    (oi / "train-labels.csv").write_text("ImageID,LabelName,Confidence\n")
    with pytest.raises(ManifestError, match=r"line 1: header must name ImageID, Source"):
        run(oi, tmp_path / "out")
    (oi / "train-labels.csv").write_text(HEADER + csv_rows(TRAIN))
    (oi / "oidv6-classes-trainable.txt").write_text("/m/0k4j\n/m/notdescribed\n")
    with pytest.raises(ManifestError, match=r"trainable\.txt line 2: unknown class id"):
        run(oi, tmp_path / "out")
    (oi / "oidv6-classes-trainable.txt").write_text("\n".join(TRAINABLE) + "\n")
    (oi / "oidv6-class-descriptions.csv").write_text(
        "LabelName,DisplayName\n/m/0k4j,Car\n/m/01g317,Person\n/m/0k4j,Auto\n"
    )
    with pytest.raises(
        ManifestError, match=r"line 4: class id /m/0k4j already described at line 2"
    ):
        run(oi, tmp_path / "out")
    (oi / "oidv6-class-descriptions.csv").write_text("LabelName,DisplayName\nPerson,/m/01g317\n")
    with pytest.raises(ManifestError, match=r"line 2: 'Person' is not a class id"):
        run(oi, tmp_path / "out")


def test_image_in_two_splits(oi: Path, tmp_path: Path) -> None:
    (oi / "validation-labels.csv").write_text(HEADER + "0000a1b2c3d4e5f6,verification,/m/0449p,1\n")
    with pytest.raises(
        ManifestError, match=r"image 0000a1b2c3d4e5f6 is listed in both .*train-labels\.csv"
    ):
        run(oi, tmp_path / "out", check_images=False)


def test_cli_entry_parse() -> None:
    entry = OpenImagesEntry.parse("labels.csv:train:/data/oi/train")
    assert entry == OpenImagesEntry(Path("labels.csv"), "train", Path("/data/oi/train"))
    with pytest.raises(ManifestError, match=r"LABELS\.csv:SPLIT:IMAGE_DIR"):
        OpenImagesEntry.parse("labels.csv:train")


def test_neg_labels_column_checked_on_write_and_by_check(tmp_path: Path) -> None:
    from mlcore.data.manifest import ManifestInfo, build_table, write_manifest

    info = ManifestInfo(class_names=("a", "b", "c"), name="t")
    table = build_table(["x"], [[0]], ["train"], paths=["x.png"], neg_labels=[[0, 2]])
    with pytest.raises(ManifestError, match=r"row 0 \(image_id='x'\): classes \[0\] in both"):
        write_manifest(tmp_path / "w", table, info)
    table = build_table(["x"], [[0]], ["train"], paths=["x.png"], neg_labels=[[5]])
    with pytest.raises(ManifestError, match=r"neg_labels index 5 out of range \[0, 3\)"):
        write_manifest(tmp_path / "w", table, info)
    # A file written around the checks: cpsd data check reports both problems.
    bad = build_table(
        ["x", "y"], [[0], [1]], ["train"] * 2, paths=["x", "y"], neg_labels=[[0], [7]]
    )
    bad = bad.replace_schema_metadata({b"cpsd": info.to_json()})
    (tmp_path / "d").mkdir()
    pq.write_table(bad, manifest_path(tmp_path / "d"))
    report = check_dataset(tmp_path / "d", verify_images="none")
    assert report.issue("label_positive_and_negative").examples == (
        "row 0 (image_id='x'): classes [0]",
    )
    assert report.issue("neg_label_out_of_range").count == 1


def test_cli_import_openimages(oi: Path, tmp_path: Path, capsys) -> None:
    from workflows.cli import run as cli

    argv = [
        "data", "import", "openimages", "--out", str(tmp_path / "out"),
        "--class-descriptions", str(oi / "oidv6-class-descriptions.csv"),
        "--trainable-classes", str(oi / "oidv6-classes-trainable.txt"),
        "--labels", f"{oi / 'train-labels.csv'}:train:{oi / 'images/train'}",
        "--labels", f"{oi / 'validation-labels.csv'}:val:{oi / 'images/validation'}",
    ]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "train-labels.csv: 7 rows, 3 images" in out
    assert "wrote 4 images (train 3, val 1), 5 classes" in out
    (oi / "train-labels.csv").write_text(HEADER + "000002b66c9c498e,verification,/m/zzzz,1\n")
    assert cli([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "line 2: unknown class id '/m/zzzz'" in err and "Traceback" not in err
    assert cli(["data", "import", "openimages", "--out", str(tmp_path / "x")]) == 2
    assert "needs --class-descriptions" in capsys.readouterr().err
