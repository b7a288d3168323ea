"""The job's artifact store: a local directory or ``s3://`` / ``gs://`` through pyarrow.fs.

Stages write their outputs under ``<storage_path>/<job name>/stages/<stage>-<key>/`` and mark
completion with a ``_SUCCESS.json`` written last. Training itself always runs in a local
directory; on remote storage that directory is synced up after every epoch, so a retried task
on another node resumes from the last epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SUCCESS = "_SUCCESS.json"


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

    def mark_done(self, rel: str, record: dict) -> None:
        self.write_json(f"{rel}/{SUCCESS}", record)


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
