"""A Ray head whose autoscaler is Ray's fake multi-node provider, started and stopped by PID.

``ray.cluster_utils.AutoscalingCluster.start()`` runs ``ray stop --force``, which ends every Ray
process on the machine; this starts ``ray start --head --block --autoscaling-config=FILE``
itself, on free ports, with the provider's config written here (its example file is not in
the wheel). Worker nodes are processes the head's autoscaler (monitor) starts; they outlive
the head's SIGTERM, so :meth:`FakeCluster.stop` ends every descendant of the head by PID.
Used by ``tests/test_autoscaling.py`` and ``bench/bench_scaleup.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workflows.runtime import _descendants, _stat

from .conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_TYPE = "gpu_worker"


def autoscaling_config(
    gcs_port: int, *, max_workers: int = 3, idle_timeout_minutes: float = 0.1
) -> dict[str, Any]:
    """A CPU-only head and one worker type ``{CPU: 1, GPU: 1}``, 0..``max_workers``."""
    return {
        "cluster_name": f"fake-{gcs_port}",
        "max_workers": max_workers,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Worker nodes join this GCS (the provider's default is port 6379).
            "gcs_address": f"127.0.0.1:{gcs_port}",
            # Start as many nodes as asked for in one launch, as a cloud provider does.
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "nobody"},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeCluster:
    proc: subprocess.Popen
    gcs: str
    dashboard: str
    log: Path

    def env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.gcs}

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes, from the dashboard's state API."""
        url = f"{self.dashboard}/api/v0/nodes?limit=1000&detail=true"
        with urllib.request.urlopen(url, timeout=10) as reply:
            data = json.loads(reply.read())
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def autoscaler_report(self) -> dict[str, Any] | None:
        """The autoscaler's last report (``ray status``), once it has made one."""
        with urllib.request.urlopen(f"{self.dashboard}/api/cluster_status", timeout=10) as reply:
            data = json.loads(reply.read())
        return (data["data"].get("clusterStatus") or {}).get("autoscalerReport")

    def workers(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if not n["is_head_node"]]

    def wait_workers(self, count: int, timeout: float = 120) -> None:
        """Wait until exactly ``count`` worker nodes are alive."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.workers()) == count:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{len(self.workers())} workers alive, expected {count}")

    def stop(self) -> None:
        """SIGTERM the head (it stops what it started), then SIGKILL every descendant left:
        the worker nodes the autoscaler started. Only processes under the head, by PID."""
        tree = [(pid, stat[1]) for pid in _descendants(self.proc.pid) if (stat := _stat(pid))]
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid, start in tree:
            stat = _stat(pid)
            if stat is not None and stat[1] == start:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@contextmanager
def fake_cluster(workdir: Path, **config: Any) -> Iterator[FakeCluster]:
    """A running fake autoscaling cluster (head: 1 CPU, no GPU); stopped on exit."""
    gcs, dashboard, agent, metrics, client = (free_port() for _ in range(5))
    config_file = workdir / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(autoscaling_config(gcs, **config)))
    log_path = workdir / "head.log"
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    # A dead raylet is noticed in about 2 s instead of 15-30 s.
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "1",
             "--num-gpus", "0", f"--autoscaling-config={config_file}",
             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent),
             "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
             f"--system-config={json.dumps(system)}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    cluster = FakeCluster(proc, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", log_path)
    try:
        _wait_http(f"{cluster.dashboard}/api/version")
        deadline = time.time() + 60
        while not (cluster.nodes() and cluster.autoscaler_report()):
            if time.time() > deadline:
                raise TimeoutError(f"the head did not come up: {log_path}")
            time.sleep(0.5)
        yield cluster
    finally:
        cluster.stop()
