"""Asymmetric Loss (ASL) for multi-label classification.

Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021, Eq. 7. With
``p = σ(z)`` the per-label loss is ``L = -y L+ - (1 - y) L-`` where::

    L+ = (1 - p)^γ+ · log(p)
    L- = p_m^γ- · log(1 - p_m),      p_m = max(p - m, 0)

Focal loss is the special case ``γ+ = γ-, m = 0`` and binary cross-entropy the case
``γ+ = γ- = 0, m = 0``; no separate code path exists for either. All three are registered here
(``loss.name: asl``, ``focal``, ``bce``), each with its own settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mlcore.configlib import check
from mlcore.losses.asymmetry import AdaptiveAsymmetrySettings, build_controller
from mlcore.losses.registry import LossInputs, LossSpec, register_loss

Reduction = Literal["sum", "mean", "none"]
_REDUCTIONS = ("sum", "mean", "none")


class AsymmetricLoss(nn.Module):
    """ASL, numerically matching the authors' reference implementation.

    Conventions of ``Alibaba-MIIL/ASL`` (``src/loss_functions/losses.py``, ``AsymmetricLoss``)
    that this module reproduces exactly:

    * the margin is applied to the negative probability: ``1 - p_m = min(1 - p + m, 1)``;
    * both log arguments are clamped below at ``eps`` (so a positive with ``p < eps`` has a
      constant loss ``-log(eps)`` and no gradient);
    * the focusing weight ``(1 - p_t)^γ`` with ``p_t = p`` for positives and ``p_t = 1 - p_m``
      for negatives is excluded from autograd when ``detach_focal_weight`` is true (their
      ``disable_torch_grad_focal_loss``);
    * the default reduction is the negated sum over batch and classes.

    ``gamma_neg``, ``gamma_pos`` and ``clip`` are plain float attributes read at every call, so
    a controller (see :mod:`mlcore.losses.asymmetry`) may change them between steps. Half
    precision logits are upcast to float32 (the authors' training script casts them likewise).

    Args:
        gamma_neg: Focusing parameter γ- of negative labels.
        gamma_pos: Focusing parameter γ+ of positive labels.
        clip: Probability margin m. ``0`` or ``None`` disables the shift.
        eps: Lower clamp of the log arguments.
        detach_focal_weight: Treat the focusing weight as a constant in the backward pass.
        reduction: ``"sum"`` (authors'), ``"mean"`` over the ``B * C`` elements, or ``"none"``.

    Raises:
        ValueError: For an unknown reduction or a negative hyper-parameter.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float | None = 0.05,
        eps: float = 1e-8,
        detach_focal_weight: bool = True,
        reduction: Reduction = "sum",
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if gamma_neg < 0 or gamma_pos < 0 or (clip is not None and clip < 0) or eps <= 0:
            raise ValueError("gamma_neg, gamma_pos and clip must be >= 0 and eps > 0")
        self.gamma_neg = float(gamma_neg)
        self.gamma_pos = float(gamma_pos)
        self.clip = None if clip is None else float(clip)
        self.eps = float(eps)
        self.detach_focal_weight = detach_focal_weight
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"eps={self.eps}, detach_focal_weight={self.detach_focal_weight}, "
            f"reduction={self.reduction!r}"
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Raw scores ``z``, shape ``(B, C)``.
            targets: Binary labels in ``{0, 1}``, shape ``(B, C)``, any float or integer dtype.

        Returns:
            A scalar for ``"sum"``/``"mean"``, the ``(B, C)`` element losses for ``"none"``;
            float64 for float64 logits, float32 otherwise (half precision is upcast).
        """
        # float16 cannot hold eps = 1e-8 (the clamp would give log(0)): compute in >= float32.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = targets.to(logits.dtype)
        anti_targets = 1.0 - targets
        prob_pos = torch.sigmoid(logits)
        prob_neg = 1.0 - prob_pos
        if self.clip is not None and self.clip > 0:
            # 1 - max(p - m, 0) == min(1 - p + m, 1): the shift acts on negatives only.
            prob_neg = (prob_neg + self.clip).clamp(max=1.0)

        log_lik = targets * torch.log(prob_pos.clamp(min=self.eps)) + anti_targets * torch.log(
            prob_neg.clamp(min=self.eps)
        )

        if self.gamma_neg > 0 or self.gamma_pos > 0:
            # Honour an enclosing no_grad(): only ever switch gradients off here, never on.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_focal_weight):
                p_t = prob_pos * targets + prob_neg * anti_targets
                gamma = self.gamma_pos * targets + self.gamma_neg * anti_targets
                # Where 1 - p_t is exactly 0 the loss term is log(1) = 0 as well; the clamp keeps
                # d/dx x^γ finite there for 0 < γ < 1, which would otherwise give 0 * inf = NaN.
                base = (1.0 - p_t).clamp(min=torch.finfo(logits.dtype).tiny)
                focal_weight = base.pow(gamma)
            log_lik = log_lik * focal_weight

        loss = -log_lik
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            return loss.mean()
        return loss


@dataclass(frozen=True, kw_only=True)
class ASLSettings:
    """``loss.asl``: the asymmetric loss and its adaptive asymmetry."""

    gamma_neg: float = 4.0
    """γ−, focusing of negative labels."""
    gamma_pos: float = 0.0
    """γ+, focusing of positive labels."""
    clip: float = 0.05
    """Probability margin m of negative labels."""
    adaptive: AdaptiveAsymmetrySettings = field(default_factory=AdaptiveAsymmetrySettings)
    """Adaptive asymmetry (ASL §2.7, ``mlcore.losses.asymmetry``)."""

    def __post_init__(self) -> None:
        check(self.gamma_neg >= 0 and self.gamma_pos >= 0, "loss.asl: gammas must be >= 0")
        check(0.0 <= self.clip < 1.0, "loss.asl.clip must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class FocalSettings:
    """``loss.focal``: focal loss, ASL with γ+ = γ− = ``gamma`` and no margin."""

    gamma: float = 2.0
    """Focal γ."""

    def __post_init__(self) -> None:
        check(self.gamma >= 0, "loss.focal.gamma must be >= 0")


@dataclass(frozen=True, kw_only=True)
class BCESettings:
    """``loss.bce``: binary cross-entropy, ASL with γ+ = γ− = 0 and no margin (no settings)."""


def _asl(settings: ASLSettings, inputs: LossInputs) -> AsymmetricLoss:
    return AsymmetricLoss(
        gamma_neg=settings.gamma_neg, gamma_pos=settings.gamma_pos, clip=settings.clip
    )


def _focal(settings: FocalSettings, inputs: LossInputs) -> AsymmetricLoss:
    return AsymmetricLoss(gamma_neg=settings.gamma, gamma_pos=settings.gamma, clip=0.0)


def _bce(settings: BCESettings, inputs: LossInputs) -> AsymmetricLoss:
    return AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)


def _controller(settings: ASLSettings, loss: AsymmetricLoss, **schedule: int):
    return build_controller(settings.adaptive, loss, **schedule)


register_loss(LossSpec(name="bce", settings=BCESettings, build=_bce, legacy_path=""))
register_loss(LossSpec(name="focal", settings=FocalSettings, build=_focal, legacy_path=""))
register_loss(
    LossSpec(
        name="asl",
        settings=ASLSettings,
        build=_asl,
        observer=_controller,
        observe_every=lambda settings: settings.adaptive.log_every,
        legacy_path="",
    )
)
