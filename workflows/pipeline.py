"""The CPSD pipeline as one Ray job: ``python -m workflows.pipeline --config FILE [--set k=v]``.

DAG (the ablation mode selects which stages run)::

    partitions ─┬─ teacher-cgp-0 ─ logits ─┐
                ├─ ...                      ├─ student ─ summary
                └─ teacher-dgp-<k-1> ─ logits ┘
    baseline (optional, in parallel with the teachers)

Every stage is a Ray task calling the same ``mlcore.cpsd`` functions as the sequential
reference run (``cpsd run-local``); nothing algorithmic lives here. Stages read and write
``<storage_path>/<name>/stages/<stage>-<key>/`` (local or s3://, gs:// through pyarrow.fs) and
pass only small records between each other: checkpoints and cached logits stay in storage.

A stage's key hashes the config fields and inputs it depends on, so rerunning a config skips
every stage whose output already exists, and a changed config reruns only what depends on the
change. A teacher whose worker dies is retried by Ray (``ray.max_retries``) and resumes from its
last epoch checkpoint; its MLflow run is found by key and resumed, never duplicated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlcore import configlib
from mlcore.configlib import ConfigError
from mlcore.cpsd import (
    ENSEMBLES,
    SUMMARY_COLUMNS,
    Partition,
    RunSummary,
    TeacherSpec,
    build_summary,
    cache_teacher_logits,
    compute_partitions,
    evaluate_split,
    plan_teachers,
    train_student,
    train_teacher,
)
from mlcore.data.manifest import manifest_digest, read_info
from mlcore.data.synth import config_hash
from mlcore.distill import LOGIT_STORE
from mlcore.experiment import resolve_dataset, train_classifier
from workflows.config import USER_ERRORS, Config, config_path, load_config
from workflows.distributed import Role, TrainingRun, model_resources, task_options, train_stage
from workflows.runtime import STOP, init_ray
from workflows.storage import Storage, WorkDir
from workflows.tracking import (
    NullRunLogger,
    Tracker,
    child_run,
    flat_params,
    git_commit,
    parent_run,
)

# ---------------------------------------------------------------------------------------------
# Stage keys


def dataset_id(cfg: Config) -> str:
    """Content identity of the dataset: the synth config hash, or the manifest's bytes."""
    if cfg.data.synth is not None:
        return "synth-" + config_hash(cfg.data.synth)
    return manifest_digest(cfg.data.root)


# Fields that change how fast or where something runs, not what it computes.
_NOT_CONTENT = {"cache_dir", "num_workers", "device", "num_threads", "eval_batch_size", "source"}


def _content(value: Any) -> Any:
    """A config section as plain data, without the fields that do not change results."""
    if not isinstance(value, dict):
        value = configlib.to_dict(value)
    if isinstance(value, dict):
        return {k: _content(v) for k, v in value.items() if k not in _NOT_CONTENT}
    return value


def stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Keys:
    """Content keys of every stage of one config."""

    partitions: str
    teachers: dict[str, str]
    student: str
    baseline: str


def _training_content(cfg: Config, epochs: int, data_id: str) -> list:
    train = dataclasses.replace(cfg.train, epochs=epochs)
    return [data_id, _content(cfg.data), _content(cfg.model), _content(cfg.loss), _content(train)]


def compute_keys(cfg: Config, data_id: str, specs: Sequence[TeacherSpec]) -> Keys:
    c = cfg.cpsd
    partitions = stage_key(
        "partitions", data_id, cfg.data.train_split, ENSEMBLES[c.mode], c.k, c.tau, c.partition_seed
    )
    teacher_epochs = c.teacher_epochs or cfg.train.epochs
    teachers = {
        s.name: stage_key(
            "teacher", s.name, list(s.subset), *_training_content(cfg, teacher_epochs, data_id)
        )
        for s in specs
    }
    full = _training_content(cfg, cfg.train.epochs, data_id)
    student = stage_key(
        "student",
        *full,
        c.mode,
        c.teacher_mode,
        c.cls_weight,
        c.kd_alpha,
        c.logits_dtype if c.teacher_mode == "cached" else None,
        [teachers[s.name] for s in specs],
    )
    return Keys(partitions, teachers, student, stage_key("baseline", *full))


# ---------------------------------------------------------------------------------------------
# What every task gets


@dataclass(frozen=True)
class JobContext:
    """Small and picklable: the config, where artifacts go, and where to log."""

    cfg: Config
    storage_uri: str
    tracker: Tracker | None

    def stage_rel(self, stage: str, key: str) -> str:
        return f"{self.cfg.name}/stages/{stage}-{key}"


def _placement() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "node_id": context.get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _print(line: str) -> None:
    # Ray prefixes worker output with the task name; flush so lines arrive as they happen.
    print(line, flush=True)


def _common_params(ctx: JobContext) -> dict[str, Any]:
    c = ctx.cfg.cpsd
    return {
        "mode": c.mode,
        "k": c.k,
        "tau": c.tau,
        "seed": ctx.cfg.train.seed,
        "git_commit": git_commit(),
        "loss_source": ctx.cfg.loss.source or "config",
        **flat_params(ctx.cfg.loss, "loss"),
        **flat_params(ctx.cfg.model, "model"),
        **flat_params(ctx.cfg.train, "train"),
    }


def _train_stage(
    ctx: JobContext,
    stage: str,
    key: str,
    params: dict[str, Any],
    run: TrainingRun,
    finish: Callable[[Path, Any], dict[str, Any]],
    role: Role = "student",
) -> dict[str, Any]:
    """Shared shell of every training stage: skip when done, resume, log, sync, mark done.

    ``run(workdir, on_epoch=, on_step=, placement=, log=)`` trains (in this task or on a Ray
    Train worker group, see ``workflows.distributed``) and returns a TrainResult;
    ``finish(workdir, result)`` adds stage-specific fields to the record.
    """
    storage = Storage(ctx.storage_uri)
    rel = ctx.stage_rel(stage, key)
    done = storage.done(rel)
    if done is not None:
        # Reused output: this job still gets a child run, pointing at where it came from.
        with child_run(ctx.tracker, key, stage, params) as logger:
            logger.tags({"cpsd.stage": stage, "cpsd.reused_from": rel})
            for row in done["history"]:
                logger.metrics(row, step=int(row["epoch"]))
        return {**done, "reused": True}
    work = WorkDir(storage, rel)
    try:
        placement = _placement()
        attempts_file = work.path / "attempts.json"
        attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
        resumed_from = None
        if (work.path / "last.pt").is_file():
            from mlcore.train import load_checkpoint

            resumed_from = int(load_checkpoint(work.path / "last.pt")["epoch"])
        attempts.append({**placement, "resumed_from_epoch": resumed_from, "time": time.time()})
        attempts_file.write_text(json.dumps(attempts, indent=1))
        # For operators (and the fault-injection test): which process trains this stage now.
        (work.path / "worker.pid").write_text(str(os.getpid()))
        work.sync()
        with child_run(ctx.tracker, key, stage, params) as logger:
            logger.tags(
                {
                    "cpsd.stage": stage,
                    "cpsd.attempt": len(attempts),
                    "ray.gpu_ids": ",".join(placement["gpu_ids"]) or "none",
                    "ray.host": placement["host"],
                }
            )

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                logger.metrics(metrics, step=epoch)
                work.sync()

            result = train_stage(
                ctx.cfg,
                role,
                run,
                work.path,
                storage=storage,
                rel=rel,
                on_epoch=on_epoch,
                logger=logger,
                log=_print,
            )
            if ctx.cfg.mlflow.log_checkpoints:
                logger.artifact(result.best_checkpoint, "checkpoints")
            record = {
                "stage": stage,
                "key": key,
                "rel": rel,
                "best_epoch": result.best_epoch,
                "metrics": result.best_metrics,
                "history": result.history,
                "attempts": attempts,
                "run_id": logger.run_id,
                "finished": time.time(),
                **finish(work.path, result),
            }
        work.sync()
        storage.mark_done(rel, record)
        return {**record, "reused": False}
    finally:
        work.close()


# ---------------------------------------------------------------------------------------------
# Stage functions (run inside Ray tasks; plain functions so tests can call them directly)


def partitions_stage(ctx: JobContext, key: str) -> dict[str, Any]:
    storage = Storage(ctx.storage_uri)
    rel = ctx.stage_rel("partitions", key)
    done = storage.done(rel)
    if done is not None:
        return done
    work = WorkDir(storage, rel)
    try:
        partitions = compute_partitions(ctx.cfg, resolve_dataset(ctx.cfg.data), work.path)
        record = {
            "rel": rel,
            "partitions": {k: dataclasses.asdict(p) for k, p in partitions.items()},
            "files": sorted(p.name for p in work.path.iterdir() if p.suffix in (".json", ".png")),
        }
        work.sync()
        storage.mark_done(rel, record)
        return record
    finally:
        work.close()


def teacher_stage(ctx: JobContext, spec: TeacherSpec, key: str) -> dict[str, Any]:
    names = read_info(resolve_dataset(ctx.cfg.data)).class_names
    params = {
        **_common_params(ctx),
        "teacher.kind": spec.kind,
        "teacher.index": spec.index,
        "teacher.num_classes": len(spec.subset),
        "teacher.classes": ",".join(names[c] for c in spec.subset),
        "teacher.epochs": ctx.cfg.cpsd.teacher_epochs or ctx.cfg.train.epochs,
    }
    return _train_stage(
        ctx,
        spec.name,
        key,
        params,
        lambda path, **hooks: train_teacher(ctx.cfg, spec, path, **hooks),
        lambda path, result: {"subset": list(spec.subset), "kind": spec.kind},
        role="teacher",
    )


def logits_stage(ctx: JobContext, spec: TeacherSpec, teacher: dict[str, Any]) -> dict[str, Any]:
    storage = Storage(ctx.storage_uri)
    rel = f"{teacher['rel']}/logits-{ctx.cfg.cpsd.logits_dtype}"
    done = storage.done(rel)
    if done is not None:
        return done
    work = WorkDir(storage, rel)
    try:
        checkpoint = storage.download(f"{teacher['rel']}/best.pt", work.path / "teacher.pt")
        cache_teacher_logits(ctx.cfg, spec, checkpoint, work.path / LOGIT_STORE)
        checkpoint.unlink()
        work.sync()
        record = {"rel": rel, "file": f"{rel}/{LOGIT_STORE}"}
        storage.mark_done(rel, record)
        return record
    finally:
        work.close()


def student_stage(
    ctx: JobContext,
    specs: Sequence[TeacherSpec],
    teachers: Sequence[dict[str, Any]],
    logits: Sequence[dict[str, Any]] | None,
    key: str,
) -> dict[str, Any]:
    storage = Storage(ctx.storage_uri)
    name = "student" if specs else "baseline"
    local: list[Path] = []

    def fetch(rels: Sequence[str], scratch: Path) -> list[Path]:
        # Local storage is read in place; remote files are fetched once for this attempt.
        out = []
        for i, rel in enumerate(rels):
            if storage.is_local:
                out.append(Path(storage.path(rel)))
            else:
                out.append(storage.download(rel, scratch / f"{i}-{Path(rel).name}"))
        return out

    def run(path: Path, **hooks):
        scratch = path / "inputs"
        checkpoints = fetch([f"{t['rel']}/best.pt" for t in teachers], scratch)
        logit_files = fetch([r["file"] for r in logits], scratch) if logits else None
        local.append(scratch)
        return train_student(
            ctx.cfg,
            specs,
            checkpoints,
            path,
            teacher_logits=logit_files,
            **hooks,
        )

    def finish(path: Path, result) -> dict[str, Any]:
        for scratch in local:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"shift": evaluate_split(ctx.cfg, result.best_checkpoint, "test_shift")}

    params = {
        **_common_params(ctx),
        "teachers": len(specs),
        "teacher_mode": ctx.cfg.cpsd.teacher_mode,
    }
    return _train_stage(ctx, name, key, params, run, finish)


def baseline_stage(ctx: JobContext, key: str) -> dict[str, Any]:
    return _train_stage(
        ctx,
        "baseline",
        key,
        _common_params(ctx),
        lambda path, **hooks: train_classifier(ctx.cfg, path, **hooks),
        lambda path, result: {
            "shift": evaluate_split(ctx.cfg, result.best_checkpoint, "test_shift")
        },
    )


# ---------------------------------------------------------------------------------------------
# Driver


def preflight(cfg: Config) -> int:
    """Checks that need no Ray: the data exists and k fits. Returns the number of classes."""
    if cfg.data.root is not None:
        num_classes = read_info(cfg.data.root).num_classes  # ManifestError names the problem
    elif cfg.data.synth.labels_from is not None:
        path = Path(cfg.data.synth.labels_from)
        if not path.is_file():
            raise ConfigError(f"data.synth.labels_from: no such file {path}")
        with np.load(path) as stats:
            key = "labels" if "labels" in stats else "class_counts"
            num_classes = int(stats[key].shape[-1])
    else:
        num_classes = cfg.data.synth.num_classes
    uses_partition = any(kind != "full" for kind in ENSEMBLES[cfg.cpsd.mode])
    if uses_partition and cfg.cpsd.k > num_classes:
        raise ConfigError(
            f"cpsd.k = {cfg.cpsd.k} is larger than the number of classes ({num_classes})"
        )
    return num_classes


def _wait_all(refs: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """ray.get with one progress line per finished stage."""
    import ray

    pending = {ref: name for name, ref in refs.items()}
    done: dict[str, Any] = {}
    started = time.time()
    while pending:
        # A timeout hands control back to Python every second, so SIGTERM/Ctrl-C handlers run.
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        if STOP.is_set():
            raise KeyboardInterrupt("stop requested")
        if not ready:
            continue
        name = pending.pop(ready[0])
        record = ray.get(ready[0])
        done[name] = record
        metrics = record.get("metrics", {})
        detail = f"val mAP {100 * metrics['val_mAP']:.2f}" if "val_mAP" in metrics else "done"
        where = record.get("attempts", [{}])[-1].get("gpu_ids") if record.get("attempts") else None
        log(
            f"  {name}: {detail}{' (reused)' if record.get('reused') else ''}"
            f"{f' gpu {where}' if where else ''}  [{len(done)}/{len(done) + len(pending)}, "
            f"{time.time() - started:.0f}s]"
        )
    return done


def write_summary(summary: RunSummary, out: Path) -> list[Path]:
    """summary.md, summary.csv and a bar plot of teacher/ensemble/student mAP."""
    import csv

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
    fig = Figure(figsize=(max(6, 0.6 * len(summary.rows)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [r["name"] for r in summary.rows]
    values = [100 * r["mAP"] for r in summary.rows]
    ax.bar(names, values, color=[colours[r["role"]] for r in summary.rows])
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("validation mAP (%)")
    ax.set_title("Teachers (own subsets), merged ensembles, student and baseline (all classes)")
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=120)
    return [out / "summary.md", out / "summary.csv", out / "summary.png"]


def run_pipeline(cfg: Config, *, log: Callable[[str], None] = print) -> RunSummary:
    """Run every stage of ``cfg`` on Ray; returns the summary (also printed and logged)."""
    import ray

    num_classes = preflight(cfg)
    data_id = dataset_id(cfg) if cfg.data.root else None
    storage = Storage(cfg.storage_path)
    tags = {"cpsd.mode": cfg.cpsd.mode, "cpsd.dataset": cfg.data.root or "synth"}
    params = {
        **flat_params(cfg),
        "git_commit": git_commit(),
        "loss_source": cfg.loss.source or "config",
    }
    tracking = (
        parent_run(cfg.mlflow, cfg.name, params, tags)
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    scratch = Path(
        tempfile.mkdtemp(prefix="cpsd-driver-")
    )  # driver-side copies, removed at the end
    try:
        with tracking as (tracker, parent):
            init_ray(cfg)
            # The synth dataset is generated (and cached) once here, before the fan-out.
            resolve_dataset(cfg.data)
            data_id = data_id or dataset_id(cfg)
            ctx = JobContext(cfg, cfg.storage_path, tracker)
            task = ray.remote(max_retries=cfg.ray.max_retries)
            outstanding: list = []
            try:
                keys0 = compute_keys(cfg, data_id, [])
                log(f"[{cfg.name}] mode {cfg.cpsd.mode}: label statistics and partitions")
                part_ref = task(partitions_stage).options(num_cpus=1).remote(ctx, keys0.partitions)
                outstanding = [part_ref]
                part_record = _wait_all({"partitions": part_ref}, log)["partitions"]
                partitions = {
                    k: Partition(v["kind"], tuple(v["assignment"]), v["report"])
                    for k, v in part_record["partitions"].items()
                }
                for name in part_record["files"]:
                    parent.artifact(
                        storage.download(f"{part_record['rel']}/{name}", scratch / name),
                        "partitions",
                    )
                specs = plan_teachers(partitions)
                keys = compute_keys(cfg, data_id, specs)

                teacher_res = model_resources(cfg, "teacher")
                refs = {
                    s.name: task(teacher_stage)
                    .options(name=s.name, **task_options(cfg, "teacher"))
                    .remote(ctx, s, keys.teachers[s.name])
                    for s in specs
                }
                baseline_ref = None
                if specs and cfg.cpsd.train_baseline:
                    baseline_ref = (
                        task(baseline_stage)
                        .options(name="baseline", **task_options(cfg, "student"))
                        .remote(ctx, keys.baseline)
                    )
                outstanding = [*refs.values(), *([baseline_ref] if baseline_ref else [])]
                if specs:
                    log(f"[{cfg.name}] {len(specs)} teachers in parallel ({teacher_res})")
                teachers = _wait_all(refs, log)
                teacher_records = [teachers[s.name] for s in specs]
                logit_records = None
                if specs and cfg.cpsd.teacher_mode == "cached":
                    log(f"[{cfg.name}] caching teacher logits")
                    logit_refs = {
                        s.name: task(logits_stage)
                        .options(name=f"{s.name}-logits", **teacher_res)
                        .remote(ctx, s, r)
                        for s, r in zip(specs, teacher_records, strict=True)
                    }
                    outstanding = list(logit_refs.values())
                    logit_done = _wait_all(logit_refs, log)
                    logit_records = [logit_done[s.name] for s in specs]
                student_name = "student" if specs else "baseline"
                log(f"[{cfg.name}] {student_name} on all {num_classes} classes")
                student_key = keys.student if specs else keys.baseline
                student_ref = (
                    task(student_stage)
                    .options(name=student_name, **task_options(cfg, "student"))
                    .remote(ctx, specs, teacher_records, logit_records, student_key)
                )
                outstanding = [student_ref, *([baseline_ref] if baseline_ref else [])]
                finals = _wait_all(
                    {
                        student_name: student_ref,
                        **({"baseline": baseline_ref} if baseline_ref else {}),
                    },
                    log,
                )
            except BaseException as err:
                # Interrupted, or a stage failed for good: stop the rest; their checkpoints stay,
                # and the parent run's exit marks their MLflow runs KILLED.
                reason = "interrupted" if isinstance(err, KeyboardInterrupt) else "a stage failed"
                log(f"[{cfg.name}] {reason}: cancelling running stages")
                for ref in outstanding:
                    ray.cancel(ref, force=True)
                raise

            teacher_dirs = [
                storage.download(
                    f"{r['rel']}/val_scores.npz", scratch / r["stage"] / "val_scores.npz"
                ).parent
                for r in teacher_records
            ]
            order = [student_name, *(["baseline"] if baseline_ref else [])]
            models = [(name, finals[name]["metrics"], finals[name].get("shift")) for name in order]
            summary = build_summary(
                specs, [r["metrics"] for r in teacher_records], teacher_dirs, num_classes, models
            )
            files = write_summary(summary, scratch / "summary")
            for path in files:
                parent.artifact(path, "summary")
                storage.upload(path, f"{cfg.name}/summary/{path.name}")
            for row in summary.rows:
                parent.metrics({f"{row['name']}.mAP": row["mAP"]}, step=0)
            storage.write_json(f"{cfg.name}/summary/summary.json", summary.rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workflows.pipeline", description="Run the CPSD pipeline on Ray."
    )
    parser.add_argument("--config", required=True, help="YAML config (or a bundled name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_path(args.config), args.overrides)
        summary = run_pipeline(cfg)
    except USER_ERRORS as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted; checkpoints kept, MLflow runs marked KILLED", file=sys.stderr)
        return 130
    print("\n" + summary.markdown())
    print(f"\nartifacts: {Path(cfg.storage_path) / cfg.name}")
    if cfg.mlflow.enabled:
        from workflows.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.mlflow)
        ui = (
            f"mlflow ui --host 127.0.0.1 --backend-store-uri {uri}"
            if uri.startswith("sqlite")
            else uri
        )
        print(f"MLflow: {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
