"""MLflow conventions: one parent run per job, nested child runs logged from wherever they run.

Everything goes through ``MlflowClient`` with explicit run ids, so a Ray worker on another node
logs to the same runs as the driver without any process-global MLflow state. A child run is
identified by its parent and a ``cpsd.key`` tag: a retried task finds its run and resumes it
instead of creating a duplicate. Runs are always terminated (FINISHED / FAILED / KILLED) in
``finally`` blocks; the driver sweeps children left RUNNING by workers that were killed.

Metric names are the same on every run (``val_mAP``, ``val_CF1``, ``val_OF1``, ``train_loss``,
...), with the epoch as step, so MLflow's compare view lines teachers and student up. MLflow
refuses ``@`` in a metric name, so the zero-shot ``zsl_F1@3`` is logged as ``zsl_F1_at_3``
(:func:`mlflow_metric_name`); files keep the ``@`` names.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from mlcore import configlib
from workflows.config import MlflowConfig, TrackingUnavailable

PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "cpsd.key"
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on a param value


def resolve_tracking_uri(cfg: MlflowConfig, cwd: str | os.PathLike | None = None) -> str:
    """An absolute tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else local SQLite.

    Ray workers run in another directory, so a relative ``sqlite:///mlflow.db`` would silently
    create a throwaway database per worker: relative SQLite paths are made absolute here.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    base = Path(cwd or os.getcwd())
    if not uri:
        return f"sqlite:///{(base / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path means a local SQLite file here
        return f"sqlite:///{(base / uri).resolve()}"
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingUnavailable(
                        f"MLflow at {uri}: /health answered {response.status}"
                    )
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable ({err}); start it or point "
                "mlflow.tracking_uri / MLFLOW_TRACKING_URI elsewhere"
            ) from err
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingUnavailable(f"MLflow SQLite store {uri}: {parent} is not a writable dir")


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """Get or create the experiment; local stores keep artifacts next to the database."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process: use theirs
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    """The commit of the code being run (``CPSD_GIT_COMMIT`` when there is no .git)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return os.environ.get("CPSD_GIT_COMMIT", "unknown")


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Config as ``dotted.key -> str`` params, values clipped to MLflow's limit."""
    flat = configlib.flatten(configlib.to_dict(config), prefix)
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flat.items()}


@dataclass(frozen=True)
class Tracker:
    """What a worker needs to log to the job's MLflow runs (small and picklable)."""

    uri: str
    experiment_id: str
    parent_run_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def find_child(self, key: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
            f"and tags.`{KEY_TAG}` = '{key}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_child(self, key: str, name: str, params: Mapping[str, Any] | None = None) -> str:
        """Create the child run ``name``, or resume it when a previous attempt made it."""
        client = self.client
        run_id = self.find_child(key)
        if run_id is None:
            tags = {KEY_TAG: key}
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            if params:
                log_params(client, run_id, params)
        else:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "cpsd.resumed", "true")
        return run_id

    @contextlib.contextmanager
    def child(
        self, key: str, name: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[RunLogger]:
        """A child run that ends FINISHED, FAILED or KILLED whatever happens inside."""
        run_id = self.start_child(key, name, params)
        with _terminating(self.client, run_id) as logger:
            yield logger

    def kill_running_children(self) -> int:
        """Mark children left RUNNING (their worker was killed) as KILLED; returns how many."""
        client = self.client
        runs = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
            "and attributes.status = 'RUNNING'",
        )
        for run in runs:
            client.set_terminated(run.info.run_id, status="KILLED")
        return len(runs)


def mlflow_metric_name(name: str) -> str:
    """``name`` in the characters MLflow accepts: ``F1@3`` becomes ``F1_at_3``."""
    return name.replace("@", "_at_")


@dataclass(frozen=True)
class RunLogger:
    """Logs to one run id."""

    client: MlflowClient
    run_id: str

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_metric_name(k), float(v), now, step)
            for k, v in values.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def params(self, values: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, values)

    def tags(self, values: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def log_params(client: MlflowClient, run_id: str, values: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


@contextlib.contextmanager
def _terminating(client: MlflowClient, run_id: str) -> Iterator[RunLogger]:
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield RunLogger(client, run_id)
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    except SystemExit as exit_:
        # Tune ends an early-stopped trial with sys.exit(0) inside tune.report.
        if exit_.code in (0, None):
            status = RunStatus.to_string(RunStatus.FINISHED)
        raise
    finally:
        client.set_terminated(run_id, status=status)


def start_parent(
    cfg: MlflowConfig, name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> tuple[Tracker, RunLogger]:
    """Check the store, create the job's parent run; returns the tracker for children."""
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        exp = experiment_id(client, uri, cfg.experiment)
        run = client.create_run(exp, run_name=name, tags=dict(tags))
    except Exception as err:
        raise TrackingUnavailable(f"MLflow at {uri} failed: {err}") from err
    log_params(client, run.info.run_id, params)
    return Tracker(uri, exp, run.info.run_id), RunLogger(client, run.info.run_id)


@contextlib.contextmanager
def parent_run(
    cfg: MlflowConfig, name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Iterator[tuple[Tracker, RunLogger]]:
    """The job's parent run; on any exit, children left RUNNING are marked KILLED."""
    tracker, logger = start_parent(cfg, name, params, tags)
    try:
        with _terminating(logger.client, logger.run_id):
            yield tracker, logger
    finally:
        tracker.kill_running_children()


class NullRunLogger:
    """Stands in for :class:`RunLogger` when tracking is off."""

    run_id = None

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        pass

    def params(self, values: Mapping[str, Any]) -> None:
        pass

    def tags(self, values: Mapping[str, Any]) -> None:
        pass

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass


def child_run(
    tracker: Tracker | None, key: str, name: str, params: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[RunLogger | NullRunLogger]:
    """``tracker.child(...)``, or a no-op logger when tracking is off."""
    if tracker is None:
        return contextlib.nullcontext(NullRunLogger())
    return tracker.child(key, name, params)
