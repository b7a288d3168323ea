"""Evaluation helpers against brute force and against multilabel_report."""

import csv
import itertools
import json

import numpy as np
import pytest
from matplotlib.text import Text

from mlcore.evaluation import (
    SWEEP_THRESHOLDS,
    ModelIdentity,
    ThresholdsError,
    choose_thresholds,
    evaluation_report,
    f1_optimal_thresholds,
    metrics_at,
    read_thresholds,
    sweep_figure,
    threshold_sweep,
    write_evaluation,
    write_thresholds,
)
from mlcore.metrics import average_precision, multilabel_report


def scored(seed=0, n=60, c=7, ties=True):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(np.int64)
    targets[:, -1] = 0  # a class without positives
    scores = rng.random((n, c)) * 0.6 + 0.4 * targets
    if ties:
        scores = np.round(scores, 1)  # many ties, some exactly at sweep thresholds
    return scores, targets


def test_sweep_matches_multilabel_report_at_every_threshold():
    scores, targets = scored()
    sweep = threshold_sweep(scores, targets)
    for i, t in enumerate(SWEEP_THRESHOLDS):
        report = multilabel_report(scores, targets, threshold=t)
        for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
            assert sweep[key][i] == pytest.approx(report[key], abs=1e-12), (t, key)


def test_per_class_thresholds_reduce_to_the_global_report():
    scores, targets = scored(1)
    constant = metrics_at(scores, targets, np.full(scores.shape[1], 0.5))
    report = multilabel_report(scores, targets, 0.5)
    assert constant == pytest.approx({k: report[k] for k in constant})


def test_f1_optimal_thresholds_reach_the_brute_force_maximum():
    scores, targets = scored(2)
    thresholds, f1 = f1_optimal_thresholds(scores, targets)
    for j in range(scores.shape[1]):
        positives = targets[:, j].sum()
        if positives == 0:
            assert np.isnan(f1[j]) and thresholds[j] == 0.5
            continue
        best = max(
            2
            * ((scores[:, j] >= t) & (targets[:, j] == 1)).sum()
            / ((scores[:, j] >= t).sum() + positives)
            for t in np.unique(scores[:, j])
        )
        achieved = 2 * ((scores[:, j] >= thresholds[j]) & (targets[:, j] == 1)).sum()
        achieved /= (scores[:, j] >= thresholds[j]).sum() + positives
        assert f1[j] == pytest.approx(best) and achieved == pytest.approx(best)


def test_report_has_top_k_and_bucket_maps():
    scores, targets = scored(3)
    train = [500, 150, 60, 20, 5, 19, 1000]
    report = evaluation_report(scores, targets, train)
    ap = average_precision(scores, targets)
    assert report["mAP_head"] == pytest.approx(np.mean(ap[[0, 1]]))  # class 6 has no positive
    assert report["mAP_medium"] == pytest.approx(np.mean(ap[[2, 3]]))
    assert report["mAP_tail"] == pytest.approx(np.mean(ap[[4, 5]]))
    assert {"F1@3", "F1@5", "P@3", "R@5", "mAP", "OF1"} <= set(report)
    assert "F1@5" not in evaluation_report(scores[:, :4], targets[:, :4])


def test_write_evaluation_files_and_thresholds_round_trip(tmp_path):
    scores, targets = scored(4, ties=False)
    names = [f"class{j}" for j in range(scores.shape[1])]
    files = write_evaluation(
        tmp_path,
        scores,
        targets,
        names,
        split="val",
        train_counts=[150, 50, 10, 200, 30, 5, 1],
        fixed_thresholds=np.full(len(names), 0.5),
        fixed_thresholds_from="test",
        model=ModelIdentity("d" * 64, tuple(names)),
    )
    doc = json.loads(files.report_json.read_text())
    assert doc["metrics"]["mAP"] == pytest.approx(multilabel_report(scores, targets)["mAP"])
    assert doc["buckets"]["classes"] == {"head": 2, "medium": 2, "tail": 3}
    assert doc["per_class_thresholds"]["metrics"]["OF1"] == pytest.approx(
        multilabel_report(scores, targets)["OF1"]
    )
    rows = list(csv.DictReader(files.per_class_csv.open()))
    assert len(rows) == len(names) and rows[-1]["AP"] == ""  # the class without positives
    for png in (files.pr_curves_png, files.sweep_png):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert files.fixed_report == doc["per_class_thresholds"]["metrics"]
    thresholds = read_thresholds(files.thresholds_json, ModelIdentity("d" * 64, names[::-1]))
    assert thresholds.chosen_on_split == "val"
    expected, _ = f1_optimal_thresholds(scores, targets)
    assert np.allclose(thresholds.values, expected[::-1])


def test_thresholds_file_errors(tmp_path):
    model = ModelIdentity("a" * 64, ("a", "b"))
    path = write_thresholds(tmp_path / "t.json", model, np.array([0.3, 0.7]), split="val")
    assert read_thresholds(path, model).values.tolist() == [0.3, 0.7]
    for other, message in [
        (model._replace(class_names=("a", "c")), r"other classes \(1 only in the file: \['b'\]; "),
        (model._replace(class_names=("a",)), r"other classes \(1 only in the file: \['b'\]\)"),
        (model._replace(digest="b" * 64), "fitted to another model .digest aaaaaaaaaaaa, this"),
    ]:
        with pytest.raises(ThresholdsError, match=message) as refused:
            read_thresholds(path, other)
        assert "\n" not in str(refused.value)
    old = json.loads(path.read_text())
    del old["model_digest"]
    (tmp_path / "old.json").write_text(json.dumps({**old, "version": 1}))
    with pytest.raises(ThresholdsError, match="does not say which model it was fitted to"):
        read_thresholds(tmp_path / "old.json", model)
    (tmp_path / "other.json").write_text('{"thresholds": {}}')
    with pytest.raises(ThresholdsError, match="not a thresholds file"):
        read_thresholds(tmp_path / "other.json", model)
    with pytest.raises(FileNotFoundError):
        read_thresholds(tmp_path / "absent.json", model)


def test_choose_thresholds_maximise_micro_f1_and_each_class_f1():
    scores, targets = scored(5, ties=False)
    single, per_class = choose_thresholds(scores, targets)
    micro_f1 = [multilabel_report(scores, targets, t)["OF1"] for t in SWEEP_THRESHOLDS]
    assert multilabel_report(scores, targets, single)["OF1"] == pytest.approx(max(micro_f1))
    best, _ = f1_optimal_thresholds(scores, targets)
    has_positives = targets.any(axis=0)
    assert np.array_equal(per_class[has_positives], best[has_positives])
    assert (per_class[~has_positives] == single).all() and (~has_positives).any()


def test_sweep_plot_labels_never_overlap_and_name_the_half_line():
    """CF1 and OF1 maxima a hundredth apart used to be two annotations on top of each other."""
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 5)) < 0.3).astype(np.int64)
    scores = np.clip(0.45 + 0.1 * targets + rng.normal(0, 0.05, targets.shape), 0, 1)
    sweep = threshold_sweep(scores, targets)
    best = {k: sweep["threshold"][np.argmax(sweep[k])] for k in ("CF1", "OF1")}
    assert abs(best["CF1"] - best["OF1"]) <= 0.03  # the case that overlapped
    fig = sweep_figure(sweep, "title")
    fig.canvas.draw()  # lays out the legend and tick labels
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, j in itertools.combinations(range(len(texts)), 2):
        assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    (legend,) = [a.get_legend() for a in fig.axes]
    assert "threshold 0.5" in [t.get_text() for t in legend.get_texts()]
