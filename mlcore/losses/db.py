"""Distribution-Balanced loss (DB) for long-tailed multi-label classification.

Wu et al., "Distribution-Balanced Loss for Multi-Label Classification in Long-Tailed Datasets",
ECCV 2020, §3. With ``n_i`` the number of training images containing class ``i`` and ``N`` the
number of training images:

Re-balanced weighting (Eq. 2-4), for image ``k`` with labels ``y^k``::

    r_i^k = P_i^C / P^I(x^k) = (1 / n_i) / Σ_{j: y_j^k = 1} (1 / n_j)
    r̂_i^k = α + σ(β (r_i^k - μ))

Negative-tolerant regularization (NTR, Eq. 7-9) with scale λ and class bias from the prior
``p_i = n_i / N``::

    b̂_i = -log(1 / p_i - 1)
    z'_i = z_i + κ b̂_i / λ           (shifted logit; see "bias scale" below)
    L_i  = r̂_i [ y_i · BCE(z'_i, 1) + (1 - y_i) · BCE(λ z'_i, 0) / λ ]

and the focal variant multiplies each element by ``balance · (1 - p_t)^γ`` where ``p_t`` is the
probability of the true label under the (scaled) logit. The batch loss is the mean over the
``B * C`` elements.

Conventions follow the authors' code (``wutong16/DistributionBalancedLoss``,
``mllt/models/losses/resample_loss.py``, ``ResampleLoss`` with ``reweight_func='rebalance'``):

* The re-balancing weight applies to positive and negative labels alike.
* Bias scale: ``init_bias = -log(N / n_i - 1) · κ / λ`` is added to the logits and the negative
  logits are then multiplied by λ, so negatives see ``λ z + κ b̂`` and positives ``z + κ b̂ / λ``.
  (Eq. 7/9 of the paper would give ``λ z + λ κ b̂``; the released code and configs are
  followed.)
* The focal weight is part of the autograd graph (not detached), ``p_t`` is computed from the
  NTR-transformed logits, and ``balance_param`` only multiplies the focal variant.
* The authors' head returns the element losses and their trainer takes ``.mean()``, so
  ``reduction="mean"`` is the mean over ``B * C`` elements.
* An image with no positive label has ``P^I = 0``; their code then gets ``r = inf`` and weight
  ``α + 1`` for every class. This module reproduces that limit explicitly.

Configurations. The defaults are the authors' COCO-MLT setting (α = 0.1, β = 10, μ = 0.2,
λ = 2, κ = 0.05, focal γ = 2, balance 2). Their VOC-MLT setting is μ = 0.3, λ = 5 (rest equal).
The config keys map as ``map_param=dict(alpha=α, beta=β, gamma=μ)`` and
``logit_reg=dict(neg_scale=λ, init_bias=κ)``. Ablation switches map to their settings:
``reweight=False`` is ``reweight_func=None`` (weight 1; with NTR on, their code would fail on
``None / neg_scale``, here negatives keep the 1/λ factor of Eq. 7), ``ntr=False`` is
``logit_reg=dict()`` (no bias, no scaling) and ``focal=False`` is ``focal=dict(focal=False)``
(plain weighted BCE, no balance factor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlcore.losses.registry import LossInputs, LossSpec, register_loss

Reduction = Literal["mean", "sum", "none"]
_REDUCTIONS = ("mean", "sum", "none")


class DistributionBalancedLoss(nn.Module):
    """DB loss: re-balanced weighting + negative-tolerant regularization (+ focal term).

    Args:
        class_freq: Number of training images containing each class ``n_i``, shape ``(C,)``.
        train_size: Number of training images ``N``.
        alpha: α, overall lift of the re-balancing weight.
        beta: β, slope of the smoothing sigmoid.
        mu: μ, centre of the smoothing sigmoid.
        neg_scale: λ, the NTR scale of negative logits.
        init_bias: κ, the scale of the class-prior bias.
        focal_gamma: γ of the focal term.
        balance_param: Constant factor of the focal variant.
        reweight: Use the re-balancing weight ``r̂`` (else weight 1).
        ntr: Use negative-tolerant regularization.
        focal: Use the focal term.
        reduction: ``"mean"`` over the ``B * C`` elements, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: If a class has no positive training image (the weight ``1 / n_i`` and the
            bias are undefined; the message names the class indices), if ``n_i > N``, if NTR
            needs the bias of a class present in every image (``n_i = N``, infinite bias),
            if ``neg_scale <= 0`` or for an unknown reduction.
    """

    def __init__(
        self,
        class_freq: Sequence[int] | np.ndarray | torch.Tensor,
        train_size: int,
        *,
        alpha: float = 0.1,
        beta: float = 10.0,
        mu: float = 0.2,
        neg_scale: float = 2.0,
        init_bias: float = 0.05,
        focal_gamma: float = 2.0,
        balance_param: float = 2.0,
        reweight: bool = True,
        ntr: bool = True,
        focal: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if neg_scale <= 0:
            raise ValueError(f"neg_scale must be > 0, got {neg_scale}")
        freq = torch.as_tensor(np.asarray(class_freq), dtype=torch.float64).flatten()
        empty = torch.nonzero(freq <= 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"classes {empty} have no positive training image; DB re-balancing divides by "
                "the class frequency. Drop these classes or fix the frequency table."
            )
        too_many = torch.nonzero(freq > train_size).flatten().tolist()
        if too_many:
            raise ValueError(f"classes {too_many} have more positives than train_size={train_size}")
        if ntr and init_bias != 0:
            everywhere = torch.nonzero(freq >= train_size).flatten().tolist()
            if everywhere:
                raise ValueError(
                    f"classes {everywhere} occur in every training image: the NTR prior bias "
                    "-log(N / n - 1) is infinite. Use init_bias=0 or ntr=False."
                )

        self.alpha = alpha
        self.beta = beta
        self.mu = mu
        self.neg_scale = neg_scale
        self.init_bias = init_bias
        self.focal_gamma = focal_gamma
        self.balance_param = balance_param
        self.reweight = reweight
        self.ntr = ntr
        self.focal = focal
        self.reduction = reduction
        # Derived constants, kept in float64 and cast per call so float64 parity is exact.
        # Not persistent: they are a function of the constructor arguments, not training state.
        self.register_buffer("freq_inv", 1.0 / freq, persistent=False)
        prior_bias = -torch.log(train_size / freq - 1.0) if ntr and init_bias != 0 else freq * 0
        self.register_buffer("logit_bias", prior_bias * init_bias / neg_scale, persistent=False)

    @property
    def num_classes(self) -> int:
        return self.freq_inv.numel()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, alpha={self.alpha}, beta={self.beta}, "
            f"mu={self.mu}, neg_scale={self.neg_scale}, init_bias={self.init_bias}, "
            f"focal_gamma={self.focal_gamma}, balance_param={self.balance_param}, "
            f"reweight={self.reweight}, ntr={self.ntr}, focal={self.focal}, "
            f"reduction={self.reduction!r}"
        )

    def rebalance_weight(self, targets: torch.Tensor) -> torch.Tensor:
        """Smoothed re-balancing weight ``r̂`` (Eq. 2-4).

        Args:
            targets: Binary labels, shape ``(B, C)``.

        Returns:
            ``r̂``, shape ``(B, C)``, in the dtype of ``targets``.
        """
        freq_inv = self.freq_inv.to(targets.dtype)
        instance_freq = targets @ freq_inv  # (B,): C · P^I(x^k)
        ratio = freq_inv / instance_freq.unsqueeze(1)
        # No positive label: P^I = 0, r = +inf and r̂ = α + 1 (the authors' limit).
        ratio = torch.where(instance_freq.unsqueeze(1) > 0, ratio, torch.inf)
        return self.alpha + torch.sigmoid(self.beta * (ratio - self.mu))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: Raw scores, shape ``(B, C)``.
            targets: Binary labels in ``{0, 1}``, shape ``(B, C)``.

        Returns:
            A scalar for ``"mean"``/``"sum"``, the ``(B, C)`` element losses for ``"none"``;
            float64 for float64 logits, float32 otherwise (half precision is upcast).

        Raises:
            ValueError: If the class dimension differs from the frequency table.
        """
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got logits {logits.shape}")
        # 1 / n_i is below float16 precision for frequent classes: compute in >= float32.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = targets.to(logits.dtype)
        weight = self.rebalance_weight(targets) if self.reweight else torch.ones_like(logits)

        if self.ntr:
            anti_targets = 1.0 - targets
            shifted = logits + self.logit_bias.to(logits.dtype)
            logits = shifted * targets + self.neg_scale * shifted * anti_targets
            # Dividing by λ keeps the negative gradient bounded by 1 despite the scaled logit.
            weight = weight * targets + weight * anti_targets / self.neg_scale

        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = weight * bce
        if self.focal:
            # 1 - p_t with p_t = exp(-BCE); expm1 keeps it exact when p_t is close to 1. The clamp
            # only acts where BCE underflows to 0 and keeps d/dx x^γ finite there for γ < 1.
            one_minus_pt = (-torch.expm1(-bce)).clamp(min=torch.finfo(bce.dtype).tiny)
            loss = self.balance_param * one_minus_pt.pow(self.focal_gamma) * loss

        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


@dataclass(frozen=True, kw_only=True)
class DBSettings:
    """``loss.db``: the Distribution-Balanced loss (defaults: the authors' COCO-LT setting)."""

    alpha: float = 0.1
    """α of the re-balancing map r̂ = α + σ(β(r − μ))."""
    beta: float = 10.0
    """β of the re-balancing map."""
    mu: float = 0.2
    """μ of the re-balancing map (VOC-LT: 0.3)."""
    neg_scale: float = 2.0
    """λ, negative-tolerant regularization scale (VOC-LT: 5)."""
    init_bias: float = 0.05
    """κ, scale of the class-prior bias ν = κ·b̂."""
    focal_gamma: float = 2.0
    """Focal γ."""
    balance_param: float = 2.0
    """Balance factor multiplying the focal term."""
    reweight: bool = True
    """Re-balanced weighting (ablation switch)."""
    ntr: bool = True
    """Negative-tolerant regularization (ablation switch)."""
    focal: bool = True
    """Focal term (ablation switch)."""


def _db(settings: DBSettings, inputs: LossInputs) -> DistributionBalancedLoss:
    if inputs.train_size is None:
        raise ValueError("loss 'db' needs the training set's size")
    return DistributionBalancedLoss(
        np.asarray(inputs.class_freq),
        int(inputs.train_size),
        **dataclasses.asdict(settings),
    )


register_loss(
    LossSpec(name="db", settings=DBSettings, build=_db, class_statistics=True, legacy_path="db")
)
