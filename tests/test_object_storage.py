"""Datasets and artifacts on object storage, against a real S3-compatible server.

The server is moto's (``python -m moto.server``), started here on a free port of 127.0.0.1 and
stopped by its PID; every process (this one, Ray's workers) finds it through the standard AWS
environment variables, ``AWS_ENDPOINT_URL`` among them (see ``cluster/README.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from mlcore.cpsd import run_local
from mlcore.data.dataset import MultiLabelDataset
from mlcore.data.loading import resolve_dataset
from mlcore.data.manifest import (
    Manifest,
    ManifestInfo,
    build_table,
    read_info,
    write_manifest,
)
from workflows.config import config_path, load_config
from workflows.pipeline import run_pipeline

ray = pytest.importorskip("ray")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

# A student trained on two Ray Train workers matches the one-process reference within this val
# and test mAP (the tolerance is derived in tests/test_distributed.py's docstring).
MAP_TOL = 2e-3
pytestmark = pytest.mark.slow

BUCKET = "cpsd-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with one bucket; the AWS variables point this process at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - server's life
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **CREDENTIALS},
    )
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.3)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def s3_ray(s3):
    # Started after the AWS variables are set: Ray's workers inherit them.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    yield s3
    ray.shutdown()


def _upload(local, uri: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def _objects(prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _tiny_dataset(tiny_overrides):
    return resolve_dataset(load_config(config_path("tiny"), tiny_overrides).data)


def test_dataset_on_s3_with_paths_or_embedded_bytes_reads_like_local(s3, tiny_overrides, tmp_path):
    local = _tiny_dataset(tiny_overrides)
    _upload(local, f"s3://{BUCKET}/datasets/paths")
    # The same rows with the images embedded in the manifest (no image files).
    table = Manifest.load(local).table
    blobs = [(local / p).read_bytes() for p in table.column("path").to_pylist()]
    embedded = build_table(
        table.column("image_id").to_pylist(),
        table.column("labels").to_pylist(),
        table.column("split").to_pylist(),
        image_bytes=blobs,
    )
    info = read_info(local)
    write_manifest(tmp_path / "embedded", embedded, ManifestInfo(class_names=info.class_names))
    _upload(tmp_path / "embedded", f"s3://{BUCKET}/datasets/embedded")

    reference = MultiLabelDataset(Manifest.load(local), "val")
    for name in ("paths", "embedded"):
        uri = f"s3://{BUCKET}/datasets/{name}"
        cache = tmp_path / f"cache-{name}"
        remote = MultiLabelDataset(Manifest.load(uri, cache_dir=cache), "val", cache_dir=cache)
        for i in (0, 5, len(reference) - 1):
            image, labels = remote[i]
            ref_image, ref_labels = reference[i]
            assert np.array_equal(image.numpy(), ref_image.numpy())
            assert labels.tolist() == ref_labels.tolist()
    # Path-based images came through the local cache, and are read from it from then on.
    cached = sorted(p.name for p in (tmp_path / "cache-paths").rglob("*.png"))
    assert len(cached) == 3
    (cached_file,) = [p for p in (tmp_path / "cache-paths").rglob("*.png")][:1]
    cached_file.write_bytes(b"not an image")  # proves the next read uses the cache
    with pytest.raises(Exception, match="cannot read image"):
        MultiLabelDataset(
            Manifest.load(f"s3://{BUCKET}/datasets/paths"),
            "val",
            cache_dir=tmp_path / "cache-paths",
        ).load_image(
            next(
                i for i, p in enumerate(reference.paths.to_pylist()) if p.endswith(cached_file.name)
            )
        )


# Two pipelines, the one-process reference and a two-worker student group: up to ~5 min on 2
# cores shared with another test process, over the suite's 300 s default.
@pytest.mark.timeout(900)
def test_pipeline_with_s3_storage_and_data_then_a_rerun_skips_every_stage(
    s3_ray, tiny_overrides, tmp_path
):
    _upload(_tiny_dataset(tiny_overrides), f"s3://{BUCKET}/datasets/tiny")
    storage = f"s3://{BUCKET}/runs"
    cfg = load_config(
        config_path("tiny"),
        [
            *tiny_overrides,
            "data.synth=null",
            f"data.root=s3://{BUCKET}/datasets/tiny",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"storage_path={storage}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "cpsd.mode=cgpd",
            "cpsd.teacher_epochs=1",
            # The student on a Ray Train group: its checkpoints go to S3 as well.
            "ray.student_train_workers=2",
        ],
    )
    first = run_pipeline(cfg, log=lambda _: None)
    # Object storage and a worker group change where models train, not what they compute.
    reference = run_local(cfg, tmp_path / "reference", log=lambda _: None)
    assert [r["name"] for r in first.rows] == [r["name"] for r in reference.rows]
    for ours, ref in zip(first.rows, reference.rows, strict=True):
        if ours["name"] == "student":  # on two workers
            for metric in ("val_mAP", "test_mAP"):
                assert ours[metric] == pytest.approx(ref[metric], abs=MAP_TOL)
        else:  # in one process, as the reference
            assert ours == pytest.approx(ref, abs=1e-9)
    keys = _objects("runs/tiny/")
    assert "runs/tiny/summary/summary.json" in keys
    stages = {k.split("/")[3] for k in keys if k.startswith("runs/tiny/stages/")} - {""}
    assert {s.rsplit("-", 1)[0] for s in stages} == {
        "partition-cgp",
        "teacher-cgp-0",
        "teacher-cgp-1",
        "ensemble-target",
        "student",
    }
    assert any(k.endswith("teacher_logits/values.npy") for k in keys)
    assert not any("/ray_train/" in k for k in keys)  # removed once the student finished
    # The student's downloads stay out of its synced stage folder (they were re-uploaded after
    # every epoch), and cached mode fetches no teacher checkpoint at all.
    student_keys = [k for k in keys if k.startswith("runs/tiny/stages/student-")]
    assert not any("/inputs/" in k or k.endswith("-best.pt") for k in student_keys)
    summary = json.loads(
        boto3.client("s3")
        .get_object(Bucket=BUCKET, Key="runs/tiny/summary/summary.json")["Body"]
        .read()
    )
    assert summary == first.rows
    # Every stage run ends FINISHED with its dataset inputs (an s3:// dataset root once made
    # the model record fail, so teacher and student runs were left RUNNING, then KILLED).
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cpsd").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    teacher = next(r for r in runs if r.info.run_name.startswith("teacher-cgp-0"))
    (source,) = {json.loads(i.dataset.source)["uri"] for i in teacher.inputs.dataset_inputs}
    assert source == f"s3://{BUCKET}/datasets/tiny"
    assert not any(k.endswith("unsent-mlflow.json") for k in keys)

    shutil.rmtree(tmp_path / "cache")  # the rerun reads the dataset from S3 again
    again = run_pipeline(cfg, log=lambda _: None)
    assert again.rows == first.rows
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cpsd").experiment_id])
    parents = sorted(
        (r for r in runs if "mlflow.parentRunId" not in r.data.tags),
        key=lambda r: r.info.start_time,
    )
    assert len(parents) == 2
    first_runs = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    world = {r.info.run_name: r.data.tags.get("ray.world_size") for r in first_runs}
    assert world["student"] == "2"
    assert {world[n] for n in world if n.startswith("teacher")} == {"1"}
    second = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    stage_runs = [r for r in second if r.data.tags.get("cpsd.role") != "ensemble"]
    assert sorted(r.info.run_name for r in stage_runs) == [
        "student",
        "teacher-cgp-0",
        "teacher-cgp-1",
    ]
    assert all("cpsd.reused_from" in r.data.tags for r in stage_runs)  # every stage skipped


def test_a_lease_on_object_storage_serialises_holders_and_expires(s3, monkeypatch):
    """Storage.lock on s3://: a second holder waits for the first; a lease whose holder
    stopped renewing it (a dead process) is taken over once it expires."""
    from workflows import storage as storage_module
    from workflows.storage import Lease, Storage

    monkeypatch.setattr(storage_module, "LEASE_SETTLE_S", 0.2)
    monkeypatch.setattr(storage_module, "WAIT_POLL_S", 0.2)
    store = Storage(f"s3://{BUCKET}/leases")
    order: list[str] = []
    waited: list[str] = []
    first = Lease(store, "job/.locks/stage.lease.json", ttl_s=30)
    first.__enter__()
    assert store.read_json("job/.locks/stage.lease.json")["owner"] == first.owner

    def second() -> None:
        with store.lock("job/stages/stage", on_wait=waited.append):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(1.5)
    assert order == [] and waited == [first.owner]  # it waits, naming the holder
    order.append("first")
    first.__exit__(None, None, None)
    thread.join(timeout=30)
    assert order == ["first", "second"]
    assert "job/.locks/stage.lease.json" not in [
        k.removeprefix("leases/") for k in _objects("leases/")
    ]

    # A holder that died: its lease is never renewed and is taken over after the TTL.
    dead = Lease(store, "job/.locks/other.lease.json", ttl_s=1.0)
    dead._write()
    started = time.time()
    with Lease(store, "job/.locks/other.lease.json", ttl_s=30):
        assert time.time() - started >= 0.5
