"""Shared fixtures: a session-wide cache of generated datasets and the tiny config."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LABEL_STATS = SHARED / "data" / "label_stats"

# One auth mode for every Ray process the tests start (see docs/ray-notes in the README).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A test that forgets mlflow.tracking_uri must not write mlflow.db into the checkout.
os.environ.setdefault(
    "MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='cpsd-tests-')}/mlflow.db"
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Generated datasets shared by all tests of the session (content-hashed)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir) -> list[str]:
    return [f"data.cache_dir={cache_dir}"]


@pytest.fixture()
def tiny_config(tiny_overrides, tmp_path):
    """The bundled tiny config, writing under this test's tmp_path."""
    from workflows.config import config_path, load_config

    return load_config(config_path("tiny"), [*tiny_overrides, f"storage_path={tmp_path / 'runs'}"])


def label_stats(name: str) -> Path:
    path = LABEL_STATS / name
    if not path.is_file():
        pytest.skip(f"{path} not present (shared/ data is beside the repo in CI)")
    return path


def free_port() -> int:
    """A TCP port nothing listens on right now (for servers the tests start on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
