"""Losses, each registered with its own settings (``mlcore.losses.registry``).

Importing the package imports every built-in loss's module, which registers it: ``asl``,
``focal`` and ``bce`` (``asl``: focal and BCE are ASL's special cases, one code path), ``db``
(``db``) and ``orderless`` (``orderless``: the label-sequence loss of ``model.head: rnn``).
"""

from mlcore.losses.asl import ASLSettings, AsymmetricLoss, BCESettings, FocalSettings
from mlcore.losses.asymmetry import AdaptiveAsymmetrySettings, AsymmetryController
from mlcore.losses.db import DBSettings, DistributionBalancedLoss
from mlcore.losses.orderless import OrderlessLoss, OrderlessSettings
from mlcore.losses.registry import (
    LOSSES,
    LossInputs,
    LossSpec,
    build_loss,
    build_observer,
    loss_spec,
    register_loss,
)

__all__ = [
    "LOSSES",
    "ASLSettings",
    "AdaptiveAsymmetrySettings",
    "AsymmetricLoss",
    "AsymmetryController",
    "BCESettings",
    "DBSettings",
    "DistributionBalancedLoss",
    "FocalSettings",
    "LossInputs",
    "LossSpec",
    "OrderlessLoss",
    "OrderlessSettings",
    "build_loss",
    "build_observer",
    "loss_spec",
    "register_loss",
]
