"""Every ablation mode of the sequential reference run, end to end at tiny scale."""

import json

import pytest

from mlcore.cpsd import ENSEMBLES, compute_partitions, run_local
from mlcore.data.loading import open_dataset
from workflows.config import load_config

FAST = ["train.epochs=1", "cpsd.teacher_epochs=1"]


def _exp(tiny_overrides, tmp_path, *extra):
    from workflows.config import config_path

    cfg = load_config(
        config_path("tiny"), [*tiny_overrides, f"storage_path={tmp_path}", *FAST, *extra]
    )
    return cfg


@pytest.mark.parametrize("mode", list(ENSEMBLES))
def test_every_mode_end_to_end(mode, tiny_overrides, tmp_path):
    exp = _exp(tiny_overrides, tmp_path, f"cpsd.mode={mode}")
    summary = run_local(exp, tmp_path / "out", log=lambda _: None)
    roles = [row["role"] for row in summary.rows]
    k = exp.cpsd.k
    expected_teachers = {"baseline": 0, "sd": 1, "cgpd": k, "dgpd": k, "cpsd": 2 * k, "random": k}
    assert roles.count("teacher") == expected_teachers[mode]
    # Each merged ensemble, then the student's target (ensemble-target) in modes with teachers.
    assert roles.count("ensemble") == len(ENSEMBLES[mode]) + bool(ENSEMBLES[mode])
    assert ("ensemble-target" in [r["name"] for r in summary.rows]) == bool(ENSEMBLES[mode])
    assert roles[-1] == ("baseline" if mode == "baseline" else "student")
    for row in summary.rows:
        assert 0.0 <= row["val_mAP"] <= 1.0 and 0.0 <= row["test_mAP"] <= 1.0
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary.rows
    for kind in ENSEMBLES[mode]:
        report = json.loads(
            (tmp_path / "out" / "partitions" / f"partition_{kind}.json").read_text()
        )
        covered = sorted(c["index"] for subset in report["subsets"] for c in subset)
        assert covered == list(range(10))


def test_online_mode_and_baseline_comparison(tiny_overrides, tmp_path):
    exp = _exp(
        tiny_overrides,
        tmp_path,
        "cpsd.mode=cgpd",
        "cpsd.teacher_mode=online",
        "cpsd.train_baseline=true",
    )
    summary = run_local(exp, tmp_path / "out", log=lambda _: None)
    assert [r["role"] for r in summary.rows][-2:] == ["student", "baseline"]
    assert not list((tmp_path / "out" / "teachers").rglob("logits.parquet"))  # nothing cached


def test_partitions_are_deterministic_and_k_is_checked(tiny_overrides, tmp_path):
    exp = _exp(tiny_overrides, tmp_path)
    dataset = open_dataset(exp.data, with_bytes=False)
    a = compute_partitions(exp, dataset)
    b = compute_partitions(exp, dataset)
    assert a == b and set(a) == {"cgp", "dgp"}
    too_many = _exp(tiny_overrides, tmp_path, "cpsd.k=11")
    with pytest.raises(
        ValueError, match=r"cpsd.k = 11 is larger than the number of classes \(10\)"
    ):
        compute_partitions(too_many, dataset)
