"""MLflow conventions: one parent run per job, nested child runs logged from wherever they run.

Everything goes through ``MlflowClient`` with explicit run ids, so a Ray worker on another node
logs to the same runs as the driver without any process-global MLflow state. A child run is
identified by its parent and a ``cpsd.key`` tag: a retried task finds its run and resumes it
instead of creating a duplicate. Runs are always terminated (FINISHED / FAILED / KILLED) in
``finally`` blocks; the driver sweeps children left RUNNING by workers that were killed.

Which run a stage continues. A stage run carries its stage's storage location
(``cpsd.location``, the URI of its stage folder) and is continued only by a later attempt at that
same location, and only while it is not FINISHED: a pipeline writing to another storage path, or
one that finds the stage done, never logs into another job's run. A reused stage gets a small
run of its own under the new parent, tagged with the original run's id (``cpsd.reused_run``).
A parent records its job (``cpsd.job``: storage and name) and its driver (host, pid and process
start time); a later driver of the same job marks parents whose driver is gone KILLED.

Metric names are the same on every run (``val_mAP``, ``val_CF1``, ``val_OF1``, ``train_loss``,
...), with the epoch as step, so MLflow's compare view lines teachers and student up. MLflow
refuses ``@`` in a metric name, so the zero-shot ``zsl_F1@3`` is logged as ``zsl_F1_at_3``
(:func:`mlflow_metric_name`); files keep the ``@`` names.

Training never waits on tracking. A :class:`RunLogger` whose server is unreachable keeps the
metrics, tags and artifacts it could not send, warns once, and sends them, in order, on a later
call once the server answers again; at the end of a stage it retries for
``FLUSH_TIMEOUT_S`` and then writes what is still unsent to ``unsent-mlflow.json`` in the
stage folder, so nothing is lost. MLflow's own HTTP retries (minutes of back-off per call) are
turned down for that reason. The final keys are logged before the model; the model, its
datasets and description go through the same buffer (a ``model`` record), so an outage at a
stage's end delays them instead of losing them. Records spilled to ``unsent-mlflow.json`` are
sent by the next job that reuses the stage (:func:`replay_unsent`); the pipeline's last lines
name any that are still unsent.

A new SQLite store is created and migrated once, under a file lock, before any parallel use
(:func:`prepare_store`): two jobs starting on a fresh ``mlflow.db`` would otherwise race in
MLflow's schema migration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from mlcore import configlib
from workflows.config import MlflowConfig, TrackingUnavailable
from workflows.model_ref import absolute_tracking_uri

PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "cpsd.key"
REUSE_TAG = "cpsd.reuse_of"
LOCATION_TAG = "cpsd.location"  # the stage folder a stage run belongs to
REUSED_RUN_TAG = "cpsd.reused_run"  # on a reuse run: the run that trained the stage
JOB_TAG = "cpsd.job"  # on a parent: <storage>/<name>, the job it belongs to
DRIVER_TAG = "cpsd.driver"  # on a parent: host:pid:start of the driver process
MAX_PARAM_LENGTH = 6000  # MLflow 3 limit on a param value
FLUSH_TIMEOUT_S = 60.0  # how long a finishing stage retries an unreachable server
RETRY_INTERVAL_S = 5.0  # between attempts to send what is buffered
UNSENT_FILE = "unsent-mlflow.json"

# One attempt per call, short timeout: RunLogger buffers and retries instead, so an outage
# costs training a few seconds once, not minutes per epoch.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_tracking_uri(cfg: MlflowConfig, cwd: str | os.PathLike | None = None) -> str:
    """An absolute tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else local SQLite
    (:func:`workflows.model_ref.absolute_tracking_uri`, importable without MLflow)."""
    return absolute_tracking_uri(cfg.tracking_uri, cwd)


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

    def child_of(self, key: str) -> Run | None:
        """This job's child run tagged ``key``, whatever its status (a sweep's trial run)."""
        where = f"tags.`{KEY_TAG}` = '{key}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1)
        return runs[0] if runs else None

    def find_run(self, key: str, location: str | None = None) -> Run | None:
        """The unfinished run of stage ``key`` at ``location`` (a stage folder's URI), if any.

        Only a run of the same stage folder that did not finish is continued: another storage
        path's run, or a FINISHED one, belongs to a job of its own.
        """
        where = f"tags.`{KEY_TAG}` = '{key}'"
        if location is not None:
            where += f" and tags.`{LOCATION_TAG}` = '{location}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=where, max_results=50)
        unfinished = [r for r in runs if r.info.status != "FINISHED"]
        return unfinished[0] if unfinished else None

    def start_child(
        self,
        key: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        location: str | None = None,
    ) -> str:
        """Create the stage run ``name``, or continue the one an earlier attempt made.

        An earlier attempt at the same stage folder may belong to this job (a retried Ray task)
        or to a driver that was killed: its run is moved under this job's parent and
        continued; its old parent is marked KILLED when that parent's driver is gone.
        """
        client = self.client
        # A stage run belongs to its stage folder; a run without one (a sweep's trial) to its
        # parent: a restored sweep continues its trials' runs whatever their status.
        found = self.find_run(key, location) if location is not None else self.child_of(key)
        if found is None:
            tags = {KEY_TAG: key, **source_tags(name)}
            if location is not None:
                tags[LOCATION_TAG] = location
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            if params:
                log_params(client, run_id, params)
            return run_id
        run_id = found.info.run_id
        old_parent = found.data.tags.get(PARENT_TAG)
        if self.parent_run_id and old_parent != self.parent_run_id:
            if old_parent:
                with contextlib.suppress(MlflowException):
                    end_if_driver_gone(client, client.get_run(old_parent))
            client.set_tag(run_id, PARENT_TAG, self.parent_run_id)
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "cpsd.resumed", "true")
        return run_id

    def start_reuse_marker(
        self,
        key: str,
        name: str,
        params: Mapping[str, Any] | None,
        location: str | None = None,
        reused_run: str | None = None,
    ) -> str:
        """A run of this job standing for a finished stage it reuses (tag ``cpsd.reuse_of``);
        ``reused_run`` is the run that trained the stage, which is left as it was."""
        tags = {REUSE_TAG: key, **source_tags(name)}
        if location is not None:
            tags[LOCATION_TAG] = location
        if reused_run:
            tags[REUSED_RUN_TAG] = reused_run
        if self.parent_run_id:
            tags[PARENT_TAG] = self.parent_run_id
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        if params:
            log_params(self.client, run_id, params)
        return run_id

    @contextlib.contextmanager
    def child(
        self,
        key: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        *,
        reused: bool = False,
        spill_dir: str | os.PathLike | None = None,
        location: str | None = None,
        reused_run: str | None = None,
    ) -> Iterator[RunLogger]:
        """A child run that ends FINISHED, FAILED or KILLED whatever happens inside.

        Everything, the run's creation included, goes through the logger's buffer: a stage
        that starts while the server is down trains anyway and creates its run once the
        server answers (``spill_dir``: where unsent records go if it never does).
        ``location`` is the stage folder's URI (see :meth:`find_run`).
        """
        create = RunSpec(
            self.experiment_id,
            self.parent_run_id,
            key,
            name,
            None if params is None else {k: str(v) for k, v in params.items()},
            location,
            reused,
            reused_run,
        )
        with _terminating(self.client, None, spill_dir, create=create) as logger:
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


def driver_identity() -> str:
    """``host:pid:start`` of this process (start: clock ticks since boot, from /proc)."""
    from workflows.runtime import process_start

    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def driver_gone(identity: str | None) -> bool:
    """True when the driver ``identity`` names ran on this host and no longer runs.

    A driver on another host cannot be checked from here: it counts as alive.
    """
    from workflows.runtime import process_start

    if not identity:
        return False
    host, pid, start = identity.rsplit(":", 2)
    if host != socket.gethostname() or start == "None":
        return False
    return str(process_start(int(pid))) != start


def end_if_driver_gone(client: MlflowClient, parent: Run) -> bool:
    """Mark a RUNNING parent KILLED, with its RUNNING children, if its driver is gone."""
    if parent.info.status != "RUNNING" or not driver_gone(parent.data.tags.get(DRIVER_TAG)):
        return False
    Tracker(
        client.tracking_uri, parent.info.experiment_id, parent.info.run_id
    ).kill_running_children()
    client.set_terminated(parent.info.run_id, status="KILLED")
    return True


def end_dead_parents(client: MlflowClient, experiment: str, job: str) -> int:
    """Mark the job's parents whose driver is gone KILLED (a driver killed after its last
    stage leaves its parent RUNNING, and a rerun that reuses every stage never meets it)."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`{JOB_TAG}` = '{job}' and attributes.status = 'RUNNING'",
    )
    return sum(end_if_driver_gone(client, run) for run in runs)


def mlflow_metric_name(name: str) -> str:
    """``name`` in the characters MLflow accepts: ``F1@3`` becomes ``F1_at_3``."""
    return name.replace("@", "_at_")


@dataclass(frozen=True)
class RunSpec:
    """What creates (or continues) a child run; plain data, so that a backlog spilled to a file
    can still create its run when it is sent by a later job."""

    experiment_id: str
    parent_run_id: str | None
    key: str
    name: str
    params: Mapping[str, Any] | None = None
    location: str | None = None
    reused: bool = False
    reused_run: str | None = None

    def start(self, uri: str) -> str:
        tracker = Tracker(uri, self.experiment_id, self.parent_run_id)
        if self.reused:
            return tracker.start_reuse_marker(
                self.key, self.name, self.params, self.location, self.reused_run
            )
        return tracker.start_child(self.key, self.name, self.params, self.location)


class RunLogger:
    """Logs to one run id; buffers what an unreachable server cannot take (module docstring).

    Args:
        client: The tracking client.
        run_id: The run, or None with ``create``.
        spill_dir: Folder for ``unsent-mlflow.json`` if :meth:`flush` gives up.
        warn: Where the one-line outage warnings go.
        create: The run to create (or continue) when ``run_id`` is None; queued first, so the
            run is created as soon as the server answers.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str | None,
        spill_dir: str | os.PathLike | None = None,
        warn: Callable[[str], None] | None = None,
        create: RunSpec | None = None,
    ):
        if run_id is None and create is None:
            raise ValueError("RunLogger needs a run id or a way to create the run")
        self.client = client
        self.run_id = run_id
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self._warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._last_attempt = -math.inf
        self._last_error = ""
        self._create = create
        if run_id is None:
            self._submit("create", {})

    @property
    def pending(self) -> int:
        """Records waiting for the server."""
        return len(self._pending)

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "create":
            self.run_id = self._create.start(self.client.tracking_uri)
        elif kind == "batch":
            self.client.log_batch(self.run_id, **payload)
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, payload["path"], payload["artifact_path"])
        elif kind == "model":
            record_trained_model(self.client.tracking_uri, self.run_id, **payload)
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, status=payload["status"])

    def _drain(self) -> bool:
        """Send buffered records in order; False at the first failure (kept for later)."""
        self._last_attempt = time.monotonic()
        while self._pending:
            kind, payload = self._pending[0]
            try:
                self._send(kind, payload)
            except Exception as err:  # any failure to reach the store means "send later"
                # Named in the warnings: a record that fails for another reason than an
                # outage (a bug) must not pass for one.
                text = str(err).strip().splitlines()
                self._last_error = f"{kind}: {type(err).__name__}: {text[0] if text else ''}"
                return False
            self._pending.pop(0)
        return True

    def _submit(self, kind: str, payload: dict[str, Any]) -> None:
        backlog = len(self._pending)
        self._pending.append((kind, payload))
        if backlog and time.monotonic() - self._last_attempt < RETRY_INTERVAL_S:
            return  # an outage: keep buffering, try again on a later call
        if self._drain():
            if backlog:
                self._warn(f"MLflow run {self.run_id}: server reachable again, backlog sent")
        elif not backlog:
            self._warn(
                f"MLflow run {self.run_id}: tracking server unreachable ({self._last_error}); "
                f"buffering and retrying every {RETRY_INTERVAL_S:.0f}s (training continues)"
            )

    def send_backlog(self) -> bool:
        """Try once to send what is buffered; True when nothing is left (the server answers)."""
        return self._drain()

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(mlflow_metric_name(k), float(v), now, step)
            for k, v in values.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        if batch:
            self._submit("batch", {"metrics": batch})

    def params(self, values: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._submit("batch", {"params": items[start : start + 100]})

    def tags(self, values: Mapping[str, Any]) -> None:
        self._submit("batch", {"tags": [RunTag(k, str(v)) for k, v in values.items()]})

    def artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._submit("artifact", {"path": str(path), "artifact_path": artifact_path})

    def model(self, **record: Any) -> None:
        """Description, datasets, the MLflow model and its registry version
        (:func:`record_trained_model`'s arguments; plain data)."""
        self._submit("model", record)

    def finish(self, status: str) -> None:
        """End the run with ``status`` after sending the backlog (see :meth:`flush`)."""
        self._pending.append(("terminate", {"status": status}))
        self.flush()

    def flush(self, timeout: float | None = None) -> bool:
        """Send the backlog, retrying for ``timeout`` s (None: ``FLUSH_TIMEOUT_S``); then spill
        what is left to a file.

        Returns:
            True when everything reached the server.
        """
        deadline = time.monotonic() + (FLUSH_TIMEOUT_S if timeout is None else timeout)
        while not self._drain():
            if time.monotonic() >= deadline:
                self._spill()
                return False
            time.sleep(min(RETRY_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        return True

    def _spill(self) -> None:
        records = [{"kind": k, **_plain(p)} for k, p in self._pending]
        where = "nowhere (no stage folder)"
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            target = self.spill_dir / UNSENT_FILE
            create = None if self._create is None else dataclasses.asdict(self._create)
            target.write_text(
                json.dumps({"run_id": self.run_id, "create": create, "records": records}, indent=1)
            )
            where = str(target)
        self._warn(
            f"MLflow run {self.run_id}: server still unreachable after {FLUSH_TIMEOUT_S:.0f}s "
            f"({self._last_error}); {len(records)} unsent records written to {where}"
        )


def _plain(payload: dict[str, Any]) -> dict[str, Any]:
    """A buffered record as JSON-able data (:func:`_unplain` reads it back)."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if key in ("metrics", "params", "tags"):
            out[key] = [
                {"key": v.key, "value": v.value}
                | ({"step": v.step, "timestamp": v.timestamp} if key == "metrics" else {})
                for v in value
            ]
        else:
            out[key] = value
    return out


def _unplain(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind, payload = record["kind"], {k: v for k, v in record.items() if k != "kind"}
    if kind == "batch":
        payload = {
            "metrics": [Metric(m["key"], m["value"], m["timestamp"], m["step"])
                        for m in payload.get("metrics", [])],
            "params": [Param(p["key"], p["value"]) for p in payload.get("params", [])],
            "tags": [RunTag(t["key"], t["value"]) for t in payload.get("tags", [])],
        }  # fmt: skip
    return kind, payload


def replay_unsent(uri: str, path: str | os.PathLike) -> bool:
    """Send a spilled backlog (``unsent-mlflow.json``) to its run, in order; delete the file
    when everything arrived. Returns True when nothing is left unsent."""
    path = Path(path)
    spilled = json.loads(path.read_text())
    create = spilled.get("create")
    logger = RunLogger(
        MlflowClient(uri),
        spilled["run_id"],
        path.parent,
        warn=lambda _: None,
        create=None if create is None else RunSpec(**create),
    )
    logger._pending = [_unplain(r) for r in spilled["records"]]
    if not logger._drain():
        return False
    path.unlink()
    return True


def log_params(client: MlflowClient, run_id: str, values: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


@contextlib.contextmanager
def _terminating(
    client: MlflowClient,
    run_id: str | None,
    spill_dir: str | os.PathLike | None = None,
    create: Callable[[], str] | None = None,
) -> Iterator[RunLogger]:
    """Yield a logger; end its run FINISHED, FAILED or KILLED whatever happens inside.

    Ending the run goes through the logger's buffer, so an unreachable server at that moment
    neither hides the exception that is propagating nor fails a run that succeeded.
    """
    logger = RunLogger(client, run_id, spill_dir, create=create)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield logger
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
        logger.finish(status)


def prepare_store(uri: str) -> None:
    """Create or migrate a SQLite tracking store once, under a file lock (module docstring).

    Call it before the process constructs any ``MlflowClient`` for ``uri``: the constructor
    initialises the store. Other stores are left to their server.
    """
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # The first call on a new file creates the tables and runs MLflow's migrations.
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start_parent(
    cfg: MlflowConfig,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    spill_dir: str | os.PathLike | None = None,
    job: str | None = None,
) -> tuple[Tracker, RunLogger]:
    """Check the store, create the job's parent run; returns the tracker for children.

    ``job`` (``<storage>/<name>``) tags the parent with its job and driver; earlier parents of
    the same job whose driver is gone are marked KILLED first.
    """
    uri = resolve_tracking_uri(cfg)
    check_reachable(uri)
    tags = {**tags, DRIVER_TAG: driver_identity()}
    if job is not None:
        tags[JOB_TAG] = job
    try:
        prepare_store(uri)  # before any client: constructing one initialises the store
        client = MlflowClient(uri)
        exp = experiment_id(client, uri, cfg.experiment)
        if job is not None:
            end_dead_parents(client, exp, job)
        run = client.create_run(exp, run_name=name, tags=tags)
    except Exception as err:
        raise TrackingUnavailable(f"MLflow at {uri} failed: {err}") from err
    log_params(client, run.info.run_id, params)
    return Tracker(uri, exp, run.info.run_id), RunLogger(client, run.info.run_id, spill_dir)


@contextlib.contextmanager
def parent_run(
    cfg: MlflowConfig,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    spill_dir: str | os.PathLike | None = None,
    job: str | None = None,
) -> Iterator[tuple[Tracker, RunLogger]]:
    """The job's parent run; on any exit, children left RUNNING are marked KILLED.

    ``spill_dir``: where the parent's unsent records go if the server never comes back;
    ``job``: see :func:`start_parent`.
    """
    tracker, logger = start_parent(cfg, name, params, tags, job=job)
    try:
        with _terminating(logger.client, logger.run_id, spill_dir) as buffered:
            yield tracker, buffered
    finally:
        with contextlib.suppress(Exception):  # never hide the job's own outcome
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

    def model(self, **record: Any) -> None:
        pass


def child_run(
    tracker: Tracker | None,
    key: str,
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    reused: bool = False,
    spill_dir: str | os.PathLike | None = None,
    location: str | None = None,
    reused_run: str | None = None,
) -> contextlib.AbstractContextManager[RunLogger | NullRunLogger]:
    """``tracker.child(...)``, or a no-op logger when tracking is off."""
    if tracker is None:
        return contextlib.nullcontext(NullRunLogger())
    return tracker.child(
        key,
        name,
        params,
        reused=reused,
        spill_dir=spill_dir,
        location=location,
        reused_run=reused_run,
    )


# ---------------------------------------------------------------------------------------------
# What the MLflow UI shows: descriptions, roles, final keys, data, source, links

ROLE_TAG = "cpsd.role"
NOTE_TAG = "mlflow.note.content"
# MLflow 3 opens an experiment on its GenAI overview unless the experiment says otherwise.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
ROLES = ("teacher", "ensemble", "student", "baseline", "control", "pretrain", "train", "trial")
FINAL_KEYS = (
    "best_val_mAP",
    "best_epoch",
    "test_mAP",
    "test_CF1",
    "test_OF1",
    "shift_mAP",
    "num_classes_evaluated",
)
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
# The console prints percentages; MLflow keeps the fractions the code computes, so every run
# description says which one a reader is looking at.
METRIC_SCALE = (
    "Units: every metric here is a fraction in [0, 1] (mAP 0.812 is the console's 81.2%)."
)


def source_tags(entry_point: str) -> dict[str, str]:
    """The tags that fill MLflow's Source column and its git link."""
    return {
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": entry_point,
        "mlflow.source.type": "LOCAL",
    }


def run_note(description: str) -> str:
    """A run description (``mlflow.note.content``) ending with the metrics' scale."""
    return f"{description} {METRIC_SCALE}"


def describe_run(client: MlflowClient, run_id: str, *, role: str, description: str) -> None:
    """Set a run's description (``mlflow.note.content``) and its ``cpsd.role`` tag.

    The description should say what the run's numbers cover, e.g. "teacher: 4 of 20 classes";
    the metrics' scale (:data:`METRIC_SCALE`) is appended.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose from {ROLES}")
    tags = [RunTag(ROLE_TAG, role), RunTag(NOTE_TAG, run_note(description))]
    client.log_batch(run_id, tags=tags)


def describe_experiment(
    client: MlflowClient, experiment_id: str, description: str | None = None
) -> None:
    """Make the UI open the experiment on its training runs; set its description if given.

    MLflow 3.17 opens experiments on the GenAI overview unless ``mlflow.experimentKind`` says
    the experiment is model training.
    """
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if description is not None:
        client.set_experiment_tag(experiment_id, NOTE_TAG, description)


def final_metrics(
    *,
    best_val_mAP: float,
    best_epoch: int | None,
    num_classes_evaluated: int,
    test_mAP: float | None = None,
    test_CF1: float | None = None,
    test_OF1: float | None = None,
    shift_mAP: float | None = None,
) -> dict[str, float]:
    """The keys every run ends with, so one column compares teachers, students and baselines.

    ``num_classes_evaluated`` is how many classes the mAPs average over (a teacher's subset);
    ``test_*``/``shift_mAP`` are left out when the dataset has no such split, ``best_epoch``
    when the model was not trained (a merged ensemble): a placeholder number would be averaged
    into the UI's group rows.
    """
    values = {
        "best_val_mAP": best_val_mAP,
        "best_epoch": best_epoch,
        "num_classes_evaluated": num_classes_evaluated,
        "test_mAP": test_mAP,
        "test_CF1": test_CF1,
        "test_OF1": test_OF1,
        "shift_mAP": shift_mAP,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def log_final_metrics(
    client: MlflowClient,
    run_id: str,
    values: Mapping[str, float],
    *,
    step: int,
    model_id: str | None = None,
) -> None:
    """Log :func:`final_metrics` at ``step`` (the best epoch, which a logged model links to)."""
    unknown = set(values) - set(FINAL_KEYS)
    if unknown:
        raise ValueError(f"not final keys: {sorted(unknown)} (final keys: {FINAL_KEYS})")
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()],
    )


def log_dataset_input(
    client: MlflowClient, run_id: str, dataset_root: str | os.PathLike, split: str, *, context: str
) -> None:
    """Record one split of a manifest dataset as an input of the run (the Dataset column).

    The dataset is named ``<name>:<split>`` and identified by the manifest's digest; its profile
    holds the split's size and class count.

    Args:
        client: Client of the run's tracking store.
        run_id: The run.
        dataset_root: Directory holding ``manifest.parquet``.
        split: Split name.
        context: What the run did with it: ``training``, ``validation`` or ``test``.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from mlcore.data.manifest import Manifest, is_uri, manifest_digest

    manifest = Manifest.load(dataset_root, with_bytes=False)
    size = int(manifest.split_rows(split).size)
    if is_uri(dataset_root):  # an object store: s3://bucket/prefix, gs://...
        uri = str(dataset_root).rstrip("/")
        source_type = uri.split("://", 1)[0]
    else:
        uri, source_type = Path(dataset_root).resolve().as_uri(), "local"
    dataset = Dataset(
        name=f"{manifest.info.name}:{split}",
        digest=manifest_digest(dataset_root),
        source_type=source_type,
        source=json.dumps({"uri": uri}),
        profile=json.dumps({"split": split, "num_rows": size, "num_classes": manifest.num_classes}),
    )
    tags = [InputTag("mlflow.data.context", context), InputTag("cpsd.split", split)]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])


VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # where the MLflow UI looks up a shared view


def share_runs_view(
    client: MlflowClient,
    experiment_id: str,
    *,
    group_by_tag: str = ROLE_TAG,
    metrics: tuple[str, ...] = FINAL_KEYS,
) -> str:
    """Save a runs-table view in the experiment: grouped by ``cpsd.role``, final keys shown.

    The MLflow UI opens a runs page whose URL carries ``viewStateShareKey=<key>`` with the view
    stored in the experiment tag ``mlflow.sharedViewState.<key>`` (what its Share button
    writes). The key hashes the view, so sharing the same view again reuses it.

    Returns:
        The share key for :func:`runs_page_link`.
    """
    columns = [f"metrics.`{m}`" for m in metrics] + [
        "attributes.`Models`",
        "attributes.`Dataset`",
        "attributes.`Source`",
    ]
    view = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        # The final keys first: without an order the table appends metrics after every
        # attribute column, off screen.
        "columnOrder": columns,
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}],
        },
    }
    text = json.dumps(view, sort_keys=True)
    key = "cpsd-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + key, text)
    return key


def runs_page_link(
    tracking_uri: str, experiment_id: str, ui_url: str | None = None, view: str | None = None
) -> str:
    """Deep link to the experiment's runs in model-training mode (optionally a shared view).

    A server URI links to that server; a local store links to ``ui_url`` (default
    ``mlflow ui``'s http://127.0.0.1:5000). ``view`` is a key from :func:`share_runs_view`.
    """
    link = f"{ui_base(tracking_uri, ui_url)}/#/experiments/{experiment_id}/runs"
    link += "?workflowType=machine_learning"
    return link + (f"&viewStateShareKey={view}" if view else "")


def ui_base(tracking_uri: str, ui_url: str | None = None) -> str:
    """The UI serving ``tracking_uri``: the server itself, else ``ui_url`` or ``mlflow ui``."""
    base = tracking_uri if tracking_uri.startswith(("http://", "https://")) else ui_url
    return (base or LOCAL_UI).rstrip("/")


def run_page_link(
    tracking_uri: str, experiment_id: str, run_id: str, ui_url: str | None = None
) -> str:
    """Deep link to one run's page (the server of ``tracking_uri``, else ``ui_url``)."""
    return f"{ui_base(tracking_uri, ui_url)}/#/experiments/{experiment_id}/runs/{run_id}"


def final_metrics_of(
    best_val_mAP: float,
    best_epoch: int | None,
    classes: int,
    held_out: Mapping[str, Mapping[str, float] | None],
) -> dict[str, float]:
    """:func:`final_metrics` from a validation mAP and ``mlcore.cpsd.evaluate_model`` reports
    (``best_epoch`` None: not trained, the key is left out)."""
    test = held_out.get("test") or {}
    shift = held_out.get("shift") or {}
    return final_metrics(
        best_val_mAP=best_val_mAP,
        best_epoch=best_epoch,
        num_classes_evaluated=classes,
        test_mAP=test.get("mAP"),
        test_CF1=test.get("CF1"),
        test_OF1=test.get("OF1"),
        shift_mAP=shift.get("mAP"),
    )


# ---------------------------------------------------------------------------------------------
# One call per trained model


@dataclass(frozen=True)
class RecordedModel:
    """What :func:`record_trained_model` created (None where switched off)."""

    model_id: str | None
    registered: str | None  # ``models:/<name>/<version>``


def record_trained_model(
    tracking_uri: str,
    run_id: str,
    *,
    role: str,
    stage: str,
    description: str,
    bundle: str | os.PathLike,
    final: Mapping[str, float],
    best_epoch: int,
    dataset_root: str | os.PathLike | None = None,
    splits: Mapping[str, str] | None = None,
    log_models: bool = True,
    registered_model: str | None = None,
    log_final: bool = True,
) -> RecordedModel:
    """Everything MLflow shows about one trained model, on its (still open) run.

    Sets the description and ``cpsd.role``, logs the dataset splits as inputs, the final keys
    at the best epoch, then the MLflow model ``stage`` (linked to those metrics), and registers
    it under ``registered_model`` with the role as alias, the final keys as version tags and a
    description (:func:`version_description`).

    Args:
        tracking_uri: The run's tracking store.
        run_id: The run.
        role: ``teacher``, ``student``, ``baseline``, ``train`` or ``trial``.
        stage: The stage that trained it (``teacher-cgp-0``, ``student``; ``train``): the
            logged model's name.
        description: What the run's numbers cover (``mlflow.note.content``).
        bundle: The model's ``model.bundle.pt``.
        final: From ``workflows.tracking.final_metrics``.
        best_epoch: The step the model and the final keys are logged at.
        dataset_root: Dataset directory whose splits are logged as inputs (None: none).
        splits: Split name -> context (``training``, ``validation``, ``test``).
        log_models: Log the MLflow model (config ``mlflow.log_models``).
        registered_model: Registry name (config ``mlflow.registered_model``; None: skip).
        log_final: Log ``final`` here (False: the caller logged them already, before this).
    """
    # The model flavour loads torch and the bundle code: only where a model is recorded.
    from workflows.mlflow_model import log_model, register_model

    client = MlflowClient(tracking_uri)
    describe_run(client, run_id, role=role, description=description)
    for split, context in (splits or {}).items():
        log_dataset_input(client, run_id, dataset_root, split, context=context)
    if log_final:
        log_final_metrics(client, run_id, final, step=best_epoch)
    if not log_models:
        return RecordedModel(None, None)
    model_id = log_model(
        tracking_uri, run_id, bundle, name=stage, step=best_epoch, tags={"cpsd.role": role}
    )
    registered = None
    if registered_model:
        version = register_model(
            tracking_uri,
            model_id,
            registered_model,
            alias=role,
            tags={"cpsd.role": role, **final},
            description=version_description(
                client.get_run(run_id), tracking_uri, role, stage, final
            ),
        )
        registered = f"models:/{registered_model}/{version.version}"
    return RecordedModel(model_id, registered)


def version_description(
    run: Run, tracking_uri: str, role: str, stage: str, final: Mapping[str, float]
) -> str:
    """A registry version's description: role, stage, test mAP and the pipeline run.

    The pipeline run is the stage run's parent (a pipeline, or a study's variant × seed); a run
    without a parent (``cpsd train``) is linked as the training run itself.
    """
    test = final.get("test_mAP")
    scored = (
        "none (the dataset has no test split)"
        if test is None
        else f"{test:.4f} (a fraction: {100 * test:.1f}%) over "
        f"{int(final['num_classes_evaluated'])} classes"
    )
    parent = run.data.tags.get(PARENT_TAG)
    linked, label = (parent, "Pipeline run") if parent else (run.info.run_id, "Training run")
    link = run_page_link(tracking_uri, run.info.experiment_id, linked)
    return (
        f"**{role}** model, trained by stage `{stage}` (run `{run.info.run_id}`).\n\n"
        f"test_mAP: {scored}.\n\n"
        f"{label}: [`{linked}`]({link})"
    )
