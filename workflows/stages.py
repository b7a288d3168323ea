"""The CPSD stages as Ray task bodies: partitions, teachers, teacher logits, baseline, student.

Each stage is a plain function of a :class:`JobContext` and small records, calling the same
``mlcore.cpsd`` functions as the sequential reference run; ``workflows.graph`` decides where
and when each runs. A stage reads and writes ``<storage_path>/<namespace>/stages/<stage>-<key>/``
(local or s3://, gs:// through pyarrow.fs); only small JSON records travel between stages, while
checkpoints, scores and cached logits stay in storage.

A stage's key is the fingerprint of what it computes (``mlcore.fingerprint``), so a finished
stage is reused by any job that needs the same result, and a stage whose worker died resumes
from its last epoch checkpoint; its MLflow run is found by that key and continued, never
duplicated. Every training stage also scores its selected weights on the held-out splits
(``test``, ``test_shift``); that evaluation is keyed by the held-out data, so adding a test split
evaluates finished stages without retraining them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlcore.bundle import BUNDLE_FILE
from mlcore.cpsd import (
    Combination,
    TeacherSpec,
    cache_teacher_logits,
    control_config,
    evaluate_combination,
    evaluate_model,
    held_out_splits,
    student_config,
    teacher_config,
    train_student,
    train_teacher,
)
from mlcore.data.loading import OpenDataset, open_dataset
from mlcore.distill import LOGIT_STORE
from mlcore.experiment import train_classifier
from mlcore.fingerprint import split_digest, stable_hash
from mlcore.partition.kinds import Partition, label_partition, label_statistics
from mlcore.pretrain import BACKBONE_FILE, export_backbone, pretrain_config
from mlcore.train import BEST, LAST, SCORES, TrainResult, load_checkpoint
from workflows.config import Config
from workflows.console import STAGE_LOG, post_end, post_epoch, stage_log
from workflows.distributed import Role, TrainingRun, train_stage, train_workers
from workflows.runtime import device_for_task
from workflows.storage import Storage, WorkDir
from workflows.tracking import (
    NOTE_TAG,
    UNSENT_FILE,
    Tracker,
    child_run,
    final_metrics_of,
    flat_params,
    git_commit,
    replay_unsent,
    run_note,
)
from workflows.versions import StaleStageError, stale_reason, version_tags, versions


@dataclass(frozen=True)
class JobContext:
    """Small and picklable: the config, where artifacts go, and where to log.

    ``namespace`` is the folder under ``storage_path`` whose ``stages/`` the job reads and
    writes: the pipeline's ``name``, or the study's, whose variants then share stages.
    """

    cfg: Config
    storage_uri: str
    tracker: Tracker | None
    namespace: str
    progress: Any = None  # a workflows.console.ProgressBoard actor, where stages post epochs

    def stage_rel(self, stage: str, key: str) -> str:
        return f"{self.namespace}/stages/{stage}-{key}"


def partition_key(cfg: Config, dataset: OpenDataset, kind: str) -> str:
    c, data = cfg.cpsd, cfg.data
    train = split_digest(dataset.root, [data.train_split], data.cache_dir)
    k = 1 if kind == "full" else c.k
    return stable_hash("partition", kind, train, k, c.tau, c.partition_seed)


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


def _common_params(cfg: Config) -> dict[str, Any]:
    c = cfg.cpsd
    return {
        "mode": c.mode,
        "k": c.k,
        "tau": c.tau,
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "loss_source": cfg.loss.source or "config",
        **flat_params(cfg.loss, "loss"),
        **flat_params(cfg.model, "model"),
        **flat_params(cfg.train, "train"),
    }


# ---------------------------------------------------------------------------------------------
# Partitions


def _computed_once(
    ctx: JobContext, storage: Storage, rel: str, label: str, compute: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The record of a stage without a model (a partition, a teacher's logits): reused when
    done, else computed under the stage's lock and marked done with the code's versions."""
    done = _finished(ctx, storage, rel, locked=False)
    if done is None:
        with storage.lock(rel, on_wait=_waiting(label)):
            done = _finished(ctx, storage, rel, locked=True)
            if done is None:
                record = {**compute(), "versions": versions()}
                storage.mark_done(rel, record)
                return record
    if "stale" in done:
        _print(f"{rel}: reused, {done['stale']} (--retrain-stale computes it again)")
    return done


def partition_stage(ctx: JobContext, kind: str, key: str) -> dict[str, Any]:
    """One label partition (``cgp``, ``dgp``, ``random`` or ``full``): JSON and heatmap."""
    storage = Storage(ctx.storage_uri)
    rel = ctx.stage_rel(f"partition-{kind}", key)
    cfg = ctx.cfg

    def compute() -> dict[str, Any]:
        work = WorkDir(storage, rel)
        try:
            dataset = open_dataset(cfg.data, with_bytes=False)
            partition = label_partition(
                kind,
                label_statistics(dataset.root, cfg.data.train_split, dataset.class_names),
                k=cfg.cpsd.k,
                tau=cfg.cpsd.tau,
                seed=cfg.cpsd.partition_seed,
                json_path=work.path / f"partition_{kind}.json",
                png_path=work.path / f"partition_{kind}.png",
            )
            files = sorted(p.name for p in work.path.iterdir() if p.suffix in (".json", ".png"))
            work.sync()
            return {"rel": rel, "partition": dataclasses.asdict(partition), "files": files}
        finally:
            work.close()

    return _computed_once(ctx, storage, rel, f"partition-{kind}", compute)


def partition_of(record: dict[str, Any]) -> Partition:
    p = record["partition"]
    return Partition(p["kind"], tuple(p["assignment"]), p["report"])


# ---------------------------------------------------------------------------------------------
# The shell of every training stage


def _held_out(
    storage: Storage,
    rel: str,
    model_cfg: Config,
    dataset: OpenDataset,
    class_subset: Sequence[int] | None,
    *,
    workdir: Path | None = None,
    done: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, float]], str]:
    """Held-out reports of a stage's selected weights and the digest of the held-out data.

    A stage being trained is evaluated in its ``workdir``. A finished stage (``done``) is
    evaluated again only when that data changed since (a test split was added), without
    retraining: its checkpoint is fetched, the new scores are written back.
    """
    _, digest = held_out_splits(dataset)
    if workdir is not None:
        reports = evaluate_model(
            model_cfg, dataset, workdir / BEST, workdir, class_subset=class_subset
        )
        return reports, digest
    if done is not None and done.get("held_out_digest") == digest:
        return done["held_out"], digest
    work = WorkDir(storage, rel, files=[BEST])
    try:
        reports = evaluate_model(
            model_cfg, dataset, work.path / BEST, work.path, class_subset=class_subset
        )
        work.sync()
        return reports, digest
    finally:
        work.close()


def _finished(
    ctx: JobContext, storage: Storage, rel: str, *, locked: bool
) -> dict[str, Any] | None:
    """The stage's success record, unless it is stale and config ``stale`` says retrain
    (``workflows.versions``); with ``stale: error`` a stale stage stops the job. A stale record
    comes back marked ``stale`` (the reason). Only a caller that holds the stage's lock
    (``locked``) clears a stale stage for retraining."""
    done = storage.done(rel)
    if done is None:
        return None
    reason = stale_reason(done)
    if reason is None:
        return done
    if ctx.cfg.stale == "error":
        raise StaleStageError(
            f"{rel} was {reason}; rerun with --retrain-stale (stale: retrain) to train it "
            "again, or stale: reuse to keep it"
        )
    if ctx.cfg.stale == "retrain":
        if locked:
            _print(f"{rel}: {reason}; retraining it (stale: retrain)")
            storage.clear(rel)
        return None
    return {**done, "stale": reason}


def _waiting(stage: str) -> Callable[[str], None]:
    return lambda holder: _print(f"{stage}: waiting for {holder}, which is training it")


def _train_stage(
    ctx: JobContext,
    stage: str,
    key: str,
    params: dict[str, Any],
    model_cfg: Config,
    dataset: OpenDataset,
    run: TrainingRun,
    *,
    role: str,
    class_subset: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Skip when done, else train (resuming), log, evaluate on held-out splits, mark done.

    ``dataset`` is the stage's data, opened once by the stage for all of this; the model
    outputs ``class_subset`` (None: all the dataset's classes).

    ``run(workdir, **hooks)`` trains into ``workdir`` and returns the TrainResult, in this task
    or on a Ray Train worker group (``workflows.distributed.train_stage``). One process at a
    time works on a stage folder (``Storage.lock``): a second driver that needs the same stage
    waits for the first and then reuses its result.
    """
    storage = Storage(ctx.storage_uri)
    rel = ctx.stage_rel(stage, key)
    done = _finished(ctx, storage, rel, locked=False)
    _, digest = held_out_splits(dataset)
    unsent = f"{rel}/{UNSENT_FILE}"
    if done is None or done.get("held_out_digest") != digest or storage.exists(unsent):
        with storage.lock(rel, on_wait=_waiting(stage)):
            done = _finished(ctx, storage, rel, locked=True)
            if done is None:
                return _train_locked(
                    ctx, storage, rel, stage, key, params, model_cfg, dataset, run, role,
                    class_subset,
                )  # fmt: skip
            held_out, digest = _held_out(storage, rel, model_cfg, dataset, class_subset, done=done)
            if digest != done.get("held_out_digest"):
                done = {**done, "held_out": held_out, "held_out_digest": digest}
                storage.mark_done(rel, {k: v for k, v in done.items() if k != "stale"})
            _send_unsent(ctx, storage, rel)
    if "stale" in done:
        _print(f"{rel}: reused, {done['stale']} (--retrain-stale trains it again)")
    # Reused output: this job gets a small run of its own pointing at the run that trained it,
    # which is left as it was.
    with child_run(
        ctx.tracker,
        key,
        stage,
        params,
        reused=True,
        location=storage.uri_of(rel),
        reused_run=done.get("run_id"),
    ) as logger:
        logger.tags(
            {
                "cpsd.stage": stage,
                "cpsd.role": role,
                "cpsd.reused_from": rel,
                NOTE_TAG: run_note(
                    f"{role} {stage}, reused: trained earlier (run {done.get('run_id')}, folder "
                    f"{rel}); its history and final keys are repeated here, its model and "
                    "datasets are on that run."
                ),
            }
        )
        logger.tags(version_tags(done.get("versions") or {}))
        if "stale" in done:
            logger.tags({"cpsd.stale": done["stale"]})
        for row in done["history"]:
            logger.metrics(row, step=int(row["epoch"]))
        logger.metrics(_final(done), step=done["best_epoch"])
    return {**done, "reused": True}


def _send_unsent(ctx: JobContext, storage: Storage, rel: str) -> None:
    """Send what an earlier attempt could not (its ``unsent-mlflow.json``) to its run."""
    if ctx.tracker is None or not storage.exists(f"{rel}/{UNSENT_FILE}"):
        return
    with tempfile.TemporaryDirectory(prefix="cpsd-unsent-") as scratch:
        local = storage.download(f"{rel}/{UNSENT_FILE}", Path(scratch) / UNSENT_FILE)
        if replay_unsent(ctx.tracker.uri, local):
            if storage.exists(f"{rel}/{UNSENT_FILE}"):  # remote: the local copy was deleted
                storage.fs.delete_file(storage.path(f"{rel}/{UNSENT_FILE}"))
            _print(f"{rel}: MLflow records left unsent by an earlier run were sent")


def _train_locked(
    ctx: JobContext,
    storage: Storage,
    rel: str,
    stage: str,
    key: str,
    params: dict[str, Any],
    model_cfg: Config,
    dataset: OpenDataset,
    run: TrainingRun,
    role: str,
    class_subset: Sequence[int] | None,
) -> dict[str, Any]:
    """Train the stage (this process holds its lock) and mark it done."""
    classes = dataset.num_classes if class_subset is None else len(class_subset)
    work = WorkDir(storage, rel)
    try:
        placement = _placement()
        attempts_file = work.path / "attempts.json"
        attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
        resumed_from = None  # the last finished epoch, counted from 1
        if (work.path / LAST).is_file():
            resumed_from = int(load_checkpoint(work.path / LAST)["epoch"]) + 1
        attempts.append({**placement, "resumed_from_epoch": resumed_from, "time": time.time()})
        attempts_file.write_text(json.dumps(attempts, indent=1))
        # For operators (and the fault-injection test): which process trains this stage now.
        (work.path / "worker.pid").write_text(str(os.getpid()))
        work.sync()
        made_by = versions()
        with child_run(
            ctx.tracker, key, stage, params, spill_dir=work.path, location=storage.uri_of(rel)
        ) as logger:
            logger.tags(
                {
                    "cpsd.stage": stage,
                    "cpsd.role": role,
                    "cpsd.attempt": len(attempts),
                    "ray.gpu_ids": ",".join(placement["gpu_ids"]) or "none",
                    "ray.host": placement["host"],
                    **version_tags(made_by),
                }
            )

            def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
                logger.metrics(metrics, step=epoch)
                post_epoch(ctx.progress, label, epoch, model_cfg.train.epochs)
                work.sync()

            label = f"{stage}@{key[:4]}"  # variants of a study share stage names
            post_epoch(ctx.progress, label, resumed_from or 0, model_cfg.train.epochs)
            try:
                with stage_log(work.path, ctx.cfg.verbose):
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
            finally:
                post_end(ctx.progress, label)
            held_out, digest = _held_out(
                storage, rel, model_cfg, dataset, class_subset, workdir=work.path
            )
            record = {
                "stage": stage,
                "role": role,
                "classes": classes,
                "key": key,
                "rel": rel,
                "best_epoch": result.best_epoch,
                "metrics": result.best_metrics,
                "history": result.history,
                "held_out": held_out,
                "held_out_digest": digest,
                "attempts": attempts,
                "run_id": logger.run_id,
                "versions": made_by,
                "finished": time.time(),
            }
            # The final keys first: whatever happens to the model's logging, the run has them.
            logger.metrics(_final(record), step=record["best_epoch"])
            _record_model(ctx, logger, record, model_cfg, dataset, work.path, role)
            if ctx.cfg.mlflow.log_checkpoints:
                logger.artifact(result.best_checkpoint, "checkpoints")
            logger.artifact(work.path / STAGE_LOG, "logs")  # the epoch lines, beside the run
        # The run id is known once the logger created the run (possibly only now, after an
        # outage); unsent records are in the stage folder by here.
        record["run_id"] = logger.run_id
        work.sync()
        storage.mark_done(rel, record)
        return {**record, "reused": False}
    finally:
        work.close()


def _final(record: dict[str, Any]) -> dict[str, float]:
    """The keys every stage run ends with, so runs compare side by side."""
    return final_metrics_of(
        record["metrics"]["val_mAP"], record["best_epoch"], record["classes"], record["held_out"]
    )


def _record_model(
    ctx: JobContext,
    logger: Any,
    record: dict[str, Any],
    cfg: Config,
    dataset: OpenDataset,
    workdir: Path,
    role: str,
) -> None:
    """Description, datasets, the MLflow model and (student, baseline) a registry version on
    the stage's run, through the logger's buffer: an outage delays them, a failure is retried,
    and what never arrives is spilled with the stage's other unsent records."""
    if ctx.tracker is None:
        return
    data = cfg.data
    splits = {data.train_split: "training", data.val_split: "validation"}
    if "test" in record["held_out"]:
        splits[data.test_split] = "test"
    what = "its own subset of" if role == "teacher" else "all"
    bundle = workdir / BUNDLE_FILE
    log_models = ctx.cfg.mlflow.log_models and bundle.is_file()
    if ctx.cfg.mlflow.log_models and not log_models:
        # A stage trained on a Ray Train worker group writes no bundle yet (known gap): its
        # run still gets the description, datasets and final keys.
        _print(f"{record['rel']}: no {BUNDLE_FILE}, so no MLflow model for this stage")
    logger.model(
        role=role,
        stage=record["stage"],
        description=(
            f"{role}: {record['classes']} classes ({what} the task's classes). "
            "best_val_mAP is the selected epoch on val (the better of val_mAP_plain, the "
            "trained weights, and val_mAP_ema, their moving average); test_* and shift_mAP "
            "score that epoch on the held-out splits, over num_classes_evaluated classes."
        ),
        bundle=str(bundle),
        final=_final(record),
        best_epoch=record["best_epoch"],
        dataset_root=str(dataset.root),
        splits=splits,
        log_models=log_models,
        registered_model=(
            ctx.cfg.mlflow.registered_model
            if log_models and role in ("student", "baseline")
            else None
        ),
        log_final=False,
    )


# ---------------------------------------------------------------------------------------------
# Teachers, their logits, the baseline and the student


def _on_assigned_device(ctx: JobContext, what: str, role: Role) -> JobContext:
    """The device this task's GPUs decide; a worker group's workers pick their own."""
    if train_workers(ctx.cfg, role) > 1:
        return ctx
    return dataclasses.replace(ctx, cfg=device_for_task(ctx.cfg, what))


def teacher_stage(ctx: JobContext, spec: TeacherSpec, key: str) -> dict[str, Any]:
    ctx = _on_assigned_device(ctx, spec.name, "teacher")
    cfg = teacher_config(ctx.cfg, spec)
    dataset = open_dataset(cfg.data)
    names = dataset.class_names
    params = {
        **_common_params(cfg),
        "teacher.kind": spec.kind,
        "teacher.index": spec.index,
        "teacher.num_classes": len(spec.subset),
        "teacher.classes": ",".join(names[c] for c in spec.subset),
        "teacher.epochs": cfg.train.epochs,
    }
    record = _train_stage(
        ctx,
        spec.name,
        key,
        params,
        cfg,
        dataset,
        lambda path, **hooks: train_teacher(ctx.cfg, dataset, spec, path, **hooks),
        role="teacher",
        class_subset=spec.subset,
    )
    return {**record, "subset": list(spec.subset), "kind": spec.kind}


def logits_stage(ctx: JobContext, spec: TeacherSpec, teacher: dict[str, Any]) -> dict[str, Any]:
    """The teacher's logits on every training image; runs as soon as that teacher is done."""
    ctx = dataclasses.replace(ctx, cfg=device_for_task(ctx.cfg, f"{spec.name}-logits"))
    storage = Storage(ctx.storage_uri)
    rel = f"{teacher['rel']}/logits-{ctx.cfg.cpsd.logits_dtype}"

    def compute() -> dict[str, Any]:
        work = WorkDir(storage, rel)
        scratch = Path(tempfile.mkdtemp(prefix="cpsd-logits-"))
        try:
            checkpoint = storage.download(f"{teacher['rel']}/{BEST}", scratch / BEST)
            dataset = open_dataset(ctx.cfg.data)
            cache_teacher_logits(ctx.cfg, dataset, spec, checkpoint, work.path / LOGIT_STORE)
            work.sync()
            return {"rel": rel, "file": f"{rel}/{LOGIT_STORE}"}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            work.close()

    return _computed_once(ctx, storage, rel, f"{spec.name}-logits", compute)


def baseline_stage(ctx: JobContext, key: str) -> dict[str, Any]:
    ctx = _on_assigned_device(ctx, "baseline", "baseline")
    dataset = open_dataset(ctx.cfg.data)
    return _train_stage(
        ctx,
        "baseline",
        key,
        _common_params(ctx.cfg),
        ctx.cfg,
        dataset,
        lambda path, **hooks: train_classifier(ctx.cfg, dataset, path, **hooks),
        role="baseline",
    )


def student_stage(
    ctx: JobContext,
    specs: Sequence[TeacherSpec],
    key: str,
    teachers: Sequence[dict[str, Any]],
    logits: Sequence[dict[str, Any]] | None,
    baseline: dict[str, Any] | None,
) -> dict[str, Any]:
    """The student, distilled from the teachers' cached logits or the teachers themselves."""
    ctx = _on_assigned_device(ctx, "student", "student")
    storage = Storage(ctx.storage_uri)
    cfg = ctx.cfg
    c = cfg.cpsd
    dataset = open_dataset(cfg.data)

    def run(path: Path, **hooks) -> TrainResult:
        # Inputs go to a scratch folder of this attempt, never into the synced stage folder
        # (on object storage that would upload every teacher checkpoint after each epoch).
        # Local storage is read in place.
        scratch = Path(tempfile.mkdtemp(prefix="cpsd-student-inputs-"))
        try:

            def fetch(rels: Sequence[str]) -> list[Path]:
                if storage.is_local:
                    return [Path(storage.path(rel)) for rel in rels]
                return [
                    storage.download(rel, scratch / f"{i}-{Path(rel).name}")
                    for i, rel in enumerate(rels)
                ]

            cached = c.teacher_mode == "cached"
            checkpoints = [] if cached else fetch([f"{t['rel']}/{BEST}" for t in teachers])
            logit_files = fetch([r["file"] for r in logits]) if cached and logits else None
            init = None
            if c.student_init == "baseline" and baseline is not None:
                init = fetch([f"{baseline['rel']}/{BEST}"])[0]
            return train_student(
                cfg,
                dataset,
                specs,
                path,
                teacher_checkpoints=checkpoints,
                teacher_logits=logit_files,
                baseline_checkpoint=init,
                **hooks,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    params = {
        **_common_params(student_config(cfg)),
        "teachers": len(specs),
        "teacher_mode": c.teacher_mode,
        "kd_reduction": c.kd_reduction,
        "student_init": c.student_init or "model",
        "cls_weight": c.cls_weight,
        "kd_alpha": c.kd_alpha,
    }
    return _train_stage(
        ctx, "student", key, params, student_config(cfg), dataset, run, role="student"
    )


def control_stage(ctx: JobContext, index: int, key: str) -> dict[str, Any]:
    """Control model ``index`` of ``cpsd.control_ensemble``: the baseline with another seed."""
    stage = f"control-{index}"
    ctx = _on_assigned_device(ctx, stage, "baseline")
    cfg = control_config(ctx.cfg, index)
    dataset = open_dataset(cfg.data)
    return _train_stage(
        ctx,
        stage,
        key,
        _common_params(cfg),
        cfg,
        dataset,
        lambda path, **hooks: train_classifier(cfg, dataset, path, **hooks),
        role="control",
    )


def pretrain_stage(ctx: JobContext, key: str) -> dict[str, Any]:
    """The upstream model (``pretrain``); its backbone weights go to ``backbone.pt`` beside it,
    the file every downstream model starts from."""
    ctx = _on_assigned_device(ctx, "pretrain", "baseline")
    cfg = pretrain_config(ctx.cfg)
    dataset = open_dataset(cfg.data)
    record = _train_stage(
        ctx,
        "pretrain",
        key,
        _common_params(cfg),
        cfg,
        dataset,
        lambda path, **hooks: train_classifier(cfg, dataset, path, **hooks),
        role="pretrain",
    )
    storage = Storage(ctx.storage_uri)
    backbone = f"{record['rel']}/{BACKBONE_FILE}"
    if not storage.exists(backbone):
        scratch = Path(tempfile.mkdtemp(prefix="cpsd-pretrain-"))
        try:
            checkpoint = storage.download(f"{record['rel']}/{BEST}", scratch / BEST)
            storage.upload(export_backbone(ctx.cfg, checkpoint, scratch / BACKBONE_FILE), backbone)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return {**record, "backbone": storage.path(backbone)}


def combination_stage(
    ctx: JobContext,
    name: str,
    key: str,
    groups: Sequence[Sequence[tuple[dict[str, Any], Sequence[int]]]],
    weights: Sequence[float],
) -> dict[str, Any]:
    """A combination of trained models' logits (``ensemble-target``, ``ensemble-baseline``),
    scored on val and the held-out splits; ``groups`` holds (stage record, class subset)."""
    ctx = dataclasses.replace(ctx, cfg=device_for_task(ctx.cfg, name))
    storage = Storage(ctx.storage_uri)
    rel = ctx.stage_rel(name, key)

    def compute() -> dict[str, Any]:
        work = WorkDir(storage, rel)
        scratch = Path(tempfile.mkdtemp(prefix="cpsd-combination-"))
        try:
            members = tuple(
                tuple(
                    (str(storage.download(f"{r['rel']}/{BEST}", scratch / f"{g}-{i}.pt")), tuple(s))
                    for i, (r, s) in enumerate(group)
                )
                for g, group in enumerate(groups)
            )
            combination = Combination(members, tuple(weights))
            dataset = open_dataset(ctx.cfg.data)
            reports = evaluate_combination(ctx.cfg, dataset, combination, work.path)
            work.sync()
            return {
                "stage": name,
                "rel": rel,
                "key": key,
                "reports": reports,
                # What the graph's progress lines read.
                "metrics": {"val_mAP": reports["val"]["mAP"]},
                "held_out": {r: reports[r] for r in ("test", "shift") if reports[r] is not None},
            }
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            work.close()

    return _computed_once(ctx, storage, rel, name, compute)


def download_scores(storage: Storage, record: dict[str, Any], scratch: Path) -> Path:
    """A stage's score files (val and held-out) in a local folder, for merging ensembles."""
    local = scratch / record["stage"]
    for name in (SCORES, "scores-test.npz", "scores-shift.npz"):
        if storage.exists(f"{record['rel']}/{name}"):
            storage.download(f"{record['rel']}/{name}", local / name)
    return local
