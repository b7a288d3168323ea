"""tools/check_mlflow_ui.py against a real `mlflow server` and headless Chromium.

Runs only where Playwright and Debian's chromium are installed (not in CI: see the tool's
docstring). The store is filled without training: runs with roles and final keys, and the
shared runs view the pipeline saves.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from workflows.tracking import (
    describe_experiment,
    describe_run,
    experiment_id,
    final_metrics,
    log_final_metrics,
    runs_page_link,
    share_runs_view,
)

from .conftest import REPO, free_port

pytest.importorskip("playwright")
CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
pytestmark = pytest.mark.slow

ROLES = {"teacher": 2, "ensemble": 1, "student": 1, "baseline": 1}


def load_tool():
    path = REPO / "tools" / "check_mlflow_ui.py"
    spec = importlib.util.spec_from_file_location("check_mlflow_ui", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A store with a pipeline's runs, served by `mlflow server`; yields its runs-page URL."""
    root = tmp_path_factory.mktemp("ui-check")
    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(store)
    exp = experiment_id(client, store, "cpsd")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    for role, count in ROLES.items():
        for i in range(count):
            run = client.create_run(
                exp, run_name=f"{role}-{i}", tags={"mlflow.parentRunId": parent}
            ).info.run_id
            describe_run(client, run, role=role, description=f"{role} {i}.")
            epoch = None if role == "ensemble" else 1
            final = final_metrics(
                best_val_mAP=0.5 + i / 10, best_epoch=epoch, num_classes_evaluated=4, test_mAP=0.4
            )
            log_final_metrics(client, run, final, step=0)
            client.set_terminated(run)
    client.set_terminated(parent)
    describe_experiment(client, exp)
    view = share_runs_view(client, exp)
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--backend-store-uri", store]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "mlflow server did not come up in 120 s"
                time.sleep(0.5)
        yield runs_page_link(url, exp, view=view), runs_page_link(url, exp)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its workers take ~10 s to stop on SIGTERM
        proc.wait(timeout=30)


def test_the_shared_view_passes_and_a_plain_runs_page_fails(server, tmp_path, capsys):
    tool = load_tool()
    shared, plain = server
    argv = ["--viewport", "1600x1000", "--chromium", CHROMIUM, "--out", str(tmp_path)]
    assert tool.main([shared, *argv]) == 0
    out = capsys.readouterr().out
    # Opening the link and closing the Assistant panel MLflow opens on a first visit.
    assert "action 2: close-assistant" in out and "2 action(s)" in out
    assert "(off screen)" not in out

    # Without the view: group by role, then add both metrics through the Columns menu.
    assert tool.main([plain, *argv]) == 1
    out = capsys.readouterr().out
    assert "action 4: group-by-role" in out and "show-test_mAP" in out
    assert "FAIL (1600x1000): took 10 actions (at most 3 allowed)" in out
    assert "shows no" not in out  # every value was read once its column was added
