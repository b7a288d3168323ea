"""The job's artifact store: a local directory or ``s3://`` / ``gs://`` through pyarrow.fs.

Stages write their outputs under ``<storage_path>/<job name>/stages/<stage>-<key>/`` and mark
completion with a ``_SUCCESS.json`` written last. Training itself always runs in a local
directory; on remote storage that directory is synced up after every epoch, so a retried task
on another node resumes from the last epoch.

One writer per stage folder (:meth:`Storage.lock`). Two drivers that need the same stage (two
pipelines on one ``storage_path``, started together) must not train it side by side: the
second waits for the first, then finds the stage done and reuses it.

* Local and shared file systems: an exclusive ``flock`` on ``<job>/.locks/<stage>.lock``,
  held by the process that trains the stage. The kernel drops it when that process dies, so a
  killed worker never leaves a stale lock. On NFS this needs working NFS locking (v4, lockd).
* Object storage has no locks: a lease object ``<job>/.locks/<stage>.lease.json`` names its
  owner and an expiry ``LEASE_TTL_S`` ahead, renewed every ``LEASE_TTL_S / 4`` by a heartbeat
  thread. A waiting process takes the lease over once it has expired (its owner died).
  Limits: writing the lease is not atomic, so a taker writes, waits ``LEASE_SETTLE_S``, reads
  it back and proceeds only if its own name is still there; two takers whose writes land
  within that window both read the later write, and only its writer proceeds. A taker stalled
  for longer than the window between reading and writing can still race; a process stalled
  longer than the TTL (a paused VM) loses its lease while it trains; and clocks across hosts
  must agree to well within the TTL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS.json"
LEASE_TTL_S = 120.0  # an object-storage lease not renewed for this long is taken over
LEASE_SETTLE_S = 2.0  # between writing a lease and reading it back
WAIT_POLL_S = 2.0  # how often a waiting process looks at a lease again


class Storage:
    """A root URI or path, with the few operations the pipeline needs."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(
            self.uri if "://" in self.uri else Path(self.uri).resolve().as_uri()
        )

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (a local path when the storage is local)."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_json(self, rel: str) -> Any:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read().decode())

    def write_json(self, rel: str, data: Any) -> None:
        self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        tmp = f"{self.path(rel)}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(data, indent=1, default=str).encode())
        self.fs.move(tmp, self.path(rel))

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file or directory to ``rel`` (no-op when it already is that path)."""
        local = Path(local)
        target = self.path(rel)
        if self.is_local and Path(target).resolve() == local.resolve():
            return
        if local.is_dir():
            self.fs.create_dir(target, recursive=True)
            pafs.copy_files(str(local), target, destination_filesystem=self.fs)
        else:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(local), target, destination_filesystem=self.fs)

    def download(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy ``rel`` (file or directory) to a local path; returns it."""
        local = Path(local)
        source = self.path(rel)
        if self.is_local and Path(source).resolve() == local.resolve():
            return local
        info = self.fs.get_file_info(source)
        if info.type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(source, str(local), source_filesystem=self.fs)
        return local

    def done(self, rel: str) -> dict | None:
        """The stage's success record, or None when the stage has not completed."""
        marker = f"{rel}/{SUCCESS}"
        return self.read_json(marker) if self.exists(marker) else None

    def clear(self, rel: str) -> None:
        """Delete everything in the folder ``rel`` (a stale stage about to be retrained)."""
        if self.exists(rel):
            self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)

    def mark_done(self, rel: str, record: dict) -> None:
        self.write_json(f"{rel}/{SUCCESS}", record)

    @contextlib.contextmanager
    def lock(self, rel: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the stage folder ``rel`` exclusively (module docstring); blocks while another
        process holds it, calling ``on_wait(holder)`` once."""
        # Beside the stages, not among them: a stage folder's listing stays its stages.
        lock_rel = rel.replace("/stages/", "/.locks/", 1) if "/stages/" in rel else f".locks/{rel}"
        if self.is_local:
            path = Path(f"{self.path(lock_rel)}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    if on_wait is not None:
                        on_wait(handle.read().strip() or "another process")
                    fcntl.flock(handle, fcntl.LOCK_EX)
                handle.seek(0)
                handle.truncate()
                handle.write(_holder())
                handle.flush()
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            with Lease(self, f"{lock_rel}.lease.json", on_wait):
                yield


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class Lease:
    """An expiring lease object on object storage, renewed by a heartbeat (module docstring)."""

    def __init__(
        self,
        storage: Storage,
        rel: str,
        on_wait: Callable[[str], None] | None = None,
        ttl_s: float = LEASE_TTL_S,
    ):
        self.storage, self.rel, self.on_wait, self.ttl_s = storage, rel, on_wait, ttl_s
        self.owner = f"{_holder()} ({uuid.uuid4().hex[:8]})"
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self.rel)
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _write(self) -> None:
        self.storage.write_json(
            self.rel, {"owner": self.owner, "expires": time.time() + self.ttl_s}
        )

    def __enter__(self) -> Lease:
        told = False
        while True:
            lease = self._read()
            if lease is None or lease["expires"] < time.time():
                self._write()
                time.sleep(LEASE_SETTLE_S)
                lease = self._read()
                if lease is not None and lease["owner"] == self.owner:
                    break
            if not told and self.on_wait is not None and lease is not None:
                self.on_wait(lease["owner"])
                told = True
            time.sleep(WAIT_POLL_S)
        self._heartbeat = threading.Thread(target=self._renew, daemon=True)
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with contextlib.suppress(OSError):
                lease = self._read()
                if lease is not None and lease["owner"] != self.owner:
                    return  # taken over after we stalled past the TTL; never steal it back
                self._write()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        lease = self._read()
        if lease is not None and lease["owner"] == self.owner:
            with contextlib.suppress(OSError):
                self.storage.fs.delete_file(self.storage.path(self.rel))


class WorkDir:
    """A local working directory for a stage: the stage dir itself on local storage, else a
    temporary directory primed from (and synced back to) the remote stage dir.

    ``files`` primes only those files of the stage dir (the rest stays remote; syncing back
    adds and replaces files, never deletes).
    """

    def __init__(self, storage: Storage, rel: str, files: list[str] | None = None):
        self.storage, self.rel = storage, rel
        if storage.is_local:
            self.path = Path(storage.path(rel))
            self.path.mkdir(parents=True, exist_ok=True)
            self._tmp = None
        else:
            self._tmp = tempfile.mkdtemp(prefix="cpsd-stage-")
            self.path = Path(self._tmp)
            if files is not None:
                for name in files:
                    if storage.exists(f"{rel}/{name}"):
                        storage.download(f"{rel}/{name}", self.path / name)
            elif storage.exists(rel):
                storage.download(rel, self.path)

    def sync(self) -> None:
        if self._tmp is not None:
            self.storage.upload(self.path, self.rel)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
