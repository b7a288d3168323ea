"""What a person sees while a job runs: one line per stage, one progress line, logs in files.

Workers do not print to the driver's console (Ray's forwarding is off unless ``verbose``): each
training stage writes its epoch lines to ``stage.log`` in its stage folder, and reports its
epoch to a :class:`ProgressBoard` actor. The driver prints one line per finished stage and a
progress line: stages done / running / waiting, the epoch of each running stage, the elapsed
time and an estimate. On a terminal the progress line is redrawn in place every second; on
anything else (CI, ``ray job logs``) it is a plain line every ``PLAIN_EVERY_S`` seconds.
Third-party INFO logging (MLflow's, Ray's) is turned down unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

PLAIN_EVERY_S = 30.0  # progress lines on a non-terminal
STAGE_LOG = "stage.log"
QUIET_LOGGERS = ("mlflow", "alembic", "ray", "urllib3", "matplotlib", "timm")


def quiet_third_party(verbose: bool) -> None:
    """INFO lines of other libraries only when asked for (``verbose``)."""
    level = logging.INFO if verbose else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


class ProgressBoard:
    """Where running stages post their epoch (a Ray actor with no CPU; see :func:`board`)."""

    def __init__(self) -> None:
        self.running: dict[str, tuple[int, int]] = {}

    def epoch(self, stage: str, epoch: int, epochs: int) -> None:
        self.running[stage] = (epoch, epochs)

    def end(self, stage: str) -> None:
        self.running.pop(stage, None)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self.running)


def board() -> Any:
    """A new :class:`ProgressBoard` actor on the driver's node (Ray must be initialised).

    Pinned there: with no CPU it would count as idle on an autoscaled worker, which the
    autoscaler removes, taking the actor with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()


def post_epoch(progress: Any, stage: str, epoch: int, epochs: int) -> None:
    """Tell the board (if any) that ``stage`` finished ``epoch`` of ``epochs``; never fails
    the stage."""
    if progress is not None:
        with contextlib.suppress(Exception):
            progress.epoch.remote(stage, epoch, epochs)


def post_end(progress: Any, stage: str) -> None:
    if progress is not None:
        with contextlib.suppress(Exception):
            progress.end.remote(stage)


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


@contextlib.contextmanager
def stage_log(folder: Path, verbose: bool) -> Iterator[Path]:
    """Send this process's prints (epoch lines, warnings) to ``folder/stage.log`` while a
    stage trains; with ``verbose`` also to the console (Ray forwards it to the driver)."""
    path = folder / STAGE_LOG
    quiet_third_party(verbose)
    with open(path, "a", buffering=1) as handle:
        out = _Tee(handle, sys.__stdout__) if verbose else handle
        err = _Tee(handle, sys.__stderr__) if verbose else handle
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield path


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """Renders the board's snapshot and the graph's counts (module docstring)."""

    def __init__(
        self, progress: Any, write: Callable[[str], None] | None = None, tty: bool | None = None
    ):
        self.progress = progress
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.started = time.time()
        self._last = 0.0
        self._shown = False

    def text(self, done: int, running: dict[str, tuple[int, int]], total: int) -> str:
        waiting = max(0, total - done - len(running))
        elapsed = time.time() - self.started
        epochs = ", ".join(f"{name} {e}/{n}" for name, (e, n) in sorted(running.items()))
        fraction = (done + sum(e / n for e, n in running.values() if n)) / max(1, total)
        eta = f", ~{_duration(elapsed * (1 - fraction) / fraction)} left" if fraction > 0 else ""
        busy = f" ({epochs})" if epochs else ""
        return (
            f"[{_duration(elapsed)}] {done}/{total} stages done, {len(running)} running{busy}, "
            f"{waiting} waiting{eta}"
        )

    def update(self, done: int, total: int, *, force: bool = False) -> None:
        """Redraw (terminal) or print (otherwise) when due."""
        now = time.time()
        due = 1.0 if self.tty else PLAIN_EVERY_S
        if not force and now - self._last < due:
            return
        self._last = now
        running: dict[str, tuple[int, int]] = {}
        if self.progress is not None:
            import ray

            with contextlib.suppress(Exception):
                running = ray.get(self.progress.snapshot.remote(), timeout=5)
        line = self.text(done, running, total)
        if self.tty:
            width = os.get_terminal_size().columns if sys.stdout.isatty() else 120
            self.write("\r" + line[: width - 1].ljust(width - 1))
            self._shown = True
        else:
            self.write(line + "\n")

    def clear(self) -> None:
        """Before a plain line on a terminal: erase the progress line."""
        if self.tty and self._shown:
            self.write("\r\033[K")
            self._shown = False
