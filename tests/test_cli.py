"""The ``cpsd`` command line end to end on tiny generated data."""

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from workflows.cli import run


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("data", "train", "partition", "run-local", "demo"):
        assert command in out


def test_synth_check_partition_train(tmp_path, capsys, tiny_overrides):
    data = tmp_path / "data"
    synth = "--num-classes 6 --num-train 96 --num-val 32 --image-size 32 --context-shift 16"
    assert run(["data", "synth", "--out", str(data), *synth.split()]) == 0
    assert run(["data", "check", str(data)]) == 0
    assert "classes" in capsys.readouterr().out

    out_json = tmp_path / "p" / "cgp.json"
    assert run(["partition", "--data", str(data), "--k", "2", "--out", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    assert report["k"] == 2 and report["kind"] == "cgp"
    assert out_json.with_suffix(".png").stat().st_size > 1000
    capsys.readouterr()
    # One check of k for every caller, naming the caller's setting; kinds from the registry.
    bad = ["partition", "--data", str(data), "--out", str(tmp_path / "bad.json")]
    assert run([*bad, "--k", "7"]) == 2
    assert "--k = 7 is larger than the number of classes (6)" in capsys.readouterr().err
    assert run([*bad, "--kind", "cgpp"]) == 2
    kinds = "the registered partition kinds: cgp, dgp, random, full"
    assert f"partition kind: 'cgpp' is not one of {kinds}" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.root={data}", "data.synth=null", "train.epochs=1", f"mlflow.tracking_uri={uri}"]
    argv = ["train", "--config", "tiny", "--out", str(tmp_path / "t")]
    assert run(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert "best val mAP" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert len(metrics) == 1 and "val_mAP" in metrics[0]
    assert (tmp_path / "t" / "best.pt").is_file() and (tmp_path / "t" / "val_scores.npz").is_file()
    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("cpsd").experiment_id])
    assert logged.info.run_name == "tiny-train" and logged.info.status == "FINISHED"
    assert "val_mAP" in logged.data.metrics
    assert logged.data.params["model.backbone"] == "test_resnet"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--set", "train.epoch=1"], "unknown config key 'train.epoch'"),
        (["train", "--config", "nope"], "config 'nope' not found"),
        (["data", "check", "/nonexistent/dir"], "no manifest.parquet"),
        (["partition", "--data", "/nonexistent/dir"], "no manifest.parquet"),
        (["train", "--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "is unreachable"),
    ],
)
def test_user_errors_are_one_line_exit_2(argv, message, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_csv_import_error_names_the_row(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("image,labels\na.png,cat dog\n")
    (tmp_path / "classes.txt").write_text("cat\n")
    argv = [
        "data",
        "import",
        "csv",
        str(tmp_path / "labels.csv"),
        "--out",
        str(tmp_path / "o"),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--label-format",
        "names",
        "--image-dir",
        str(tmp_path),
    ]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert "dog" in err and "line 2" in err
