"""``--model`` and ``--tracking-uri`` checked without torch or MLflow.

Importing torch, timm and MLflow takes seconds (more on a busy machine), so ``cpsd predict``,
``evaluate``, ``export`` and ``serve`` first check here what is cheap to check: a path exists,
a ``runs:/`` or ``models:/`` reference is well formed, and the tracking store it points into
exists. The store is never created here or later by these read-only commands: MLflow's SQLite
store creates its database file on first use, so a mistyped store is refused before MLflow
sees it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import NamedTuple

DEFAULT_STORE = "mlflow.db"
"""The SQLite file in the current directory used when nothing names a store."""

# MLflow's own forms: a version number or "latest" after a slash, an alias after "@", and
# MLflow 3 logged model ids (m-<hex>) on their own.
_MODELS = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))?")
_RUNS = re.compile(r"runs:/(?P<run_id>[^/]+)/(?P<path>.+)")


def absolute_tracking_uri(uri: str | None, cwd: str | os.PathLike | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``, with SQLite paths absolute.

    Ray workers run in another directory, so a relative ``sqlite:///mlflow.db`` would silently
    create a throwaway database per worker: relative SQLite paths are made absolute here.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    base = Path(cwd or os.getcwd())
    if not uri:
        return f"sqlite:///{(base / DEFAULT_STORE).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path means a local SQLite file here
        return f"sqlite:///{(base / uri).resolve()}"
    return uri


class TrackingStore(NamedTuple):
    """A tracking store and how it was chosen, for messages that say where was searched."""

    uri: str
    chosen_by: str  # "--tracking-uri", "MLFLOW_TRACKING_URI" or "the default"

    @classmethod
    def of(cls, uri: str | None) -> TrackingStore:
        """The store ``--tracking-uri`` names, else ``MLFLOW_TRACKING_URI``, else ./mlflow.db."""
        if uri:
            return cls(absolute_tracking_uri(uri), "--tracking-uri")
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return cls(absolute_tracking_uri(None), "MLFLOW_TRACKING_URI")
        return cls(absolute_tracking_uri(None), f"the default, ./{DEFAULT_STORE}")

    def where(self) -> str:
        """``tracking store URI (chosen by ...); point at another with ...``."""
        return (
            f"tracking store {self.uri} ({self.chosen_by}); point at the store that holds it "
            "with --tracking-uri URI or MLFLOW_TRACKING_URI"
        )

    def local_path(self) -> Path | None:
        """The SQLite database file or ``file:`` store directory; None for a server."""
        if self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///").split("?")[0])
        if self.uri.startswith("file:"):
            return Path(urllib.parse.urlparse(self.uri).path)
        return None


def model_uri(ref: str) -> str:
    """``models:/name/<alias>`` -> ``models:/name@<alias>``; other references unchanged.

    MLflow reads the path segment after a registered model's name as a version number (or
    ``latest``); aliases need ``@``. Both spellings are accepted here.
    """
    match = _MODELS.fullmatch(ref)
    version = match and match.group("version")
    if version and not version.isdigit() and version.lower() != "latest":
        return f"models:/{match.group('name')}@{version}"
    return ref


def check_model_ref(ref: str, store: TrackingStore) -> None:
    """Refuse a ``--model`` that cannot exist, looking only at its text and the file system.

    Raises:
        FileNotFoundError: No such path; a malformed ``runs:/`` or ``models:/`` reference; or
            a local tracking store (SQLite file, ``file:`` directory) that does not exist (it
            is not created).
    """
    if not ref.startswith(("runs:/", "models:/")):
        if not Path(ref).exists():
            raise FileNotFoundError(f"--model {ref}: no such file or directory")
        return
    if ref.startswith("models:/") and not _MODELS.fullmatch(ref):
        raise FileNotFoundError(
            f"--model {ref}: expected models:/<name>/<version>, models:/<name>/<alias> or "
            "models:/<name>@<alias>"
        )
    if ref.startswith("runs:/") and not _RUNS.fullmatch(ref):
        raise FileNotFoundError(f"--model {ref}: expected runs:/<run_id>/<stage>")
    local = store.local_path()
    if local is not None and not local.exists():  # MLflow would create it
        raise FileNotFoundError(f"--model {ref}: there is no {store.where()}")
