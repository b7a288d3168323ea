"""``cpsd study``: one Ray job runs a grid of pipeline variants over seeds and tabulates them.

``python -m workflows.study --config FILE`` (also ``cpsd study``). The config's ``study``
section names a grid of dotted keys and values plus a list of seeds; every combination of the
grid is a *variant*, run once per seed, with the plain baseline trained beside it. All variants
go through one stage graph (``workflows.graph``), so a stage two variants need runs once, even
while it is in flight: the CGP teachers of ``cgpd`` and ``cpsd`` are the same stages, and every
variant that keeps the data, model, loss and training settings shares one baseline per seed.

Outputs, under ``<storage_path>/<name>/study/`` and as artifacts of the study's MLflow run:

* ``study.csv``: one row per variant × seed with every metric of the variant's final model
  (the student, or the baseline in mode ``baseline``), of its baseline and of its ensembles
  (merged teachers, ``ensemble-target``, ``ensemble-baseline``: test, shift and val mAP);
* ``study_summary.csv``: ``variant, metric, mean, ci95_low, ci95_high, n`` (t-interval over
  seeds; empty bounds with one seed);
* ``study_paired.csv``: per-seed paired differences against the baseline, with intervals (the
  final model's, and each ensemble's test mAP);
* ``study.md``: the tables people read (variants, then ensembles); ``study_modes.png`` (the
  paper's Table 3) and ``study_k.png`` (its Fig. 3, when ``cpsd.k`` varies), with 95% error
  bars.

Everything is chosen on ``val`` inside each run and reported on the held-out ``test`` split.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlcore import configlib
from mlcore.data.loading import resolve_dataset
from mlcore.stats import mean_interval, paired_interval
from workflows.autoscaling import resolve_placement
from workflows.config import Config
from workflows.console import ProgressLine, board, quiet_third_party
from workflows.driver import preflight, spill_dir_for
from workflows.entry import STUDY, job_main
from workflows.graph import ConfigRefs, StageGraph
from workflows.report import collect, final_keys, mlflow_link, summarise, write_summary
from workflows.runtime import init_ray
from workflows.stages import JobContext
from workflows.storage import Storage
from workflows.tracking import (
    NullRunLogger,
    RunLogger,
    Tracker,
    flat_params,
    git_commit,
    parent_run,
    run_note,
    source_tags,
)
from workflows.versions import version_tags, versions

# Metrics of a run's final model, its baseline and its ensembles that the tables report.
REPORTED = ("test_mAP", "test_CF1", "test_OF1", "shift_mAP", "val_mAP")
PAIRED = (
    "test_mAP",
    "test_CF1",
    "test_OF1",
    "shift_mAP",
    "test_mAP_head",
    "test_mAP_medium",
    "test_mAP_tail",
)


@dataclass(frozen=True)
class Run:
    """One variant at one seed."""

    variant: str
    values: dict[str, Any]
    seed: int
    cfg: Config


def _short(key: str, keys: Sequence[str]) -> str:
    """The last part of a dotted key (``loss.name`` is ``loss``), unless another key of the
    variant ends the same way."""

    def last(k: str) -> str:
        parts = k.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    return last(key) if sum(last(k) == last(key) for k in keys) == 1 else key


def variant_name(values: dict[str, Any]) -> str:
    if not values:
        return "base"
    keys = list(values)
    return ",".join(f"{_short(k, keys)}={values[k]}" for k in keys)


def expand(cfg: Config) -> list[Run]:
    """Every variant × seed as a checked config; bad keys or values raise ConfigError here,
    before Ray starts."""
    study = cfg.study
    keys = list(study.grid)
    runs = []
    combos = [dict(zip(keys, c, strict=True)) for c in itertools.product(*study.grid.values())]
    explicit = [dict(v) for v in study.variants] or [{}]
    for values in ({**g, **v} for g in combos for v in explicit):
        for seed in study.seeds:
            overrides = [f"{k}={json.dumps(v)}" for k, v in values.items()]
            overrides += [
                f"train.seed={seed}",
                f"cpsd.partition_seed={seed}",
                "cpsd.train_baseline=true",  # every variant is compared with its own baseline
            ]
            if study.vary_data_seed:
                if cfg.data.synth is None:
                    raise configlib.ConfigError("study.vary_data_seed needs generated data")
                overrides.append(f"data.synth.seed={seed}")
            run_cfg = configlib.replace(cfg, overrides)
            preflight(run_cfg)
            runs.append(Run(variant_name(values), values, seed, run_cfg))
    names = {r.variant for r in runs}
    if study.reference is not None and study.reference not in names:
        raise configlib.ConfigError(
            f"study.reference {study.reference!r} is not a variant ({', '.join(sorted(names))})"
        )
    return runs


def _placed(run: Run, placed: Config) -> Run:
    if run.cfg.ray.teacher_gpus is not None or placed.ray.teacher_gpus is None:
        return run
    ray_cfg = dataclasses.replace(run.cfg.ray, teacher_gpus=placed.ray.teacher_gpus)
    return dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, ray=ray_cfg))


@dataclass
class StudyResult:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    markdown: str
    out_dir: str


def run_study(cfg: Config, *, log: Callable[[str], None] = print) -> StudyResult:
    """Run every variant × seed on Ray and write the study's tables and plots."""
    quiet_third_party(cfg.verbose)
    runs = expand(cfg)
    variants = list(dict.fromkeys(r.variant for r in runs))
    log(
        f"[{cfg.name}] study: {len(variants)} variants x {len(cfg.study.seeds)} seeds "
        f"= {len(runs)} runs"
    )
    storage = Storage(cfg.storage_path)
    params = {**flat_params(cfg), "git_commit": git_commit()}
    tracking = (
        parent_run(
            cfg.mlflow,
            cfg.name,
            params,
            {
                "cpsd.study": cfg.name,
                "mlflow.note.content": run_note(
                    f"Study {cfg.name}: each variant × seed is a child run (cpsd.role variant) "
                    "with its final model's final keys and `baseline.*`; their stages are "
                    "nested below them."
                ),
                **source_tags("cpsd study"),
                **version_tags(versions()),
            },
            spill_dir=spill_dir_for(storage, cfg.name),
            job=storage.uri_of(cfg.name),
        )
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    scratch = Path(tempfile.mkdtemp(prefix="cpsd-study-"))
    try:
        with tracking as (tracker, parent):
            init_ray(cfg)
            # GPUs the cluster has or can add, decided once, as the pipeline does; a variant
            # that sets ray.teacher_gpus itself keeps it.
            placed, placement = resolve_placement(cfg, log)
            parent.params(placement.params())
            runs = [_placed(run, placed) for run in runs]
            for run in runs:
                resolve_dataset(run.cfg.data)  # generate each dataset once, before the fan-out
            progress = board()
            graph = StageGraph(log, ProgressLine(progress) if log is print else None)
            run_loggers: list[RunLogger] = []
            status = "KILLED"
            try:
                contexts = []
                for run in runs:
                    run_tracker = _run_tracker(tracker, run, run_loggers)
                    contexts.append(
                        JobContext(run.cfg, cfg.storage_path, run_tracker, cfg.name, progress)
                    )
                started = [
                    graph.start(run.cfg, ctx) for run, ctx in zip(runs, contexts, strict=True)
                ]
                refs = [graph.finish(r) for r in started]
                log(f"[{cfg.name}] {len(graph.outstanding())} distinct stages submitted")
                graph.wait(graph.labelled())
                rows = []
                for run, run_refs, logger in zip(
                    runs, refs, run_loggers or [None] * len(runs), strict=True
                ):
                    rows.append(_row(run, run_refs, graph, scratch, storage, cfg.name, logger))
                status = "FINISHED"
            except BaseException as err:
                reason = "interrupted" if isinstance(err, KeyboardInterrupt) else "a stage failed"
                cancelled = graph.cancel()
                log(f"[{cfg.name}] {reason}: cancelled {cancelled} outstanding stages")
                status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                raise
            finally:
                for logger in run_loggers:
                    with contextlib.suppress(Exception):
                        Tracker(
                            tracker.uri, tracker.experiment_id, logger.run_id
                        ).kill_running_children()
                    logger.finish(status)
            out = scratch / "study"
            result = write_study(rows, variants, out, cfg)
            for path in sorted(out.iterdir()):
                parent.artifact(path, "study")
                storage.upload(path, f"{cfg.name}/study/{path.name}")
            result.out_dir = storage.uri_of(f"{cfg.name}/study")
            if tracker is not None:
                log(f"MLflow runs: {mlflow_link(tracker)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _run_tracker(tracker: Tracker | None, run: Run, loggers: list[RunLogger]) -> Tracker | None:
    """A child run of the study for one variant × seed; its stages nest under it."""
    if tracker is None:
        return None
    client = tracker.client
    run_id = client.create_run(
        tracker.experiment_id,
        run_name=f"{run.variant}/seed={run.seed}",
        tags={
            "mlflow.parentRunId": tracker.parent_run_id,
            "cpsd.role": "variant",
            "cpsd.variant": run.variant,
            "mlflow.note.content": run_note(
                f"Study variant {run.variant} at seed {run.seed}: the final model "
                f"({'baseline' if run.cfg.cpsd.mode == 'baseline' else 'student'}) selected on "
                "val and scored on the held-out test split; `baseline.*` metrics are the plain "
                "model of the same seed. Its stages are nested below (a stage shared with "
                "another variant appears under the first one that needed it)."
            ),
        },
    ).info.run_id
    logger = RunLogger(client, run_id)
    logger.params({**{f"study.{k}": v for k, v in run.values.items()}, "seed": run.seed})
    loggers.append(logger)
    return Tracker(tracker.uri, tracker.experiment_id, run_id)


def _row(
    run: Run,
    refs: ConfigRefs,
    graph: StageGraph,
    scratch: Path,
    storage: Storage,
    name: str,
    logger: RunLogger | None,
) -> dict[str, Any]:
    records = collect(graph, refs)
    num_classes = preflight(run.cfg)
    summary = summarise(refs, records, num_classes, scratch / run.variant / str(run.seed))
    folder = scratch / "variants" / run.variant.replace("/", "_") / f"seed-{run.seed}"
    write_summary(summary, folder, title=f"{run.variant}, seed {run.seed}")
    for path in folder.iterdir():
        storage.upload(
            path, f"{name}/study/variants/{folder.parent.name}/{folder.name}/{path.name}"
        )
    by_name = {r["name"]: r for r in summary.rows}
    final = by_name["student"] if "student" in by_name else by_name["baseline"]
    baseline = by_name["baseline"]
    row: dict[str, Any] = {"variant": run.variant, "seed": run.seed, **run.values}
    row["teachers"] = len(refs.specs)
    for metric in REPORTED:
        row[metric] = final.get(metric)
        row[f"baseline_{metric}"] = baseline.get(metric)
    final_test = records[final["name"]].get("held_out", {}).get("test", {})
    base_test = records["baseline"].get("held_out", {}).get("test", {})
    for bucket in ("head", "medium", "tail"):
        row[f"test_mAP_{bucket}"] = final_test.get(f"mAP_{bucket}")
        row[f"baseline_test_mAP_{bucket}"] = base_test.get(f"mAP_{bucket}")
    for ens in (r for r in summary.rows if r["role"] == "ensemble"):
        for metric in ("test_mAP", "shift_mAP", "val_mAP"):
            row[f"{ens['name'].replace('-', '_')}_{metric}"] = ens.get(metric)
    if logger is not None:
        logger.metrics(final_keys(final), step=0)
        logger.metrics({f"baseline.{k}": v for k, v in final_keys(baseline).items()}, step=0)
    return row


# ---------------------------------------------------------------------------------------------
# Tables and plots


def summarise_rows(
    rows: Sequence[dict[str, Any]], variants: Sequence[str], reference: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-variant t-intervals of every metric, and paired differences (by seed) against each
    variant's own baseline, or against the ``reference`` variant's final model."""
    # Over every row's columns: a first variant in mode baseline has no ensemble columns.
    metrics = [
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if ("_mAP" in k or k.endswith(("_CF1", "_OF1"))) and any(r.get(k) is not None for r in rows)
    ]
    summary, paired = [], []
    for variant in variants:
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        for metric in metrics:
            values = [r.get(metric) for r in mine if r.get(metric) is not None]
            if values:
                summary.append(_interval_row(variant, metric, mean_interval(values)))
        against = {r["seed"]: r for r in rows if r["variant"] == reference}
        for metric in PAIRED:
            if reference is None:
                pairs = [(r.get(metric), r.get(f"baseline_{metric}")) for r in mine]
            else:
                pairs = [(r.get(metric), against.get(r["seed"], {}).get(metric)) for r in mine]
            _add_paired(paired, variant, f"{metric} - {reference or 'baseline'}", pairs)
        # Each ensemble (merged teachers, the student's target, the plain control ensemble)
        # against the variant's own baseline, whatever the reference: what the teachers offer.
        for metric in (m for m in metrics if m.startswith("ensemble_") and m.endswith("_test_mAP")):
            pairs = [(r.get(metric), r.get("baseline_test_mAP")) for r in mine]
            _add_paired(paired, variant, f"{metric} - baseline", pairs)
    return summary, paired


def _add_paired(paired: list[dict[str, Any]], variant: str, name: str, pairs) -> None:
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if pairs:
        diff = paired_interval([a for a, _ in pairs], [b for _, b in pairs])
        paired.append(_interval_row(variant, name, diff))


def _interval_row(variant: str, metric: str, interval) -> dict[str, Any]:
    return {
        "variant": variant,
        "metric": metric,
        "mean": interval.mean,
        "ci95_low": interval.low,
        "ci95_high": interval.high,
        "n": interval.n,
    }


def _write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def markdown_table(
    summary: Sequence[dict[str, Any]],
    paired: Sequence[dict[str, Any]],
    variants: Sequence[str],
    reference: str | None = None,
) -> str:
    """Variant | n | test mAP | Δ test mAP | test CF1 | test OF1 | shift mAP | Δ shift mAP,
    then mAP by training-frequency bucket (head / medium / tail) with its Δ."""
    against = reference or "baseline"

    def cell(rows, variant, metric) -> str:
        found = next((r for r in rows if r["variant"] == variant and r["metric"] == metric), None)
        if found is None:
            return ""
        if found["ci95_low"] is None:
            return f"{100 * found['mean']:.2f} (n=1)"
        return (
            f"{100 * found['mean']:.2f} [{100 * found['ci95_low']:.2f}, "
            f"{100 * found['ci95_high']:.2f}]"
        )

    lines = [
        f"| variant | n | test mAP | Δ test mAP vs {against} | test CF1 | test OF1 "
        "| shift mAP | Δ shift mAP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        n = next((r["n"] for r in summary if r["variant"] == v and r["metric"] == "test_mAP"), 0)
        lines.append(
            f"| {v} | {n} | {cell(summary, v, 'test_mAP')} | "
            f"{cell(paired, v, f'test_mAP - {against}')} | {cell(summary, v, 'test_CF1')} | "
            f"{cell(summary, v, 'test_OF1')} | {cell(summary, v, 'shift_mAP')} | "
            f"{cell(paired, v, f'shift_mAP - {against}')} |"
        )
    ensembles = list(
        dict.fromkeys(
            r["metric"].removesuffix("_test_mAP")
            for r in summary
            if r["metric"].startswith("ensemble_") and r["metric"].endswith("_test_mAP")
        )
    )
    if ensembles:
        lines += [
            "",
            "Ensembles (no training of their own): test mAP, and Δ vs the variant's baseline. "
            "`ensemble_target` is the logits the student regresses to; `ensemble_baseline` the "
            "mean of the baseline and its control models:",
            "",
            "| variant | " + " | ".join(f"{e} | Δ {e}" for e in ensembles) + " |",
            "|---|" + "---|---|" * len(ensembles),
        ]
        for v in variants:
            cells = [
                cell(summary, v, f"{e}_test_mAP")
                + " | "
                + cell(paired, v, f"{e}_test_mAP - baseline")
                for e in ensembles
            ]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    buckets = ("head", "medium", "tail")
    if any(r["metric"].startswith("test_mAP_") for r in summary):
        lines += [
            "",
            f"test mAP by training frequency (DB paper's buckets), and Δ vs {against}:",
            "",
            "| variant | " + " | ".join(f"{b} | Δ {b}" for b in buckets) + " |",
            "|---|" + "---|---|" * len(buckets),
        ]
        for v in variants:
            cells = [
                cell(summary, v, f"test_mAP_{b}")
                + " | "
                + cell(paired, v, f"test_mAP_{b} - {against}")
                for b in buckets
            ]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_study(
    rows: list[dict[str, Any]], variants: Sequence[str], out: Path, cfg: Config
) -> StudyResult:
    out.mkdir(parents=True, exist_ok=True)
    summary, paired = summarise_rows(rows, variants, cfg.study.reference)
    _write_csv(rows, out / "study.csv")
    _write_csv(summary, out / "study_summary.csv")
    _write_csv(paired, out / "study_paired.csv")
    table = markdown_table(summary, paired, variants, cfg.study.reference)
    grid = ", ".join(f"`{k}` ∈ {list(v)}" for k, v in cfg.study.grid.items()) or "none"
    if cfg.study.variants:
        grid += "; variants " + "; ".join(variant_name(dict(v)) for v in cfg.study.variants)
    compared = (
        "the baseline trained with the same seed"
        if cfg.study.reference is None
        else f"variant {cfg.study.reference} at the same seed"
    )
    (out / "study.md").write_text(
        f"# Study {cfg.name}\n\nGrid: {grid}; seeds {list(cfg.study.seeds)}. Mean over seeds "
        f"with 95% t-intervals, in %; Δ is the per-seed paired difference to {compared}. "
        "Selected on val, reported on the held-out test split.\n\n"
        f"{table}\n"
    )
    plot_study(rows, summary, paired, cfg, out)
    return StudyResult(rows, summary, paired, table, str(out))


def plot_study(rows, summary, paired, cfg: Config, out: Path) -> list[Path]:
    """``study_modes.png``: test mAP per variant with the baseline line (Table 3);
    ``study_k.png``: test mAP against k per strategy (Fig. 3), when ``cpsd.k`` varies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def stat(variant: str, metric: str, table=summary):
        return next((r for r in table if r["variant"] == variant and r["metric"] == metric), None)

    def err(entry) -> tuple[float, float]:
        if entry is None or entry["ci95_low"] is None:
            return (0.0, 0.0)
        return (
            100 * (entry["mean"] - entry["ci95_low"]),
            100 * (entry["ci95_high"] - entry["mean"]),
        )

    written = []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(max(7.0, 1.2 * len(variants)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    means = [100 * stat(v, "test_mAP")["mean"] for v in variants]
    errors = list(zip(*(err(stat(v, "test_mAP")) for v in variants), strict=True))
    ax.bar(range(len(variants)), means, yerr=errors, capsize=4, color="#3182bd")
    base = stat(variants[0], "baseline_test_mAP")
    if base is not None and cfg.study.reference is None:
        ax.axhline(100 * base["mean"], color="#636363", ls="--", lw=1, label="baseline")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test mAP (%)")
    lo = min(m - e for m, e in zip(means, errors[0], strict=True))
    ax.set_ylim(max(0.0, lo - 5), None)
    ax.set_title("final model, mean ± 95% CI over seeds", fontsize=9)
    against = cfg.study.reference or "baseline"
    deltas = [stat(v, f"test_mAP - {against}", paired) for v in variants]
    ax2.bar(
        range(len(variants)),
        [100 * d["mean"] if d else 0.0 for d in deltas],
        yerr=list(zip(*(err(d) for d in deltas), strict=True)),
        capsize=4,
        color="#e6550d",
    )
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel(f"Δ test mAP vs {against} (pts)")
    ax2.set_title("paired by seed", fontsize=9)
    fig.suptitle(f"{cfg.name}: held-out test split", fontsize=10)
    fig.savefig(out / "study_modes.png", dpi=120, bbox_inches="tight")
    written.append(out / "study_modes.png")

    if "cpsd.k" in cfg.study.grid and "cpsd.mode" in cfg.study.grid:
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for mode in cfg.study.grid["cpsd.mode"]:
            points = []
            for k in cfg.study.grid["cpsd.k"]:
                match = [
                    v
                    for v in variants
                    if any(
                        r["variant"] == v and r.get("cpsd.k") == k and r.get("cpsd.mode") == mode
                        for r in rows
                    )
                ]
                if match:
                    points.append((k, stat(match[0], "test_mAP")))
            if points:
                ax.errorbar(
                    [k for k, _ in points],
                    [100 * e["mean"] for _, e in points],
                    yerr=list(zip(*(err(e) for _, e in points), strict=True)),
                    marker="o",
                    capsize=3,
                    label=str(mode),
                )
        ax.set_xlabel("k (label subsets)")
        ax.set_ylabel("test mAP (%)")
        ax.legend(fontsize=8)
        ax.set_title(f"{cfg.name}: mAP against k, mean ± 95% CI", fontsize=10)
        fig.savefig(out / "study_k.png", dpi=120, bbox_inches="tight")
        written.append(out / "study_k.png")
    return written


def command(cfg: Config, args: argparse.Namespace) -> None:
    """``cpsd study``: run the study and print its table."""
    if not (cfg.study.grid or cfg.study.variants) and len(cfg.study.seeds) < 2:
        raise configlib.ConfigError(
            "study: set study.grid or study.variants, or at least two study.seeds"
        )
    result = run_study(cfg)
    print("\n" + result.markdown)
    print(f"\ntables and plots: {result.out_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(STUDY, command, argv)


if __name__ == "__main__":
    sys.exit(main())
