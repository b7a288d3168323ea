"""Upstream pretraining: a class-disjoint task whose backbone initialises the models."""

import torch

from mlcore import configlib
from mlcore.data.loading import resolve_dataset
from mlcore.data.manifest import read_info
from mlcore.models import build_model_from_config
from mlcore.pretrain import export_backbone, pretrain_config, pretrain_fingerprint, with_pretrained

UPSTREAM = [
    "pretrain.enabled=true",
    "pretrain.synth={num_classes: 10, class_offset: 10, num_train: 32, num_val: 16, num_test: 0,"
    " image_size: 32, num_topics: 3}",
    "pretrain.epochs=1",
]


def test_upstream_classes_are_disjoint_and_its_key_ignores_the_downstream_seed(tiny_config):
    cfg = configlib.replace(tiny_config, UPSTREAM)
    upstream = pretrain_config(cfg)
    down = set(read_info(resolve_dataset(cfg.data)).class_names)
    up = set(read_info(resolve_dataset(upstream.data)).class_names)
    assert len(up) == 10 and not up & down
    other = configlib.replace(
        cfg, ["train.seed=7", "data.synth.seed=7", "cpsd.cls_weight=50", "loss.name=bce"]
    )
    assert pretrain_fingerprint(other) == pretrain_fingerprint(cfg)
    assert pretrain_fingerprint(configlib.replace(cfg, ["pretrain.seed=1"])) != (
        pretrain_fingerprint(cfg)
    )


def test_exported_backbone_initialises_a_downstream_model(tiny_config, tmp_path):
    cfg = configlib.replace(tiny_config, UPSTREAM)
    upstream = build_model_from_config(pretrain_config(cfg).model, 10)
    torch.save({"model": upstream.state_dict()}, tmp_path / "best.pt")
    backbone = export_backbone(cfg, tmp_path / "best.pt", tmp_path / "backbone.pt")
    resolved = with_pretrained(cfg, backbone)
    assert not resolved.pretrain.enabled and resolved.model.pretrained_file == str(backbone)
    model = build_model_from_config(resolved.model, 10)
    fresh = build_model_from_config(cfg.model, 10)
    upstream_state, state = upstream.state_dict(), model.state_dict()
    assert not any(name.startswith("fc.") for name in torch.load(backbone, weights_only=True))
    for name, tensor in state.items():
        if not name.startswith("fc.") and tensor.is_floating_point():
            assert torch.equal(tensor, upstream_state[name]), name
    assert any(
        not torch.equal(t, fresh.state_dict()[n])
        for n, t in state.items()
        if t.is_floating_point() and not n.startswith("fc.")
    )


def test_commands_that_do_not_run_the_stage_graph_refuse_pretrain(tiny_config):
    import pytest

    from mlcore.configlib import ConfigError
    from workflows.train_one import train_one
    from workflows.tune import validate_space

    cfg = configlib.replace(tiny_config, UPSTREAM)
    with pytest.raises(ConfigError, match=r"pretrain\.enabled runs in cpsd pipeline"):
        train_one(cfg)
    sweep = configlib.replace(cfg, ["tune.space={loss.asl.clip: {choice: [0.0]}}"])
    with pytest.raises(ConfigError, match=r"pretrain\.enabled needs tune\.target: student"):
        validate_space(sweep)
