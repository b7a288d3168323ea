"""Loss registry: ``build_loss(cfg, ...)`` maps ``loss.name`` to a module.

``bce`` and ``focal`` are the special cases of ASL (γ+ = γ−, no margin), so they share its code.
``orderless`` scores the label sequences of ``model.head: rnn`` (step logits, not per-class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from mlcore.config import LossConfig
from mlcore.losses.asl import AsymmetricLoss
from mlcore.losses.asymmetry import DEFAULT_STEP, AsymmetryController
from mlcore.losses.db import DistributionBalancedLoss
from mlcore.losses.orderless import FIXED_ORDERS, OrderlessLoss, class_ranking


def _bce(cfg: LossConfig, **_) -> nn.Module:
    return AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)


def _focal(cfg: LossConfig, **_) -> nn.Module:
    return AsymmetricLoss(gamma_neg=cfg.gamma, gamma_pos=cfg.gamma, clip=0.0)


def _asl(cfg: LossConfig, **_) -> nn.Module:
    return AsymmetricLoss(gamma_neg=cfg.gamma_neg, gamma_pos=cfg.gamma_pos, clip=cfg.clip)


def _db(cfg: LossConfig, *, class_freq=None, train_size=None, **_) -> nn.Module:
    if class_freq is None or train_size is None:
        raise ValueError("loss 'db' needs the training set's class frequencies and size")
    db = cfg.db
    return DistributionBalancedLoss(
        np.asarray(class_freq),
        int(train_size),
        alpha=db.alpha,
        beta=db.beta,
        mu=db.mu,
        neg_scale=db.neg_scale,
        init_bias=db.init_bias,
        focal_gamma=db.focal_gamma,
        balance_param=db.balance_param,
        reweight=db.reweight,
        ntr=db.ntr,
        focal=db.focal,
    )


def _orderless(cfg: LossConfig, *, class_freq=None, class_names=None, **_) -> nn.Module:
    num_classes = len(class_freq) if class_freq is not None else len(class_names or ())
    if num_classes == 0:
        raise ValueError("loss 'orderless' needs the training class frequencies or names")
    rank = class_ranking(cfg.order, class_freq, class_names) if cfg.order in FIXED_ORDERS else None
    return OrderlessLoss(num_classes, cfg.order, rank=rank, pla_variant=cfg.pla_variant)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "bce": _bce,
    "focal": _focal,
    "asl": _asl,
    "db": _db,
    "orderless": _orderless,
}


def build_loss(
    cfg: LossConfig,
    *,
    class_freq: np.ndarray | None = None,
    train_size: int | None = None,
    class_names: Sequence[str] | None = None,
) -> nn.Module:
    """The loss module named by ``cfg.name``.

    ``db`` needs the training class frequencies and size; ``orderless`` the frequencies (its
    number of classes, and the ``frequent``/``rare`` orders) and the class names
    (``dictionary``).
    """
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[cfg.name](
        cfg, class_freq=class_freq, train_size=train_size, class_names=class_names
    )


# The batch size the default step sizes were chosen at (the toy problem of the tests).
REFERENCE_BATCH = 256


def build_asymmetry_controller(
    cfg: LossConfig, loss: nn.Module, *, batch_size: int, lr_warmup_steps: int = 0
) -> AsymmetryController | None:
    """The adaptive-asymmetry controller for ``loss`` when ``cfg.adaptive.enabled``.

    Its step is ``λ · batch_size / 256`` (``adaptive.step_size`` is per 256 images), and with
    ``adaptive.warmup_steps: null`` it waits ``lr_warmup_steps``, the schedule's warm-up
    (``mlcore.losses.asymmetry`` gives the evidence for both).
    """
    ad = cfg.adaptive
    if not ad.enabled:
        return None
    return AsymmetryController(
        loss,
        target_gap=ad.target_gap,
        step_size=(ad.step_size or DEFAULT_STEP[ad.adapt]) * batch_size / REFERENCE_BATCH,
        gamma_neg_bounds=(ad.gamma_neg_min, ad.gamma_neg_max),
        warmup_steps=lr_warmup_steps if ad.warmup_steps is None else ad.warmup_steps,
        adapt=ad.adapt,
        margin_bounds=(ad.margin_min, ad.margin_max),
    )


__all__ = [
    "LOSSES",
    "AsymmetricLoss",
    "AsymmetryController",
    "DistributionBalancedLoss",
    "OrderlessLoss",
    "build_asymmetry_controller",
    "build_loss",
]
