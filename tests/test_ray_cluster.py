"""Real Ray clusters: `ray job submit` to a head started here, two nodes, a killed worker,
`ray job stop`. Every head is started by the test and stopped by its PID afterwards."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from workflows.config import config_path, load_config
from workflows.pipeline import run_pipeline

from .conftest import REPO, free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` as our child; stopped through its PID, also on failure.

    The job agent gets a free port: on the default 52365 it cannot serve HTTP while any other
    Ray instance on the machine holds that port, and job submission then fails with "No
    available agent to submit job".
    """
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
         "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dashboard}"
        _wait_http(f"{address}/api/version")
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: stops the processes this head started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _runtime_env_json() -> str:
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("env_vars", None)  # the shipped file points MLflow at a placeholder server
    return json.dumps(env)


def _submit(
    address,
    tmp_path,
    tiny_overrides,
    *overrides,
    wait=True,
    submission_id="job",
    module="pipeline",
    config="tiny",
):
    sets = [
        *tiny_overrides,
        f"storage_path={tmp_path / 'storage'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ]
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", _runtime_env_json(), "--submission-id", submission_id]  # fmt: skip
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", sys.executable, "-m", f"workflows.{module}", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "ray::IDLE" not in Path(
        f"/proc/{pid}/cmdline"
    ).read_text(errors="replace")


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpsd")
    return [] if exp is None else client.search_runs([exp.experiment_id])


# Three submitted jobs end to end: 211-221 s in clean-clone runs on 2 cores beside another
# test process, once over the suite's 300 s default (2026-12-03, acbceb8).
@pytest.mark.timeout(600)
def test_ray_job_submit_then_job_stop(ray_head, tmp_path, tiny_overrides):
    from ray.job_submission import JobStatus, JobSubmissionClient

    fast = "cpsd.teacher_epochs=1"
    done = _submit(ray_head, tmp_path, tiny_overrides, fast, submission_id="cpsd-ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = JobSubmissionClient(ray_head)
    info = client.get_job_info("cpsd-ok")
    assert info.status == JobStatus.SUCCEEDED, done.stdout[-3000:] + done.stderr[-3000:]
    assert info.driver_exit_code == 0
    logs = client.get_job_logs("cpsd-ok")
    assert "| student | student | 10 |" in logs
    # A person reads the console: at most 40 lines, no worker lines with Ray's prefixes, no
    # third-party INFO logging; each stage's epoch lines are in its own log file.
    lines = logs.strip().splitlines()
    assert len(lines) <= 40, logs
    assert not [line for line in lines if " pid=" in line or "INFO mlflow" in line], logs
    stages = tmp_path / "storage" / "tiny" / "stages"
    for stage in ("teacher-cgp-0", "student"):  # tiny trains no baseline
        (log,) = stages.glob(f"{stage}-*/stage.log")
        assert "epoch 1/" in log.read_text()
    # A head without an autoscaling config only mirrors its nodes: nothing to scale up.
    assert "placement: 0 GPU per teacher, student, baseline and trial (no GPUs and no " \
        "autoscaler)" in logs  # fmt: skip
    runs = _runs(tmp_path)
    names = sorted(r.info.run_name for r in runs)
    assert names == [
        "ensemble-cgp",
        "ensemble-dgp",
        "ensemble-target",
        "student",
        "teacher-cgp-0",
        "teacher-cgp-1",
        "teacher-dgp-0",
        "teacher-dgp-1",
        "tiny",
    ]
    assert all(r.info.status == "FINISHED" for r in runs)

    # A sweep is a job like the pipeline (the DB sweep here; the ASL one runs in test_tune).
    sweep = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
         "--runtime-env-json", _runtime_env_json(), "--submission-id", "cpsd-sweep", "--",
         sys.executable, "-m", "workflows.tune", "--config", "tune_db_tiny",
         *[a for s in [*tiny_overrides, f"storage_path={tmp_path / 'storage'}",
                       f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       "tune.num_samples=2"]
           for a in ("--set", s)]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert client.get_job_info("cpsd-sweep").status == JobStatus.SUCCEEDED, sweep.stdout[-3000:]
    assert (tmp_path / "storage" / "tune_db_tiny" / "best_loss.yaml").is_file()
    sweep_runs = [r for r in _runs(tmp_path) if r.info.run_name.startswith("run_trial")]
    assert len(sweep_runs) == 2 and all(r.info.status == "FINISHED" for r in sweep_runs)

    # A study is a job too. On the pipeline job's config and storage, its cpsd variant at seed 0
    # is that job's stages: only the baseline the study pairs it with is trained.
    study = _submit(
        ray_head, tmp_path, tiny_overrides, fast, "study.grid={cpsd.mode: [cpsd]}",
        "study.seeds=[0]", module="study", submission_id="cpsd-study",
    )  # fmt: skip
    assert client.get_job_info("cpsd-study").status == JobStatus.SUCCEEDED, study.stdout[-3000:]
    study_logs = client.get_job_logs("cpsd-study")
    assert "| mode=cpsd | 1 |" in study_logs
    for stage in ("teacher-cgp-0", "teacher-dgp-1", "student"):
        reused = re.search(rf"  {stage}-[0-9a-f]+: .*\(reused\)", study_logs)
        assert reused, (stage, study_logs[-3000:])
    assert not re.search(r"  baseline-[0-9a-f]+: .*\(reused\)", study_logs), study_logs[-3000:]
    summary = tmp_path / "storage" / "tiny" / "study" / "study_summary.csv"
    assert summary.is_file()
    runs = [r for r in _runs(tmp_path) if r.info.run_name in ("tiny", "tune_db_tiny")]
    runs += [r for r in _runs(tmp_path) if r.data.tags.get("cpsd.study")]

    # A long job, stopped while teachers and the baseline train: nothing may be left running,
    # in MLflow or as a process (the baseline used to escape the cancellation).
    _submit(ray_head, tmp_path, tiny_overrides, "name=long", "cpsd.teacher_epochs=50",
            "train.epochs=50", "cpsd.train_baseline=true", wait=False,
            submission_id="cpsd-stop")  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:
        running = {
            r.info.run_name
            for r in _runs(tmp_path)
            if r.info.status == "RUNNING" and r.info.start_time > max(x.info.end_time for x in runs)
        }
        checkpointed = list((tmp_path / "storage" / "long" / "stages").glob("teacher-*/last.pt"))
        if "baseline" in running and checkpointed:
            break
        time.sleep(0.5)
    assert "baseline" in running, client.get_job_logs("cpsd-stop")[-3000:]
    workers = [
        int(p.read_text()) for p in (tmp_path / "storage" / "long" / "stages").glob("*/worker.pid")
    ]
    subprocess.run(
        [RAY, "job", "stop", "--address", ray_head, "cpsd-stop"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    deadline = time.time() + 60
    while (
        client.get_job_status("cpsd-stop") not in (JobStatus.STOPPED, JobStatus.FAILED)
        and time.time() < deadline
    ):
        time.sleep(0.5)
    assert client.get_job_status("cpsd-stop") == JobStatus.STOPPED
    last_end = max(r.info.end_time for r in runs)
    long_runs = [r for r in _runs(tmp_path) if r.info.start_time > last_end]
    statuses = {r.info.run_name: r.info.status for r in long_runs}
    assert statuses.get("long") == "KILLED", statuses
    assert statuses.get("baseline") == "KILLED", statuses
    assert "RUNNING" not in statuses.values(), statuses
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "a stage kept training after the stop"
    # The interrupted teachers kept their epoch checkpoints.
    assert list((tmp_path / "storage" / "long" / "stages").glob("teacher-*/last.pt"))


def test_teachers_run_on_two_nodes(tiny_overrides, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, resources={"nodeB": 1})
        ray.init(address=cluster.address)
        cfg = load_config(
            config_path("tiny"),
            [
                *tiny_overrides,
                f"storage_path={tmp_path}",
                "mlflow.enabled=false",
                "cpsd.teacher_epochs=3",
            ],
        )
        run_pipeline(cfg, log=lambda _: None)
        records = [
            json.loads(p.read_text()) for p in tmp_path.glob("tiny/stages/teacher-*/_SUCCESS.json")
        ]
        nodes = {r["attempts"][-1]["node_id"] for r in records}
        assert len(records) == 4 and len(nodes) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_teacher_worker_is_retried_and_resumes(tmp_path, tiny_overrides):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage = tmp_path / "storage"
    sets = [
        *tiny_overrides,
        f"storage_path={storage}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "cpsd.teacher_epochs=6",
        "train.epochs=1",
    ]
    cmd = [sys.executable, "-m", "workflows.pipeline", "--config", "tiny"]
    for s in sets:
        cmd += ["--set", s]
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115 - lives as long as the job
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    victim = None
    try:
        deadline = time.time() + 180
        while victim is None and time.time() < deadline and proc.poll() is None:
            for stage in storage.glob("tiny/stages/teacher-*"):
                # Mid-training: at least one epoch checkpointed, not finished.
                if (stage / "last.pt").is_file() and not (stage / "_SUCCESS.json").exists():
                    victim = stage
                    os.kill(int((stage / "worker.pid").read_text()), signal.SIGKILL)
                    break
            time.sleep(0.05)
        assert victim is not None, (tmp_path / "job.log").read_text()[-3000:]
        assert proc.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    record = json.loads((victim / "_SUCCESS.json").read_text())
    assert len(record["attempts"]) == 2
    assert record["attempts"][1]["resumed_from_epoch"] >= 1  # resumed, not from scratch
    runs = _runs(tmp_path)
    teacher_runs = sorted(r.info.run_name for r in runs if r.info.run_name.startswith("teacher"))
    assert teacher_runs == ["teacher-cgp-0", "teacher-cgp-1", "teacher-dgp-0", "teacher-dgp-1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    resumed = [r for r in runs if r.data.tags.get("cpsd.resumed") == "true"]
    assert [r.info.run_name for r in resumed] == [victim.name.rsplit("-", 1)[0]]
