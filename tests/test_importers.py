"""Importers: COCO, VOC, NUS-WIDE and CSV fixtures built in tmp_path with tiny PNG images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mlcore.data.importers import (
    VOC_CLASSES,
    CocoEntry,
    ImportOptions,
    import_coco,
    import_csv,
    import_nuswide,
    import_voc,
    parse_split_map,
)
from mlcore.data.manifest import Manifest, ManifestError


def png(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> None:
    """A 4x4 PNG (whatever the file's extension says: PIL reads by content)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="PNG")


def rows_by_id(root: Path) -> dict[str, dict]:
    table = Manifest.load(root).table.to_pylist()
    return {r["image_id"]: r for r in table}


# --------------------------------------------------------------------------- COCO

COCO_CATEGORIES = [
    {"id": 7, "name": "apple", "supercategory": "food"},
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
]


def coco_file(path: Path, images: list[tuple[int, str]], anns: list[tuple[int, int, int]]) -> Path:
    """``anns``: (image_id, category_id, iscrowd)."""
    data = {
        "info": {},
        "images": [{"id": i, "file_name": f, "width": 4, "height": 4} for i, f in images],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1]}
            for k, (i, c, crowd) in enumerate(anns)
        ],
        "categories": COCO_CATEGORIES,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def coco2014(tmp_path: Path) -> list[CocoEntry]:
    base = tmp_path / "coco"
    train = [(9, "COCO_train2014_000000000009.jpg"), (25, "COCO_train2014_000000000025.jpg")]
    val = [(42, "COCO_val2014_000000000042.jpg"), (73, "COCO_val2014_000000000073.jpg")]
    for _, f in train:
        png(base / "train2014" / f)
    for _, f in val:
        png(base / "val2014" / f)
    # image 9: person twice + car; 25: nothing; 42: crowd-only apple; 73: person
    tr = coco_file(
        base / "annotations/instances_train2014.json", train, [(9, 1, 0), (9, 1, 0), (9, 3, 0)]
    )
    va = coco_file(base / "annotations/instances_val2014.json", val, [(42, 7, 1), (73, 1, 0)])
    return [CocoEntry(tr, "train", base / "train2014"), CocoEntry(va, "val", base / "val2014")]


def test_coco_rows_labels_splits_and_id_order(coco2014: list[CocoEntry], tmp_path: Path) -> None:
    result = import_coco(coco2014, tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == ("person", "car", "apple")  # category id order 1, 3, 7
    assert m.info.image_root == str((tmp_path / "coco").resolve())
    rows = rows_by_id(tmp_path / "out")
    assert rows["9"]["labels"] == [0, 1]
    assert rows["9"]["path"] == "train2014/COCO_train2014_000000000009.jpg"
    assert rows["25"]["labels"] == []  # unannotated images are kept
    assert rows["42"]["labels"] == [2]  # crowd annotations count as labels
    assert {k: r["split"] for k, r in rows.items()} == {
        "9": "train",
        "25": "train",
        "42": "val",
        "73": "val",
    }
    assert result.rows_per_split == {"train": 2, "val": 2}
    src = m.info.source
    assert src["kind"] == "coco" and src["category_ids"] == [1, 3, 7]
    assert [i["crowd_annotations"] for i in src["inputs"]] == [0, 1]
    assert src["skipped"] == {"empty": 0, "missing_images": 0, "corrupt_images": 0}
    assert "wrote 4 images" in result.summary()


def test_coco_name_order_and_drop_empty(coco2014: list[CocoEntry], tmp_path: Path) -> None:
    import_coco(
        coco2014, tmp_path / "out", class_order="name", options=ImportOptions(drop_empty=True)
    )
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == ("apple", "car", "person")
    rows = rows_by_id(tmp_path / "out")
    assert "25" not in rows
    assert rows["9"]["labels"] == [1, 2] and rows["42"]["labels"] == [0]
    assert m.info.source["skipped"]["empty"] == 1


def test_coco_2017_single_entry_layout(tmp_path: Path) -> None:
    png(tmp_path / "val2017/000000000042.jpg")
    ann = coco_file(tmp_path / "instances_val2017.json", [(42, "000000000042.jpg")], [(42, 3, 0)])
    import_coco([(ann, "val", tmp_path / "val2017")], tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    assert m.info.image_root == str((tmp_path / "val2017").resolve())
    assert rows_by_id(tmp_path / "out")["42"]["path"] == "000000000042.jpg"


def test_coco_missing_images_error_and_skip(coco2014: list[CocoEntry], tmp_path: Path) -> None:
    (tmp_path / "coco/val2014/COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 of 4 image files are missing.*000073\.jpg"):
        import_coco(coco2014, tmp_path / "out")
    import_coco(coco2014, tmp_path / "out", options=ImportOptions(skip_missing=True))
    m = Manifest.load(tmp_path / "out")
    assert "73" not in rows_by_id(tmp_path / "out")
    assert m.info.source["skipped"]["missing_images"] == 1
    assert m.info.source["skipped"]["missing_examples"] == ["val2014/COCO_val2014_000000000073.jpg"]


def test_coco_malformed_input_names_file_and_entry(
    coco2014: list[CocoEntry], tmp_path: Path
) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ManifestError, match=r"broken\.json: not valid JSON \(line 1"):
        import_coco([(bad, "train", tmp_path)], tmp_path / "out")
    unknown = coco_file(tmp_path / "u.json", [(1, "a.jpg")], [(1, 99, 0)])
    with pytest.raises(ManifestError, match=r"u\.json: annotations\[0\].*category id 99"):
        import_coco([(unknown, "train", tmp_path)], tmp_path / "out")
    data = json.loads(unknown.read_text())
    data["images"][0]["id"] = "one"
    unknown.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"u\.json: images\[0\] needs int 'id'"):
        import_coco([(unknown, "train", tmp_path)], tmp_path / "out")
    # the same image listed by two files (e.g. 2014 train + 2017 val)
    with pytest.raises(ManifestError, match=r"image id '9' already imported from .*train2014"):
        import_coco([coco2014[0], coco2014[0]], tmp_path / "out")


def test_coco_refuses_to_overwrite_and_parses_cli_entry(
    coco2014: list[CocoEntry], tmp_path: Path
) -> None:
    import_coco(coco2014, tmp_path / "out")
    with pytest.raises(ManifestError, match="already exists"):
        import_coco(coco2014, tmp_path / "out")
    import_coco(coco2014[:1], tmp_path / "out", options=ImportOptions(overwrite=True))
    assert len(Manifest.load(tmp_path / "out").table) == 2
    assert CocoEntry.parse("a.json:train:/data/x") == CocoEntry(
        Path("a.json"), "train", Path("/data/x")
    )
    with pytest.raises(ManifestError, match=r"ANNOTATIONS\.json:SPLIT:IMAGE_DIR"):
        CocoEntry.parse("a.json:train")


# --------------------------------------------------------------------------- VOC


def voc_xml(objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>1</xmin></bndbox></object>"
        for n, d in objects
    )
    return f"<annotation><folder>VOC2007</folder><filename>x.jpg</filename>{objs}</annotation>"


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit/VOC2007"
    images = {
        "000005": [("chair", 0), ("chair", 1), ("pottedplant", 1)],  # plant only difficult
        "000007": [("car", 0)],
        "000009": [("horse", 0), ("person", 0)],
        "000012": [("tvmonitor", 1)],  # difficult only
    }
    for image_id, objects in images.items():
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        png(root / "JPEGImages" / f"{image_id}.jpg")
    sets = root / "ImageSets/Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("000005\n000007\n")
    (sets / "val.txt").write_text("000009\n000012\n")
    (sets / "trainval.txt").write_text("000005\n000007\n000009\n000012\n")
    (sets / "chair_train.txt").write_text("000005  1\n000007 -1\n")  # per-class files are ignored
    return root


def test_voc_standard_classes_and_difficult_excluded(voc: Path, tmp_path: Path) -> None:
    result = import_voc(voc, tmp_path / "out", splits={"train": "train", "val": "val"})
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert m.info.name == "voc2007" and m.info.image_root == str(voc.resolve())
    rows = rows_by_id(tmp_path / "out")
    idx = VOC_CLASSES.index
    assert rows["000005"]["labels"] == [idx("chair")]
    assert rows["000009"]["labels"] == [idx("horse"), idx("person")]
    assert rows["000012"]["labels"] == []
    assert rows["000007"]["path"] == "JPEGImages/000007.jpg"
    assert result.rows_per_split == {"train": 2, "val": 2}
    counts = m.info.source["counts"]
    assert counts["difficult_objects"] == 3
    assert counts["difficult_only_labels_excluded"] == 2


def test_voc_include_difficult_and_drop_empty(voc: Path, tmp_path: Path) -> None:
    import_voc(voc, tmp_path / "a", splits={"trainval": "train"}, include_difficult=True)
    rows = rows_by_id(tmp_path / "a")
    assert rows["000005"]["labels"] == [
        VOC_CLASSES.index("chair"),
        VOC_CLASSES.index("pottedplant"),
    ]
    assert rows["000012"]["labels"] == [VOC_CLASSES.index("tvmonitor")]
    assert {r["split"] for r in rows.values()} == {"train"}
    import_voc(
        voc, tmp_path / "b", splits={"trainval": "train"}, options=ImportOptions(drop_empty=True)
    )
    assert set(rows_by_id(tmp_path / "b")) == {"000005", "000007", "000009"}
    assert Manifest.load(tmp_path / "b").info.source["skipped"]["empty"] == 1


def test_voc_errors(voc: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ManifestError, match=r"unknown split source 'test'.*available: train, trainval, val"
    ):
        import_voc(voc, tmp_path / "out", splits={"test": "test"})
    with pytest.raises(
        ManifestError,
        match=r"trainval\.txt:1: image id '000005' already imported from .*/train\.txt:1",
    ):
        import_voc(voc, tmp_path / "out", splits={"train": "train", "trainval": "train"})
    (voc / "Annotations/000009.xml").write_text("<annotation><object><name>horse</name>")
    with pytest.raises(ManifestError, match=r"000009\.xml: malformed XML \(line 1"):
        import_voc(voc, tmp_path / "out", splits={"val": "val"})
    (voc / "Annotations/000009.xml").write_text(voc_xml([("unicorn", 0)]))
    with pytest.raises(
        ManifestError, match=r"000009\.xml: object 0 has unknown class name 'unicorn'"
    ):
        import_voc(voc, tmp_path / "out", splits={"val": "val"})
    with pytest.raises(ManifestError, match="no ImageSets/Main"):
        import_voc(tmp_path, tmp_path / "out", splits={"val": "val"})


# --------------------------------------------------------------------------- NUS-WIDE

NUS_CONCEPTS = ["animal", "sky", "water"]


@pytest.fixture()
def nuswide(tmp_path: Path) -> Path:
    root = tmp_path / "NUS-WIDE"
    train = ["actor\\0001_2124494179.jpg", "sky\\0002_11.jpg", "water/0003_12.jpg"]
    test = ["C:\\ImageData\\Flickr\\actor\\0004_13.jpg", "sky\\0005_14.jpg"]
    for rel in train + test:
        png(root / "Flickr" / "/".join(rel.replace("\\", "/").split("/")[-2:]))
    (root / "ImageList").mkdir(parents=True)
    (root / "ImageList/TrainImagelist.txt").write_text("\r\n".join(train) + "\r\n")
    (root / "ImageList/TestImagelist.txt").write_text("\n".join(test) + "\n")
    (root / "Concepts81.txt").write_text("\n".join(NUS_CONCEPTS) + "\n")
    labels = {  # concept -> (train column, test column)
        "animal": ([1, 0, 0], [1, 0]),
        "sky": ([1, 1, 0], [0, 0]),
        "water": ([0, 0, 0], [0, 1]),
    }
    gt = root / "Groundtruth/TrainTestLabels"
    gt.mkdir(parents=True)
    for concept, (tr, te) in labels.items():
        (gt / f"Labels_{concept}_Train.txt").write_text("".join(f"{v}\n" for v in tr))
        (gt / f"Labels_{concept}_Test.txt").write_text("".join(f"{v}\n" for v in te))
    return root


def test_nuswide_rows_labels_and_backslash_paths(nuswide: Path, tmp_path: Path) -> None:
    result = import_nuswide(nuswide, tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == tuple(NUS_CONCEPTS)
    assert m.info.image_root == str((nuswide / "Flickr").resolve())
    rows = rows_by_id(tmp_path / "out")
    assert rows["actor/0001_2124494179"]["path"] == "actor/0001_2124494179.jpg"
    assert rows["actor/0001_2124494179"]["labels"] == [0, 1]
    assert rows["sky/0002_11"]["labels"] == [1]
    assert rows["water/0003_12"]["labels"] == []
    assert rows["actor/0004_13"]["path"] == "actor/0004_13.jpg"
    assert rows["sky/0005_14"] == {**rows["sky/0005_14"], "labels": [2], "split": "test"}
    assert result.rows_per_split == {"train": 3, "test": 2}


def test_nuswide_split_choice_and_drop_empty(nuswide: Path, tmp_path: Path) -> None:
    import_nuswide(
        nuswide,
        tmp_path / "out",
        splits={"train": "trainval"},
        options=ImportOptions(drop_empty=True),
    )
    rows = rows_by_id(tmp_path / "out")
    assert set(rows) == {"actor/0001_2124494179", "sky/0002_11"}
    assert {r["split"] for r in rows.values()} == {"trainval"}


def test_nuswide_mismatched_label_file(nuswide: Path, tmp_path: Path) -> None:
    (nuswide / "Groundtruth/TrainTestLabels/Labels_sky_Test.txt").write_text("0\n0\n1\n")
    with pytest.raises(
        ManifestError, match=r"Labels_sky_Test\.txt has 3 lines but .*TestImagelist\.txt lists 2"
    ):
        import_nuswide(nuswide, tmp_path / "out")


def test_nuswide_invalid_label_values(nuswide: Path, tmp_path: Path) -> None:
    (nuswide / "Groundtruth/TrainTestLabels/Labels_water_Train.txt").write_text("0\n-1130179\n0\n")
    with pytest.raises(ManifestError, match=r"Labels_water_Train\.txt:2: '-1130179'"):
        import_nuswide(nuswide, tmp_path / "out")
    import_nuswide(nuswide, tmp_path / "out", invalid_labels="negative")
    m = Manifest.load(tmp_path / "out")
    assert rows_by_id(tmp_path / "out")["sky/0002_11"]["labels"] == [1]
    assert m.info.source["counts"]["invalid_label_values"] == 1


def test_nuswide_missing_files(nuswide: Path, tmp_path: Path) -> None:
    (nuswide / "Flickr/sky/0002_11.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 of 5 image files are missing .*sky/0002_11\.jpg"):
        import_nuswide(nuswide, tmp_path / "out")
    import_nuswide(nuswide, tmp_path / "out", options=ImportOptions(skip_missing=True))
    assert Manifest.load(tmp_path / "out").info.source["skipped"]["missing_images"] == 1
    (nuswide / "Groundtruth/TrainTestLabels/Labels_sky_Train.txt").unlink()
    with pytest.raises(ManifestError, match=r"label file not found: .*Labels_sky_Train\.txt"):
        import_nuswide(nuswide, tmp_path / "out2")
    with pytest.raises(ManifestError, match=r"image directory .* not found"):
        import_nuswide(nuswide, tmp_path / "out2", image_dir=tmp_path / "nowhere")


# --------------------------------------------------------------------------- CSV


@pytest.fixture()
def csv_dir(tmp_path: Path) -> Path:
    for name in ("a", "b", "c", "d"):
        png(tmp_path / "data/img" / f"{name}.png")
    (tmp_path / "data/classes.txt").write_text("dog\ncat\nbird\n")
    return tmp_path / "data"


def test_csv_names_with_classes_file_and_split_column(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "labels.csv").write_text(
        "image,labels,split\nimg/a.png,cat dog,train\nimg/b.png,,val\nimg\\c.png,bird,\n"
    )
    result = import_csv(
        csv_dir / "labels.csv", tmp_path / "out", classes_file=csv_dir / "classes.txt"
    )
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == ("dog", "cat", "bird")
    assert m.info.name == "labels" and m.info.image_root == str(csv_dir.resolve())
    rows = rows_by_id(tmp_path / "out")
    assert rows["img/a"]["labels"] == [0, 1] and rows["img/a"]["split"] == "train"
    assert rows["img/b"]["labels"] == [] and rows["img/b"]["split"] == "val"
    assert rows["img/c"] == {**rows["img/c"], "path": "img/c.png", "split": "train"}
    assert result.rows_per_split == {"train": 2, "val": 1}
    assert m.info.source["options"]["label_format"] == "names"


def test_csv_sorted_names_and_custom_delimiters(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "l.csv").write_text("labels;image\nzebra|ant;img/a.png\nant;img/b.png\n")
    out = tmp_path / "out"
    import_csv(csv_dir / "l.csv", out, csv_delimiter=";", label_delimiter="|", default_split="test")
    m = Manifest.load(tmp_path / "out")
    assert m.class_names == ("ant", "zebra")
    rows = rows_by_id(tmp_path / "out")
    assert rows["img/a"]["labels"] == [0, 1] and rows["img/a"]["split"] == "test"


def test_csv_indices_auto_and_explicit(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "i.csv").write_text("image,labels\nimg/a.png,2 0\nimg/b.png,1\n")
    import_csv(csv_dir / "i.csv", tmp_path / "a", classes_file=csv_dir / "classes.txt")
    assert rows_by_id(tmp_path / "a")["img/a"]["labels"] == [0, 2]
    import_csv(csv_dir / "i.csv", tmp_path / "b", num_classes=4, label_format="indices")
    assert Manifest.load(tmp_path / "b").class_names == ("0", "1", "2", "3")
    with pytest.raises(ManifestError, match="labels are class indices; give classes_file"):
        import_csv(csv_dir / "i.csv", tmp_path / "c")
    import_csv(csv_dir / "i.csv", tmp_path / "d", label_format="names")
    assert Manifest.load(tmp_path / "d").class_names == ("0", "1", "2")


def test_csv_errors_name_the_line(csv_dir: Path, tmp_path: Path) -> None:
    classes = csv_dir / "classes.txt"
    (csv_dir / "u.csv").write_text("image,labels\nimg/a.png,cat\n\nimg/b.png,cat horse\n")
    with pytest.raises(ManifestError, match=r"u\.csv line 4: unknown class name 'horse'"):
        import_csv(csv_dir / "u.csv", tmp_path / "out", classes_file=classes, label_format="names")
    (csv_dir / "r.csv").write_text("image,labels\nimg/a.png,0\nimg/b.png,1 3\n")
    with pytest.raises(ManifestError, match=r"r\.csv line 3: class index 3 out of range \[0, 3\)"):
        import_csv(csv_dir / "r.csv", tmp_path / "out", classes_file=classes)
    with pytest.raises(ManifestError, match=r"r\.csv line 3: label 'x' is not a class index"):
        (csv_dir / "r.csv").write_text("image,labels\nimg/a.png,0\nimg/b.png,1 x\n")
        import_csv(
            csv_dir / "r.csv", tmp_path / "out", classes_file=classes, label_format="indices"
        )
    (csv_dir / "h.csv").write_text("img/a.png,cat\n")
    with pytest.raises(ManifestError, match=r"h\.csv line 1: header must name"):
        import_csv(csv_dir / "h.csv", tmp_path / "out")
    (csv_dir / "d.csv").write_text("image,labels\nimg/a.png,cat\nimg/a.png,dog\n")
    with pytest.raises(ManifestError, match=r"d\.csv line 3: image id 'img/a' already .*line 2"):
        import_csv(csv_dir / "d.csv", tmp_path / "out")
    (csv_dir / "bad_classes.txt").write_text("dog\n\ncat\n")
    with pytest.raises(ManifestError, match=r"bad_classes\.txt line 2: blank line"):
        import_csv(csv_dir / "d.csv", tmp_path / "out", classes_file=csv_dir / "bad_classes.txt")


def test_csv_missing_and_corrupt_images(csv_dir: Path, tmp_path: Path) -> None:
    (csv_dir / "m.csv").write_text(
        "image,labels\nimg/a.png,cat\nimg/gone.png,dog\nimg/b.png,dog\nimg/c.png,cat\n"
    )
    with pytest.raises(ManifestError, match=r"1 of 4 image files are missing .*img/gone\.png"):
        import_csv(csv_dir / "m.csv", tmp_path / "out")
    (csv_dir / "img/b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (csv_dir / "n.csv").write_text("image,labels\nimg/a.png,cat\nimg/b.png,dog\n")
    with pytest.raises(ManifestError, match=r"1 of 2 image files cannot be decoded .*img/b\.png"):
        import_csv(csv_dir / "n.csv", tmp_path / "out", options=ImportOptions(verify_decode=True))
    import_csv(csv_dir / "m.csv", tmp_path / "out", options=ImportOptions(skip_missing=True))
    assert set(rows_by_id(tmp_path / "out")) == {"img/a", "img/b", "img/c"}
    import_csv(
        csv_dir / "m.csv",
        tmp_path / "out",
        options=ImportOptions(skip_missing=True, verify_decode=True, overwrite=True),
    )
    skipped = Manifest.load(tmp_path / "out").info.source["skipped"]
    assert skipped["missing_images"] == 1 and skipped["corrupt_images"] == 1
    assert set(rows_by_id(tmp_path / "out")) == {"img/a", "img/c"}


def test_parse_split_map() -> None:
    assert parse_split_map(["trainval:train", "test"]) == {"trainval": "train", "test": "test"}
    with pytest.raises(ManifestError, match="given twice"):
        parse_split_map(["train:a", "train:b"])
    with pytest.raises(ManifestError, match="SOURCE:SPLIT"):
        parse_split_map(["a:b:c"])
