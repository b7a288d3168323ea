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

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mlcore.configlib import ConfigError
from mlcore.cpsd import ENSEMBLES, RunSummary
from mlcore.data.manifest import read_info
from mlcore.experiment import resolve_dataset
from workflows.autoscaling import resolve_placement, start_prewarm
from workflows.config import USER_ERRORS, Config, config_arg_parser, config_path, load_config
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
from workflows.tracking import NullRunLogger, flat_params, git_commit, parent_run, source_tags


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


def spill_dir_for(storage: Storage, name: str) -> Path:
    """Where the job's own unsent MLflow records go: its storage folder, or on object
    storage a local folder of the driver (``./mlflow-unsent/<name>``)."""
    if storage.is_local:
        return Path(storage.path(name))
    return Path.cwd() / "mlflow-unsent" / name


def run_pipeline(cfg: Config, *, log: Callable[[str], None] = print) -> RunSummary:
    """Run every stage of ``cfg`` on Ray; returns the summary (also written and logged)."""
    num_classes = preflight(cfg)
    storage = Storage(cfg.storage_path)
    tags = {
        "cpsd.mode": cfg.cpsd.mode,
        "cpsd.dataset": cfg.data.root or "synth",
        "mlflow.note.content": (
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
    tracking = (
        parent_run(cfg.mlflow, cfg.name, params, tags, spill_dir=spill_dir_for(storage, cfg.name))
        if cfg.mlflow.enabled
        else contextlib.nullcontext((None, NullRunLogger()))
    )
    scratch = Path(tempfile.mkdtemp(prefix="cpsd-driver-"))  # driver-side copies
    try:
        with tracking as (tracker, parent):
            init_ray(cfg)
            # GPUs the cluster has or can add (workflows.autoscaling), decided once, here.
            cfg, placement = resolve_placement(cfg, log)
            parent.params(placement.params())
            # The synth dataset is generated (and cached) once here, before the fan-out.
            resolve_dataset(cfg.data)
            ctx = JobContext(cfg, cfg.storage_path, tracker, cfg.name)
            graph = StageGraph(log)
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
            log_ensembles(tracker, summary)
            for row in summary.rows:
                if row["role"] in ("student", "baseline"):
                    parent.metrics(
                        {f"{row['name']}.{k}": v for k, v in final_keys(row).items()}, step=0
                    )
            storage.write_json(f"{cfg.name}/summary/summary.json", summary.rows)
            if tracker is not None:
                log(f"MLflow runs: {mlflow_link(tracker)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = config_arg_parser(
        "python -m workflows.pipeline", "Run the CPSD pipeline on Ray."
    ).parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
