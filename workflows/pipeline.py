"""The CPSD pipeline as one Ray job: ``python -m workflows.pipeline --config FILE [--set k=v]``.

The stages of one config (``workflows.stages``), submitted through the stage graph
(``workflows.graph``): partitions and the baseline first, then 2k teachers in parallel, each
teacher's logits as soon as it finishes, then the student; every model is selected on ``val``
and reported on the held-out ``test`` (and ``test_shift``) splits. Nothing algorithmic lives
here: every stage calls the same ``mlcore.cpsd`` functions as ``cpsd run-local``.

Stage outputs live in ``<storage_path>/<name>/stages/<stage>-<key>/`` (local, s3://, gs://);
a stage's key is the fingerprint of what it computes, so a rerun skips every finished stage,
a changed setting reruns only what depends on it, and an interrupted stage resumes from its
last epoch. MLflow gets a parent run per job and a child per stage (``cpsd.role`` tags).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mlcore.cpsd import RunSummary
from mlcore.data.loading import resolve_dataset
from workflows.autoscaling import resolve_placement, start_prewarm
from workflows.config import Config
from workflows.console import STAGE_LOG, ProgressLine, board, quiet_third_party
from workflows.driver import preflight, report_unsent, spill_dir_for
from workflows.entry import PIPELINE, job_main
from workflows.graph import StageGraph
from workflows.report import (
    collect,
    final_keys,
    log_ensembles,
    mlflow_link,
    summarise,
    write_summary,
)
from workflows.runtime import init_ray
from workflows.stages import JobContext
from workflows.storage import Storage
from workflows.tracking import (
    UNSENT_FILE,
    NullRunLogger,
    flat_params,
    git_commit,
    parent_run,
    replay_unsent,
    run_note,
    source_tags,
)
from workflows.versions import version_tags, versions


def run_pipeline(cfg: Config, *, log: Callable[[str], None] = print) -> RunSummary:
    """Run every stage of ``cfg`` on Ray; returns the summary (also written and logged)."""
    quiet_third_party(cfg.verbose)
    num_classes = preflight(cfg)
    storage = Storage(cfg.storage_path)
    tags = {
        "cpsd.mode": cfg.cpsd.mode,
        "cpsd.dataset": cfg.data.root or "synth",
        "mlflow.note.content": run_note(
            f"CPSD pipeline, mode {cfg.cpsd.mode}: its stages are the child runs (group by "
            "cpsd.role). `student.*` and `baseline.*` are their final keys; teachers cover only "
            "their own subset of the classes (num_classes_evaluated)."
        ),
        **source_tags("cpsd pipeline"),
    }
    params = {
        **flat_params(cfg),
        "git_commit": git_commit(),
        "loss_source": cfg.loss.source or "config",
    }
    tags.update(version_tags(versions()))
    spill = spill_dir_for(storage, cfg.name)
    tracking = (
        parent_run(
            cfg.mlflow, cfg.name, params, tags, spill_dir=spill, job=storage.uri_of(cfg.name)
        )
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    scratch = Path(tempfile.mkdtemp(prefix="cpsd-driver-"))  # driver-side copies
    try:
        with tracking as (tracker, parent):
            unsent = spill / UNSENT_FILE
            if tracker is not None and unsent.is_file() and replay_unsent(tracker.uri, unsent):
                log(f"[{cfg.name}] MLflow records an earlier run left unsent were sent")
            init_ray(cfg)
            # GPUs the cluster has or can add (workflows.autoscaling), decided once, here.
            cfg, placement = resolve_placement(cfg, log)
            parent.params(placement.params())
            # The synth dataset is generated (and cached) once here, before the fan-out.
            resolve_dataset(cfg.data)
            progress = board()
            ctx = JobContext(cfg, cfg.storage_path, tracker, cfg.name, progress)
            graph = StageGraph(log, ProgressLine(progress) if log is print else None)
            log(
                f"[{cfg.name}] epoch lines of each stage: "
                f"{storage.uri_of(ctx.stage_rel('<stage>', '<key>'))}/{STAGE_LOG}"
            )
            prewarm = start_prewarm(cfg, placement, graph, log)
            try:
                log(f"[{cfg.name}] mode {cfg.cpsd.mode}: partitions and baseline submitted")
                refs = graph.finish(graph.start(cfg, ctx))
                if refs.specs:
                    log(f"[{cfg.name}] {len(refs.specs)} teachers, each one's logits when done")
                records = collect(graph, refs)
                partitions = graph.wait(
                    {f"partition-{k}": r for k, r in refs.partitions.items()}, quiet=True
                )
            except BaseException as err:
                # Interrupted, or a stage failed for good: stop every outstanding stage; the
                # checkpoints stay, and the parent run's exit marks their MLflow runs KILLED.
                reason = "interrupted" if isinstance(err, KeyboardInterrupt) else "a stage failed"
                cancelled = graph.cancel()
                log(f"[{cfg.name}] {reason}: cancelled {cancelled} outstanding stages")
                raise
            finally:
                prewarm.close()
            for record in partitions.values():
                for name in record["files"]:
                    parent.artifact(
                        storage.download(f"{record['rel']}/{name}", scratch / name), "partitions"
                    )
            summary = summarise(refs, records, num_classes, scratch)
            files = write_summary(
                summary, scratch / "summary", title=f"{cfg.name}: {cfg.cpsd.mode}"
            )
            for path in files:
                parent.artifact(path, "summary")
                storage.upload(path, f"{cfg.name}/summary/{path.name}")
            try:
                log_ensembles(tracker, summary)
            except Exception as err:  # the store went away at the very end: the results stand
                log(
                    f"MLflow unreachable ({type(err).__name__}): the ensemble runs were not "
                    "recorded; rerunning the pipeline reuses every stage and records them"
                )
            for row in summary.rows:
                if row["role"] in ("student", "baseline"):
                    parent.metrics(
                        {f"{row['name']}.{k}": v for k, v in final_keys(row).items()}, step=0
                    )
            storage.write_json(f"{cfg.name}/summary/summary.json", summary.rows)
            if tracker is not None:
                try:
                    log(f"MLflow runs: {mlflow_link(tracker)}")
                except Exception as err:
                    log(f"MLflow unreachable ({type(err).__name__}): no runs-page link")
                report_unsent(storage, [r["rel"] for r in records.values()], log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def command(cfg: Config, args: argparse.Namespace) -> None:
    """``cpsd pipeline``: run the pipeline and print its summary."""
    summary = run_pipeline(cfg)
    print("\n" + summary.markdown())
    print(f"\nartifacts: {Path(cfg.storage_path) / cfg.name}")


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(PIPELINE, command, argv)


if __name__ == "__main__":
    sys.exit(main())
