"""Records you can trust under reruns, concurrency and faults (issue: bookkeeping).

One test per defect, each against a real local Ray (started here, stopped after) and a real
SQLite MLflow store: a later pipeline never takes over an earlier one's runs, two drivers on one
storage train a stage once, a dead driver's parent is marked KILLED, the final keys and the
model survive a failing or unreachable tracking store, stage runs carry source and version
tags, stale stages are named, and user errors stop before Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from mlcore.cpsd import baseline_fingerprint
from mlcore.data.loading import open_dataset, resolve_dataset
from workflows import tracking
from workflows.config import MlflowConfig, config_path, load_config
from workflows.pipeline import main, run_pipeline
from workflows.stages import JobContext, baseline_stage
from workflows.tracking import UNSENT_FILE, start_parent

from .conftest import REPO

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

EPOCHS = 2


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(tiny_overrides, tmp_path, storage: str = "A", *extra: str):
    return load_config(
        config_path("tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / storage}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "cpsd.mode=baseline",
            f"train.epochs={EPOCHS}",
            *extra,
        ],
    )


def _runs(cfg):
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _steps(client, run, key="val_mAP"):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def _broken_labels(cache_dir, tmp_path) -> Path:
    """A copy of the tiny dataset whose first training row has a label past the last class."""
    cfg = load_config(config_path("tiny"), [f"data.cache_dir={cache_dir}"])
    source = Path(resolve_dataset(cfg.data))
    table = pq.read_table(source / "manifest.parquet")
    labels = table.column("labels").to_pylist()
    labels[0] = [*labels[0], 99]
    column = pa.array(labels, type=table.schema.field("labels").type)
    table = table.set_column(table.column_names.index("labels"), "labels", column)
    out = tmp_path / "broken"
    out.mkdir()
    pq.write_table(table, out / "manifest.parquet")
    for entry in source.iterdir():
        if entry.name != "manifest.parquet":
            (out / entry.name).symlink_to(entry)
    return out


# First in this module: no test before it has started Ray.
def test_user_errors_stop_before_ray_with_one_line(cache_dir, tiny_overrides, tmp_path, capsys):
    from workflows.cli import run as cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    broken = _broken_labels(cache_dir, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [*tiny_overrides, f"mlflow.tracking_uri={uri}"]
    cases = [
        (["model.backbone=resnet9000", f"storage_path={tmp_path / 's'}"], "does not build"),
        ([f"storage_path={blocker}/runs"], "is not writable"),
        ([f"data.root={broken}", "data.synth=null", f"storage_path={tmp_path / 's'}"],
         "out of range [0, 10)"),
    ]  # fmt: skip
    for extra, message in cases:
        argv = ["--config", "tiny", *[a for o in [*base, *extra] for a in ("--set", o)]]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not ray.is_initialized()
        assert not (tmp_path / "s").exists()  # nothing started, nothing written
        assert not (tmp_path / "mlflow.db").exists()
    # cpsd train read the broken labels as an IndexError traceback before.
    argv = ["train", "--config", "tiny", "--set", f"data.root={broken}", "--set", "data.synth=null",
            "--set", f"storage_path={tmp_path / 's'}", "--set", "mlflow.enabled=false"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of range" in err[0], err


def test_a_later_pipeline_never_takes_over_an_earlier_pipelines_runs(
    local_ray, tiny_overrides, tmp_path
):
    first = _cfg(tiny_overrides, tmp_path, "A")
    run_pipeline(first, log=lambda _: None)
    run_pipeline(_cfg(tiny_overrides, tmp_path, "B"), log=lambda _: None)

    client, runs = _runs(first)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        (baseline,) = [r for r in children if r.info.run_name == "baseline"]
        assert baseline.info.status == "FINISHED"
        assert "cpsd.resumed" not in baseline.data.tags
        # Exactly one value per epoch, counted from 1 (epochs are 1-based in every record).
        assert _steps(client, baseline) == list(range(1, EPOCHS + 1))
        assert baseline.data.tags["mlflow.source.name"] == "baseline"  # the Source column
        assert baseline.data.tags["mlflow.source.git.commit"]
        assert baseline.data.tags["cpsd.version.code"]
        assert baseline.data.tags["cpsd.location"].endswith(baseline.data.tags["cpsd.key"])
    a, b = (
        json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/tiny/stages/*/_SUCCESS.json"))
    )
    assert a["run_id"] != b["run_id"]
    assert a["versions"]["code"] == b["versions"]["code"]
    assert a["history"][0]["epoch"] == 1 and a["best_epoch"] >= 1


def test_two_drivers_on_one_storage_train_each_stage_once(local_ray, tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, tmp_path, "shared")
    errors: list[BaseException] = []

    def drive():
        try:
            run_pipeline(cfg, log=lambda _: None)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    drivers = [threading.Thread(target=drive) for _ in range(2)]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join()
    assert not errors

    (stage,) = (tmp_path / "shared" / "tiny" / "stages").iterdir()
    attempts = json.loads((stage / "attempts.json").read_text())
    assert len(attempts) == 1  # trained once: the second driver waited, then reused it
    client, runs = _runs(cfg)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }
    assert sorted(len(c) for c in children.values()) == [1, 1]
    trained = [r for r in runs if "cpsd.reuse_of" not in r.data.tags and r.info.run_name]
    trained = [r for r in trained if "mlflow.parentRunId" in r.data.tags]
    (trained,) = trained
    assert _steps(client, trained) == list(range(1, EPOCHS + 1))
    (reuse,) = [r for r in runs if "cpsd.reuse_of" in r.data.tags]
    assert reuse.data.tags["cpsd.reused_run"] == trained.info.run_id


def test_a_rerun_marks_the_parent_of_a_dead_driver_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = f"{tmp_path}/runs/tiny"
    dead = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os
            from workflows.config import MlflowConfig
            from workflows.tracking import start_parent
            tracker, _ = start_parent(MlflowConfig(tracking_uri={uri!r}), "tiny", {{}}, {{}},
                                      job={job!r})
            print(tracker.parent_run_id)
            os._exit(0)  # like a SIGKILL after the last stage: the parent is left RUNNING
        """)],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    client = MlflowClient(uri)
    assert client.get_run(dead).info.status == "RUNNING"
    start_parent(MlflowConfig(tracking_uri=uri), "x", {}, {}, job=f"{job}-other")
    assert client.get_run(dead).info.status == "RUNNING"  # another job leaves it alone
    alive, _ = start_parent(MlflowConfig(tracking_uri=uri), "tiny", {}, {}, job=job)
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(alive.parent_run_id).info.status == "RUNNING"  # this driver lives


def _stage_with_fault(cfg, tracker, fault: str | None):
    """The baseline stage as a Ray task whose dataset logging fails: ``once`` (the SQLite race
    seen with two resumed teachers: ``UNIQUE constraint failed: datasets``) or ``always`` (an
    outage that outlasts the stage's flush), or ``None``."""

    def stage() -> dict:

        tracking.FLUSH_TIMEOUT_S, tracking.RETRY_INTERVAL_S = 1.0, 0.1
        real, calls = tracking.log_dataset_input, []

        def injected(*args, **kwargs):
            calls.append(1)
            if fault == "always":
                raise ConnectionError("tracking server unreachable")
            if fault == "once" and len(calls) == 1:
                raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets")
            return real(*args, **kwargs)

        tracking.log_dataset_input = injected
        try:
            ctx = JobContext(cfg, cfg.storage_path, tracker, cfg.name)
            return baseline_stage(ctx, baseline_fingerprint(cfg, open_dataset(cfg.data)))
        finally:
            tracking.log_dataset_input = real

    return ray.get(ray.remote(stage).options(num_cpus=1, max_retries=0).remote())


def test_final_keys_first_and_the_model_survives_a_failing_then_unreachable_store(
    local_ray, tiny_overrides, tmp_path
):
    cfg = _cfg(tiny_overrides, tmp_path, "faults", "mlflow.registered_model=bookkeeping")
    resolve_dataset(cfg.data)
    tracker, _ = start_parent(cfg.mlflow, "faults", {}, {})
    record = _stage_with_fault(cfg, tracker, "once")
    client = MlflowClient(tracker.uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert {"best_val_mAP", "best_epoch", "test_mAP"} <= set(run.data.metrics)
    assert run.data.tags["cpsd.role"] == "baseline" and run.outputs.model_outputs
    assert client.get_model_version_by_alias("bookkeeping", "baseline").run_id == run.info.run_id

    # An outage at the stage's end: the model never reaches the store in this job ...
    cfg = _cfg(tiny_overrides, tmp_path, "outage")
    record = _stage_with_fault(cfg, start_parent(cfg.mlflow, "outage", {}, {})[0], "always")
    unsent = Path(cfg.storage_path) / record["rel"] / UNSENT_FILE
    assert unsent.is_file()
    run = client.get_run(record["run_id"])
    assert "test_mAP" in run.data.metrics  # the final keys went first
    assert not run.outputs.model_outputs
    # ... and the next job that reuses the stage sends it, to the run that trained it.
    reused = _stage_with_fault(cfg, start_parent(cfg.mlflow, "outage", {}, {})[0], None)
    assert reused["reused"] and not unsent.exists()
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.outputs.model_outputs
    assert run.data.tags["mlflow.note.content"].startswith("baseline:")
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"synth:train", "synth:val"}


def test_stale_stages_are_named_marked_refused_or_retrained(
    local_ray, tiny_overrides, tmp_path, capsys
):
    cfg = _cfg(tiny_overrides, tmp_path, "stale")
    run_pipeline(cfg, log=lambda _: None)
    (success,) = (tmp_path / "stale" / "tiny" / "stages").glob("baseline-*/_SUCCESS.json")
    record = json.loads(success.read_text())
    assert set(record["versions"]) >= {"cpsd", "code", "git_commit", "torch", "timm", "ray"}
    record["versions"] = {**record["versions"], "code": "0123older", "git_commit": "abc123"}
    success.write_text(json.dumps(record))
    capsys.readouterr()

    lines: list[str] = []
    summary = run_pipeline(cfg, log=lines.append)
    (line,) = [line for line in lines if "made by other code" in line]
    assert "baseline" in line and "(commit abc123; code 0123older ->" in line
    assert summary.rows[-1]["stale"] and "| baseline (stale) |" in summary.markdown()

    args = [a for o in [*tiny_overrides, f"storage_path={tmp_path / 'stale'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "cpsd.mode=baseline",
            f"train.epochs={EPOCHS}"] for a in ("--set", o)]  # fmt: skip
    assert main(["--config", "tiny", *args, "--set", "stale=error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--retrain-stale" in err[0] and "baseline-" in err[0]

    assert main(["--config", "tiny", *args, "--retrain-stale"]) == 0
    record = json.loads(success.read_text())
    assert record["versions"]["code"] != "0123older" and len(record["attempts"]) == 1


def test_concurrent_first_use_of_a_new_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    script = textwrap.dedent(f"""
        from workflows.config import MlflowConfig
        from workflows.tracking import start_parent
        start_parent(MlflowConfig(tracking_uri={uri!r}), "p", {{}}, {{}})
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], [err[-500:] for _, err in results]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cpsd")
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_a_record_that_fails_names_its_error_in_the_warnings(tmp_path, monkeypatch):
    """A failure that is no outage (an s3:// dataset root once broke the model record) must not
    pass for an unreachable server: the warnings carry the record's kind and error."""
    monkeypatch.setattr(tracking, "FLUSH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.05)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    warnings: list[str] = []
    logger = tracking.RunLogger(client, run_id, tmp_path / "stage", warn=warnings.append)
    logger.model(
        role="train", stage="train", description="d", bundle=str(tmp_path / "missing.pt"),
        final={}, best_epoch=1, log_models=True,
    )  # fmt: skip
    logger.finish("FINISHED")
    assert len(warnings) == 2 and all("(model: " in w for w in warnings), warnings
    assert "missing.pt" in warnings[0] and (tmp_path / "stage" / UNSENT_FILE).is_file()
