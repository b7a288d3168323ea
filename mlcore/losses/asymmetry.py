"""Adaptive asymmetry for ASL: steer γ- (or the margin m) towards a target probability gap.

ASL paper §2.7. From a batch's sigmoid outputs ``p`` (shape ``(B, C)``) and labels ``y``::

    p_t+ = mean of p       over the entries with y = 1          (Eq. 9)
    p_t- = mean of (1 - p) over the entries with y = 0          (Eq. 9)
    Δp   = p_t+ - p_t-                                          (Eq. 10)

and after each batch the asymmetry parameter moves by a step proportional to the error::

    γ- ← clamp(γ- + λ (Δp_target - Δp), γ_min, γ_max)

Sign of the update. Eq. 11 is printed as ``γ- ← γ- + λ(Δp - Δp_target)``, which is positive
feedback: a larger γ- down-weights easy negatives, so their mean probability rises, ``p_t-`` falls
and ``Δp`` grows; the paper's own Table 3 shows the same monotonicity (Δp_target 0 / 0.1 / 0.2 /
0.3 ends at γ- 1.2 / 3.3 / 5.2 / 6.2). With the printed sign, Δp above target increases γ-,
which increases Δp further. Evidence from the toy problem of ``tests/test_asymmetry.py`` (linear
classifier, 20 long-tailed classes, Adam, 300 steps, Δp_target = 0.1): with fixed γ- = 0 / 1 /
2 / 4 the final Δp is -0.21 / -0.05 / 0.06 / 0.22. The printed sign (λ = 0.5 or 1) ran γ- to a
bound from every start: 0 from γ- = 1 (Δp -0.21) and 10 from γ- = 2.4 or 4 (Δp +0.46). The sign
used here settled at γ- = 2.33-2.38 with Δp 0.101-0.104 over the last 20% of steps from starts
0, 1, 4 and 8. This module therefore implements the convergent sign.

The ``"margin"`` variant applies the same rule to the probability margin (``loss.clip``), which
the paper mentions but does not evaluate ("similar logic to Eq. 11"); a larger margin also
discards more easy negatives, so the sign is the same.

Schedules and batch size. Training from config (:func:`build_controller`)
starts adapting only after the lr warm-up: while OneCycle's lr is still small the network barely
responds, the gap stays below target, and the controller integrates that error until γ- sits at
its upper bound (on the toy problem at lr 0.01, batch 32: γ- 4 → 7.6 during warm-up). And it
scales λ with the batch, λ·B/256: the gap of a batch of B images is noisier at small B, and
there are 256/B times more updates per epoch; unscaled, γ- wanders over 0.44 in the last 20% of
steps at B = 32, against 0.03 scaled (tail Δp 0.099 for target 0.1). A target the network cannot
reach within the bounds still leaves the parameter at a bound: that is the controller's correct
answer, and ``gamma_neg`` in the step metrics shows it.

Default step sizes (per batch of 256; not given in the paper): λ = 0.5 for γ- and 0.05 for the
margin.
On the toy problem these settle within ~100 steps; over the last 20% of steps γ- moves by 0.05
(0.12 from a start at 8) and the margin by 0.007. λ = 1 (margin 0.1) also converges but wanders
more (γ- range 0.08-0.46, margin 0.02); λ = 4 keeps swinging over most of [0, 10] and a margin
step of 0.2 still moves the margin by 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from mlcore.configlib import NOT_RESULT, check

Adapt = Literal["gamma_neg", "margin"]
DEFAULT_STEP = {"gamma_neg": 0.5, "margin": 0.05}
REFERENCE_BATCH = 256
"""The batch size the default step sizes were chosen at (the toy problem of the tests)."""


class Asymmetric(Protocol):
    """A loss with the asymmetry attributes the controller moves (``AsymmetricLoss``)."""

    gamma_neg: float
    clip: float | None


@dataclass(frozen=True, kw_only=True)
class AdaptiveAsymmetrySettings:
    """ASL §2.7: adapt γ− (or the margin) after each batch towards a target probability gap
    (``loss.asl.adaptive``)."""

    enabled: bool = False
    """Turn the controller on."""
    target_gap: float = 0.1
    """Δp_target, the desired p_t⁺ − p_t⁻."""
    step_size: float | None = None
    """λ, the controller step per 256 images: a batch of B moves by λ·B/256 (None: 0.5 for
    ``gamma_neg``, 0.05 for ``margin``)."""
    adapt: Adapt = "gamma_neg"
    """Which asymmetry to adapt."""
    gamma_neg_min: float = 0.0
    """Lower bound of γ−."""
    gamma_neg_max: float = 10.0
    """Upper bound of γ−."""
    margin_min: float = 0.0
    """Lower bound of the probability margin."""
    margin_max: float = 0.5
    """Upper bound of the probability margin."""
    warmup_steps: int | None = None
    """Batches before the controller starts adapting; None: the lr warm-up of the OneCycle
    schedule (``train.pct_start`` of all steps), during which the gap swings too fast to
    follow and adapting winds γ− up to a bound."""

    log_every: int = field(default=10, metadata=NOT_RESULT)
    """Report γ−, p_t⁺, p_t⁻ and Δp every this many steps."""

    def __post_init__(self) -> None:
        check(-1 < self.target_gap < 1, "loss.asl.adaptive.target_gap in (-1, 1)")
        check(self.step_size is None or self.step_size > 0, "loss.asl.adaptive.step_size > 0")
        check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            "loss.asl.adaptive.warmup_steps >= 0",
        )
        check(self.log_every >= 1, "loss.asl.adaptive.log_every must be >= 1")


def mean_confidences(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[float | None, float | None]:
    """Mean confidence of positive and negative labels in a batch (ASL Eq. 9).

    Args:
        logits: Raw scores, shape ``(B, C)``.
        targets: Binary labels, shape ``(B, C)``.

    Returns:
        ``(p_t+, p_t-)``: the mean of ``σ(z)`` over positive entries and of ``1 - σ(z)`` over
        negative entries; either is ``None`` when the batch has no entry of that kind.
    """
    with torch.no_grad():
        # float32 at least: under AMP the logits may be half precision.
        prob = torch.sigmoid(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)))
        positive = targets > 0.5
        # One host transfer for all three numbers.
        sum_pos, sum_neg, num_pos = torch.stack(
            [
                torch.where(positive, prob, 0.0).sum(),
                torch.where(positive, 0.0, 1.0 - prob).sum(),
                positive.sum().to(prob.dtype),
            ]
        ).tolist()
    num_neg = targets.numel() - num_pos
    p_pos = sum_pos / num_pos if num_pos > 0 else None
    p_neg = sum_neg / num_neg if num_neg > 0 else None
    return p_pos, p_neg


class AsymmetryController:
    """Adapt ``loss.gamma_neg`` or ``loss.clip`` after every batch to reach ``Δp_target``.

    Call :meth:`update` once per training step with that step's logits and labels. The first
    ``warmup_steps`` calls only measure. A batch without positive (or without negative) labels
    has no Δp, so it leaves the parameter unchanged. Checkpoint the controller with
    :meth:`state_dict`; :meth:`load_state_dict` also writes the restored value into the loss.

    Args:
        loss: The ASL instance whose attribute is adapted in place.
        target_gap: Δp_target.
        step_size: λ per batch; ``None`` picks 0.5 for ``"gamma_neg"`` and 0.05 for ``"margin"``.
        adapt: Which asymmetry to adapt: ``"gamma_neg"`` (the paper's choice) or ``"margin"``.
        gamma_neg_bounds: Closed interval γ- is clamped to.
        margin_bounds: Closed interval the margin is clamped to.
        warmup_steps: Number of initial :meth:`update` calls that do not adapt.

    Raises:
        ValueError: For an unknown ``adapt``, a non-positive step size, a negative warm-up or
            an empty/negative bounds interval.
    """

    def __init__(
        self,
        loss: Asymmetric,
        *,
        target_gap: float = 0.1,
        step_size: float | None = None,
        adapt: Adapt = "gamma_neg",
        gamma_neg_bounds: tuple[float, float] = (0.0, 10.0),
        margin_bounds: tuple[float, float] = (0.0, 0.5),
        warmup_steps: int = 0,
    ) -> None:
        if adapt not in DEFAULT_STEP:
            raise ValueError(f"adapt must be one of {tuple(DEFAULT_STEP)}, got {adapt!r}")
        step_size = DEFAULT_STEP[adapt] if step_size is None else float(step_size)
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        for name, (low, high) in (("gamma_neg", gamma_neg_bounds), ("margin", margin_bounds)):
            if not 0.0 <= low <= high:
                raise ValueError(f"{name}_bounds must satisfy 0 <= low <= high, got {(low, high)}")
        self.loss = loss
        self.target_gap = float(target_gap)
        self.step_size = step_size
        self.adapt = adapt
        self.gamma_neg_bounds = (float(gamma_neg_bounds[0]), float(gamma_neg_bounds[1]))
        self.margin_bounds = (float(margin_bounds[0]), float(margin_bounds[1]))
        self.warmup_steps = int(warmup_steps)
        self.steps = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Measure Δp on one batch and, after warm-up, move the adapted parameter.

        Args:
            logits: The batch's raw scores, shape ``(B, C)``; gradients are not tracked.
            targets: The batch's binary labels, shape ``(B, C)``.

        Returns:
            ``gamma_neg`` and ``clip`` (after the update), ``p_pos``, ``p_neg``, ``delta_p``,
            ``updated`` (1.0 if the parameter was moved) and ``step``. For a batch without
            positive (negative) labels ``p_pos`` (``p_neg``) and ``delta_p`` are reported as 0.0
            and ``updated`` is 0.0, so the values stay finite for loggers.
        """
        self.steps += 1
        p_pos, p_neg = mean_confidences(logits, targets)
        measured = p_pos is not None and p_neg is not None
        delta_p = p_pos - p_neg if measured else 0.0
        updated = measured and self.steps > self.warmup_steps
        if updated:
            correction = self.step_size * (self.target_gap - delta_p)
            if self.adapt == "gamma_neg":
                low, high = self.gamma_neg_bounds
                self.loss.gamma_neg = min(max(self.loss.gamma_neg + correction, low), high)
            else:
                low, high = self.margin_bounds
                self.loss.clip = min(max((self.loss.clip or 0.0) + correction, low), high)
        return {
            "gamma_neg": self.loss.gamma_neg,
            "clip": self.loss.clip or 0.0,
            "p_pos": 0.0 if p_pos is None else p_pos,
            "p_neg": 0.0 if p_neg is None else p_neg,
            "delta_p": delta_p,
            "updated": float(updated),
            "step": float(self.steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue identically."""
        return {"steps": self.steps, "gamma_neg": self.loss.gamma_neg, "clip": self.loss.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, including the loss's ``gamma_neg`` and ``clip``."""
        self.steps = int(state["steps"])
        self.loss.gamma_neg = float(state["gamma_neg"])
        self.loss.clip = None if state["clip"] is None else float(state["clip"])


def build_controller(
    settings: AdaptiveAsymmetrySettings,
    loss: Asymmetric,
    *,
    batch_size: int,
    lr_warmup_steps: int = 0,
) -> AsymmetryController | None:
    """The controller of ``loss`` when ``settings.enabled``, else None.

    Its step is ``λ · batch_size / 256`` (``step_size`` is per 256 images), and with
    ``warmup_steps: null`` it waits ``lr_warmup_steps``, the schedule's warm-up (the module
    docstring gives the evidence for both).
    """
    if not settings.enabled:
        return None
    return AsymmetryController(
        loss,
        target_gap=settings.target_gap,
        step_size=(settings.step_size or DEFAULT_STEP[settings.adapt])
        * batch_size
        / REFERENCE_BATCH,
        gamma_neg_bounds=(settings.gamma_neg_min, settings.gamma_neg_max),
        warmup_steps=lr_warmup_steps if settings.warmup_steps is None else settings.warmup_steps,
        adapt=settings.adapt,
        margin_bounds=(settings.margin_min, settings.margin_max),
    )
