"""Joining or starting Ray, and stopping cleanly on Ctrl-C or ``ray job stop`` (SIGTERM).

Processes a killed driver leaves behind. When the driver of a local instance is SIGKILLed (OOM
killer, ``kill -9``), Ray 2.60 ends its GCS, raylet and workers, but the raylet's
``DashboardAgent`` and ``RuntimeEnvAgent`` survive, reparented to init (seen 60 s after the
kill; ray-project/ray#52385, open). ``include_dashboard=False`` does not prevent them, and
Ray offers no switch to run without them. So a local start records the processes it started
(PID and start time, from ``/proc``) in ``~/.cache/cpsd/ray-local/<driver pid>.json``, deletes
that record on a clean exit, and on every later local start ends the recorded processes of any
driver that is gone, each only if its PID still has the recorded start time (a reused PID is
left alone). What remains: orphans stay until the next local start on that machine (or until
``kill <pid>`` from the record); only Linux has ``/proc``, elsewhere nothing is recorded.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

from mlcore.configlib import ConfigError
from workflows.config import Config

STOP = threading.Event()


def _stop_requested(signum, frame) -> None:
    # Inside ray.wait/ray.get Ray's own signal check swallows exceptions raised here, so wait
    # loops poll STOP; elsewhere the KeyboardInterrupt propagates at once.
    STOP.set()
    raise KeyboardInterrupt(f"signal {signum}")


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` when given, else start a local instance.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); `ray job stop` must end runs
    as KILLED instead, so SIGTERM and SIGINT are taken back and treated alike.
    """
    import logging

    import ray

    from workflows.console import quiet_third_party

    quiet_third_party(cfg.verbose)
    # Workers write their epoch lines to their stage's log file; forwarding them (with Ray's
    # prefixes) is for --verbose.
    quiet = {
        "log_to_driver": cfg.verbose,
        "logging_level": logging.INFO if cfg.verbose else logging.WARNING,
    }
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **quiet)
        else:
            stopped = end_orphans()
            if stopped:
                print(f"stopped {stopped} Ray processes left by killed drivers", flush=True)
            # "local" always starts a fresh instance; without it Ray may try to join whatever
            # cluster was last started on this machine (/tmp/ray/ray_current_cluster).
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus,
                num_gpus=cfg.ray.num_gpus,
                include_dashboard=False,
                **quiet,
            )
            record_local_processes()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_requested)
        signal.signal(signal.SIGINT, _stop_requested)


def device_for_task(cfg: Config, what: str) -> Config:
    """``cfg`` with ``train.device`` following the GPUs Ray gave this task or trial.

    A task that requested no GPU trains on the CPU even where CUDA is visible: left to
    ``auto`` it would silently share ``cuda:0`` with the tasks that did request it (Ray does not
    hide the devices from a task without GPUs). A task that holds GPUs uses them (Ray's
    ``CUDA_VISIBLE_DEVICES`` makes the first assigned one ``cuda:0``). ``train.device``
    naming CUDA in a task without a GPU is a clear error, not a silent share.

    Raises:
        ConfigError: ``train.device`` asks for CUDA but the task holds no GPU.
    """
    import ray
    import torch

    device = cfg.train.device
    holds_gpu = bool(ray.get_gpu_ids())
    if not holds_gpu and device.startswith("cuda"):
        raise ConfigError(
            f"{what}: train.device={device} but this Ray task requested no GPU; request one "
            "(ray.teacher_gpus / ray.student_gpus, tune.resources_per_trial.GPU) or set "
            "train.device: auto"
        )
    if device == "auto":
        device = "cuda" if holds_gpu and torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))


# ---------------------------------------------------------------------------------------------
# Processes of a local instance (module docstring)


def records_dir() -> Path:
    """Where local starts record their processes (``CPSD_RAY_RECORDS`` overrides)."""
    default = Path.home() / ".cache" / "cpsd" / "ray-local"
    return Path(os.environ.get("CPSD_RAY_RECORDS", default))


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def process_start(pid: int) -> int | None:
    """The start time of a live process in clock ticks (None: gone, or no /proc): with the
    PID, it names one process, even after the PID is reused."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[0]
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def record_local_processes(settle_s: float = 5.0) -> Path | None:
    """Record the processes this driver's local Ray started (waits for the raylet's agents)."""
    if not Path("/proc/self/stat").exists():
        return None
    me = os.getpid()
    deadline = time.monotonic() + settle_s
    pids: list[int] = []
    while time.monotonic() < deadline:
        pids = _descendants(me)
        # GCS, raylet, monitor, log monitor, dashboard head, and the raylet's two agents.
        if len(pids) >= 7:
            break
        time.sleep(0.2)
    processes = [{"pid": p, "start": stat[1]} for p in pids if (stat := _stat(p)) is not None]
    records_dir().mkdir(parents=True, exist_ok=True)
    record = records_dir() / f"{me}.json"
    own = _stat(me)
    record.write_text(
        json.dumps({"driver": {"pid": me, "start": own and own[1]}, "processes": processes})
    )
    atexit.register(record.unlink, missing_ok=True)
    return record


def end_orphans() -> int:
    """End the recorded processes of local instances whose driver is gone; returns how many."""
    if not records_dir().is_dir():
        return 0
    stopped = 0
    for record in records_dir().glob("*.json"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        driver = data["driver"]
        alive = _stat(driver["pid"])
        if alive is not None and alive[1] == driver["start"]:
            continue  # that driver still runs its instance
        for proc in data["processes"]:
            stat = _stat(proc["pid"])
            if stat is not None and stat[1] == proc["start"]:
                try:
                    os.kill(proc["pid"], signal.SIGKILL)
                    stopped += 1
                except ProcessLookupError:
                    pass
        record.unlink(missing_ok=True)
    return stopped
