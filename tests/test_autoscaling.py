"""Placement defaults, prewarming and preempted nodes on a real autoscaler.

The slow tests share one head whose autoscaler is Ray's fake multi-node provider
(``tests/fake_cluster.py``): a CPU-only head and a worker type ``{CPU: 1, GPU: 1}``, 0..3, idle
timeout 12 s. Worker nodes are processes on this machine: their logical GPU is a slot a task
can hold, training runs on their CPU, and a local directory is storage every node sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from workflows.autoscaling import Placement, Prewarm, parallel_stages, trial_resources
from workflows.config import config_path, load_config
from workflows.runtime import _descendants, _stat

from .conftest import REPO
from .fake_cluster import RAY, FakeCluster, fake_cluster

# The same small run everywhere, so the preempted run can be compared with the plain one.
# No MLflow model or checkpoint uploads: they cost seconds per stage and are tested elsewhere.
RUN = [
    "cpsd.teacher_epochs=2",
    "train.epochs=1",
    "mlflow.log_models=false",
    "mlflow.log_checkpoints=false",
]
TEACHERS = ["teacher-cgp-0", "teacher-cgp-1", "teacher-dgp-0", "teacher-dgp-1"]
# Each of the module's three runs (pipeline, sweep, job) starts worker nodes, a raylet and two
# agents each, on the same cores: the first test to need a run pays for it, ~2-4 min on a
# loaded 2-core machine, close to the suite's 300 s default.
LONG = pytest.mark.timeout(600)

# ---------------------------------------------------------------------------------------------
# Without Ray


def _tiny(tiny_overrides, *sets):
    return load_config(config_path("tiny"), [*tiny_overrides, *sets])


def test_prewarm_asks_for_every_parallel_stage_and_shrinks_as_they_finish(tiny_overrides):
    cfg = _tiny(tiny_overrides, "ray.teacher_gpus=1", "cpsd.train_baseline=true")
    assert parallel_stages(cfg) == {"teacher": 4, "baseline": 1}
    prewarm = Prewarm(cfg, graph=None)
    gpu = {"CPU": 1.0, "GPU": 1.0}
    assert prewarm.bundles({}) == [gpu] * 5
    assert prewarm.bundles({"teacher": 3}) == [gpu] * 2
    assert prewarm.bundles({"teacher": 4, "baseline": 1}) == []
    # A Ray Train group per model asks for one bundle per worker; the student's GPUs are the
    # baseline's.
    grouped = _tiny(
        tiny_overrides, "ray.teacher_gpus=1", "ray.student_gpus=0", "ray.train_workers=2",
        "cpsd.mode=sd", "cpsd.train_baseline=true",
    )  # fmt: skip
    assert Prewarm(grouped, graph=None).bundles({}) == [gpu] * 2 + [{"CPU": 1.0}] * 2


def test_a_trial_gets_the_gpu_default_unless_its_resources_name_gpus(tiny_overrides):
    one = Placement(1.0, "test", "v1", True)
    cfg = _tiny(tiny_overrides)
    assert trial_resources(cfg, one) == {"CPU": 1.0, "GPU": 1.0}
    explicit = _tiny(tiny_overrides, "tune.resources_per_trial={CPU: 2, GPU: 0}")
    assert trial_resources(explicit, one) == {"CPU": 2.0, "GPU": 0.0}
    assert trial_resources(cfg, Placement(None, "set", "v1", True)) == {"CPU": 1.0}
    assert trial_resources(cfg, Placement(0.0, "no GPUs", None, False)) == {"CPU": 1.0}


# ---------------------------------------------------------------------------------------------
# On the fake autoscaling cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # At 6 s a node could be removed as idle just as a retried or next stage was placed on it,
    # costing that stage a retry of its own.
    with fake_cluster(tmp_path_factory.mktemp("fake-cluster"), idle_timeout_minutes=0.2) as running:
        yield running


def _sets(out: Path, tiny_overrides) -> list[str]:
    return [
        *tiny_overrides,
        *RUN,
        f"storage_path={out / 'storage'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
    ]


def _args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _records(storage: Path, name: str = "tiny") -> dict[str, dict]:
    return {
        p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
        for p in storage.glob(f"{name}/stages/*/_SUCCESS.json")
    }


def _runs(out: Path):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpsd")
    return [] if exp is None else client.search_runs([exp.experiment_id])


class WorkerCount:
    """The most worker nodes alive at once while the block runs (polled every 0.5 s)."""

    def __init__(self, cluster: FakeCluster):
        self.cluster = cluster
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.most = max(self.most, len(self.cluster.workers()))

    def __enter__(self) -> WorkerCount:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _head_id(cluster: FakeCluster) -> str:
    return next(n["node_id"] for n in cluster.nodes() if n["is_head_node"])


def _assert_on_gpu_workers(records: dict[str, dict], head: str) -> None:
    assert sorted(r for r in records if r.startswith("teacher")) == TEACHERS
    for name in TEACHERS:
        attempt = records[name]["attempts"][-1]
        assert attempt["gpu_ids"], (name, attempt)  # the head has no GPU: a worker's slot
        assert attempt["node_id"] != head, (name, attempt)


@pytest.fixture(scope="module")
def plain_run(cluster, tiny_overrides, tmp_path_factory):
    """``cpsd pipeline --config tiny`` joining the cluster, placement left to the defaults."""
    out = tmp_path_factory.mktemp("plain")
    with WorkerCount(cluster) as count:
        done = subprocess.run(
            [sys.executable, "-m", "workflows.cli", "pipeline", "--config", "tiny",
             *_args(_sets(out, tiny_overrides))],
            env=cluster.env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, count.most


@pytest.mark.slow
@LONG
def test_pipeline_defaults_train_every_teacher_on_an_autoscaled_gpu_worker(cluster, plain_run):
    out, stdout, most = plain_run
    assert "placement: 1 GPU per teacher, student, baseline and trial (no GPUs now, but the " \
        "autoscaler starts a GPU node when asked for one)" in stdout  # fmt: skip
    assert "prewarm: requested 4 bundles (4 GPUs) from the autoscaler" in stdout
    assert "prewarm: requested 0 bundles (0 GPUs) from the autoscaler" in stdout
    records = _records(out / "storage")
    _assert_on_gpu_workers(records, _head_id(cluster))
    assert records["student"]["attempts"][-1]["gpu_ids"]
    assert most >= 3  # up to the worker type's max_workers (a removed node may still show)
    parent = next(r for r in _runs(out) if r.info.run_name == "tiny")
    assert {k: v for k, v in parent.data.params.items() if k.startswith("placement.")} == {
        "placement.default_gpus": "1",
        "placement.reason": "no GPUs now, but the autoscaler starts a GPU node when asked for one",
        "placement.autoscaler": "v1",
        "placement.prewarm": "true",
    }
    cluster.wait_workers(0, timeout=90)  # idle timeout 12 s


@pytest.mark.slow
@LONG
def test_tune_trials_with_a_gpu_each_scale_the_cluster_up_and_down(
    cluster, tiny_overrides, tmp_path
):
    sets = [
        *tiny_overrides,
        f"storage_path={tmp_path / 'storage'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tune.resources_per_trial={GPU: 1}",
        "tune.num_samples=2",
        "tune.scheduler.name=fifo",
        "train.epochs=1",
    ]
    with WorkerCount(cluster) as count:
        done = subprocess.run(
            [sys.executable, "-m", "workflows.cli", "tune", "--config", "tune_asl_tiny",
             *_args(sets)],
            env=cluster.env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # A trial holds one GPU and the head has none: each ran on a worker the trials launched.
    assert count.most >= 2
    trials = [r for r in _runs(tmp_path) if r.info.run_name.startswith("run_trial")]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.metrics.get("val_mAP") is not None for r in trials)
    cluster.wait_workers(0, timeout=90)


def _runtime_env_json() -> str:
    """The shipped runtime_env, with the repository as a ``local://`` working dir.

    The fake provider's nodes are processes of one machine sharing one session directory, so
    they share one copy of an uploaded working dir too, and each node's runtime-env agent
    replaces that copy (rmtree, then unpack) the first time it needs it. A node added while
    teachers train on another deleted their current directory; their workers then failed to
    load torch (oneMKL's "Cannot load libtorch_cpu.so" is what a process whose working
    directory is gone prints). Real nodes each have their own disk; here ``local://`` points
    every node at the repository in place. The upload itself is tested on a single-node head
    (tests/test_ray_cluster.py)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("env_vars", None)  # the shipped file points MLflow at a placeholder server
    env.pop("excludes", None)  # nothing is uploaded
    env["working_dir"] = f"local://{REPO}"
    return json.dumps(env)


def _kill_node_of(stage: Path) -> str:
    """SIGKILL the raylet of the node training ``stage``, then what it leaves: its agents and
    workers (a spot VM that is reclaimed). Returns the node's id."""
    node = json.loads((stage / "attempts.json").read_text())[-1]["node_id"]
    raylet = _stat(int((stage / "worker.pid").read_text()))[0]  # a Ray worker's parent
    assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_text()
    tree = [(pid, stat[1]) for pid in [raylet, *_descendants(raylet)] if (stat := _stat(pid))]
    for pid, start in tree:
        stat = _stat(pid)
        if stat is not None and stat[1] == start:
            os.kill(pid, signal.SIGKILL)
    return node


@pytest.fixture(scope="module")
def preempted_job(cluster, plain_run, tiny_overrides, tmp_path_factory):
    """The same pipeline through ``ray job submit``; one teacher's node is killed mid-training."""
    out = tmp_path_factory.mktemp("job")
    sets = _sets(out, tiny_overrides)
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard,
         "--runtime-env-json", _runtime_env_json(), "--submission-id", "preempted", "--no-wait",
         "--", sys.executable, "-m", "workflows.pipeline", "--config", "tiny", *_args(sets)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    stages = out / "storage" / "tiny" / "stages"
    victim, node = None, None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline:
        for stage in sorted(stages.glob("teacher-*")):
            # Mid-training: an epoch checkpointed, more to go.
            if (stage / "last.pt").is_file() and not (stage / "_SUCCESS.json").exists():
                victim, node = stage, _kill_node_of(stage)
                break
        status = client.get_job_status("preempted")
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), (
            status,
            client.get_job_logs("preempted")[-3000:],
        )
        time.sleep(0.1)
    assert victim is not None, client.get_job_logs("preempted")[-3000:]
    while client.get_job_status("preempted") not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.time() < deadline, client.get_job_logs("preempted")[-3000:]
        time.sleep(1)
    return out, client, victim.name.rsplit("-", 1)[0], node


@pytest.mark.slow
@LONG
def test_job_submit_trains_every_teacher_on_an_autoscaled_gpu_worker(cluster, preempted_job):
    out, client, _, _ = preempted_job
    from ray.job_submission import JobStatus

    logs = client.get_job_logs("preempted")
    assert client.get_job_info("preempted").status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "placement: 1 GPU per teacher" in logs
    assert "| student | student | 10 |" in logs
    _assert_on_gpu_workers(_records(out / "storage"), _head_id(cluster))


def _numbers(record: dict) -> tuple:
    """What a teacher computed, without its wall times."""

    def strip(row):
        return {k: v for k, v in row.items() if k != "epoch_time_s"}

    return [strip(r) for r in record["history"]], strip(record["metrics"]), record["held_out"]


@pytest.mark.slow
@LONG
def test_preempted_teacher_resumes_on_another_node_with_the_same_numbers(plain_run, preempted_job):
    out, _, victim, node = preempted_job
    record = _records(out / "storage")[victim]
    first, second = record["attempts"]  # one retry
    assert first["node_id"] == node and second["node_id"] != node
    assert second["resumed_from_epoch"] is not None  # from its epoch checkpoint
    plain = _records(plain_run[0] / "storage")[victim]
    assert _numbers(record) == _numbers(plain)
    runs = [r for r in _runs(out) if r.info.run_name == victim]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["cpsd.resumed"] == "true"
