"""``bench/gpu_check.py`` runs end to end: its CPU fallback (toy sizes, gloo, a logical GPU for
the sharing check) on this machine. The GPU figures themselves come from running the script
on a GPU (docs/benchmarks.md); nothing here times anything."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_cpu_fallback_runs_every_check(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for section in ("(1)", "(2)", "(3)", "(4)"):
        assert section in done.stdout
    results = json.loads(out.read_text())
    loop = results["loop"]
    assert loop["pure_images_s"] > 0
    for decode_on in ("loader", "device"):
        assert loop[decode_on]["images_s"] > 0 and loop[decode_on]["ratio"] > 0
    sharing = results["sharing"]
    for mode in ("one_at_a_time", "shared"):
        assert len(sharing[mode]["teachers"]) == 2 and sharing[mode]["wall_s"] > 0
    group = results["group"]
    assert group["ran"] and group["backend"] == "gloo", group
    assert 0.0 <= group["val_mAP"] <= 1.0
