import hashlib

import numpy as np
import pytest

from mlcore.config import SynthConfig
from mlcore.data.manifest import Manifest
from mlcore.data.synth import class_appearance, ensure_generated, generate

from .conftest import label_stats

SMALL = SynthConfig(num_classes=12, num_train=1000, num_val=50, num_test_shift=1000, image_size=24)


def _digest(root) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate(SMALL, tmp_path_factory.mktemp("synth") / "a")


def test_deterministic_byte_identical(small, tmp_path):
    again = generate(SMALL, tmp_path / "b")
    assert _digest(small) == _digest(again)
    other = generate(SynthConfig(**{**SMALL.__dict__, "seed": 1}), tmp_path / "c")
    assert _digest(other) != _digest(small)


def test_appearances_are_unique():
    assert len({class_appearance(c) for c in range(80)}) == 80


def test_manifest_contents(small):
    m = Manifest.load(small)
    assert m.num_classes == 12 and m.splits() == ["test", "test_shift", "train", "val"]
    assert len(m.split_rows("train")) == 1000
    assert all(len(row) >= 1 for row in m.label_lists())
    assert (m.image_root / m.table.column("path")[0].as_py()).is_file()


def _pair_dependence(y: np.ndarray) -> float:
    """Mean |P(i,j) - P(i)P(j)| over class pairs, normalised by the independent value."""
    p = y.mean(0)
    joint = (y.T @ y) / len(y)
    indep = np.outer(p, p)
    off = ~np.eye(len(p), dtype=bool)
    return float(np.abs(joint - indep)[off].sum() / indep[off].sum())


def test_cooccurrence_present_and_context_shift_independent(small):
    m = Manifest.load(small)
    train = m.multi_hot(m.split_rows("train")).astype(float)
    shift = m.multi_hot(m.split_rows("test_shift")).astype(float)
    # Scene structure: joint frequencies far from the product of marginals (0.41 measured on
    # 20,000 draws of this label model)...
    dep_train = _pair_dependence(train)
    # ...while the shift split draws every class independently (0.02 on 20,000 draws; what
    # remains at 1,000 images is sampling noise).
    dep_shift = _pair_dependence(shift)
    assert dep_train > 0.3, dep_train
    assert dep_shift < 0.5 * dep_train, (dep_shift, dep_train)
    # Same class frequencies (up to sampling noise and the at-least-one-label rule).
    assert np.corrcoef(train.mean(0), shift.mean(0))[0, 1] > 0.8


def test_long_tailed_frequencies(small):
    m = Manifest.load(small)
    counts = np.sort(m.positives_per_class("train"))
    assert counts[-1] >= 2.5 * counts[0]


def test_labels_from_real_statistics(tmp_path):
    voc = label_stats("voc2012_labels.npz")
    cfg = SynthConfig(num_train=200, num_val=20, image_size=32, labels_from=str(voc))
    m = Manifest.load(generate(cfg, tmp_path / "voc"))
    assert m.num_classes == 20 and m.class_names[0] == "aeroplane"
    real = np.load(voc)["labels"]
    real_rows = {tuple(np.flatnonzero(r)) for r in real}
    assert all(tuple(r) in real_rows for r in m.label_lists())

    coco = label_stats("coco2014.npz")
    cfg = SynthConfig(num_train=300, num_val=20, image_size=32, labels_from=str(coco))
    m = Manifest.load(generate(cfg, tmp_path / "coco"))
    assert m.num_classes == 80 and "person" in m.class_names
    y = m.multi_hot(m.split_rows("train")).astype(float)
    person = m.class_names.index("person")
    assert y[:, person].mean() == max(y.mean(0))  # the most frequent class stays on top


def test_bad_statistics_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="needs a 'labels' matrix"):
        generate(SynthConfig(num_train=5, num_val=5, labels_from=str(bad)), tmp_path / "x")


def test_cache_by_content_hash(tmp_path):
    cfg = SynthConfig(num_classes=4, num_train=20, num_val=8, image_size=32)
    a = ensure_generated(cfg, tmp_path)
    mtime = (a / "manifest.parquet").stat().st_mtime_ns
    assert ensure_generated(cfg, tmp_path) == a
    assert (a / "manifest.parquet").stat().st_mtime_ns == mtime  # not regenerated
    b = ensure_generated(
        SynthConfig(num_classes=4, num_train=21, num_val=8, image_size=32), tmp_path
    )
    assert b != a
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".synth-tmp")]


def test_compositional_embeddings_and_iid_test_split(tmp_path):
    from mlcore.data.embeddings import DATASET_FILE, load_class_embeddings
    from mlcore.data.synth import EMBEDDING_DIM, SHAPES

    cfg = SynthConfig(
        num_classes=30, num_train=40, num_val=10, num_test=20, image_size=16, compositional=True
    )
    root = generate(cfg, tmp_path / "z")
    m = Manifest.load(root)
    assert m.splits() == ["test", "train", "val"] and len(m.split_rows("test")) == 20
    table = load_class_embeddings(root / DATASET_FILE, m.class_names)
    assert table.vectors.shape == (30, EMBEDDING_DIM)
    unit = table.vectors / np.linalg.norm(table.vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    attrs = [class_appearance(c) for c in range(30)]
    share_one = [
        (i, j)
        for i in range(30)
        for j in range(i)
        if (attrs[i][0] == attrs[j][0]) != (attrs[i][1] == attrs[j][1])
    ]
    share_none = [
        (i, j)
        for i in range(30)
        for j in range(i)
        if attrs[i][0] != attrs[j][0] and attrs[i][1] != attrs[j][1]
    ]
    # Classes sharing their shape or their colour point the same way; others do not.
    assert np.mean([cosine[p] for p in share_one]) > 0.3
    assert abs(np.mean([cosine[p] for p in share_none])) < 0.15
    assert len({s for s, _ in attrs}) == len(SHAPES)
    plain = generate(
        SynthConfig(num_classes=4, num_train=4, num_val=2, image_size=16), tmp_path / "p"
    )
    assert not (plain / DATASET_FILE).exists()
