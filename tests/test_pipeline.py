"""The CPSD pipeline on a real local Ray instance (started here, stopped after)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mlcore import configlib
from mlcore.cpsd import run_local
from workflows.config import config_path, load_config
from workflows.pipeline import main, run_pipeline

ray = pytest.importorskip("ray")


def _config(tiny_overrides, tmp_path, *extra):
    return load_config(
        config_path("tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def local_ray():
    # Two logical GPUs on this CPU machine: teachers request one each, so placement is real
    # even though torch runs on the CPU.
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _children(tracking_uri: str, parent_name: str | None = None):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("cpsd")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    by_parent = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }
    return parents, by_parent


def test_bad_config_fails_before_ray_starts(tmp_path, capsys, tiny_overrides):
    cases = [
        (["--set", "train.epoch=1"], "unknown config key 'train.epoch'"),
        (["--set", "cpsd.k=11"], "cpsd.k = 11 is larger than the number of classes (10)"),
        (
            ["--set", f"data.root={tmp_path}/missing", "--set", "data.synth=null"],
            "no manifest.parquet",
        ),
        (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "unreachable"),
    ]
    for extra, message in cases:
        argv = [
            "--config",
            "tiny",
            "--set",
            f"storage_path={tmp_path}",
            *tiny_overrides_args(tiny_overrides),
            *extra,
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert not ray.is_initialized()


def tiny_overrides_args(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def test_pipeline_reproduces_reference_then_skips_and_reruns_what_changed(
    local_ray, tiny_overrides, tmp_path
):
    cfg = _config(tiny_overrides, tmp_path, "mlflow.registered_model=tiny-cpsd")
    reference = run_local(cfg, tmp_path / "reference", log=lambda _: None)
    first = run_pipeline(cfg, log=lambda _: None)
    assert [r["name"] for r in first.rows] == [r["name"] for r in reference.rows]
    for ours, ref in zip(first.rows, reference.rows, strict=True):
        for metric in ("val_mAP", "val_CF1", "val_OF1", "test_mAP", "test_CF1", "test_OF1"):
            assert ours[metric] == pytest.approx(ref[metric], abs=1e-9), (ours["name"], metric)
    partitions = json.loads(
        next(
            (tmp_path / "storage" / "tiny" / "stages").glob("partition-cgp-*/partition_cgp.json")
        ).read_text()
    )
    assert partitions == json.loads(
        (tmp_path / "reference" / "partitions" / "partition_cgp.json").read_text()
    )

    again = run_pipeline(cfg, log=lambda _: None)
    assert again.rows == first.rows
    changed = run_pipeline(configlib.replace(cfg, ["cpsd.kd_alpha=0.3"]), log=lambda _: None)
    # Teachers and their merged ensembles reused as they were; α moves the student's target.
    assert changed.rows[:-2] == first.rows[:-2]
    assert [r["name"] for r in changed.rows[-2:]] == ["ensemble-target", "student"]
    assert changed.rows[-2]["val_mAP"] != first.rows[-2]["val_mAP"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, children = _children(uri)
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents)
    names = sorted(
        r.info.run_name
        for r in children[parents[0].info.run_id]
        if r.data.tags["cpsd.role"] != "ensemble"
    )
    assert names == ["student", "teacher-cgp-0", "teacher-cgp-1", "teacher-dgp-0", "teacher-dgp-1"]
    roles = {r.info.run_name: r.data.tags["cpsd.role"] for r in children[parents[0].info.run_id]}
    assert roles["ensemble-cgp"] == "ensemble" and roles["student"] == "student"
    (ensemble,) = [r for r in children[parents[0].info.run_id] if r.info.run_name == "ensemble-cgp"]
    assert "best_epoch" not in ensemble.data.metrics and "test_mAP" in ensemble.data.metrics
    assert roles["ensemble-target"] == "ensemble"
    reused = [
        {r.info.run_name for r in children[p.info.run_id] if "cpsd.reused_from" in r.data.tags}
        for p in parents
    ]
    assert reused[0] == set() and reused[1] == set(names)
    assert reused[2] == set(names) - {"student"}
    first_student = next(
        r for r in children[parents[0].info.run_id] if r.info.run_name == "student"
    )
    assert {"val_mAP", "val_CF1", "val_OF1", "train_loss"} <= set(first_student.data.metrics)
    assert {"best_val_mAP", "best_epoch", "test_mAP", "test_CF1"} <= set(first_student.data.metrics)
    assert first_student.data.params["teacher_mode"] == "cached"
    assert first_student.data.tags["mlflow.note.content"].startswith("student: 10 classes")
    assert {d.dataset.name for d in first_student.inputs.dataset_inputs} == {
        "synth:train",
        "synth:val",
        "synth:test",
    }
    version = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias(
        "tiny-cpsd", "student"
    )
    assert version.tags["cpsd.role"] == "student" and float(version.tags["test_mAP"]) > 0
    client = MlflowClient(uri)
    pipeline_run = client.get_run(version.run_id).data.tags["mlflow.parentRunId"]
    assert "trained by stage `student`" in version.description
    assert f"Pipeline run: [`{pipeline_run}`]" in version.description
    logged = client.search_logged_models([parents[0].info.experiment_id])
    assert {m.name for m in logged} == set(names)  # named by stage, not all "model"
    assert [a.path for a in client.list_artifacts(parents[0].info.run_id)] == [
        "partitions",
        "summary",
    ]
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")} >= {
        "summary/summary.csv",
        "summary/summary.md",
        "summary/summary.png",
    }


def test_concurrent_teachers_never_share_a_gpu(local_ray, tiny_overrides, tmp_path):
    cfg = _config(tiny_overrides, tmp_path, "cpsd.teacher_epochs=3", "train.epochs=1")
    run_pipeline(cfg, log=lambda _: None)
    records = [
        json.loads(p.read_text())
        for p in (tmp_path / "storage" / "tiny" / "stages").glob("teacher-*/_SUCCESS.json")
    ]
    assert len(records) == 4
    spans = [
        (r["attempts"][-1]["time"], r["finished"], r["attempts"][-1]["gpu_ids"]) for r in records
    ]
    assert all(len(gpus) == 1 for _, _, gpus in spans)
    overlapping = 0
    for i, (s1, e1, g1) in enumerate(spans):
        for s2, e2, g2 in spans[i + 1 :]:
            if s1 < e2 and s2 < e1:
                overlapping += 1
                assert g1 != g2
    assert overlapping >= 1  # two logical GPUs: teachers did run side by side


# The teacher layouts that cpsd (test above) does not have: one all-class teacher, a random
# partition. Every mode also runs on Ray in test_study and in one process in test_cpsd. The sd
# run goes through the command line with a control ensemble of two more plain models.
@pytest.mark.parametrize("mode", ["sd", "random"])
def test_every_mode_on_ray(mode, local_ray, tiny_overrides, tmp_path):
    sets = [f"cpsd.mode={mode}", "train.epochs=1", "cpsd.teacher_epochs=1"]
    if mode == "sd":
        sets.append("cpsd.control_ensemble=2")
    cfg = _config(tiny_overrides, tmp_path, *sets)
    if mode == "sd":
        argv = ["--config", "tiny", *tiny_overrides_args([*tiny_overrides, *sets])]
        argv += ["--set", f"storage_path={cfg.storage_path}"]
        argv += ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        assert main(argv) == 0
        summary = json.loads(
            (tmp_path / "storage" / "tiny" / "summary" / "summary.json").read_text()
        )
    else:
        summary = run_pipeline(cfg, log=lambda _: None).rows
    reference = run_local(cfg, tmp_path / "ref", log=lambda _: None).rows
    assert [r["name"] for r in summary] == [r["name"] for r in reference]
    ours = {r["name"]: r for r in summary}
    for ref in reference:
        if ref["role"] != "teacher":
            assert ours[ref["name"]]["test_mAP"] == pytest.approx(ref["test_mAP"], abs=1e-9)
    assert Path(tmp_path / "storage" / "tiny" / "summary" / "summary.png").is_file()
    if mode == "sd":
        with open(tmp_path / "storage" / "tiny" / "summary" / "summary.csv") as f:
            rows = {r["name"]: r for r in csv.DictReader(f)}
        for name in ("ensemble-target", "ensemble-baseline"):
            assert rows[name]["role"] == "ensemble" and 0 < float(rows[name]["test_mAP"]) <= 1
        # One full-label teacher: the target is that teacher's logits.
        assert ours["ensemble-target"]["val_mAP"] == pytest.approx(ours["ensemble-full"]["val_mAP"])
        stages = tmp_path / "storage" / "tiny" / "stages"
        assert len(list(stages.glob("control-*/_SUCCESS.json"))) == 2
        assert len(list(stages.glob("baseline-*/_SUCCESS.json"))) == 1


def test_device_follows_the_gpus_ray_assigned(local_ray, tiny_config):
    from mlcore import configlib
    from mlcore.configlib import ConfigError
    from workflows.runtime import device_for_task

    def device(cfg, gpus):
        task = ray.remote(lambda c: device_for_task(c, "probe").train.device)
        return ray.get(task.options(num_gpus=gpus, num_cpus=0).remote(cfg))

    assert device(tiny_config, 0) == "cpu"  # never a silent share of cuda:0
    # With a (logical) GPU it would be cuda on a CUDA machine; this one has no CUDA.
    assert device(tiny_config, 1) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        device(configlib.replace(tiny_config, ["train.device=cuda"]), 0)
    assert isinstance(err.value.cause, ConfigError) and "requested no GPU" in str(err.value)


def test_baseline_mode_trains_the_orderless_rnn(local_ray, tiny_overrides, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        config_path("pla_tiny"),
        [
            *tiny_overrides,
            f"storage_path={tmp_path / 'storage'}",
            f"mlflow.tracking_uri={uri}",
            "train.epochs=1",
            "data.synth.num_test_shift=32",
        ],
    )
    summary = run_pipeline(cfg, log=lambda _: None)
    reference = run_local(cfg, tmp_path / "ref", log=lambda _: None)
    assert [r["name"] for r in summary.rows] == [r["name"] for r in reference.rows] == ["baseline"]
    for metric in ("val_mAP", "val_CF1", "val_OF1", "test_mAP", "test_OF1", "shift_mAP"):
        assert summary.rows[0][metric] == pytest.approx(reference.rows[0][metric], abs=1e-9)
    # Held-out reports of the RNN score its decoded label sets, as its val_* do.
    (held_out,) = (tmp_path / "storage" / "pla_tiny" / "stages").glob("baseline-*/eval.json")
    test_report = json.loads(held_out.read_text())["reports"]["test"]
    assert {"duplicate_ratio", "order_rigidness", "mAP", "OF1"} <= set(test_report)
    parents, children = _children(uri)
    (run,) = children[parents[0].info.run_id]
    assert run.info.run_name == "baseline" and run.info.status == "FINISHED"
    assert {"val_OF1", "val_duplicate_ratio", "val_mla_loss"} <= set(run.data.metrics)
    assert run.data.params["model.head"] == "rnn"
