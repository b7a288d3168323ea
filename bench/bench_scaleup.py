"""Scale-up timeline on Ray's fake autoscaling cluster, with and without prewarming.

    PYTHONPATH=$PWD python bench/bench_scaleup.py [--repeats N] [--max-workers 4]

Starts one fake multi-node cluster (``tests/fake_cluster.py``: a CPU-only head, worker type
``{CPU: 1, GPU: 1}``, 0..max-workers, idle timeout 6 s, autoscaler update every 1 s) and runs
``python -m workflows.pipeline --config tiny`` against it with default placement, alternating
``ray.prewarm=true`` and ``false``; before each run the cluster is back at zero workers. For
each run it prints, in seconds from the driver's start ("submit"): when the first worker node
was alive, when the last of the 4 teachers started training on a worker (its first attempt in
``attempts.json``: "all teachers running"), and when the pipeline ended.

Worker nodes are processes on this machine, so a node "boots" in seconds (a cloud VM takes
minutes); what the numbers compare is how the requests reach the autoscaler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.fake_cluster import FakeCluster, fake_cluster

SETS = [
    "cpsd.teacher_epochs=1",
    "train.epochs=1",
    "mlflow.log_models=false",
    "mlflow.log_checkpoints=false",
]


def one_run(cluster: FakeCluster, out: Path, prewarm: bool) -> dict[str, float]:
    first_worker: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.25):
            if not first_worker and cluster.workers():
                first_worker.append(time.time())

    sets = [
        *SETS,
        f"ray.prewarm={str(prewarm).lower()}",
        f"storage_path={out / 'storage'}",
        f"data.cache_dir={out.parent / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
    ]
    out.mkdir(parents=True)
    watcher = threading.Thread(target=watch, daemon=True)
    start = time.time()
    watcher.start()
    done = subprocess.run(
        [sys.executable, "-m", "workflows.pipeline", "--config", "tiny"]
        + [a for s in sets for a in ("--set", s)],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    end = time.time()
    stop.set()
    watcher.join()
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    starts = [
        json.loads(p.read_text())["attempts"][0]["time"]
        for p in (out / "storage").glob("tiny/stages/teacher-*/_SUCCESS.json")
    ]
    assert len(starts) == 4, starts
    return {
        "first worker": first_worker[0] - start,
        "all teachers running": max(starts) - start,
        "pipeline done": end - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-workers", type=int, default=4)
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench-scaleup-") as tmp:
        root = Path(tmp)
        with fake_cluster(root, max_workers=args.max_workers) as cluster:
            for i in range(args.repeats):
                for prewarm in (True, False):
                    cluster.wait_workers(0, timeout=120)
                    run = one_run(cluster, root / f"run-{i}-{prewarm}", prewarm)
                    results[prewarm].append(run)
                    print(
                        f"prewarm={prewarm}: "
                        + ", ".join(f"{k} {v:.1f} s" for k, v in run.items()),
                        flush=True,
                    )
    print("\n| prewarm | first worker (s) | all teachers running (s) | pipeline done (s) |")
    print("|---|---|---|---|")
    for prewarm, runs in results.items():
        cells = [
            " / ".join(f"{r[key]:.1f}" for r in runs)
            + (f" (median {statistics.median(r[key] for r in runs):.1f})" if len(runs) > 1 else "")
            for key in ("first worker", "all teachers running", "pipeline done")
        ]
        print(f"| {'on' if prewarm else 'off'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
