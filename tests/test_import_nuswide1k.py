"""NUS-WIDE 1k-tag importer: the seen/unseen zero-shot split, fixtures in the distributed layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlcore.data.importers import ImportOptions, import_nuswide1k
from mlcore.data.manifest import Manifest, ManifestError
from tests.test_importers import png, rows_by_id

# Two of the five tags are also concepts ("sky", "water"): they leave the seen set, which is
# how the official 1,000 tags give 925 seen classes.
TAGS = ["sunset", "sky", "beach", "water", "dog"]
CONCEPTS = ["animal", "sky", "water"]
IMAGES = [  # (listed path, tag row, concept row)
    ("C:\\ImageData\\Flickr\\actor\\0001_1.jpg", "1 1 0 0 0", (1, 1, 0)),
    ("actor\\0002_2.jpg", "0 0 1 1 1", (0, 0, 1)),
    ("sky\\0003_3.jpg", "0 1 0 0 0", (0, 0, 0)),
    ("water\\0004_4.jpg", "0 0 0 0 1", (1, 0, 0)),
    ("water\\0005_5.jpg", "1 0 0 0 0", (0, 1, 1)),
]


@pytest.fixture()
def nus1k(tmp_path: Path) -> Path:
    root = tmp_path / "NUS-WIDE"
    for listed, _, _ in IMAGES:
        png(root / "Flickr" / "/".join(listed.replace("\\", "/").split("/")[-2:]))
    (root / "NUS_WID_Tags").mkdir(parents=True)
    (root / "NUS_WID_Tags/TagList1k.txt").write_text("\n".join(TAGS) + "\n")
    # The official rows are tab-separated with a trailing tab.
    (root / "NUS_WID_Tags/AllTags1k.txt").write_text(
        "".join(row.replace(" ", "\t") + "\t\n" for _, row, _ in IMAGES)
    )
    (root / "ConceptsList").mkdir()
    (root / "ConceptsList/Concepts81.txt").write_text("\n".join(CONCEPTS) + "\n")
    labels = root / "Groundtruth/AllLabels"
    labels.mkdir(parents=True)
    for j, concept in enumerate(CONCEPTS):
        (labels / f"Labels_{concept}.txt").write_text("".join(f"{r[j]}\n" for *_, r in IMAGES))
    (root / "ImageList").mkdir()
    (root / "ImageList/Imagelist.txt").write_text("\r\n".join(p for p, _, _ in IMAGES) + "\r\n")
    (root / "ImageList/TrainImagelist.txt").write_text("actor\\0001_1.jpg\nsky\\0003_3.jpg\n")
    (root / "ImageList/TestImagelist.txt").write_text("actor\\0002_2.jpg\nwater\\0005_5.jpg\n")
    return root


def test_seen_tags_then_unseen_concepts(nus1k: Path, tmp_path: Path) -> None:
    result = import_nuswide1k(nus1k, tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    seen = ["sunset", "beach", "dog"]
    assert m.class_names == (*seen, *CONCEPTS)
    assert m.info.source["zsl"] == {"seen": seen, "unseen": CONCEPTS}
    counts = m.info.source["counts"]
    assert counts["tags_that_are_concepts"] == 2 and counts["images_in_neither_split"] == 1
    rows = rows_by_id(tmp_path / "out")
    # Seen labels from the user tags (the tag "sky" is dropped), unseen ones from the human
    # concept labels: image 1 has tags sunset+sky and concepts animal+sky.
    assert rows["actor/0001_1"]["labels"] == [0, 3, 4]
    assert rows["sky/0003_3"]["labels"] == []  # only the tag "sky": no seen label, no concept
    assert rows["actor/0002_2"] == {**rows["actor/0002_2"], "labels": [1, 2, 5], "split": "test"}
    assert rows["water/0005_5"]["labels"] == [0, 4, 5]
    assert result.rows_per_split == {"train": 2, "test": 2}


def test_val_fraction_by_id_hash(nus1k: Path, tmp_path: Path) -> None:
    import_nuswide1k(nus1k, tmp_path / "a", val_fraction=0.5)
    import_nuswide1k(nus1k, tmp_path / "b", val_fraction=0.5)
    splits = {k: r["split"] for k, r in rows_by_id(tmp_path / "a").items()}
    assert splits == {k: r["split"] for k, r in rows_by_id(tmp_path / "b").items()}
    assert {splits["actor/0002_2"], splits["water/0005_5"]} == {"test"}  # test stays test
    assert {splits["actor/0001_1"], splits["sky/0003_3"]} <= {"train", "val"}
    import_nuswide1k(nus1k, tmp_path / "c", val_fraction=0.999)
    assert {r["split"] for r in rows_by_id(tmp_path / "c").values()} == {"val", "test"}
    with pytest.raises(ManifestError, match=r"val_fraction must be in \[0, 1\)"):
        import_nuswide1k(nus1k, tmp_path / "d", val_fraction=1.0)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        (
            "NUS_WID_Tags/AllTags1k.txt",
            "1 1 0 0 0\n0 0 1 1\n0 1 0 0 0\n0 0 0 0 1\n1 0 0 0 0\n",
            r"AllTags1k\.txt line 2: 4 values, TagList1k has 5 tags",
        ),
        (
            "NUS_WID_Tags/AllTags1k.txt",
            "1 1 0 0 0\n0 0 1 1 1\n0 1 0 2 0\n0 0 0 0 1\n1 0 0 0 0\n",
            r"AllTags1k\.txt line 3: value '2' for tag 4 is not 0 or 1",
        ),
        (
            "NUS_WID_Tags/AllTags1k.txt",
            "1 1 0 0 0\n0 0 1 1 1\n",
            r"AllTags1k\.txt has 2 lines but the image list has 5",
        ),
        (
            "ImageList/TestImagelist.txt",
            "actor\\0002_2.jpg\nwater\\0009_9.jpg\n",
            r"TestImagelist\.txt:2: image 'water/0009_9\.jpg' is not in .*Imagelist\.txt",
        ),
        (
            "ImageList/Imagelist.txt",
            "actor\\0001_1.jpg\nactor\\0002_2.jpg\nactor\\0001_1.jpg\nw\\4.jpg\nw\\5.jpg\n",
            r"Imagelist\.txt line 3: image 'actor/0001_1\.jpg' already listed at line 1",
        ),
        (
            "Groundtruth/AllLabels/Labels_water.txt",
            "0\n1\n0\n-1130179\n1\n",
            r"Labels_water\.txt:4: '-1130179'",
        ),
        (
            "NUS_WID_Tags/TagList1k.txt",
            "sunset\nsky\n\nwater\ndog\n",
            r"TagList1k\.txt line 3: blank line inside the 1k tag list",
        ),
    ],
)
def test_bad_input_names_file_and_line(
    nus1k: Path, tmp_path: Path, file: str, content: str, message: str
) -> None:
    (nus1k / file).write_text(content)
    with pytest.raises(ManifestError, match=message):
        import_nuswide1k(nus1k, tmp_path / "out")


def test_missing_files_and_images(nus1k: Path, tmp_path: Path) -> None:
    (nus1k / "Flickr/sky/0003_3.jpg").unlink()
    with pytest.raises(ManifestError, match=r"1 of 4 image files are missing"):
        import_nuswide1k(nus1k, tmp_path / "out")
    import_nuswide1k(
        nus1k, tmp_path / "out", options=ImportOptions(skip_missing=True, drop_empty=True)
    )
    assert set(rows_by_id(tmp_path / "out")) == {"actor/0001_1", "actor/0002_2", "water/0005_5"}
    (nus1k / "Groundtruth/AllLabels/Labels_animal.txt").unlink()
    with pytest.raises(ManifestError, match=r"label file not found: .*Labels_animal\.txt"):
        import_nuswide1k(nus1k, tmp_path / "out2")


def test_cli_import_nuswide1k(nus1k: Path, tmp_path: Path, capsys) -> None:
    from workflows.cli import run as cli

    argv = ["data", "import", "nuswide1k", str(nus1k), "--out", str(tmp_path / "out")]
    assert cli([*argv, "--val-fraction", "0.999"]) == 0
    assert "wrote 4 images (val 2, test 2), 6 classes" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "out").info.source["options"]["val_fraction"] == 0.999
