"""From finished stage records to what people read: the summary table, its plot, MLflow runs.

Used by the pipeline for one config and by the study for each variant × seed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mlcore.cpsd import (
    CONTROL,
    ENSEMBLES,
    SUMMARY_COLUMNS,
    TARGET,
    RunSummary,
    TrainedModel,
    build_summary,
)
from workflows.graph import ConfigRefs, StageGraph
from workflows.stages import download_scores
from workflows.storage import Storage
from workflows.tracking import (
    Tracker,
    describe_experiment,
    describe_run,
    final_metrics_of,
    log_final_metrics,
    runs_page_link,
    share_runs_view,
)


def collect(graph: StageGraph, refs: ConfigRefs) -> dict[str, dict[str, Any]]:
    """Wait for a config's teachers, baseline, combinations and final model; records by
    stage name."""
    named = {**refs.teachers, **refs.combinations}
    if refs.baseline is not None:
        named["baseline"] = refs.baseline
    if refs.final is not None and refs.final is not refs.baseline:
        named["student"] = refs.final
    return graph.wait(named)


def summarise(
    refs: ConfigRefs, records: dict[str, dict[str, Any]], num_classes: int, scratch: Path
) -> RunSummary:
    """The run's table: teachers, merged ensembles, student, baseline (val and held-out)."""
    storage = Storage(refs.ctx.storage_uri)

    def trained(name: str, role: str, classes: int) -> TrainedModel:
        record = records[name]
        return TrainedModel(
            name=name,
            role=role,
            classes=classes,
            best_epoch=record["best_epoch"],
            best_metrics=record["metrics"],
            held_out=record.get("held_out") or {},
            directory=download_scores(storage, record, scratch),
        )

    teachers = [trained(s.name, "teacher", len(s.subset)) for s in refs.specs]
    finals = []
    if ENSEMBLES[refs.cfg.cpsd.mode]:
        finals.append(trained("student", "student", num_classes))
    if "baseline" in records:
        finals.append(trained("baseline", "baseline", num_classes))
    combinations = [
        (name, records[name]["reports"]) for name in (TARGET, CONTROL) if name in records
    ]
    summary = build_summary(refs.specs, teachers, finals, num_classes, combinations)
    for row in summary.rows:
        if records.get(row["name"], {}).get("stale"):
            row["stale"] = records[row["name"]]["stale"]
    return summary


def write_summary(summary: RunSummary, out: Path, title: str = "") -> list[Path]:
    """summary.md, summary.csv and a bar plot of val and test mAP per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary.markdown() + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary.rows)
    colours = {
        "teacher": "#9ecae1",
        "ensemble": "#3182bd",
        "student": "#e6550d",
        "baseline": "#636363",
    }
    rows = summary.rows
    fig = Figure(figsize=(max(6.0, 0.7 * len(rows)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(rows))
    width = 0.4
    val = [100 * r["val_mAP"] for r in rows]
    test = [100 * (r["test_mAP"] or 0.0) for r in rows]
    ax.bar([x - width / 2 for x in xs], val, width, color=[colours[r["role"]] for r in rows],
           alpha=0.45, label="val (selection)")  # fmt: skip
    ax.bar([x + width / 2 for x in xs], test, width, color=[colours[r["role"]] for r in rows],
           label="test (held out)")  # fmt: skip
    for x, v in zip(xs, test, strict=True):
        if v:
            ax.text(x + width / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mAP (%)")
    ax.set_title(title or "mAP per model (teachers: own classes only)", fontsize=10, wrap=True)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out / "summary.png", dpi=120, bbox_inches="tight")
    return [out / "summary.md", out / "summary.csv", out / "summary.png"]


def log_ensembles(tracker: Tracker | None, summary: RunSummary) -> None:
    """Each merged ensemble as a run of its own (role ``ensemble``) with the final keys."""
    if tracker is None:
        return
    client = tracker.client
    for row in summary.rows:
        if row["role"] != "ensemble":
            continue
        run_id = client.create_run(
            tracker.experiment_id,
            run_name=row["name"],
            tags={"mlflow.parentRunId": tracker.parent_run_id or ""},
        ).info.run_id
        describe_run(client, run_id, role="ensemble", description=_describe(row))
        log_final_metrics(client, run_id, final_keys(row), step=0)
        client.set_terminated(run_id)


def _describe(row: dict[str, Any]) -> str:
    """What an ensemble row's numbers cover."""
    what = {
        TARGET: "the logits the student is distilled towards: the cpsd.kd_alpha-weighted "
        "combination of the CGP and DGP merged teacher logits (mode cpsd), or the one "
        "ensemble's merged logits (other modes)",
        CONTROL: "the mean logits of the baseline and its cpsd.control_ensemble plain models "
        "with other seeds, a plain ensemble to set against the teachers'",
    }.get(row["name"], "its teachers' logits merged")
    return (
        f"{row['name']}: {what}, over all {row['classes']} classes; no training of its own "
        "(each member was selected on val)."
    )


def final_keys(row: dict[str, Any]) -> dict[str, float]:
    """The final keys every run ends with, from a summary row."""
    held_out = {
        "test": {"mAP": row["test_mAP"], "CF1": row["test_CF1"], "OF1": row["test_OF1"]}
        if row.get("test_mAP") is not None
        else None,
        "shift": {"mAP": row["shift_mAP"]} if row.get("shift_mAP") is not None else None,
    }
    return final_metrics_of(row["val_mAP"], row.get("best_epoch"), row["classes"], held_out)


def mlflow_link(tracker: Tracker) -> str:
    """The runs page grouped by ``cpsd.role`` with the final keys first (a saved view)."""
    client = tracker.client
    describe_experiment(client, tracker.experiment_id)
    view = share_runs_view(client, tracker.experiment_id)
    link = runs_page_link(tracker.uri, tracker.experiment_id, view=view)
    if not tracker.uri.startswith(("http://", "https://")):
        link += f"  (after: mlflow ui --host 127.0.0.1 --backend-store-uri {tracker.uri})"
    return link
