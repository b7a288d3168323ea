from pathlib import Path

import pytest

from mlcore import configlib
from mlcore.configlib import ConfigError
from workflows.config import CONFIG_DIR, Config, config_path, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert Path(cfg.storage_path).is_absolute()


def test_dotted_overrides_and_types():
    cfg = load_config(
        None, ["train.epochs=3", "train.lr=1e-3", "loss.name=db", "train.grad_clip=null"]
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.loss.name == "db" and cfg.train.grad_clip is None
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", "unknown config key 'train.epoch' (did you mean 'epochs'?)"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("loss.name=hinge", "loss.name: 'hinge' is not one of"),
        ("model.head=mlp", "model.head: 'mlp' is not one of"),
        ("train.ema=maybe", "train.ema: expected true/false"),
        ("data.synth.seed=1 data.root=/x", "set only one of data.root"),
        ("train", "not of the form dotted.key=value"),
        ("train.epochs=1 train.epochs.x=1", "'train.epochs' is a value, not a section"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split())
    assert message in str(err.value)


def test_unknown_key_in_file_and_include(tmp_path):
    (tmp_path / "loss.yaml").write_text("name: asl\nasl: {gamma_neg: 3}\n")
    (tmp_path / "a.yaml").write_text("loss: !include loss.yaml\ntrain: {epochs: 2}\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.loss.settings.gamma_neg == 3.0 and cfg.train.epochs == 2
    (tmp_path / "b.yaml").write_text("train: {epochz: 2}\n")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("loss: !include missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        load_config(tmp_path / "c.yaml")


def test_frozen_and_round_trip():
    cfg = load_config(config_path("tiny"))
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]
    again = configlib.from_dict(Config, configlib.to_dict(cfg))
    assert again == cfg
    assert configlib.replace(cfg, ["train.epochs=7"]).train.epochs == 7


def test_relative_paths_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.cache_dir=c", "storage_path=s"])
    assert cfg.data.cache_dir == str(tmp_path / "c") and cfg.storage_path == str(tmp_path / "s")
    assert load_config(None, ["storage_path=s3://bucket/x"]).storage_path == "s3://bucket/x"


def test_missing_bundled_config_lists_available():
    with pytest.raises(ConfigError, match=r"bundled configs: .*tiny"):
        config_path("nope")


def test_pretrained_study_runs_the_issue_18_design():
    from workflows.study import expand

    runs = expand(load_config(config_path("study_cpsd_pretrained")))
    assert len(runs) == 9 * 5
    assert {r.cfg.cpsd.mode for r in runs} == {"baseline", "cpsd"}
    assert {r.cfg.cpsd.cls_weight for r in runs if r.cfg.cpsd.mode == "cpsd"} == {0.5, 5, 50}
    pretrained = [r for r in runs if r.cfg.pretrain.enabled]
    scratch = [r for r in runs if not r.cfg.pretrain.enabled]
    assert {r.cfg.cpsd.mode for r in scratch} == {"baseline", "cpsd"} and len(scratch) == 2 * 5
    for run in pretrained:
        k = run.cfg.cpsd.k
        assert run.cfg.cpsd.control_ensemble in (0, 2 * k - 1)  # the long baseline has none
    assert any(r.cfg.cpsd.student_epochs == 2 * r.cfg.train.epochs for r in runs)
    assert any(r.cfg.train.epochs == 24 and r.cfg.cpsd.mode == "baseline" for r in runs)
    for run in runs:
        assert run.cfg.data.synth.seed == run.seed and 12 <= run.cfg.train.epochs <= 24
    upstream = runs[0].cfg.pretrain.synth
    downstream = runs[0].cfg.data.synth
    assert upstream.class_offset >= downstream.num_classes  # disjoint classes
    assert load_config(config_path("study_cpsd")).cpsd.control_ensemble == 5
