"""Evaluating a trained model on a dataset split: report, per-class table, plots, thresholds.

Everything here works on a score matrix ``scores`` (N, C) of probabilities and the matching
multi-hot ``targets`` (N, C); ``cpsd evaluate`` produces them from a model bundle.

* **Report**: mAP and CP, CR, CF1, OP, OR, OF1 at one global threshold
  (``mlcore.metrics.multilabel_report``, ML-GCN convention), plus the top-k F1@3 and F1@5 of
  the zero-shot literature (``mlcore.metrics.f1_at_k``), plus mAP per frequency bucket.
* **Frequency buckets** follow the Distribution-Balanced loss paper (Wu et al., ECCV 2020, §4.2,
  after Liu et al.'s OLTR): a class is *head* with more than 100 training images, *medium*
  with 20 to 100, *tail* with fewer than 20. The counts are the number of training images
  containing the class (the model bundle records them).
* **Threshold sweep**: CP/CR/CF1/OP/OR/OF1 for a grid of global thresholds, with the
  conventions of ``multilabel_report``; computed from one sorted copy of each class's scores,
  so a 99-point sweep costs about one report.
* **Per-class F1-maximising thresholds**: for class j, the threshold τ_j maximising
  F1_j = 2·TP_j / (Np_j + Ng_j) over the cuts between distinct scores; τ_j is the midpoint
  between the lowest score it admits and the highest one it rejects. They are fitted to the
  split they are computed on, so they must be chosen on ``val`` and the metrics they give
  reported on another split (``cpsd evaluate --thresholds``).
* **Validation thresholds** (:func:`choose_thresholds`): training stores per-class thresholds
  and one global threshold (maximum micro-F1 over the sweep grid) in the model bundle.
* **Thresholds files** record the model they were fitted to (:class:`ModelIdentity`: the
  bundle's digest and class names); reading one for another model is refused.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlcore.metrics import (
    average_precision,
    bucket_map,
    f1_at_k,
    frequency_buckets,
    multilabel_report,
)

THRESHOLDS_FORMAT = "cpsd.thresholds"
THRESHOLDS_VERSION = 2  # 2: names its model (digest and class names)
SWEEP_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
TOP_K = (3, 5)


class ThresholdsError(ValueError):
    """A thresholds file is not one ``cpsd evaluate`` wrote, or was written for another model."""


class ModelIdentity(NamedTuple):
    """Which model a thresholds file belongs to."""

    digest: str  # mlcore.bundle.ModelBundle.digest
    class_names: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Counting at many thresholds


def _sorted_columns(scores: np.ndarray, targets: np.ndarray):
    """Per class: all scores ascending and the positives' scores ascending."""
    positive = targets != 0
    for j in range(scores.shape[1]):
        column = scores[:, j]
        yield np.sort(column), np.sort(column[positive[:, j]])


def class_counts(
    scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and predicted positives per (threshold row, class) for the rule ``score >= τ``.

    Args:
        scores: (N, C) scores.
        targets: (N, C) 0/1.
        thresholds: (T, C) one threshold per row and class (broadcast a (T, 1) column for a
            global sweep).

    Returns:
        ``true_pos`` (T, C), ``predicted`` (T, C) and ``actual`` (C,) counts.
    """
    n, c = scores.shape
    thresholds = np.broadcast_to(thresholds, (thresholds.shape[0], c))
    true_pos = np.empty(thresholds.shape, np.int64)
    predicted = np.empty(thresholds.shape, np.int64)
    actual = np.empty(c, np.int64)
    for j, (column, positives) in enumerate(_sorted_columns(scores, targets)):
        # side="left": a score equal to the threshold counts as predicted, as in the report.
        predicted[:, j] = n - np.searchsorted(column, thresholds[:, j], side="left")
        true_pos[:, j] = positives.size - np.searchsorted(positives, thresholds[:, j], "left")
        actual[j] = positives.size
    return true_pos, predicted, actual


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    total = p + r
    return np.divide(2 * p * r, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)


def thresholded_metrics(
    true_pos: np.ndarray, predicted: np.ndarray, actual: np.ndarray
) -> dict[str, np.ndarray]:
    """CP, CR, CF1, OP, OR, OF1 per threshold row, with ``multilabel_report``'s conventions.

    Per-class means run over the classes with positives; a class with no predictions has
    precision 0; OP is 0 when nothing is predicted.
    """
    evaluated = actual > 0
    if not evaluated.any():
        raise ValueError("no class has a positive sample; the metrics are undefined")
    class_p = true_pos / np.maximum(predicted, 1)
    class_r = true_pos[:, evaluated] / actual[evaluated]
    cp = class_p[:, evaluated].mean(axis=1)
    cr = class_r.mean(axis=1)
    total_pred = predicted.sum(axis=1)
    op = np.divide(
        true_pos.sum(axis=1), total_pred, out=np.zeros(len(total_pred)), where=total_pred > 0
    )
    o_r = true_pos.sum(axis=1) / actual.sum()
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": o_r, "OF1": _f1(op, o_r)}


def threshold_sweep(
    scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray = SWEEP_THRESHOLDS
) -> dict[str, np.ndarray]:
    """The thresholded metrics for each global threshold (arrays aligned with ``thresholds``)."""
    counts = class_counts(scores, targets, np.asarray(thresholds, np.float64)[:, None])
    return {"threshold": np.asarray(thresholds, np.float64), **thresholded_metrics(*counts)}


def metrics_at(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> dict:
    """CP ... OF1 with one threshold per class (``thresholds`` (C,))."""
    counts = class_counts(scores, targets, np.asarray(thresholds, np.float64)[None, :])
    return {k: float(v[0]) for k, v in thresholded_metrics(*counts).items()}


def f1_optimal_thresholds(
    scores: np.ndarray, targets: np.ndarray, default: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold maximising its F1 on this data, and that F1.

    Candidate cuts lie between distinct scores (sorted descending, admitting the top k); the
    threshold is the midpoint between the k-th score and the next lower one (the lowest score
    itself when every sample is admitted). Among equal F1s the highest threshold wins. A class
    without positives gets ``default`` and F1 NaN.

    Returns:
        ``thresholds`` (C,) and ``f1`` (C,).
    """
    n, c = scores.shape
    thresholds = np.full(c, default, np.float64)
    best_f1 = np.full(c, np.nan)
    for j in range(c):
        order = np.argsort(-scores[:, j], kind="stable")
        column = scores[order, j].astype(np.float64)
        positive = targets[order, j] != 0
        num_pos = int(positive.sum())
        if num_pos == 0:
            continue
        admitted = np.arange(1, n + 1)
        f1 = 2 * np.cumsum(positive) / (admitted + num_pos)
        # Only cut where the next score is strictly lower: tied scores are admitted together.
        cut = np.ones(n, bool)
        cut[:-1] = column[:-1] > column[1:]
        k = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
        thresholds[j] = column[k] if k == n - 1 else (column[k] + column[k + 1]) / 2
        best_f1[j] = f1[k]
    return thresholds, best_f1


def choose_thresholds(scores: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """The global threshold maximising micro-F1 (OF1) on the sweep grid, and per-class
    F1-maximising thresholds (a class without positives gets the global one).

    Returns:
        ``single`` and ``per_class`` (C,).
    """
    sweep = threshold_sweep(scores, targets)
    single = float(sweep["threshold"][int(np.argmax(sweep["OF1"]))])
    per_class, _ = f1_optimal_thresholds(scores, targets, default=single)
    return single, per_class


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray):
    """Recall and precision at every cut between distinct scores of one class (for plots)."""
    order = np.argsort(-scores, kind="stable")
    column, hits = scores[order], positive[order] != 0
    cut = np.ones(len(column), bool)
    cut[:-1] = column[:-1] > column[1:]
    true_pos = np.cumsum(hits)[cut]
    admitted = np.arange(1, len(column) + 1)[cut]
    return true_pos / max(1, hits.sum()), true_pos / admitted


# ---------------------------------------------------------------------------------------------
# The report


def evaluation_report(
    scores: np.ndarray,
    targets: np.ndarray,
    train_counts: Sequence[int] | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """mAP, CP ... OF1 at ``threshold``, F1@3, F1@5 (with their P and R) and mAP per bucket.

    Bucket keys (``mAP_head`` ...) appear only when ``train_counts`` are given and the bucket
    has a class with positives in this split; ``F1@k`` only when k <= C.
    """
    report = dict(multilabel_report(scores, targets, threshold))
    for k in TOP_K:
        if k <= scores.shape[1]:
            top = f1_at_k(scores, targets, k)
            report.update(
                {f"P@{k}": top["precision"], f"R@{k}": top["recall"], f"F1@{k}": top["f1"]}
            )
    if train_counts is not None:
        buckets = frequency_buckets(train_counts)
        for bucket, value in bucket_map(scores, targets, buckets).items():
            if value is not None:
                report[f"mAP_{bucket}"] = value
    return report


@dataclass
class EvaluationFiles:
    """What :func:`write_evaluation` wrote, and the report it computed."""

    report: dict[str, float]
    report_json: Path
    per_class_csv: Path
    pr_curves_png: Path
    sweep_png: Path
    thresholds_json: Path | None
    fixed_report: dict[str, float] | None = None  # CP ... OF1 at the fixed per-class thresholds

    def paths(self) -> list[Path]:
        files = [self.report_json, self.per_class_csv, self.pr_curves_png, self.sweep_png]
        return files + ([self.thresholds_json] if self.thresholds_json else [])


def per_class_rows(
    scores: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    train_counts: Sequence[int] | None,
    best_thresholds: np.ndarray,
    best_f1: np.ndarray,
) -> list[dict]:
    """One row per class: AP, positives here, training positives and bucket, best F1."""
    ap = average_precision(scores, targets)
    positives = (targets != 0).sum(axis=0)
    rows = []
    for j, name in enumerate(class_names):
        train = None if train_counts is None else int(train_counts[j])
        rows.append(
            {
                "class": name,
                "AP": None if math.isnan(ap[j]) else float(ap[j]),
                "positives": int(positives[j]),
                "train_positives": train,
                "bucket": None if train is None else str(frequency_buckets([train])[0]),
                "f1_threshold": float(best_thresholds[j]),
                "best_f1": None if math.isnan(best_f1[j]) else float(best_f1[j]),
            }
        )
    return rows


def plot_pr_curves(
    scores: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    per_panel: int = 4,
    title: str = "",
) -> Path:
    """Precision-recall curves of the ``per_panel`` worst and best classes by AP."""
    ap = average_precision(scores, targets)
    ranked = [int(j) for j in np.argsort(ap) if not math.isnan(ap[j])]  # ascending AP
    worst = ranked[:per_panel]
    best = ranked[::-1][:per_panel]
    fig = Figure(figsize=(10, 4.4))
    FigureCanvasAgg(fig)
    for panel, (label, chosen) in enumerate((("worst", worst), ("best", best))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for j in chosen:
            recall, precision = precision_recall_curve(scores[:, j], targets[:, j])
            ax.step(recall, precision, where="post", label=f"{class_names[j]} (AP {ap[j]:.3f})")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{len(chosen)} {label} classes by AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def sweep_figure(sweep: dict[str, np.ndarray], title: str = "") -> Figure:
    """CF1 and OF1 (with CP/CR/OP/OR faint) against the global threshold; maxima marked.

    Every label is a legend entry beside the axes (the maxima too), so no text lands on a curve
    or on another label, however close the maxima are.
    """
    fig = Figure(figsize=(7.6, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    t = sweep["threshold"]
    for key, colour in (("CF1", "#e6550d"), ("OF1", "#3182bd")):
        best = int(np.argmax(sweep[key]))
        label = f"{key} (max {sweep[key][best]:.3f} at {t[best]:.2f})"
        ax.plot(t, sweep[key], color=colour, label=label, linewidth=2)
        ax.plot(t[best], sweep[key][best], "o", color=colour)
    for key, colour in (("CP", "#e6550d"), ("CR", "#e6550d"), ("OP", "#3182bd"), ("OR", "#3182bd")):
        style = "--" if key.endswith("P") else ":"
        ax.plot(t, sweep[key], style, color=colour, alpha=0.45, linewidth=1, label=key)
    ax.axvline(0.5, color="grey", linewidth=0.8, label="threshold 0.5")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("global threshold on the sigmoid probability")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "Thresholded metrics against the global threshold")
    return fig


def plot_threshold_sweep(sweep: dict[str, np.ndarray], path: str | os.PathLike, title: str = ""):
    """:func:`sweep_figure` as a PNG."""
    path = Path(path)
    sweep_figure(sweep, title).savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_evaluation(
    out_dir: str | os.PathLike,
    scores: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    *,
    split: str,
    train_counts: Sequence[int] | None = None,
    threshold: float = 0.5,
    fixed_thresholds: np.ndarray | None = None,
    fixed_thresholds_from: str | None = None,
    model: ModelIdentity | None = None,
) -> EvaluationFiles:
    """Write ``report.json``, ``per_class.csv``, ``pr_curves.png``, ``threshold_sweep.png`` and
    (given ``model``) ``thresholds.json``.

    Args:
        out_dir: Output directory (created).
        scores: (N, C) probabilities.
        targets: (N, C) multi-hot.
        class_names: C names.
        split: Name of the evaluated split (recorded, and in the thresholds file).
        train_counts: Training images per class (frequency buckets); None leaves them out.
        threshold: The global threshold of the report.
        fixed_thresholds: Per-class thresholds chosen elsewhere; their CP ... OF1 are added to
            the report under ``per_class_thresholds``.
        fixed_thresholds_from: Where those came from (recorded).
        model: The model the scores come from, when ``class_names`` are all its classes in its
            order: the F1-maximising thresholds of this split are written for it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets)
    report = evaluation_report(scores, targets, train_counts, threshold)
    best_thresholds, best_f1 = f1_optimal_thresholds(scores, targets, default=threshold)
    rows = per_class_rows(scores, targets, class_names, train_counts, best_thresholds, best_f1)
    sweep = threshold_sweep(scores, targets)

    doc: dict = {
        "split": split,
        "images": int(scores.shape[0]),
        "classes": int(scores.shape[1]),
        "classes_with_positives": int(((targets != 0).sum(axis=0) > 0).sum()),
        "threshold": threshold,
        "metrics": report,
        "buckets": {
            "definition": "training images per class: head > 100, medium 20-100, tail < 20 "
            "(Distribution-Balanced loss paper, §4.2)",
            "classes": {
                b: sum(1 for r in rows if r["bucket"] == b) for b in ("head", "medium", "tail")
            },
        }
        if train_counts is not None
        else None,
        "sweep_best": {
            key: {
                "value": float(sweep[key].max()),
                "threshold": float(sweep["threshold"][int(np.argmax(sweep[key]))]),
            }
            for key in ("CF1", "OF1")
        },
    }
    fixed_report = None
    if fixed_thresholds is not None:
        fixed_report = metrics_at(scores, targets, fixed_thresholds)
        doc["per_class_thresholds"] = {"from": fixed_thresholds_from, "metrics": fixed_report}
    report_json = out / "report.json"
    report_json.write_text(json.dumps(doc, indent=1))

    per_class_csv = out / "per_class.csv"
    with open(per_class_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["AP"] is None, -(r["AP"] or 0.0))))

    what = f"{split}: {scores.shape[0]} images, {scores.shape[1]} classes"
    pr_png = plot_pr_curves(
        scores, targets, class_names, out / "pr_curves.png", title=f"Precision-recall ({what})"
    )
    sweep_png = plot_threshold_sweep(
        sweep, out / "threshold_sweep.png", f"Thresholded metrics vs global threshold ({what})"
    )
    thresholds_json = None
    if model is not None:
        if tuple(class_names) != tuple(model.class_names):
            raise ValueError("thresholds are written for all of the model's classes, in order")
        thresholds_json = write_thresholds(
            out / "thresholds.json", model, best_thresholds, split=split, f1=best_f1
        )
    return EvaluationFiles(
        report, report_json, per_class_csv, pr_png, sweep_png, thresholds_json, fixed_report
    )


# ---------------------------------------------------------------------------------------------
# The thresholds file that cpsd evaluate writes and cpsd predict reads


def write_thresholds(
    path: str | os.PathLike,
    model: ModelIdentity,
    thresholds: np.ndarray,
    *,
    split: str,
    f1: np.ndarray | None = None,
) -> Path:
    """A per-class thresholds file (JSON, keyed by class name) for ``model`` alone."""
    path = Path(path)
    doc = {
        "format": THRESHOLDS_FORMAT,
        "version": THRESHOLDS_VERSION,
        "model_digest": model.digest,
        "class_names": list(model.class_names),
        "chosen_on_split": split,
        "note": "chosen to maximise each class's F1 on this split; do not report metrics "
        "computed with them on the same split",
        "thresholds": {n: float(t) for n, t in zip(model.class_names, thresholds, strict=True)},
    }
    if f1 is not None:
        # JSON has no NaN: a class without positives has no F1 (null).
        doc["f1"] = {
            n: None if math.isnan(v) else float(v)
            for n, v in zip(model.class_names, f1, strict=True)
        }
    path.write_text(json.dumps(doc, indent=1))
    return path


class Thresholds(NamedTuple):
    """Per-class thresholds read back, and the split they were chosen on."""

    values: np.ndarray  # (C,) in the model's class order
    chosen_on_split: str


def name_difference(
    first: str, first_names: Sequence[str], second: str, second_names: Sequence[str]
) -> str:
    """``only in A: [...]; only in B: [...]`` (at most 5 names each), or empty if the sets match."""
    parts = []
    for label, mine, theirs in (
        (first, first_names, set(second_names)),
        (second, second_names, set(first_names)),
    ):
        only = [n for n in mine if n not in theirs]
        if only:
            more = f" and {len(only) - 5} more" if len(only) > 5 else ""
            parts.append(f"{len(only)} only in {label}: {only[:5]}{more}")
    return "; ".join(parts)


def read_thresholds(path: str | os.PathLike, model: ModelIdentity) -> Thresholds:
    """Thresholds for ``model``'s classes (in its order) from a :func:`write_thresholds` file.

    Raises:
        FileNotFoundError: No such file.
        ThresholdsError: Not a thresholds file, one that does not name its model, one written
            for another model (other digest or classes), or a value that is not a finite number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no thresholds file at {path}")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ThresholdsError(f"{path} is not JSON: {err}") from err
    if not isinstance(doc, Mapping) or doc.get("format") != THRESHOLDS_FORMAT:
        raise ThresholdsError(f"{path} is not a thresholds file written by cpsd evaluate")
    if doc.get("version") != THRESHOLDS_VERSION or "model_digest" not in doc:
        raise ThresholdsError(
            f"{path} does not say which model it was fitted to (written by an older cpsd); "
            "run cpsd evaluate with this model to write a new one"
        )
    table = doc.get("thresholds", {})
    difference = name_difference("the file", list(table), "the model", model.class_names)
    if difference:
        raise ThresholdsError(f"{path} was written for a model with other classes ({difference})")
    if doc["model_digest"] != model.digest:
        raise ThresholdsError(
            f"{path} was fitted to another model (digest {str(doc['model_digest'])[:12]}, this "
            f"model {model.digest[:12]}); run cpsd evaluate with this model for its thresholds"
        )
    try:
        values = np.array([float(table[n]) for n in model.class_names])
    except (TypeError, ValueError) as err:
        raise ThresholdsError(f"{path}: a threshold is not a number ({err})") from err
    if not np.isfinite(values).all():
        raise ThresholdsError(f"{path}: thresholds must be finite numbers")
    return Thresholds(values, str(doc.get("chosen_on_split", "unknown")))
