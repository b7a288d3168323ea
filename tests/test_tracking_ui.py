"""What the MLflow UI shows, against a real SQLite store, without Ray: the final keys of
ensembles, the metrics' scale in every description, logged models named by stage and the
description of a registry version."""

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mlcore.bundle import ModelBundle, Preprocessing
from mlcore.config import ModelConfig
from mlcore.cpsd import RunSummary, summary_row
from mlcore.models import build_model_from_config
from workflows.mlflow_model import open_bundle
from workflows.report import final_keys, log_ensembles
from workflows.tracking import (
    METRIC_SCALE,
    NOTE_TAG,
    ROLE_TAG,
    Tracker,
    experiment_id,
    final_metrics,
    record_trained_model,
)

REGISTERED = "cpsd-ui-test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with a pipeline's parent run; a Tracker for its children."""
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(client, uri, "cpsd-ui")
    parent = client.create_run(exp, run_name="pipeline").info.run_id
    return Tracker(uri, exp, parent)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    cfg = ModelConfig(backbone="test_resnet", head="gap")
    torch.manual_seed(0)
    model = ModelBundle(
        model=cfg,
        class_names=("cat", "dog", "car"),
        preprocessing=Preprocessing(image_size=32),
        state_dict=build_model_from_config(cfg, 3).state_dict(),
    )
    return model.save(tmp_path_factory.mktemp("bundle") / "model.bundle.pt")


def test_ensemble_runs_leave_best_epoch_out(store):
    held_out = {"test": {"mAP": 0.6, "CF1": 0.5, "OF1": 0.55}, "shift": None}
    val = {"mAP": 0.7, "CF1": 0.6, "OF1": 0.65}
    teacher = summary_row("teacher-cgp-0", "teacher", 2, val, held_out, best_epoch=3)
    ensemble = summary_row("ensemble-cgp", "ensemble", 4, val, held_out)
    assert final_keys(teacher)["best_epoch"] == 3
    assert "best_epoch" not in final_keys(ensemble)
    assert "best_epoch" not in final_metrics(
        best_val_mAP=0.7, best_epoch=None, num_classes_evaluated=4
    )

    log_ensembles(store, RunSummary([teacher, ensemble]))
    client = store.client
    (run,) = client.search_runs([store.experiment_id], "tags.`cpsd.role` = 'ensemble'")
    assert run.info.run_name == "ensemble-cgp"
    assert run.data.metrics == {
        "best_val_mAP": 0.7,
        "num_classes_evaluated": 4.0,
        "test_mAP": 0.6,
        "test_CF1": 0.5,
        "test_OF1": 0.55,
    }
    assert run.data.tags[NOTE_TAG].endswith(METRIC_SCALE)


def test_models_are_named_by_stage_and_versions_described(store, bundle, tmp_path):
    teacher = store.start_child("k-teacher", "teacher-cgp-0")
    student = store.start_child("k-student", "student")
    common = {"description": "what the numbers cover.", "bundle": bundle, "best_epoch": 1}
    record_trained_model(
        store.uri,
        teacher,
        role="teacher",
        stage="teacher-cgp-0",
        final=final_metrics(best_val_mAP=0.5, best_epoch=1, num_classes_evaluated=2),
        **common,
    )
    recorded = record_trained_model(
        store.uri,
        student,
        role="student",
        stage="student",
        final=final_metrics(
            best_val_mAP=0.7, best_epoch=1, num_classes_evaluated=3, test_mAP=0.81234
        ),
        registered_model=REGISTERED,
        **common,
    )
    client = store.client
    models = client.search_logged_models([store.experiment_id])
    assert sorted((m.name, m.source_run_id) for m in models) == sorted(
        [("teacher-cgp-0", teacher), ("student", student)]
    )
    run = client.get_run(student)
    assert run.data.tags[ROLE_TAG] == "student"
    assert run.data.tags[NOTE_TAG] == f"what the numbers cover. {METRIC_SCALE}"
    with open_bundle(f"runs:/{student}/student", store.uri) as path:
        assert path.read_bytes() == bundle.read_bytes()

    version = client.get_model_version_by_alias(REGISTERED, "student")
    assert recorded.registered == f"models:/{REGISTERED}/{version.version}"
    parent = store.parent_run_id
    link = f"http://127.0.0.1:5000/#/experiments/{store.experiment_id}/runs/{parent}"
    assert version.description == (
        f"**student** model, trained by stage `student` (run `{student}`).\n\n"
        "test_mAP: 0.8123 (a fraction: 81.2%) over 3 classes.\n\n"
        f"Pipeline run: [`{parent}`]({link})"
    )
