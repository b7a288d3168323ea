"""Losses as registered components: each owns its settings, the config carries only the selected
one's, the old one-section layout is still read, and stage keys do not move."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from mlcore import configlib
from mlcore.config import ExperimentConfig, LossConfig
from mlcore.configlib import ConfigError, ConfigWarning
from mlcore.fingerprint import config_content, stable_hash
from mlcore.losses import (
    LOSSES,
    ASLSettings,
    AsymmetricLoss,
    DBSettings,
    LossInputs,
    LossSpec,
    OrderlessSettings,
    build_loss,
    register_loss,
)


def _loss(section: dict) -> LossConfig:
    return configlib.from_dict(ExperimentConfig, {"loss": section}).loss


def _key(loss: LossConfig) -> str:
    return stable_hash(config_content(loss))


# The loss section's key hashes computed by the code before losses were registered (main at
# b6d7555, one LossConfig holding every loss's settings), for the same settings written in the
# old layout: config_content(cfg.loss) through stable_hash.
PUBLISHED = [
    ({"name": "asl"}, "33ac0cf9a4aa"),
    ({"name": "bce"}, "2fc80da125ed"),
    ({"name": "focal", "focal": {"gamma": 3}}, "afc5b2602881"),
    ({"name": "db", "db": {"alpha": 0.2}}, "ef679727f83e"),
    ({"name": "orderless", "orderless": {"order": "pla"}}, "24be43de984e"),
    ({"name": "orderless", "orderless": {"pla_variant": "code"}}, "528e1bb127c0"),
    (
        {"name": "asl", "asl": {"clip": 0.1, "adaptive": {"enabled": True, "log_every": 3}}},
        "bcdd745a0ed2",
    ),
]


@pytest.mark.parametrize(("section", "published"), PUBLISHED, ids=[str(s) for s, _ in PUBLISHED])
def test_stage_keys_hash_the_layout_they_were_published_with(section, published):
    assert _key(_loss(section)) == published


def test_the_old_layout_is_read_with_one_deprecation_line():
    old = {"name": "asl", "gamma_neg": 3, "adaptive": {"enabled": True}, "db": {"mu": 0.3}}
    with pytest.warns(ConfigWarning) as caught:
        loss = _loss(old)
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "config: deprecated loss layout, read as loss.gamma_neg -> loss.asl.gamma_neg, "
        "loss.adaptive -> loss.asl.adaptive; loss.db not used: loss.name is asl"
    )
    assert loss == _loss({"name": "asl", "asl": {"gamma_neg": 3, "adaptive": {"enabled": True}}})
    # What an old run folder's config.yaml holds: every loss's settings, at their defaults.
    with pytest.warns(ConfigWarning, match="loss.gamma -> loss.focal.gamma"):
        dumped = _loss(
            {"name": "orderless", "gamma_neg": 4.0, "gamma": 2.0, "order": "mla", "db": {}}
        )
    assert dumped.settings == OrderlessSettings(order="mla")


def test_the_config_carries_only_the_selected_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a section at its defaults is dropped without a word
        loss = _loss({"name": "db", "db": {"mu": 0.3}, "asl": {}})
    assert loss.settings == DBSettings(mu=0.3)
    assert configlib.to_dict(loss) == {"name": "db", "db": loss_dict(loss), "source": None}
    assert configlib.to_dict(_loss({"name": "bce"})) == {"name": "bce", "source": None}
    # A base config tuned for one loss still runs another, and says what it does not use.
    with pytest.warns(ConfigWarning, match=r"^config: loss.asl not used: loss.name is bce$"):
        switched = _loss({"name": "bce", "asl": {"gamma_neg": 2}})
    assert switched == _loss({"name": "bce"})


def loss_dict(loss: LossConfig) -> dict:
    return configlib.to_dict(loss.settings)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_round_trips_through_plain_data(name):
    loss = _loss({"name": name})
    assert configlib.from_dict(LossConfig, configlib.to_dict(loss), prefix="loss") == loss
    assert configlib.replace(loss, []) == loss


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"name": "asll"},
            "loss.name: 'asll' is not one of the registered losses: bce, focal, asl, db, orderless",
        ),
        ({"name": "asl", "asl": {"gama_neg": 1}}, "unknown config key 'loss.asl.gama_neg'"),
        ({"name": "asl", "asl": {"clip": 1.5}}, "loss.asl.clip must be in [0, 1)"),
        ({"name": "asl", "clipp": 0.1}, "unknown config key 'loss.clipp' (did you mean 'clip'?)"),
        ({"name": "db", "db": {"alpha": "x"}}, "loss.db.alpha: expected a number"),
    ],
)
def test_bad_loss_settings_name_their_key(section, message):
    with pytest.raises(ConfigError) as err:
        _loss(section)
    assert message in str(err.value)


def test_a_settings_object_of_another_loss_is_refused():
    with pytest.raises(ConfigError, match="must be DBSettings, got ASLSettings"):
        LossConfig(name="db", settings=ASLSettings())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledBCESettings:
    """A toy loss's settings."""

    scale: float = 1.0
    """Multiplies the BCE."""


class ScaledBCE(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.bce = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scale * self.bce(logits, targets)


@pytest.fixture
def scaled_bce():
    before = {name: _key(_loss({"name": name})) for name in LOSSES}
    spec = register_loss(
        LossSpec(
            name="scaled_bce",
            settings=ScaledBCESettings,
            build=lambda settings, inputs: ScaledBCE(settings.scale),
        )
    )
    yield spec, before
    del LOSSES[spec.name]


def test_a_loss_registered_in_one_file_is_selectable_and_leaves_published_keys(scaled_bce):
    spec, before = scaled_bce
    cfg = configlib.from_dict(
        ExperimentConfig, {"loss": {"name": "scaled_bce", "scaled_bce": {"scale": 2.0}}}
    )
    loss = build_loss(cfg.loss, LossInputs())
    logits, targets = torch.zeros(2, 3), torch.ones(2, 3)
    plain = build_loss(_loss({"name": "bce"}))(logits, targets)
    assert torch.allclose(loss(logits, targets), 2.0 * plain)
    # Selected, its settings count under its name; registered, it moves no other loss's key.
    assert config_content(cfg.loss)["scaled_bce"] == {"scale": 2.0}
    assert _key(cfg.loss) != _key(_loss({"name": "scaled_bce"}))
    assert {name: _key(_loss({"name": name})) for name in before} == before
    with pytest.raises(ValueError, match="registered already"):
        register_loss(dataclasses.replace(spec))
