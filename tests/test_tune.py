"""Ray Tune sweeps: tiny real sweeps on a local Ray, MLflow child runs, ASHA, best config,
resume after the driver is killed, and search-space validation before Ray starts."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from workflows.config import config_path, load_config
from workflows.tune import main, run_sweep, validate_space

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _sets(tiny_overrides, tmp_path, *extra):
    return [
        *tiny_overrides,
        f"storage_path={tmp_path / 'storage'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


def _runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpsd")
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={loss.asl.clip: {normal: [0, 1]}}", "unknown distribution 'normal'"),
        ("tune.space={loss.asl.clip: {choice: []}}", "choice needs a non-empty list"),
        ("tune.space={loss.asl.clip: {uniform: [0.3, 0.1]}}", "low < high, got [0.3, 0.1]"),
        ("tune.space={loss.asl.clip: {loguniform: [0, 0.1]}}", "loguniform needs low > 0"),
        ("tune.space={loss.asl.clipp: {choice: [0.1]}}", "unknown config key 'loss.asl.clipp'"),
        ("tune.space={loss.asl.clip: {choice: [2.0]}}", "loss.asl.clip must be in [0, 1)"),
        ("tune.space={}", "tune.space is empty"),
    ],
)
def test_invalid_space_is_a_clear_error_before_ray(override, message, tmp_path, capsys):
    argv = ["--config", "tune_asl_tiny", "--set", f"storage_path={tmp_path}", "--set", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not ray.is_initialized()


def test_both_sweep_configs_validate():
    names = ("tune_asl", "tune_asl_tiny", "tune_asl_fixed", "tune_db", "tune_db_tiny")
    for name in (*names, "tune_cpsd_student", "tune_cpsd_student_tiny"):
        cfg = load_config(config_path(name))
        assert validate_space(cfg)


def test_tiny_asl_sweep_records_every_trial_and_feeds_the_pipeline(tiny_overrides, tmp_path):
    cfg = load_config(config_path("tune_asl_tiny"), _sets(tiny_overrides, tmp_path))
    outcome = run_sweep(cfg, out_dir=tmp_path / "out")
    client, runs = _runs(tmp_path)
    parent = next(r for r in runs if r.info.run_name == "tune_asl_tiny")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and parent.info.status == "FINISHED"
    for run in trials:
        assert run.info.status == "FINISHED"
        assert {"sweep.loss.asl.adaptive.target_gap", "sweep.loss.asl.clip"} <= set(run.data.params)
        assert 0.0 <= float(run.data.params["sweep.loss.asl.adaptive.target_gap"]) <= 0.3
        assert "val_mAP" in run.data.metrics and "gamma_neg" in run.data.metrics
        assert run.data.tags["tune.status"] == "TERMINATED"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
            "plots/asymmetry.png"
        ]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} == {
        "sweep/best_loss.yaml",
        "sweep/results.csv",
        "sweep/sweep.png",
    }
    # The best loss settings are a fragment the pipeline config includes directly.
    best = yaml.safe_load(outcome.best_loss_file.read_text())
    assert best["source"] == f"mlflow-run:{parent.info.run_id}"
    (tmp_path / "pipeline.yaml").write_text(
        "name: p\nloss: !include out/best_loss.yaml\ntrain: {epochs: 1}\n"
    )
    piped = load_config(tmp_path / "pipeline.yaml")
    assert piped.loss.settings.adaptive.target_gap == pytest.approx(
        outcome.best_params["loss.asl.adaptive.target_gap"]
    )
    assert piped.loss.source == best["source"]


def test_asha_stops_a_clearly_worse_trial(tiny_overrides, tmp_path):
    # Grid order: two sane learning rates finish first; the two near-zero ones are then
    # measured against them at the first rung and stopped there.
    cfg = load_config(
        config_path("tune_asl_tiny"),
        _sets(
            tiny_overrides,
            tmp_path,
            "name=asha",
            "train.epochs=4",
            "loss.asl.adaptive.enabled=false",
            "mlflow.enabled=false",
            "tune.max_concurrent_trials=1",
            "tune.search=grid",
            "tune.space={train.lr: {grid: [0.003, 0.002, 1.0e-9, 2.0e-9]}}",
        ),
    )
    outcome = run_sweep(cfg, out_dir=tmp_path / "out")
    by_lr = {row["train.lr"]: row for row in outcome.table}
    assert max(by_lr[0.003]["epochs"], by_lr[0.002]["epochs"]) == 4  # the leader runs to the end
    for bad in (1e-9, 2e-9):  # below every recorded result at their first rung
        assert by_lr[bad]["early_stopped"] and by_lr[bad]["epochs"] == 1, by_lr[bad]


def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_overrides, tmp_path):
    sets = _sets(
        tiny_overrides,
        tmp_path,
        "name=resume",
        "train.epochs=2",
        "tune.scheduler.name=fifo",
        "tune.max_concurrent_trials=1",
    )
    argv = [sys.executable, "-m", "workflows.tune", "--config", "tune_asl_tiny"]
    for s in sets:
        argv += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - lives as long as the sweep
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        finished = []
        while time.time() < deadline and proc.poll() is None:
            # sweep.json is written once the sweep's MLflow tables and parent run exist.
            if (tmp_path / "storage" / "resume" / "sweep.json").exists():
                _, runs = _runs(tmp_path)
                finished = [
                    r for r in runs if r.info.status == "FINISHED" and r.info.run_name != "resume"
                ]
                if len(finished) >= 2:
                    break
            time.sleep(1)
        assert len(finished) >= 2, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray: a lost head
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    done_before = {r.info.run_name: r.data.metrics for r in finished}
    assert (
        main(["--config", "tune_asl_tiny", "--resume", *[a for s in sets for a in ("--set", s)]])
        == 0
    )
    client, runs = _runs(tmp_path)
    trials = [r for r in runs if r.info.run_name != "resume"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    for name in done_before:
        history = client.get_metric_history(
            next(r.info.run_id for r in trials if r.info.run_name == name), "val_mAP"
        )
        assert sorted(m.step for m in history) == [1, 2]  # not trained again


def test_trials_train_on_two_worker_groups(tiny_overrides, tmp_path):
    # The trial holds no CPU; its two gloo workers hold one each, all of the two CPUs (with a
    # CPU, or 0.01, for the trial the group could never start: Tune-over-Train deadlock).
    cfg = load_config(
        config_path("tune_asl_tiny"),
        _sets(
            tiny_overrides,
            tmp_path,
            "name=group",
            "ray.train_workers=2",
            "tune.num_samples=1",
            "tune.scheduler.name=fifo",
        ),
    )
    outcome = run_sweep(cfg, out_dir=tmp_path / "out")
    assert [row["epochs"] for row in outcome.table] == [2]
    client, runs = _runs(tmp_path)
    trials = [r for r in runs if r.info.run_name != "group"]
    assert len(trials) == 1
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["ray.world_size"] == "2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_mAP")]
        assert sorted(steps) == [1, 2]  # rank 0 alone logs, once per epoch
        assert "gamma_neg" in run.data.metrics  # the controller's step metrics, from rank 0
    assert not list((tmp_path / "storage" / "group").glob("tune-train/*/*"))


def test_sweep_over_label_orders_with_the_orderless_rnn(tiny_overrides, tmp_path):
    for name in ("tune_pla", "tune_pla_tiny"):
        assert set(validate_space(load_config(config_path(name)))) >= {"loss.orderless.order"}
    # Three of the six orders keep the test short: a fixed order and both alignments.
    orders = ["frequent", "mla", "pla"]
    space = f"tune.space={{loss.orderless.order: {{grid: [{', '.join(orders)}]}}}}"
    cfg = load_config(
        config_path("tune_pla_tiny"), _sets(tiny_overrides, tmp_path, "train.epochs=1", space)
    )
    outcome = run_sweep(cfg, out_dir=tmp_path / "out")
    assert sorted(row["loss.orderless.order"] for row in outcome.table) == sorted(orders)
    assert all(row["error"] is None and row["epochs"] == 1 for row in outcome.table)
    _, runs = _runs(tmp_path)
    trials = [r for r in runs if r.info.run_name != "tune_pla_tiny"]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert sorted(r.data.params["sweep.loss.orderless.order"] for r in trials) == sorted(orders)
    for run in trials:
        assert {"val_OF1", "val_duplicate_ratio", "val_mla_loss"} <= set(run.data.metrics)
    best = yaml.safe_load(outcome.best_loss_file.read_text())
    assert (
        best["name"] == "orderless"
        and best["orderless"]["order"] == outcome.best_params["loss.orderless.order"]
    )


def test_student_sweep_refuses_keys_that_would_change_its_teachers(tmp_path, capsys):
    argv = ["--config", "tune_cpsd_student_tiny", "--set", f"storage_path={tmp_path}"]
    argv += ["--set", "tune.space={train.lr: {choice: [0.001]}}"]
    assert main(argv) == 2
    assert "train.lr would change the teachers" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_student_sweep_distils_every_trial_from_one_set_of_cached_teachers(
    tiny_overrides, tmp_path
):
    cfg = load_config(config_path("tune_cpsd_student_tiny"), _sets(tiny_overrides, tmp_path))
    outcome = run_sweep(cfg, out_dir=tmp_path / "out")
    stages = tmp_path / "storage" / "tune_cpsd_student_tiny" / "stages"
    assert len(list(stages.glob("teacher-*/_SUCCESS.json"))) == 2 * cfg.cpsd.k
    assert len(list(stages.glob("teacher-*/logits-float32/_SUCCESS.json"))) == 2 * cfg.cpsd.k
    assert not list(stages.glob("student-*")) and not list(stages.glob("baseline-*"))
    _, runs = _runs(tmp_path)
    trials = [r for r in runs if "trial_id" in r.data.params]
    assert {t.data.params["tune.target"] for t in trials} == {"student"}
    assert sorted(float(t.data.params["sweep.cpsd.cls_weight"]) for t in trials) == [0.5, 50.0]
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.params["teachers"] == "4"
        assert "val_mAP" in trial.data.metrics
    # Selected on val: the best trial is the one with the higher val mAP.
    best = max(trials, key=lambda t: t.data.metrics["val_mAP"])
    assert outcome.best_params["cpsd.cls_weight"] == float(
        best.data.params["sweep.cpsd.cls_weight"]
    )
