"""`cpsd study` on a real local Ray: a grid of modes over seeds, shared stages, intervals."""

import csv
import math

import pytest
from mlflow import MlflowClient

from workflows.config import config_path, load_config
from workflows.study import expand, main, run_study

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _sets(tiny_overrides, tmp_path, *extra):
    args = [
        *tiny_overrides,
        f"storage_path={tmp_path / 'storage'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]
    return [a for o in args for a in ("--set", o)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.grid={cpsd.mode: [cpsd], train.epoch: [1]}", "unknown config key 'train.epoch'"),
        ("study.grid={cpsd.k: []}", "study.grid.cpsd.k: needs a non-empty list"),
        ("study.grid={cpsd.mode: [cpsd, nope]}", "cpsd.mode: 'nope' is not one of"),
        ("study.grid={cpsd.k: [2, 11]}", "cpsd.k = 11 is larger than the number of classes"),
        ("study.seeds=[0, 0]", "study.seeds repeats a seed"),
        ("study={grid: {}, seeds: [0]}", "set study.grid or study.variants, or at least two"),
    ],
)
def test_bad_study_is_a_clear_error_before_ray(override, message, tmp_path, capsys):
    argv = ["--config", "study_cpsd_tiny", "--set", f"storage_path={tmp_path}", "--set", override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_every_mode_over_two_seeds_shares_stages(tiny_overrides, tmp_path):
    cfg = load_config(
        config_path("study_cpsd_tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    assert len(expand(cfg)) == 12
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = run_study(cfg, log=lambda _: None)
    finally:
        ray.shutdown()

    modes = ["baseline", "sd", "cgpd", "dgpd", "cpsd", "random"]
    assert len(result.rows) == 12
    by_metric = {(r["variant"], r["metric"]): r for r in result.summary}
    for mode in modes:
        row = by_metric[(f"mode={mode}", "test_mAP")]
        assert row["n"] == 2
        assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]
    paired = {(r["variant"], r["metric"]): r for r in result.paired}
    # The baseline variant is its own baseline: a difference of exactly 0 at every seed.
    zero = paired[("mode=baseline", "test_mAP - baseline")]
    assert zero["mean"] == 0.0 and zero["ci95_low"] == 0.0 == zero["ci95_high"]
    # Every variant at a seed compares with the same, shared baseline.
    for seed in (0, 1):
        baselines = {r["baseline_test_mAP"] for r in result.rows if r["seed"] == seed}
        assert len(baselines) == 1

    stages = tmp_path / "storage" / "study_cpsd_tiny" / "stages"
    k, seeds = cfg.cpsd.k, 2
    # CGP teachers of cgpd and cpsd are the same stages: trained once per seed, not twice.
    assert len(list(stages.glob("teacher-cgp-*/_SUCCESS.json"))) == k * seeds
    assert len(list(stages.glob("teacher-dgp-*/_SUCCESS.json"))) == k * seeds
    assert len(list(stages.glob("baseline-*/_SUCCESS.json"))) == seeds
    assert len(list(stages.glob("student-*/_SUCCESS.json"))) == 5 * seeds

    out = tmp_path / "storage" / "study_cpsd_tiny" / "study"
    for name in ("study.csv", "study_summary.csv", "study_paired.csv", "study.md"):
        assert (out / name).is_file(), name
    assert (out / "study_modes.png").stat().st_size > 10_000
    with open(out / "study_summary.csv") as f:
        header = next(csv.reader(f))
    assert header == ["variant", "metric", "mean", "ci95_low", "ci95_high", "n"]
    assert "| mode=cpsd | 2 |" in (out / "study.md").read_text()
    assert all(math.isfinite(r["test_mAP"]) for r in result.rows)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpsd")
    parents = client.search_runs([exp.experiment_id], "tags.`cpsd.study` = 'study_cpsd_tiny'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # The GPU default is decided once for every variant, as the pipeline does (none here).
    assert parents[0].data.params["placement.default_gpus"] == "0"
    variants = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    )
    assert len(variants) == 12 and {v.info.status for v in variants} == {"FINISHED"}
    assert all(
        "test_mAP" in v.data.metrics and "baseline.test_mAP" in v.data.metrics for v in variants
    )
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert {"study/study.md", "study/study_summary.csv", "study/study_modes.png"} <= artifacts
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert running == []


def test_one_pretrain_stage_serves_every_seed_and_control_models_every_variant(
    tiny_overrides, tmp_path
):
    import json

    from mlcore.cpsd import baseline_fingerprint
    from mlcore.data.loading import open_dataset
    from mlcore.pretrain import with_pretrained

    cfg = load_config(
        config_path("study_cpsd_tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "study.grid={}",
            # Two variants whose plain models are the same stages (cls_weight is a student
            # setting): the control models must be trained once per seed, not per variant.
            "study.variants=[{cpsd.mode: baseline}, {cpsd.mode: baseline, cpsd.cls_weight: 5}]",
            "cpsd.control_ensemble=1",
            "pretrain.enabled=true",
            "pretrain.synth={num_classes: 10, class_offset: 10, num_train: 32, num_val: 16,"
            " num_test: 0, image_size: 32, num_topics: 3}",
            "pretrain.epochs=1",
        ],
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = run_study(cfg, log=lambda _: None)
    finally:
        ray.shutdown()

    stages = tmp_path / "storage" / "study_cpsd_tiny" / "stages"
    (pretrain,) = stages.glob("pretrain-*")
    assert (pretrain / "_SUCCESS.json").is_file() and (pretrain / "backbone.pt").is_file()
    assert len(list(stages.glob("baseline-*/_SUCCESS.json"))) == 2
    assert len(list(stages.glob("control-0-*/_SUCCESS.json"))) == 2
    assert len(list(stages.glob("ensemble-baseline-*/_SUCCESS.json"))) == 2
    # Each seed's baseline started from the upstream backbone: its key follows the file.
    for run in expand(cfg):
        pretrained = with_pretrained(run.cfg, pretrain / "backbone.pt")
        dataset = open_dataset(run.cfg.data, with_bytes=False)
        assert (stages / f"baseline-{baseline_fingerprint(pretrained, dataset)}").is_dir()
        assert not (stages / f"baseline-{baseline_fingerprint(run.cfg, dataset)}").exists()
    record = json.loads((pretrain / "_SUCCESS.json").read_text())
    assert record["role"] == "pretrain" and record["classes"] == 10
    assert all(0 < r["ensemble_baseline_test_mAP"] <= 1 for r in result.rows)
    paired = {(r["variant"], r["metric"]) for r in result.paired}
    assert ("mode=baseline", "ensemble_baseline_test_mAP - baseline") in paired
