"""Using a trained model end to end: cpsd train once, then predict, evaluate, export, MLflow.

One real ``cpsd train`` (tiny config, 1 epoch, SQLite MLflow store with a Model Registry) feeds
every test of this module.
"""

import base64
import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torch.utils.data import DataLoader

from mlcore import configlib
from mlcore.bundle import (
    BUNDLE_FILE,
    Classifier,
    Decision,
    ModelBundle,
    Preprocessing,
    ValThresholds,
    load_bundle,
)
from mlcore.config import MLDecoderConfig, ModelConfig, SynthConfig
from mlcore.data.dataset import MultiLabelDataset
from mlcore.data.manifest import Manifest, manifest_digest
from mlcore.data.synth import default_class_names, generate
from mlcore.evaluation import (
    ModelIdentity,
    choose_thresholds,
    metrics_at,
    read_thresholds,
    write_thresholds,
)
from mlcore.export import ExportError, export_bundle
from mlcore.metrics import multilabel_report
from mlcore.models import FAMILIES, build_model_from_config
from mlcore.train import predict
from workflows.cli import run
from workflows.mlflow_model import (
    IMAGE_ROOT_KEY,
    INFERENCE_CONFIG_ENV,
    PATH_OFF,
    PATH_REFUSED,
    model_uri,
    open_bundle,
    servable_model,
)
from workflows.model_commands import manifest_inputs
from workflows.tracking import (
    ROLE_TAG,
    VIEW_TAG_PREFIX,
    final_metrics,
    log_final_metrics,
    runs_page_link,
)

from .conftest import free_port

REPO = Path(__file__).resolve().parents[1]
REGISTERED = "cpsd-test"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
    root = tmp_path_factory.mktemp("use")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sets = [
        *tiny_overrides,
        "train.epochs=1",
        "data.synth.num_test_shift=32",
        f"mlflow.tracking_uri={uri}",
        f"mlflow.registered_model={REGISTERED}",
    ]
    argv = ["train", "--config", "tiny", "--out", str(root / "train")]
    assert run(argv + [a for s in sets for a in ("--set", s)]) == 0
    client = MlflowClient(uri)
    (train_run,) = client.search_runs([client.get_experiment_by_name("cpsd").experiment_id])
    bundle = load_bundle(root / "train" / BUNDLE_FILE)
    dataset = Path(bundle.metadata["dataset"]["root"])
    return SimpleNamespace(
        root=root,
        out=root / "train",
        uri=uri,
        client=client,
        run=train_run,
        bundle=bundle,
        dataset=dataset,
        manifest=Manifest.load(dataset),
    )


def cli(*argv, uri=None):
    return run([*argv, *(["--tracking-uri", uri] if uri else [])])


def image_folder(trained, tmp_path, count=3) -> list[Path]:
    """A few validation images as PNG files in nested folders, plus non-images beside them."""
    (tmp_path / "imgs" / "nested").mkdir(parents=True)
    val = MultiLabelDataset(trained.manifest, "val")
    paths = []
    for i in range(count):
        path = tmp_path / "imgs" / ("nested" if i % 2 else ".") / f"img{i}.png"
        Image.fromarray(val.load_image(i).permute(1, 2, 0).numpy()).save(path)
        paths.append(path.resolve())
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image and not picked up")
    return paths


def test_bundle_reproduces_the_selected_weights(trained):
    """The bundle alone gives the validation scores training saved for its best epoch."""
    classifier = Classifier(trained.bundle, "cpu")
    val = MultiLabelDataset(trained.manifest, "val", classifier.transform)
    loader = DataLoader(val, 64, collate_fn=val.collate_fn)
    scores, _ = predict(classifier.model, loader, classifier.device)
    saved = np.load(trained.out / "val_scores.npz")["scores"]
    assert np.allclose(scores, saved, atol=1e-5)
    meta = trained.bundle.metadata
    assert meta["best_epoch"] == 1 and meta["train_images"] == 320
    assert meta["train_positives"] == trained.manifest.positives_per_class("train").tolist()
    assert trained.bundle.class_names == trained.manifest.class_names
    with np.load(trained.out / "val_scores.npz") as val:
        single, per_class = choose_thresholds(val["scores"], val["targets"])
    assert trained.bundle.thresholds == ValThresholds(
        per_class=tuple(per_class.tolist()), single=single, split="val"
    )


def test_predict_images_folders_stdin_and_skips(trained, tmp_path, capsys, monkeypatch):
    paths = image_folder(trained, tmp_path)
    out = tmp_path / "labels.jsonl"
    argv = ["predict", "--model", str(trained.out), "--out", str(out), "--top-k", "3"]
    assert cli(*argv, "--images", str(tmp_path / "imgs"), str(tmp_path / "absent.png")) == 1
    err = capsys.readouterr()
    assert "absent.png: no such file" in err.err and "broken.png: not an image file" in err.err
    assert "labelled 3 images" in err.out and "skipped 2" in err.out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).resolve() for r in rows) == sorted(paths)

    classifier = Classifier(trained.bundle, "cpu")
    ((_, scores, _),) = classifier.iter_scores([str(p) for p in paths])
    expected = Decision(top_k=3).select(scores)
    by_image = {Path(r["image"]).resolve(): r for r in rows}
    for path, chosen, row_scores in zip(paths, expected, scores, strict=True):
        row = by_image[path]
        assert row["labels"] == [trained.bundle.class_names[c] for c in chosen]
        assert row["scores"] == pytest.approx(row_scores[chosen], abs=1e-6)

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{p}\n" for p in paths[:2])))
    assert cli(*argv[:-2], "--images", "-") == 0
    assert len(out.read_text().splitlines()) == 2


def test_evaluate_then_predict_a_split_with_its_thresholds(trained, tmp_path, capsys):
    ev = tmp_path / "eval"
    assert cli("evaluate", "--model", str(trained.out), "--out", str(ev)) == 0
    assert "F1@3" in capsys.readouterr().out
    report = json.loads((ev / "report.json").read_text())
    assert report["split"] == "val" and report["images"] == 128
    assert {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "F1@3", "F1@5"} <= set(report["metrics"])
    assert report["metrics"]["mAP"] == pytest.approx(trained.run.data.metrics["best_val_mAP"])
    assert sum(report["buckets"]["classes"].values()) == 10
    assert "per_class_thresholds" not in report  # the bundle's were chosen on val itself
    for name in ("per_class.csv", "pr_curves.png", "threshold_sweep.png", "thresholds.json"):
        assert (ev / name).stat().st_size > 0

    # The thresholds were fitted on val: fine for another split, refused for val itself.
    thresholds_file = str(ev / "thresholds.json")
    shift = tmp_path / "shift"
    argv = ["evaluate", "--model", str(trained.out), "--thresholds", thresholds_file]
    assert cli(*argv, "--split", "test_shift", "--out", str(shift)) == 0
    fixed = json.loads((shift / "report.json").read_text())["per_class_thresholds"]["metrics"]
    printed = capsys.readouterr().out
    heading = f"test_shift, per-class thresholds from {thresholds_file} (chosen on val):"
    figures = printed.split(heading)[1].split("wrote")[0]
    assert [line.split()[0] for line in figures.strip().splitlines()] == list(fixed)
    for line in figures.strip().splitlines():
        key, value = line.split()
        assert float(value) == pytest.approx(100 * fixed[key], abs=0.006)
    assert cli(*argv, "--out", str(tmp_path / "again")) == 2
    assert "chosen on 'val'" in capsys.readouterr().err

    # Without --thresholds, another split is also reported at the bundle's own val thresholds.
    own = tmp_path / "own"
    assert cli("evaluate", "--model", str(trained.out), "--split", "test", "--out", str(own)) == 0
    assert "test, per-class thresholds from the model's own (chosen on val):" in (
        capsys.readouterr().out
    )
    batches = Classifier(trained.bundle, "cpu").iter_scores(
        manifest_inputs(trained.dataset, "test").sources
    )
    scores = np.concatenate([b.scores for b in batches])
    rows = trained.manifest.split_rows("test")
    targets = np.zeros_like(scores)
    for i, labels in enumerate(trained.manifest.table.take(rows).column("labels").to_pylist()):
        targets[i, labels] = 1
    expected = metrics_at(scores, targets, np.array(trained.bundle.thresholds.per_class))
    got = json.loads((own / "report.json").read_text())["per_class_thresholds"]["metrics"]
    assert got == pytest.approx(expected, abs=1e-6)

    out = tmp_path / "shift.csv"
    argv = ["predict", "--model", str(trained.out / BUNDLE_FILE), "--out", str(out)]
    argv += ["--manifest", str(trained.dataset), "--split", "test_shift"]
    assert cli(*argv, "--thresholds", thresholds_file) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 32
    sources = manifest_inputs(trained.dataset, "test_shift").sources
    classifier = Classifier(trained.bundle, "cpu")
    scores = np.concatenate([b.scores for b in classifier.iter_scores(sources)])
    identity = ModelIdentity(trained.bundle.digest, trained.bundle.class_names)
    values = read_thresholds(thresholds_file, identity).values
    for row, chosen in zip(rows, Decision(values).select(scores), strict=True):
        labels = row["labels"].split(";") if row["labels"] else []
        assert labels == [trained.bundle.class_names[c] for c in chosen]


def synth_dataset(root: Path, num_classes: int, seed: int, images: int = 16) -> Path:
    """Freshly generated images like the training data's (same class names and looks)."""
    cfg = SynthConfig(
        num_classes=num_classes,
        num_train=images,
        num_val=8,
        num_test=0,
        image_size=32,
        num_topics=3,
        seed=seed,
    )
    return generate(cfg, root)


def micro_f1(labels_file: Path, manifest: Manifest, split: str) -> float:
    rows = manifest.table.take(manifest.split_rows(split))
    truth = {
        image: {manifest.class_names[c] for c in labels}
        for image, labels in zip(
            rows.column("image_id").to_pylist(), rows.column("labels").to_pylist(), strict=True
        )
    }
    hits = predicted = 0
    for line in labels_file.read_text().splitlines():
        row = json.loads(line)
        hits += len(set(row["labels"]) & truth[row["image"]])
        predicted += len(row["labels"])
    actual = sum(len(labels) for labels in truth.values())
    return 2 * hits / (predicted + actual)


def test_predict_uses_the_bundles_val_thresholds_and_beats_one_half(trained, tmp_path, capsys):
    """Issue 21: no threshold option -> the bundle's val thresholds, said in the first line,
    and a higher micro-F1 on fresh generated images than --threshold 0.5."""
    fresh = Manifest.load(synth_dataset(tmp_path / "fresh", 10, seed=123, images=200))
    base = ["predict", "--model", str(trained.out), "--manifest", str(fresh.root)]
    base += ["--split", "train"]
    default, half = tmp_path / "default.jsonl", tmp_path / "half.jsonl"
    assert cli(*base, "--out", str(default)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("labels: the model's per-class thresholds, chosen on val")
    assert cli(*base, "--out", str(half), "--threshold", "0.5") == 0
    assert capsys.readouterr().out.splitlines()[0] == "labels: one threshold, 0.5"
    assert micro_f1(default, fresh, "train") > micro_f1(half, fresh, "train")

    # The labels are exactly the bundle's per-class rule.
    classifier = Classifier(trained.bundle, "cpu")
    sources = manifest_inputs(fresh.root, "train").sources
    scores = np.concatenate([b.scores for b in classifier.iter_scores(sources)])
    expected = Decision(np.array(trained.bundle.thresholds.per_class)).select(scores)
    rows = [json.loads(line) for line in default.read_text().splitlines()]
    for row, chosen in zip(rows, expected, strict=True):
        assert row["labels"] == [trained.bundle.class_names[c] for c in chosen]


def test_thresholds_of_another_model_are_refused(trained, tmp_path, capsys):
    """Issue 20: a thresholds file names its model; another model's file is one line, exit 2."""
    bundle = trained.bundle
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in bundle.state_dict.items()}
    other = dataclasses.replace(bundle, state_dict=weights).save(tmp_path / "other.bundle.pt")
    own = write_thresholds(
        tmp_path / "own.json",
        ModelIdentity(bundle.digest, bundle.class_names),
        np.full(bundle.num_classes, 0.4),
        split="val",
    )
    wider_names = (*bundle.class_names, *(f"extra{i}" for i in range(10)))
    wider = write_thresholds(
        tmp_path / "wider.json",
        ModelIdentity("0" * 64, wider_names),
        np.full(20, 0.4),
        split="val",
    )
    image = image_folder(trained, tmp_path, count=1)[0]
    out = str(tmp_path / "p.jsonl")
    predict = ["predict", "--images", str(image), "--out", out]
    evaluate = ["evaluate", "--split", "test", "--out", str(tmp_path / "ev")]
    assert cli(*predict, "--model", str(trained.out), "--thresholds", str(own)) == 0
    capsys.readouterr()
    for argv, model, file, message in [
        (predict, other, own, f"{own} was fitted to another model (digest {bundle.digest[:12]}"),
        (evaluate, other, own, f"{own} was fitted to another model"),
        (predict, trained.out, wider, "other classes (10 only in the file: ['extra0', "),
        (evaluate, trained.out, wider, "other classes (10 only in the file"),
    ]:
        assert cli(*argv, "--model", str(model), "--thresholds", str(file)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_evaluate_on_other_classes_is_an_error_unless_intersect(trained, tmp_path, capsys):
    """Issue 20: a 10-class model on 12- or 8-class data names the difference; intersect
    evaluates the shared classes and says so."""
    wider = synth_dataset(tmp_path / "wider", 12, seed=5)
    narrower = synth_dataset(tmp_path / "narrower", 8, seed=5)
    names = trained.bundle.class_names
    base = ["evaluate", "--model", str(trained.out), "--split", "val"]
    for data, message in [
        (wider, f"2 only in the dataset: {list(default_class_names(12)[10:])}"),
        (narrower, f"2 only in the model: {list(names[8:])}"),
    ]:
        assert cli(*base, "--manifest", str(data), "--out", str(tmp_path / "refused")) == 2
        err = capsys.readouterr().err
        assert message in err and "--classes intersect" in err and err.count("\n") == 1

    for data, classes in [(wider, 10), (narrower, 8)]:
        out = tmp_path / f"eval-{data.name}"
        argv = [*base, "--manifest", str(data), "--out", str(out), "--classes", "intersect"]
        assert cli(*argv) == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"evaluating the {classes} classes in both (--classes intersect")
        report = json.loads((out / "report.json").read_text())
        assert report["classes"] == classes
        # Thresholds are written for the whole model only.
        assert (out / "thresholds.json").exists() == (classes == 10)


def test_every_model_reference_gives_the_same_bundle(trained, tmp_path, capsys):
    run_id = trained.run.info.run_id
    refs = [
        str(trained.out),
        str(trained.out / BUNDLE_FILE),
        f"runs:/{run_id}/train",
        f"models:/{REGISTERED}/1",
        f"models:/{REGISTERED}/train",
        f"models:/{REGISTERED}@train",
    ]
    for ref in refs:
        with open_bundle(ref, trained.uri) as path:
            loaded = load_bundle(path)
        assert loaded.class_names == trained.bundle.class_names, ref
        for key, value in trained.bundle.state_dict.items():
            assert torch.equal(loaded.state_dict[key], value), (ref, key)
    assert model_uri("models:/m/champion") == "models:/m@champion"
    assert model_uri("models:/m/latest") == "models:/m/latest"

    image = image_folder(trained, tmp_path, count=1)[0]
    random_bytes = tmp_path / "random.bundle.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    out = str(tmp_path / "p.jsonl")
    base = ["predict", "--images", str(image), "--out", out]
    assert cli(*base, "--model", f"models:/{REGISTERED}@train", uri=trained.uri) == 0
    capsys.readouterr()
    for bad, message in [
        (f"models:/{REGISTERED}/7", "--model models:/cpsd-test/7"),
        (str(tmp_path / "nowhere"), "no such file or directory"),
        (str(tmp_path), "no model.bundle.pt in"),
        (str(image), "is not a readable model bundle"),
        (str(random_bytes), "is not a readable model bundle: corrupt, truncated, or not a file"),
    ]:
        assert cli(*base, "--model", bad, uri=trained.uri) == 2, bad
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "weights_only" not in err, err


def test_read_only_commands_never_create_a_tracking_store(trained, tmp_path, monkeypatch, capsys):
    """Issue 21: a registry look-up in a directory without mlflow.db leaves none behind and says
    which store was searched and how to name another."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    model = ["--model", f"models:/{REGISTERED}@train"]
    commands = [
        ["predict", *model, "--images", "x.png", "--out", "p.jsonl"],
        ["evaluate", *model, "--out", "ev"],
        ["export", *model, "--format", "onnx", "--out", "m.onnx"],
    ]
    for argv in commands:
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            f"cpsd: error: --model models:/{REGISTERED}@train: there is no tracking store "
            f"sqlite:///{tmp_path / 'mlflow.db'} (the default, ./mlflow.db); point at the store "
            "that holds it with --tracking-uri URI or MLFLOW_TRACKING_URI\n"
        )
    for store, searched in [
        ("sqlite:///other.db", f"sqlite:///{tmp_path / 'other.db'}"),
        (f"file://{tmp_path / 'mlruns'}", f"file://{tmp_path / 'mlruns'}"),
    ]:
        assert run([*commands[0], "--tracking-uri", store]) == 2
        assert f"no tracking store {searched} (--tracking-uri)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    assert run(["predict", "--model", "models:/nosuch@train", *commands[0][3:]]) == 2
    assert capsys.readouterr().err == (
        "cpsd: error: --model models:/nosuch@train: Registered Model with name=nosuch not "
        f"found, in the tracking store {trained.uri} (MLFLOW_TRACKING_URI); point at the store "
        "that holds it with --tracking-uri URI or MLFLOW_TRACKING_URI\n"
    )
    found = ["predict", *model, *commands[0][3:], "--tracking-uri", trained.uri]
    assert run(found) == 1  # the model is found; x.png is skipped
    assert list(tmp_path.iterdir()) == [tmp_path / "p.jsonl"]


def test_a_wrong_model_fails_before_torch_or_mlflow_is_imported(tmp_path):
    """Issue 21: failing --model look-ups took 12-16 s of imports before the error."""
    code = (
        "import sys; from workflows.cli import run\n"
        "for ref in ('nosuch.pt', 'models:/a/b/c', 'models:/m@alias'):\n"
        "    assert run(['predict', '--model', ref, '--images', 'x', '--out', 'y.jsonl']) == 2\n"
        "print(sorted(m for m in ('torch', 'timm', 'mlflow', 'pyarrow') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"
    assert done.stderr.count("cpsd: error: --model") == 3 and list(tmp_path.iterdir()) == []


def test_export_onnx_and_torchscript_with_parity(trained, tmp_path, capsys):
    import onnx
    import onnxruntime

    # A tolerance no float computation meets fails the parity check; the file stays for
    # inspection, and compared by hand it is within the default tolerance.
    onnx_file = tmp_path / "model.onnx"
    argv = ["export", "--model", str(trained.out), "--out"]
    assert cli(*argv, str(onnx_file), "--format", "onnx", "--atol", "1e-12") == 2
    assert "onnx parity check failed: max |exported - eager| =" in capsys.readouterr().err
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    images = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        eager = trained.bundle.build_model()(images).numpy()
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - eager).max() <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["cpsd.class_names"]) == list(trained.bundle.class_names)

    script_file = tmp_path / "model.pt"
    assert cli(*argv, str(script_file), "--format", "torchscript") == 0
    extra = {"cpsd.json": ""}
    scripted = torch.jit.load(str(script_file), _extra_files=extra)
    assert np.abs(scripted(images).detach().numpy() - eager).max() <= 1e-4
    assert json.loads(extra["cpsd.json"])["cpsd.class_names"]
    assert "parity with eager PyTorch at batch sizes [1, 3]" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("head", ["ml_decoder", "rnn"])
def test_ml_decoder_and_orderless_rnn_export(head, fmt, tmp_path):
    cfg = ModelConfig(
        backbone="test_resnet",
        head=head,
        ml_decoder=MLDecoderConfig(embed_dim=32, ff_dim=64, num_heads=4),
    )
    torch.manual_seed(0)
    bundle = ModelBundle(
        model=cfg,
        class_names=tuple(f"c{i}" for i in range(7)),
        preprocessing=Preprocessing(image_size=32),
        state_dict=build_model_from_config(cfg, 7).state_dict(),
    )
    result = export_bundle(bundle, fmt, tmp_path / f"m.{fmt}")
    assert result.max_abs_diff <= 1e-4 and result.batch_sizes == (1, 3)


def test_export_refuses_heads_without_an_adapter(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "gap", dataclasses.replace(FAMILIES["gap"], export=None))
    with pytest.raises(ExportError, match="export of head 'gap' is not supported yet"):
        export_bundle(trained.bundle, "onnx", tmp_path / "m.onnx")


def test_mlflow_run_has_model_datasets_source_and_final_keys(trained):
    client, run_ = trained.client, trained.run
    tags, metrics = run_.data.tags, run_.data.metrics
    assert tags[ROLE_TAG] == "train" and "val_mAP_plain" in tags["mlflow.note.content"]
    assert len(tags["mlflow.source.git.commit"]) == 40
    experiment = client.get_experiment(run_.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (view,) = [v for k, v in experiment.tags.items() if k.startswith(VIEW_TAG_PREFIX)]
    view = json.loads(view)
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": ROLE_TAG}]
    assert view["columnOrder"][0] == "metrics.`best_val_mAP`"

    assert metrics["best_val_mAP"] == pytest.approx(metrics["val_mAP"])
    assert metrics["best_epoch"] == 1 and metrics["num_classes_evaluated"] == 10
    assert {"shift_mAP", "test_mAP", "test_CF1", "test_OF1"} <= set(metrics)
    history = client.get_metric_history(run_.info.run_id, "best_val_mAP")
    assert [m.step for m in history] == [1]

    inputs = {d.dataset.name: d for d in run_.inputs.dataset_inputs}
    assert set(inputs) == {"synth:train", "synth:val", "synth:test"}
    train_input = inputs["synth:train"]
    assert train_input.dataset.digest == manifest_digest(trained.dataset)
    assert json.loads(train_input.dataset.profile)["num_rows"] == 320
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "training"

    (output,) = run_.outputs.model_outputs
    assert output.step == 1
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run_.info.run_id and model.name == "train"
    linked = {m.key: m.value for m in model.metrics}
    assert linked["best_val_mAP"] == pytest.approx(metrics["best_val_mAP"])
    assert "val_mAP" in linked

    version = client.get_model_version_by_alias(REGISTERED, "train")
    assert int(version.version) == 1 and version.source == f"models:/{model.model_id}"
    assert version.run_id == run_.info.run_id
    assert float(version.tags["best_val_mAP"]) == pytest.approx(metrics["best_val_mAP"])
    assert version.tags["cpsd.role"] == "train"
    assert version.description.startswith("**train** model, trained by stage `train`")
    assert f"Training run: [`{run_.info.run_id}`]" in version.description  # no pipeline


def test_pyfunc_takes_bytes_and_pytorch_flavour_gives_logits(trained, tmp_path, monkeypatch):
    (path,) = image_folder(trained, tmp_path, count=1)
    mlflow.set_tracking_uri(trained.uri)
    uri = f"runs:/{trained.run.info.run_id}/train"
    model = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"image": [path.read_bytes(), b"junk"]})
    out = model.predict(frame, params={"top_k": 2})
    assert list(out.columns) == ["labels", "scores", "error"]
    assert len(out["labels"][0]) == 2 and out["error"][0] == ""
    assert "not an image" in out["error"][1]
    assert model.metadata.get_input_schema().input_names() == ["image", "path"]

    # Without a threshold the bundle's own val thresholds label, as in cpsd predict.
    ((_, scores, _),) = Classifier(trained.bundle, "cpu").iter_scores([path.read_bytes()])
    (chosen,) = trained.bundle.default_decision().select(scores)
    (labels,) = model.predict(frame[:1])["labels"]
    assert list(labels) == [trained.bundle.class_names[c] for c in chosen]

    network = mlflow.pytorch.load_model(uri)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = trained.bundle.build_model()(images)
        assert torch.allclose(network(images), expected, atol=1e-5)


def test_pyfunc_reads_server_files_only_under_an_allowed_root(trained, tmp_path, monkeypatch):
    """Issue 20: paths are off by default; with a root, outside and missing look the same."""
    (image,) = image_folder(trained, tmp_path, count=1)
    root = image.parent
    (root / "link.png").symlink_to("/etc/passwd")
    monkeypatch.delenv(INFERENCE_CONFIG_ENV, raising=False)
    mlflow.set_tracking_uri(trained.uri)
    uri = f"runs:/{trained.run.info.run_id}/train"
    texts = [
        str(image),
        image.name,
        "/etc/passwd",
        "../" * 12 + "etc/passwd",
        str(root / "absent.png"),
        "link.png",  # inside the root, pointing outside
        "broken.png",
    ]
    frame = pd.DataFrame({"path": texts})

    served = mlflow.pyfunc.load_model(uri).predict(frame, params={"top_k": 2})
    assert list(served["error"]) == [PATH_OFF] * len(texts)
    assert all(len(labels) == 0 for labels in served["labels"])

    expected = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [image.read_bytes()]}), params={"top_k": 2}
    )["labels"][0]
    by_config = mlflow.pyfunc.load_model(uri, model_config={IMAGE_ROOT_KEY: str(root)})
    monkeypatch.setenv(INFERENCE_CONFIG_ENV, json.dumps({IMAGE_ROOT_KEY: str(root)}))
    for model in (by_config, mlflow.pyfunc.load_model(uri)):  # the second as a server would
        out = model.predict(frame, params={"top_k": 2})
        assert list(out["error"][:2]) == ["", ""]
        assert list(out["labels"][0]) == list(out["labels"][1]) == list(expected)
        assert list(out["error"][2:6]) == [PATH_REFUSED] * 4
        assert "not an image" in out["error"][6]  # a file under the root is read


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_cpsd_serve_answers_an_image_with_labels(trained, tmp_path):
    """cpsd serve works without the venv on PATH (mlflow models serve by full path did not:
    "uvicorn: not found"), and reads server files only under --image-root."""
    (path,) = image_folder(trained, tmp_path, count=1)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # python -m workflows.cli from this checkout
        "PATH": "/usr/bin:/bin",  # no venv: uvicorn is not on it
    }
    command = [sys.executable, "-m", "workflows.cli", "serve", "--tracking-uri", trained.uri]
    command += ["--model", f"models:/{REGISTERED}@train", "--port", str(port)]
    command += ["--image-root", str(path.parent)]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    # Its own process group: the server forks a uvicorn worker, stopped with it by PID.
    server = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "server did not come up in 180 s"
                time.sleep(1)
        encoded = base64.b64encode(path.read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}
        answer = _post(f"http://127.0.0.1:{port}/invocations", {**body, "params": {"top_k": 3}})
        (prediction,) = answer["predictions"]
        assert len(prediction["labels"]) == 3 and prediction["error"] == ""
        assert set(prediction["labels"]) <= set(trained.bundle.class_names)
        assert prediction["scores"] == sorted(prediction["scores"], reverse=True)

        paths = {"dataframe_split": {"columns": ["path"], "data": [[path.name], ["/etc/passwd"]]}}
        answer = _post(f"http://127.0.0.1:{port}/invocations", {**paths, "params": {"top_k": 3}})
        under_root, outside = answer["predictions"]
        assert under_root == prediction
        assert outside == {"labels": [], "scores": [], "error": PATH_REFUSED}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    first_line = (tmp_path / "serve.log").read_text().splitlines()[0]
    assert first_line.startswith(f"serving models:/{REGISTERED}@train at http://127.0.0.1:{port}/")


def test_serve_writes_a_local_bundle_once_as_an_mlflow_model(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    served = Path(servable_model(str(trained.out)))
    assert served.parent == tmp_path / "cache" / "cpsd" / "serve"
    written = (served / "MLmodel").stat().st_mtime_ns
    assert servable_model(str(trained.out / BUNDLE_FILE)) == str(served)  # the same bundle
    assert (served / "MLmodel").stat().st_mtime_ns == written
    (image,) = image_folder(trained, tmp_path, count=1)
    model = mlflow.pyfunc.load_model(str(served))
    out = model.predict(pd.DataFrame({"image": [image.read_bytes()]}), params={"top_k": 2})
    assert len(out["labels"][0]) == 2 and out["error"][0] == ""
    assert servable_model(f"models:/{REGISTERED}/train") == f"models:/{REGISTERED}@train"


def test_final_keys_and_links():
    values = final_metrics(best_val_mAP=0.5, best_epoch=3, num_classes_evaluated=4, shift_mAP=0.4)
    assert values == {
        "best_val_mAP": 0.5,
        "best_epoch": 3.0,
        "num_classes_evaluated": 4.0,
        "shift_mAP": 0.4,
    }
    with pytest.raises(ValueError, match="not final keys"):
        log_final_metrics(None, "run", {"val_mAP": 1.0}, step=0)
    assert runs_page_link("sqlite:////x/mlflow.db", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert runs_page_link("http://10.0.0.2:5000/", "7", view="k").startswith(
        "http://10.0.0.2:5000/#/experiments/7/runs?workflowType=machine_learning&"
        "viewStateShareKey=k"
    )


def test_a_teacher_bundle_evaluates_on_its_own_classes(trained, tiny_config, tmp_path, capsys):
    """A model on a label subset keeps its class order; evaluate matches classes by name."""
    from mlcore.data.loading import open_dataset
    from mlcore.experiment import train_classifier

    subset = [3, 1]
    one_epoch = configlib.replace(tiny_config, ["train.epochs=1"])
    train_classifier(
        one_epoch, open_dataset(one_epoch.data), tmp_path / "teacher", class_subset=subset
    )
    bundle = load_bundle(tmp_path / "teacher" / BUNDLE_FILE)
    names = trained.manifest.class_names
    assert bundle.class_names == (names[3], names[1])
    assert bundle.metadata["dataset"]["class_indices"] == subset
    out = tmp_path / "eval"
    assert cli("evaluate", "--model", str(tmp_path / "teacher"), "--out", str(out)) == 0
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert sorted(r["class"] for r in rows) == sorted(bundle.class_names)
    saved = np.load(tmp_path / "teacher" / "val_scores.npz")
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == 2
    assert report["metrics"]["mAP"] == pytest.approx(
        multilabel_report(saved["scores"], saved["targets"])["mAP"], abs=1e-6
    )


def test_registered_model_config_is_checked():
    from workflows.config import ConfigError, MlflowConfig

    with pytest.raises(ConfigError, match=r"needs mlflow\.log_models"):
        MlflowConfig(registered_model="m", log_models=False)
    with pytest.raises(ConfigError, match="non-empty"):
        MlflowConfig(registered_model=" ")
