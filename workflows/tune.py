"""Loss sweeps with Ray Tune: ``python -m workflows.tune --config FILE [--resume]``.

Each trial trains the configured model (all classes, or ``tune.class_subset`` for a teacher's
sub-task) with the sampled settings and reports every epoch's validation metrics; ASHA stops
weak trials early. MLflow gets one parent run per sweep and one child run per trial (sampled
params, per-epoch metrics under the pipeline's names, trial status, and for adaptive ASL the
γ−/Δp trajectory, the ASL paper's Fig. 9). The parent gets the results table and a plot of mAP
against every swept key. The best trial's loss section is written as ``best_loss.yaml``, which a
pipeline config includes with ``loss: !include best_loss.yaml``; it records the sweep's run id
in ``loss.source``, so the pipeline's runs say where their loss came from.

With ``tune.target: student`` a trial is the CPSD student: the stage graph first trains (or
reuses) the config's partitions, teachers and cached teacher logits under
``<storage_path>/<name>/stages``, then every trial distils a student from them with its
sampled student settings (``cpsd.cls_weight``, ``cpsd.student_lr_scale``...), selected on val
like any trial.

An interrupted sweep resumes with ``--resume`` (``Tuner.restore``): finished trials are not
rerun, unfinished ones continue from their last epoch checkpoint, and their MLflow runs resume.

With ``ray.train_workers > 1`` each trial trains on a Ray Train worker group
(``workflows.distributed``): every worker holds ``tune.resources_per_trial`` and the trial
itself no CPU (``TRIAL_RESOURCES``; Tune over Train deadlocks otherwise). Rank 0 logs the trial's
metrics; the γ−/Δp plot is not drawn for such trials; an interrupted trial resumes from the
group's last epoch checkpoint (same Ray Train run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from mlcore import configlib
from mlcore.configlib import ConfigError
from mlcore.cpsd import ENSEMBLES, TeacherSpec, student_config, train_student
from mlcore.data.loading import open_dataset, resolve_dataset
from mlcore.experiment import train_classifier
from mlcore.train import BEST
from workflows.autoscaling import resolve_placement, trial_resources
from workflows.config import Config, SweepConfig
from workflows.distributed import TRIAL_RESOURCES, fit_group, task_placement
from workflows.entry import TUNE, job_main
from workflows.graph import StageGraph
from workflows.runtime import device_for_task, init_ray
from workflows.stages import JobContext
from workflows.storage import Storage
from workflows.tracking import (
    RunLogger,
    Tracker,
    check_reachable,
    child_run,
    flat_params,
    git_commit,
    resolve_tracking_uri,
    run_note,
    start_parent,
)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
BEST_LOSS_FILE = "best_loss.yaml"
# What a student sweep may vary: settings of the student alone, never of its teachers.
STUDENT_KEYS = (
    "cpsd.cls_weight",
    "cpsd.kd_alpha",
    "cpsd.kd_reduction",
    "cpsd.student_lr_scale",
    "cpsd.student_epochs",
)


# ---------------------------------------------------------------------------------------------
# Search space (validated before Ray starts)


def _nested(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    head, *rest = keys
    if not rest:
        return {**data, head: value}
    child = data.get(head) or {}
    if not isinstance(child, dict):
        raise ConfigError(f"tune.space: '{head}' is a value, not a section")
    return {**data, head: _nested(child, rest, value)}


def apply_params(cfg: Config, params: Mapping[str, Any]) -> Config:
    """``cfg`` with each dotted key set to its sampled value (validated like any config)."""
    data = configlib.to_dict(cfg)
    for key, value in params.items():
        data = _nested(data, key.split("."), value)
    return configlib.from_dict(Config, data)


def validate_space(cfg: Config) -> dict[str, tuple[str, list[Any]]]:
    """Check every key and distribution; returns ``{key: (distribution, args)}``.

    Raises:
        ConfigError: Empty space, unknown key or distribution, bad bounds, empty choice, a
            value the config rejects, or non-grid keys in a grid search.
    """
    sweep = cfg.tune
    if not sweep.space:
        raise ConfigError("tune.space is empty: nothing to sweep")
    if sweep.target == "student":
        _check_student_sweep(cfg)
    elif cfg.pretrain.enabled:
        raise ConfigError("pretrain.enabled needs tune.target: student (the stage graph runs it)")
    parsed = {}
    for key, spec in sweep.space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"{where}: give exactly one distribution, e.g. {{uniform: [0, 1]}}")
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}: unknown distribution {dist!r} (use one of {', '.join(DISTRIBUTIONS)})"
            )
        if not isinstance(args, list | tuple) or not args:
            raise ConfigError(f"{where}: {dist} needs a non-empty list")
        args = list(args)
        if dist in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
                raise ConfigError(f"{where}: {dist} needs [low, high]")
            low, high = args
            if not low < high:
                raise ConfigError(f"{where}: {dist} needs low < high, got [{low}, {high}]")
            if dist == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
            candidates = [low, high] if dist != "randint" else [int(low), int(high) - 1]
        else:
            candidates = args
        if sweep.search == "grid" and dist not in ("grid", "choice"):
            raise ConfigError(f"{where}: search 'grid' takes only grid/choice keys, not {dist}")
        for value in candidates:  # every value must make a valid config
            try:
                apply_params(cfg, {key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} is invalid: {err}") from err
        parsed[key] = (dist, args)
    return parsed


def _check_student_sweep(cfg: Config) -> None:
    c = cfg.cpsd
    if not ENSEMBLES[c.mode]:
        raise ConfigError("tune.target: student needs a cpsd.mode with teachers")
    if c.student_init == "baseline":
        raise ConfigError("tune.target: student does not train the baseline (cpsd.student_init)")
    if "://" in cfg.storage_path:
        raise ConfigError("tune.target: student reads its teachers from a local storage_path")
    if cfg.ray.train_workers > 1:
        raise ConfigError("tune.target: student trials train in their task (ray.train_workers=1)")
    others = [key for key in cfg.tune.space if key not in STUDENT_KEYS]
    if others:
        raise ConfigError(
            f"tune.target: student sweeps student settings only ({', '.join(STUDENT_KEYS)}); "
            f"{', '.join(others)} would change the teachers"
        )


def param_space(parsed: Mapping[str, tuple[str, list[Any]]], search: str) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, (dist, args) in parsed.items():
        if dist == "uniform":
            out[key] = tune.uniform(*args)
        elif dist == "loguniform":
            out[key] = tune.loguniform(*args)
        elif dist == "randint":
            out[key] = tune.randint(*args)
        elif dist == "choice" and search == "random":
            out[key] = tune.choice(args)
        else:
            out[key] = tune.grid_search(args)
    return out


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Ray worker)


@dataclass(frozen=True)
class StudentTeachers:
    """The teachers every trial of a student sweep distils from (local files)."""

    specs: list[TeacherSpec]
    checkpoints: list[str]
    logits: list[str] | None


@dataclass(frozen=True)
class SweepContext:
    cfg: Config
    tracker: Tracker | None
    teachers: StudentTeachers | None = None


def _trial_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {f"sweep.{k}": v for k, v in params.items()}


def run_trial(params: dict[str, Any], ctx: SweepContext) -> None:
    """Train one sampled config, reporting every epoch (with a resumable checkpoint)."""
    from ray import tune

    trial = tune.get_context()
    cfg = apply_params(ctx.cfg, params)
    if cfg.ray.train_workers == 1:  # a worker group's workers pick their own device
        cfg = device_for_task(cfg, f"trial {trial.get_trial_id()}")
    # Inside Tune's local trial dir (artifact sync is off): Tune may end the trial's process
    # right after its last report, and the Ray session owns and removes that directory.
    work = Path(trial.get_trial_dir()) / "run"
    work.mkdir(parents=True, exist_ok=True)
    restored = tune.get_checkpoint()
    if restored is not None:
        restored.to_directory(work)  # last.pt: the loop resumes after its epoch
    trajectory: list[dict[str, float]] = []
    run_params = {
        **_trial_params(params),
        **flat_params(cfg.loss, "loss"),
        "trial_id": trial.get_trial_id(),
        "git_commit": git_commit(),
        "tune.target": cfg.tune.target,
    }
    if ctx.teachers is not None:
        run_params["teachers"] = len(ctx.teachers.specs)
    try:
        with child_run(
            ctx.tracker, trial.get_trial_id(), trial.get_trial_name(), run_params
        ) as run:

            def on_step(step: int, stats: dict[str, float]) -> None:
                trajectory.append({"step": step, **stats})
                run.metrics(stats, step=step)

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                run.metrics(metrics, step=epoch)
                if trajectory:
                    # Logged every epoch, before reporting: Tune may end the trial's process
                    # right after a report (ASHA stop, last epoch), so nothing is left to a
                    # final block.
                    run.artifact(plot_trajectory(trajectory, work / "asymmetry.png", cfg), "plots")
                with tempfile.TemporaryDirectory(dir=work.parent) as tmp:
                    # The whole run directory (last.pt to resume from, best.pt and its scores)
                    # so a trial restored after its last epoch still has its results.
                    shutil.copytree(work, tmp, dirs_exist_ok=True)
                    tune.report(
                        {**metrics, "epoch": epoch},
                        checkpoint=tune.Checkpoint.from_directory(tmp),
                    )

            subset = list(cfg.tune.class_subset) if cfg.tune.class_subset else None
            dataset = open_dataset(cfg.data)  # the trial's own: a sweep may vary data settings

            def train(out: Path, **hooks):
                if ctx.teachers is not None:
                    return train_student(
                        cfg,
                        dataset,
                        ctx.teachers.specs,
                        out,
                        teacher_checkpoints=ctx.teachers.checkpoints,
                        teacher_logits=ctx.teachers.logits,
                        **hooks,
                    )
                return train_classifier(cfg, dataset, out, class_subset=subset, **hooks)

            if cfg.ray.train_workers > 1:
                from ray.tune.integration.ray_train import TuneReportCallback

                fit_group(
                    train,
                    work,
                    workers=cfg.ray.train_workers,
                    resources=dict(cfg.tune.resources_per_trial),
                    max_failures=cfg.tune.max_failures,
                    logger=run,
                    storage=Storage(cfg.storage_path),
                    rel=f"{cfg.name}/tune-train/{trial.get_trial_id()}",
                    callbacks=[TuneReportCallback()],
                )
            else:
                train(
                    work,
                    on_epoch=on_epoch,
                    on_step=on_step if adaptive_enabled(cfg) else None,
                    placement=task_placement(),
                    log=lambda line: print(line, flush=True),
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def adaptive_enabled(cfg: Config) -> bool:
    """Whether the loss is ASL with its adaptive asymmetry on (step metrics to report)."""
    adaptive = getattr(cfg.loss.settings, "adaptive", None)
    return adaptive is not None and adaptive.enabled


def plot_trajectory(rows: list[dict[str, float]], path: Path, cfg: Config) -> Path:
    """γ− (or the margin) and Δp against the step, as the ASL paper's Fig. 9."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    adaptive = cfg.loss.settings.adaptive
    knob = "gamma_neg" if adaptive.adapt == "gamma_neg" else "clip"
    ax.plot(
        steps,
        [r[knob] for r in rows],
        color="#d62728",
        label="γ−" if knob == "gamma_neg" else "margin",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("γ−" if knob == "gamma_neg" else "margin m", color="#d62728")
    twin = ax.twinx()
    twin.plot(steps, [r["delta_p"] for r in rows], color="#1f77b4", label="Δp")
    twin.axhline(adaptive.target_gap, color="#1f77b4", linestyle="--", linewidth=1)
    twin.set_ylabel("Δp = p_t⁺ − p_t⁻ (dashed: target)", color="#1f77b4")
    ax.set_title("Adaptive asymmetry (ASL Eq. 11)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------
# Driver


def _reporter(cfg: Config):
    from ray import tune

    columns = {key: key.rsplit(".", 1)[-1][:12] for key in cfg.tune.space}
    return tune.CLIReporter(
        metric_columns={"val_mAP": "mAP", "epoch": "ep"},
        parameter_columns=columns,
        max_progress_rows=20,
        max_error_rows=5,
        max_column_length=12,
        # Tune's table is a dozen lines: every 15 s on a terminal, every minute in a log.
        max_report_frequency=15 if sys.stdout.isatty() else 60,
        sort_by_metric=True,
    )


def _sweep_state(storage: Storage, cfg: Config) -> dict | None:
    rel = f"{cfg.name}/sweep.json"
    return storage.read_json(rel) if storage.exists(rel) else None


@dataclass
class SweepOutcome:
    best_params: dict[str, Any]
    best_metric: float
    best_loss_file: Path
    parent_run_id: str | None
    table: list[dict[str, Any]]


def run_sweep(
    cfg: Config, *, resume: bool = False, out_dir: str | Path | None = None
) -> SweepOutcome:
    """Validate, start (or resume) the sweep, and write the results and the best loss file."""
    import ray

    from workflows.console import quiet_third_party

    quiet_third_party(cfg.verbose)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    parsed = validate_space(cfg)
    sweep: SweepConfig = cfg.tune
    storage = Storage(cfg.storage_path)
    tune_path = storage.uri_of(f"{cfg.name}/tune")
    state = _sweep_state(storage, cfg)
    if resume and state is None:
        raise ConfigError(f"--resume: no sweep named {cfg.name!r} under {cfg.storage_path}")

    tracker, parent = None, None
    if cfg.mlflow.enabled:
        if resume and state.get("parent_run_id"):
            uri = resolve_tracking_uri(cfg.mlflow)
            check_reachable(uri)
            client = MlflowClient(uri)
            client.update_run(state["parent_run_id"], status="RUNNING")
            tracker = Tracker(uri, state["experiment_id"], state["parent_run_id"])
            parent = RunLogger(client, state["parent_run_id"])
        else:
            tags = {
                "cpsd.kind": "sweep",
                "cpsd.space": ",".join(sweep.space),
                "mlflow.note.content": run_note(
                    f"Tune sweep over {', '.join(sweep.space)}: each trial is a child run."
                ),
            }
            params = {**flat_params(cfg), "git_commit": git_commit()}
            tracker, parent = start_parent(cfg.mlflow, cfg.name, params, tags)
    if not resume:
        storage.write_json(
            f"{cfg.name}/sweep.json",
            {
                "parent_run_id": tracker and tracker.parent_run_id,
                "experiment_id": tracker and tracker.experiment_id,
            },
        )

    # A custom, narrow reporter needs Tune's classic output mode.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    status = "FAILED"
    try:
        init_ray(cfg)
        cfg, placement = resolve_placement(cfg)
        # A trial's GPU default travels in its config (a worker group's workers read it too).
        cfg = dataclasses.replace(
            cfg,
            tune=dataclasses.replace(cfg.tune, resources_per_trial=trial_resources(cfg, placement)),
        )
        sweep = cfg.tune
        if parent is not None and not resume:  # a resumed sweep's run has them already
            parent.params(placement.params())
        resolve_dataset(cfg.data)  # generate the synth data once, before trials start
        context = SweepContext(cfg, tracker)
        if sweep.target == "student":
            context = _with_teachers(cfg, tracker)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, ctx=context),
            dict(sweep.resources_per_trial) if cfg.ray.train_workers == 1 else TRIAL_RESOURCES,
        )
        max_t = trial_epochs(cfg)
        if sweep.scheduler.name == "asha":
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_t,
                grace_period=min(sweep.scheduler.grace_period, max_t),
                reduction_factor=sweep.scheduler.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        if resume:
            tuner = tune.Tuner.restore(
                f"{tune_path}/{cfg.name}",
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(parsed, sweep.search),
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode=sweep.mode,
                    num_samples=1 if sweep.search == "grid" else sweep.num_samples,
                    scheduler=scheduler,
                    max_concurrent_trials=sweep.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=tune_path,
                    failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    progress_reporter=_reporter(cfg),
                    verbose=1,
                ),
            )
        results = tuner.fit()
        outcome = _finish(cfg, results, parsed, tracker, parent, storage, out_dir)
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            parent.client.set_terminated(parent.run_id, status=status)
        if ray.is_initialized() and not os.environ.get("RAY_ADDRESS") and not cfg.ray.address:
            ray.shutdown()


def trial_epochs(cfg: Config) -> int:
    """Epochs of one trial: the student's in a student sweep."""
    return student_config(cfg).train.epochs if cfg.tune.target == "student" else cfg.train.epochs


def _with_teachers(cfg: Config, tracker: Tracker | None) -> SweepContext:
    """Train (or reuse) the config's teachers and their logits through the stage graph; the
    trials' context then holds the config as run (with ``pretrain``: its backbone file)."""
    graph = StageGraph()
    ctx = JobContext(cfg, cfg.storage_path, tracker, cfg.name)
    # The plain baseline is not part of a student sweep.
    plain = configlib.replace(cfg, ["cpsd.train_baseline=false", "cpsd.control_ensemble=0"])
    try:
        refs = graph.teachers(graph.start(plain, dataclasses.replace(ctx, cfg=plain)))
        records = graph.wait(
            {**refs.teachers, **{f"{n}-logits": r for n, r in refs.logits.items()}}
        )
    except BaseException:
        graph.cancel()
        raise
    storage = Storage(cfg.storage_path)
    teachers = StudentTeachers(
        refs.specs,
        [storage.path(f"{records[s.name]['rel']}/{BEST}") for s in refs.specs],
        [storage.path(records[f"{s.name}-logits"]["file"]) for s in refs.specs]
        if refs.logits
        else None,
    )
    return SweepContext(dataclasses.replace(refs.cfg, cpsd=cfg.cpsd), tracker, teachers)


def _finish(cfg, results, parsed, tracker, parent, storage, out_dir) -> SweepOutcome:
    """Mark trial runs, write table/plot/best loss, log them on the parent run."""
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="cpsd-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    sweep = cfg.tune
    table = []
    for result in results:
        history = result.metrics_dataframe
        epochs = 0 if history is None or history.empty else int(history["epoch"].max())
        best = (
            math.nan
            if history is None or history.empty
            else float(history[sweep.metric].agg(sweep.mode))
        )
        row = {
            "trial_id": result.metrics.get("trial_id") if result.metrics else None,
            **{key: result.config.get(key) for key in parsed},
            f"best_{sweep.metric}": best,
            "epochs": epochs,
            "early_stopped": result.error is None and epochs < trial_epochs(cfg),
            "error": None if result.error is None else type(result.error).__name__,
        }
        table.append(row)
        if tracker is not None and row["trial_id"]:
            found = tracker.child_of(row["trial_id"])
            if found is not None:
                run_id = found.info.run_id
                client = tracker.client
                client.set_tag(run_id, "tune.status", "ERROR" if row["error"] else "TERMINATED")
                client.set_tag(run_id, "tune.early_stopped", str(row["early_stopped"]).lower())
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, status="FAILED" if row["error"] else "FINISHED")
    best = results.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="all")
    best_value = table_best(table, sweep)
    best_params = {key: best.config[key] for key in parsed}
    best_cfg = apply_params(cfg, best_params)
    source = f"mlflow-run:{parent.run_id}" if parent is not None else f"sweep:{cfg.name}"
    loss = configlib.to_dict(best_cfg.loss)
    loss["source"] = source
    best_file = out / BEST_LOSS_FILE
    best_file.write_text(
        f"# Best loss settings of sweep {cfg.name!r} ({sweep.metric} "
        f"{best_value:.4f}).\n"
        f"# Use in a pipeline config:  loss: !include {BEST_LOSS_FILE}\n"
        + yaml.safe_dump(loss, sort_keys=False)
    )
    csv_path = out / "results.csv"
    _write_csv(table, csv_path)
    plot = plot_sweep(table, list(parsed), f"best_{sweep.metric}", out / "sweep.png")
    for path in (best_file, csv_path, plot):
        storage.upload(path, f"{cfg.name}/{path.name}")
        if parent is not None:
            parent.artifact(path, "sweep")
    if parent is not None:
        parent.metrics({f"best_{sweep.metric}": best_value}, step=0)
    return SweepOutcome(best_params, best_value, best_file, parent and parent.run_id, table)


def table_best(table: list[dict[str, Any]], sweep: SweepConfig) -> float:
    values = [r[f"best_{sweep.metric}"] for r in table if not math.isnan(r[f"best_{sweep.metric}"])]
    return max(values) if sweep.mode == "max" else min(values)


def _write_csv(table: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def plot_sweep(table: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> Path:
    """One panel per swept key: each trial's best metric against its value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(keys), 3.4))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for stopped, marker, label in (
            (False, "o", "ran to the end"),
            (True, "x", "stopped early"),
        ):
            rows = [r for r in table if r["early_stopped"] == stopped and not math.isnan(r[metric])]
            values = [r[key] for r in rows]
            if values and not all(isinstance(v, int | float) for v in values):
                values = [str(v) for v in values]
            ax.scatter(values, [100 * r[metric] for r in rows], marker=marker, label=label)
        ax.set_xlabel(key)
        if i == 0:
            ax.set_ylabel(f"{metric} (%)")
            ax.legend(fontsize=7)
    fig.suptitle("Sweep: best validation mAP of each trial")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def command(cfg: Config, args: argparse.Namespace) -> None:
    """``cpsd tune``: run (or resume) the sweep and print its best settings."""
    validate_space(cfg)  # before Ray starts
    out = Path(args.out) if args.out else Path(cfg.storage_path) / cfg.name
    outcome = run_sweep(cfg, resume=args.resume, out_dir=out)
    print(f"\nbest {cfg.tune.metric}: {outcome.best_metric:.4f} with {outcome.best_params}")
    print(
        f"best loss settings: {outcome.best_loss_file}  (pipeline: loss: !include {BEST_LOSS_FILE})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(TUNE, command, argv)


if __name__ == "__main__":
    sys.exit(main())
