"""The label-sequence cross-entropy of orderless recurrent models (PLA paper, Eq. 3–5).

For an image with n labels the decoder's T ≥ n + 1 step logits ``p_t`` (C + 1 outputs, ``<end>``
= C) are compared with the target sequence ``y = [y_0 .. y_{n−1}, <end>]``::

    L = − Σ_b Σ_{t ≤ n_b} log softmax(p_{b,t})[y_{b,t}]  /  Σ_b (n_b + 1)

i.e. cross-entropy over the first n + 1 steps of each sequence, averaged over all valid tokens
of the batch (the authors' ``pack_padded_sequence`` loss, written as a length mask). Steps
after ``<end>`` are not scored. How ``y_0 .. y_{n−1}`` orders the labels is
``loss.orderless.order``:

* ``frequent`` / ``rare``: by training-split class frequency, descending / ascending;
* ``dictionary``: by class name;
* ``random``: by a random ranking of the classes, redrawn for every batch;
* ``mla`` / ``pla``: aligned to the decoder's own predictions (``mlcore.orderless``); the
  alignment reads the logits without gradient.

Shapes: logits (B, T, C + 1), multi-hot targets (B, C), target sequence (B, T) with
``IGNORE`` after ``<end>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlcore.configlib import check
from mlcore.losses.registry import LossInputs, LossSpec, register_loss
from mlcore.orderless import align_targets
from mlcore.train import Batch

IGNORE = -100  # F.cross_entropy's ignore_index: steps after <end>
FIXED_ORDERS = ("frequent", "rare", "dictionary")
ORDERS = (*FIXED_ORDERS, "random", "mla", "pla")


def class_ranking(
    order: str, class_freq: np.ndarray | None = None, class_names: Sequence[str] | None = None
) -> torch.Tensor:
    """(C,) position of each class in a fixed order (0 = first); ties by class index.

    Args:
        order: ``frequent``, ``rare`` or ``dictionary``.
        class_freq: (C,) training positives per class (``frequent``/``rare``).
        class_names: C names (``dictionary``).
    """
    if order == "dictionary":
        if class_names is None:
            raise ValueError("loss.order: dictionary needs the class names")
        keys = np.argsort(np.asarray(class_names, dtype=object), kind="stable")
    elif order in ("frequent", "rare"):
        if class_freq is None:
            raise ValueError(f"loss.order: {order} needs the training class frequencies")
        freq = np.asarray(class_freq, dtype=np.float64)
        keys = np.argsort(-freq if order == "frequent" else freq, kind="stable")
    else:
        raise ValueError(f"no fixed ranking for loss.order {order!r}")
    rank = np.empty(len(keys), dtype=np.int64)
    rank[keys] = np.arange(len(keys))
    return torch.from_numpy(rank)


def ranked_sequences(targets: torch.Tensor, rank: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Target sequences of a fixed class ranking, on the targets' device (no host sync).

    Args:
        targets: (B, C) multi-hot.
        rank: (C,) position of each class in the order.
        num_steps: T.

    Returns:
        (B, T): each row's labels by rank, then ``<end>`` (= C), then ``IGNORE``.
    """
    num_classes = targets.shape[1]
    present = targets > 0
    key = torch.where(present, rank.to(targets.device).float(), float("inf"))
    by_rank = key.argsort(dim=1, stable=True)[:, :num_steps]  # present classes first
    if by_rank.shape[1] < num_steps:
        by_rank = F.pad(by_rank, (0, num_steps - by_rank.shape[1]))
    step = torch.arange(num_steps, device=targets.device)
    n = present.sum(dim=1, keepdim=True)
    sequence = torch.where(step < n, by_rank, IGNORE)
    return torch.where(step == n, num_classes, sequence)


class OrderlessLoss(nn.Module):
    """Sequence cross-entropy with the configured label order (module docstring).

    Args:
        num_classes: C.
        order: One of ``ORDERS``.
        rank: (C,) class ranking for the fixed orders (see :func:`class_ranking`).
        pla_variant: ``paper`` (Eq. 5) or ``code`` (the authors' code), for ``order="pla"``.
    """

    def __init__(
        self,
        num_classes: int,
        order: str,
        *,
        rank: torch.Tensor | None = None,
        pla_variant: str = "paper",
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown loss.order {order!r}; choose from {ORDERS}")
        if order in FIXED_ORDERS and rank is None:
            raise ValueError(f"loss.order {order!r} needs a class ranking")
        self.num_classes = num_classes
        self.order = order
        self.rank = rank
        self.pla_variant = pla_variant

    def target_sequences(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) target tokens for step logits (B, T, C + 1) and multi-hot targets (B, C)."""
        batch, num_steps = logits.shape[:2]
        most = int(targets.sum(dim=1).max().item()) if batch else 0
        if most >= num_steps:
            raise ValueError(
                f"an image has {most} labels; the decoder's {num_steps} steps hold at most "
                f"{num_steps - 1} (model.rnn.max_steps)"
            )
        if self.order in FIXED_ORDERS:
            return ranked_sequences(targets, self.rank, num_steps)
        if self.order == "random":
            # Drawn from torch's global generator, which the loop re-seeds every epoch.
            return ranked_sequences(targets, torch.randperm(self.num_classes), num_steps)
        # One device->host copy per batch; the per-image Hungarian runs on the CPU.
        log_probs = logits.detach().float().log_softmax(dim=-1).cpu().numpy()
        present = targets.detach().cpu().numpy() > 0
        sequence = np.full((batch, num_steps), IGNORE, dtype=np.int64)
        for i in range(batch):
            labels = np.flatnonzero(present[i])
            n = len(labels)
            sequence[i, :n] = align_targets(
                log_probs[i], labels, self.order, variant=self.pla_variant
            )
            sequence[i, n] = self.num_classes
        return torch.from_numpy(sequence).to(logits.device, non_blocking=True)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the valid tokens: logits (B, T, C + 1), targets (B, C)."""
        sequence = self.target_sequences(logits, targets)
        return F.cross_entropy(
            logits.flatten(0, 1), sequence.flatten(), ignore_index=IGNORE, reduction="mean"
        )


class TeacherForcing:
    """``mlcore.train.Forward`` feeding the fixed-order target sequence as decoder input.

    The loss recomputes the same sequence from the same targets (fixed orders only, so both
    agree); positions after ``<end>`` feed ``<end>``, which no loss term reads.
    """

    def __init__(self, loss: OrderlessLoss):
        if loss.order not in FIXED_ORDERS:
            raise ValueError(f"teacher forcing needs a fixed order, not {loss.order!r}")
        self.loss = loss

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        sequence = ranked_sequences(batch.targets, self.loss.rank, model.num_steps)
        tokens = torch.where(sequence == IGNORE, self.loss.num_classes, sequence)
        return model(batch.images, teacher_tokens=tokens)


@dataclass(frozen=True, kw_only=True)
class OrderlessSettings:
    """``loss.orderless``: the label-sequence loss of ``model.head: rnn``."""

    order: Literal["frequent", "rare", "dictionary", "random", "mla", "pla"] = "pla"
    """How each image's labels are ordered into the target sequence. ``frequent``/``rare``: by
    training-split class frequency (ties: lower class index first); ``dictionary``: by class
    name; ``random``: a new random class ranking for every batch; ``mla``: minimal-loss
    alignment to the predictions (PLA paper Eq. 4); ``pla``: predicted-label alignment (Eq. 5).
    See ``mlcore.orderless``."""
    pla_variant: Literal["paper", "code"] = "paper"
    """``order: pla``: ``paper`` is Eq. 5 (predictions of the first n steps fix labels);
    ``code`` is the authors' code, where a label predicted only after step n keeps its slot in
    the base (class-index) order. See ``mlcore.orderless.align_targets``."""
    teacher_forcing: bool = False
    """With a fixed order (frequent, rare, dictionary): feed the target sequence as the
    decoder's input in training instead of its own argmax. A control: the paper's models are
    free-running (its Eq. 2); evaluation is always free-running."""

    def __post_init__(self) -> None:
        check(
            not self.teacher_forcing or self.order in FIXED_ORDERS,
            "loss.orderless.teacher_forcing needs a fixed loss.orderless.order (frequent, rare "
            "or dictionary): the decoder's input must be known before the forward pass",
        )


def _orderless(settings: OrderlessSettings, inputs: LossInputs) -> OrderlessLoss:
    order = settings.order
    rank = (
        class_ranking(order, inputs.class_freq, inputs.class_names)
        if order in FIXED_ORDERS
        else None
    )
    return OrderlessLoss(len(inputs.class_freq), order, rank=rank, pla_variant=settings.pla_variant)


register_loss(
    LossSpec(
        name="orderless",
        settings=OrderlessSettings,
        build=_orderless,
        targets="sequences",
        class_statistics=True,
        legacy_path="",
    )
)
