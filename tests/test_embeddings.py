"""Class-embedding loader: text and NumPy formats, multi-word names, clear errors.

Real vectors: ``shared/data/label_stats`` holds the 300-d GloVe vectors of the COCO and NUS-WIDE
class names (skipped when absent); the other files are written by the tests in the distributed
formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlcore.data.embeddings import ClassEmbeddingError, ClassEmbeddings, load_class_embeddings
from tests.conftest import label_stats


def write_text(path: Path, vectors: dict[str, np.ndarray], header: bool = False) -> Path:
    """A GloVe-style text file; ``header`` adds the word2vec/fastText ``COUNT DIM`` line."""
    dim = len(next(iter(vectors.values())))
    lines = [f"{len(vectors)} {dim}"] if header else []
    lines += [f"{w} " + " ".join(f"{x:.6f}" for x in v) for w, v in vectors.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def coco() -> dict[str, np.ndarray]:
    data = np.load(label_stats("coco2014.npz"))
    return dict(zip(data["class_names"].tolist(), data["glove"], strict=True))


@pytest.fixture(scope="module")
def nuswide() -> dict[str, np.ndarray]:
    data = np.load(label_stats("nuswide.npz"))
    return dict(zip(data["class_names"].tolist(), data["glove"], strict=True))


def test_real_npz_arrays_found_by_shape(coco: dict[str, np.ndarray]) -> None:
    # coco2014.npz also holds int class_counts / pair_counts: only the string names and the
    # float matrix with as many rows qualify.
    names = ["person", "baseball bat", "hair drier", "zebra"]
    table = load_class_embeddings(label_stats("coco2014.npz"), names)
    assert table.names == tuple(names) and table.vectors.shape == (4, 300)
    assert table.vectors.dtype == np.float32
    for name, row in zip(names, table.vectors, strict=True):
        np.testing.assert_array_equal(row, coco[name])


def test_real_vectors_agree_across_datasets(
    coco: dict[str, np.ndarray], nuswide: dict[str, np.ndarray]
) -> None:
    # The COCO (float32) and NUS-WIDE (float64) copies come from the same GloVe release.
    shared = sorted(set(coco) & set(nuswide))
    assert {"bear", "cat", "dog", "person", "train", "zebra"} <= set(shared)
    from_nus = load_class_embeddings(label_stats("nuswide.npz"), shared)
    np.testing.assert_allclose(from_nus.vectors, np.stack([coco[n] for n in shared]), atol=1e-6)


def test_real_multi_word_names_average_words(tmp_path: Path, nuswide) -> None:
    # A GloVe text file of real single-word vectors (the NUS-WIDE concepts); class names made
    # of several of those words take the mean of the word vectors.
    path = write_text(tmp_path / "glove.txt", nuswide)
    names = ["street sign", "fire_tower", "Sky", "water"]
    table = load_class_embeddings(path, names)
    expected = [
        (nuswide["street"] + nuswide["sign"]) / 2,
        (nuswide["fire"] + nuswide["tower"]) / 2,
        nuswide["sky"],  # lowercased lookup
        nuswide["water"],
    ]
    np.testing.assert_allclose(table.vectors, np.stack(expected), atol=1e-5)


def test_real_missing_names_listed_once(tmp_path: Path, nuswide) -> None:
    # CPSD's NUS-WIDE key for "earthquake" is "earthq": the full word is missing.
    path = write_text(tmp_path / "glove.txt", nuswide)
    with pytest.raises(ClassEmbeddingError) as err:
        load_class_embeddings(path, ["sky", "earthquake", "hot dog", "street sign"])
    message = str(err.value)
    assert "no vector for 2 of 4 class names" in message
    assert "'earthquake'" in message and "'hot dog' (no hot)" in message
    assert "street sign" not in message


def test_word2vec_header_phrases_and_fasttext_vec(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = {w: rng.normal(size=5) for w in ("traffic_light", "traffic", "light", "Dog")}
    w2v = write_text(tmp_path / "w2v.txt", words, header=True)
    table = load_class_embeddings(w2v, ["traffic light", "Dog", "traffic Dog"])
    # A word2vec phrase beats the mean of its words; case is kept when it matches exactly.
    np.testing.assert_allclose(table.vectors[0], words["traffic_light"], atol=1e-5)
    np.testing.assert_allclose(table.vectors[1], words["Dog"], atol=1e-5)
    np.testing.assert_allclose(table.vectors[2], (words["traffic"] + words["Dog"]) / 2, atol=1e-5)
    vec = write_text(tmp_path / "ft.vec", words, header=True)
    assert load_class_embeddings(vec, ["light"]).dim == 5


def test_words_with_spaces_and_unread_bad_lines(tmp_path: Path) -> None:
    # GloVe 840B holds tokens with spaces; the vector is the last E fields. A broken line of a
    # word nobody asks for is never parsed.
    path = tmp_path / "g.txt"
    path.write_text("new york 1 2 3\ncat 4 5 6\nbroken 1 x\n")
    table = load_class_embeddings(path, ["new york", "cat"])
    np.testing.assert_array_equal(table.vectors, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cat 1 2 3\ndog 1 2\n", r"line 2: expected a word and 3 numbers, got 2 fields"),
        ("cat 1 2 3\ndog 1 x 3\n", r"line 2: non-numeric value in the vector of 'dog'"),
        ("2 3\ncat 1 2 3\ndog 1 2\n", r"line 3: expected a word and 3 numbers"),
        ("", r"empty embedding file"),
        ("cat 0 0 0\ndog 1 1 1\n", r"all-zero vectors \(no direction\) for \['cat'\]"),
    ],
)
def test_malformed_text_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ClassEmbeddingError, match=message):
        load_class_embeddings(path, ["cat", "dog"])


def test_npz_npy_round_trip_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = ClassEmbeddings(("a b", "c"), rng.normal(size=(2, 4)).astype(np.float32))
    table.save(tmp_path / "t.npz")
    back = load_class_embeddings(tmp_path / "t.npz", ["c", "a b"])
    np.testing.assert_array_equal(back.vectors, table.vectors[[1, 0]])

    structured = np.zeros(2, dtype=[("name", "U8"), ("vector", "f4", (4,))])
    structured["name"], structured["vector"] = ["x", "y"], rng.normal(size=(2, 4))
    np.save(tmp_path / "s.npy", structured)
    np.testing.assert_array_equal(
        load_class_embeddings(tmp_path / "s.npy", ["y"]).vectors[0], structured["vector"][1]
    )
    np.save(tmp_path / "bare.npy", rng.normal(size=(2, 4)))
    with pytest.raises(ClassEmbeddingError, match="a bare matrix has no class names"):
        load_class_embeddings(tmp_path / "bare.npy", ["x"])
    np.savez(tmp_path / "two.npz", a=np.array(["x"]), b=np.array(["y"]), v=np.ones((1, 3)))
    with pytest.raises(ClassEmbeddingError, match=r"cannot tell which array holds the names"):
        load_class_embeddings(tmp_path / "two.npz", ["x"])
    np.savez(tmp_path / "dup.npz", names=np.array(["x", "x"]), vectors=np.ones((2, 3)))
    with pytest.raises(ClassEmbeddingError, match=r"name 'x' repeated \(entry 1\)"):
        load_class_embeddings(tmp_path / "dup.npz", ["x"])
    with pytest.raises(ClassEmbeddingError, match=r"unknown embedding format '\.pkl'"):
        load_class_embeddings(tmp_path / "w.pkl", ["x"])
    with pytest.raises(ClassEmbeddingError, match="not found"):
        load_class_embeddings(tmp_path / "nope.txt", ["x"])
