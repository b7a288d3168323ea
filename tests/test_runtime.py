"""A local Ray start cleans up after a driver that was SIGKILLed (its raylet's agents outlive
it: ray-project/ray#52385)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from workflows import runtime

from .conftest import REPO

pytestmark = pytest.mark.slow

DRIVER = """
import time
from workflows.config import load_config
from workflows.runtime import init_ray
init_ray(load_config(None, ["ray.num_cpus=1"]))
print("ready", flush=True)
time.sleep(600)
"""


def _alive(proc: dict) -> bool:
    stat = runtime._stat(proc["pid"])
    return stat is not None and stat[1] == proc["start"]


def test_next_local_start_ends_what_a_killed_driver_left(tmp_path, monkeypatch):
    monkeypatch.setenv("CPSD_RAY_RECORDS", str(tmp_path / "records"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CPSD_RAY_RECORDS": str(tmp_path / "records")}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout.readline().strip() == "ready"
        record = tmp_path / "records" / f"{driver.pid}.json"
        processes = json.loads(record.read_text())["processes"]
        assert len(processes) >= 5  # GCS, raylet, monitors, agents
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # only the driver, as the OOM killer would
        driver.wait(timeout=30)
    time.sleep(5)
    # Measured on Ray 2.60: DashboardAgent and RuntimeEnvAgent are still alive here.
    survivors = [p for p in processes if _alive(p)]
    assert survivors, "Ray now ends its agents with the driver: this cleanup can go"

    ended = runtime.end_orphans()  # what the next local start runs first
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in processes):
        time.sleep(0.2)
    assert not [p for p in processes if _alive(p)]
    assert ended == len(survivors)
    assert not record.exists()


def test_a_live_drivers_processes_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CPSD_RAY_RECORDS", str(tmp_path / "records"))
    (tmp_path / "records").mkdir()
    me = runtime._stat(os.getpid())
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        record = {
            "driver": {"pid": os.getpid(), "start": me[1]},
            "processes": [{"pid": sleeper.pid, "start": runtime._stat(sleeper.pid)[1]}],
        }
        (tmp_path / "records" / "live.json").write_text(json.dumps(record))
        assert runtime.end_orphans() == 0
        assert sleeper.poll() is None
        # A recorded PID now running another program (other start time) is never touched.
        record["driver"]["start"] = -1
        record["processes"][0]["start"] = -1
        (tmp_path / "records" / "live.json").write_text(json.dumps(record))
        assert runtime.end_orphans() == 0 and sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
