"""Training survives its tracking server: a real `mlflow server` on 127.0.0.1 is stopped and
restarted in the middle of a stage, and a driver killed mid-stage is picked up by the next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlcore.train import LAST, load_checkpoint
from workflows.config import config_path, load_config
from workflows.pipeline import run_pipeline

from .conftest import REPO, free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


class MlflowServer:
    """`mlflow server` as our child on a fixed port; start/stop by PID."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--default-artifact-root", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    def stop(self) -> None:
        """An outage as a crash: SIGKILL to the server's own process group (its workers take
        about 10 s to stop on SIGTERM, which only slowed the tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow")
    srv.root.mkdir()
    srv.start()
    yield srv
    srv.stop()


def _wait_for_epoch(stages: Path, pattern: str, epoch: int, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for last in stages.glob(f"{pattern}/{LAST}"):
            try:
                if load_checkpoint(last)["epoch"] >= epoch:
                    return
            except (OSError, RuntimeError, EOFError):
                pass  # being replaced right now
        time.sleep(0.2)
    raise TimeoutError(f"{pattern} never reached epoch {epoch}")


def test_training_continues_through_a_tracking_outage(server, tiny_overrides, tmp_path):
    cfg = load_config(
        config_path("tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri={server.uri}",
            "cpsd.mode=baseline",
            "train.epochs=6",
        ],
    )
    stages = tmp_path / "storage" / "tiny" / "stages"
    events = []

    def outage() -> None:
        try:
            _wait_for_epoch(stages, "baseline-*", 0)
            server.stop()
            events.append(("down", time.time()))
            _wait_for_epoch(stages, "baseline-*", 3)
            server.start()
            events.append(("up", time.time()))
        except Exception as err:  # reported by the assertion below
            events.append((repr(err), time.time()))

    watcher = threading.Thread(target=outage, daemon=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        watcher.start()
        summary = run_pipeline(cfg, log=lambda _: None)
    finally:
        ray.shutdown()
    watcher.join(timeout=60)
    assert [e for e, _ in events] == ["down", "up"]  # the outage did happen mid-stage
    assert summary.rows[-1]["name"] == "baseline"

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("cpsd")
    runs = client.search_runs([exp.experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("cpsd.role") == "baseline"]
    assert len(stage_runs) == 1
    run = stage_runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_mAP")
    assert sorted(m.step for m in history) == list(range(1, 7))  # nothing lost in the outage
    assert "test_mAP" in run.data.metrics
    assert not list(stages.glob("baseline-*/unsent-mlflow.json"))
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_restarted_driver_finishes_the_stage_runs_of_a_killed_one(
    server, tiny_overrides, tmp_path
):
    overrides = [
        *tiny_overrides,
        f"storage_path={tmp_path / 'storage'}",
        f"mlflow.tracking_uri={server.uri}",
        "cpsd.mode=baseline",
        "train.epochs=5",
    ]
    stages = tmp_path / "storage" / "tiny" / "stages"
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "workflows.pipeline", "--config", "tiny", *args],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_epoch(stages, "baseline-*", 1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(timeout=30)

    cfg = load_config(config_path("tiny"), overrides)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        run_pipeline(cfg, log=lambda _: None)
    finally:
        ray.shutdown()

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("cpsd")
    runs = client.search_runs([exp.experiment_id])
    baseline = [r for r in runs if r.data.tags.get("cpsd.role") == "baseline"]
    assert len(baseline) == 1, "the second driver continued the first one's run"
    run = baseline[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("cpsd.resumed") == "true"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mAP"))
    assert steps[0] == 1 and steps[-1] == 5  # epochs from before and after the restart
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the dead parent is KILLED
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
