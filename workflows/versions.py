"""Which code produced a stage: versions recorded with every result, and what to do with stale ones.

A stage's key covers its config and data, not the code that ran it, so a stage trained by an
older release would be reused silently after an upgrade. Every finished stage therefore records
:func:`versions` in its ``_SUCCESS.json`` and on its MLflow run. ``code`` is a digest of the
``mlcore`` sources (what trains and scores a model); a stage whose product version or code
digest differs from the running code's is *stale*. Config ``stale`` decides what a job does
with one: ``reuse`` it (one line names it, summaries mark its row), ``retrain`` it in place, or
stop with an ``error``. ``git_commit`` and the library versions are recorded for the reader and
do not make a stage stale on their own: a documentation commit changes nothing that was trained.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import mlcore
from mlcore.configlib import ConfigError

# What decides staleness; the rest of versions() is informational.
DECIDING = ("cpsd", "code")
LIBRARIES = ("torch", "torchvision", "timm", "ray", "mlflow", "numpy", "pyarrow")


class StaleStageError(ConfigError):
    """A finished stage was made by other code and config ``stale`` is ``error``."""


@functools.cache
def code_digest() -> str:
    """SHA-256 (first 16 hex digits) of every ``mlcore`` source file, by relative path."""
    root = Path(mlcore.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def versions() -> dict[str, str]:
    """The product version, code digest, git commit, Python and library versions."""
    from workflows.tracking import git_commit

    return {
        "cpsd": _version("cpsd"),
        "code": code_digest(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES},
    }


def stale_reason(record: dict[str, Any]) -> str | None:
    """Why a finished stage's record was made by other code than this (None: it was not).

    Records written before versions were recorded count as stale.
    """
    made = record.get("versions")
    if made is None:
        return "made by code older than version records"
    now = versions()
    changed = [f"{k} {made.get(k)} -> {now[k]}" for k in DECIDING if made.get(k) != now[k]]
    if not changed:
        return None
    commit = made.get("git_commit", "unknown")
    return f"made by other code (commit {commit[:12]}; {', '.join(changed)})"


def version_tags(record_versions: dict[str, str]) -> dict[str, str]:
    """The versions as MLflow tags (``cpsd.version.<name>``)."""
    return {f"cpsd.version.{k}": v for k, v in record_versions.items()}
