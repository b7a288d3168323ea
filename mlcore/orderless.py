"""Label alignment and sequence metrics of orderless recurrent multi-label models (PLA paper).

Yazici et al., "Orderless Recurrent Models for Multi-label Classification" (CVPR 2020).

**Alignment.** An image has n ground-truth labels L = {l_1..l_n}; the decoder emits T ≥ n + 1
steps with log-probabilities ``log P`` (T, C + 1) over the C classes and ``<end>`` (= C). The
loss (Eq. 3) compares step t with the t-th target, so the targets of steps 0..n−1 must be put in
some order (``<end>`` is always the target of step n). With the n × n cost
``K[t, j] = −log P[t, l_j]`` (t < n):

* **MLA** (minimal loss alignment, Eq. 4): the permutation π minimising Σ_t K[t, π(t)],
  found by the Hungarian algorithm;
* **PLA** (predicted label alignment, Eq. 5): with l̂_t = argmax_c log P[t, c], every step t < n
  whose prediction is a ground-truth label keeps it as its target (a label predicted at several
  steps is fixed at its first one); the remaining steps take the remaining labels by minimum
  total cost (Hungarian on the remaining rows and columns).
* **PLA, authors' code** (``variant="code"``, ``train_lstm.py:order_the_targets_pla``): the
  predictions of *all T steps* count. Labels are fixed at their first predicted step < n as
  above, by swaps within the base order (the order ``labels`` are given in). Only the labels
  never predicted at any step are re-assigned by the Hungarian, among the slots holding them.
  A label predicted only at steps ≥ n is thus neither fixed nor re-assigned: it keeps its slot
  in the base order. Without such labels both variants give the same alignment.

**Sequence metrics.** A predicted sequence is the decoded labels before the first ``<end>``.

* ``duplicate_ratio``: the fraction of sequences that contain some label twice (Table 1).
* ``order_rigidness`` (Table 1): de-duplicate each sequence (keeping the first occurrence); for
  every unordered pair {a, b} of classes let n_ab be the number of sequences with a before b;
  then ``Σ_{a<b} max(n_ab, n_ba) / Σ_{a<b} (n_ab + n_ba)`` over all pairs in a sequence, not
  only adjacent ones. 100% means every pair always comes in the same order.

Alignment runs on the CPU, one image at a time, on numpy arrays that the loss copies off the
device once per batch (``mlcore.losses.orderless``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import DataLoader

from mlcore.data.manifest import Manifest, ManifestError
from mlcore.metrics import mean_average_precision, multilabel_report
from mlcore.train import Evaluation, unpack

__all__ = [
    "align_targets",
    "check_label_counts",
    "duplicate_ratio",
    "evaluate_sequences",
    "order_rigidness",
    "predicted_sequences",
    "sequence_report",
]


def sequence_scores(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-class scores of decoded sequences: the highest probability before the first <end>.

    Args:
        probs: (B, T, C + 1) step probabilities, ``<end>`` last.
        tokens: (B, T) the decoded tokens (argmax of each step).

    Returns:
        (B, C) scores in [0, 1]; 0 for every class when the sequence ends at step 0.
    """
    end = probs.shape[-1] - 1
    before_end = (tokens == end).cumsum(dim=1) == 0  # (B, T): steps before the first <end>
    return (probs[..., :end] * before_end.unsqueeze(-1)).amax(dim=1)


def _assign(cost: np.ndarray) -> np.ndarray:
    """Column assigned to each row by the minimum-cost assignment of a square cost matrix."""
    rows, cols = linear_sum_assignment(cost)
    assigned = np.empty(len(rows), dtype=np.int64)
    assigned[rows] = cols
    return assigned


def align_targets(
    log_probs: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    method: Literal["mla", "pla"],
    *,
    variant: Literal["paper", "code"] = "paper",
) -> np.ndarray:
    """Order one image's labels to match the decoder's predictions (Eq. 4 or Eq. 5).

    Args:
        log_probs: (T, C + 1) log-probabilities of the T decoder steps (``<end>`` last),
            T > n.
        labels: The image's n distinct ground-truth classes, in its base order (used only by
            ``method="pla", variant="code"``).
        method: ``"mla"`` (Eq. 4) or ``"pla"`` (Eq. 5).
        variant: For ``pla``: ``"paper"`` (Eq. 5) or ``"code"`` (the authors' code; see the
            module docstring).

    Returns:
        (n,) int64: the target class of steps 0..n−1, a permutation of ``labels``.

    Raises:
        ValueError: Repeated labels, fewer than n + 1 steps, or an unknown method/variant.
    """
    lp = log_probs.detach().cpu().numpy() if isinstance(log_probs, torch.Tensor) else log_probs
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if len(np.unique(labels)) != n:
        raise ValueError(f"labels must be distinct, got {labels.tolist()}")
    if lp.shape[0] <= n:
        raise ValueError(f"{n} labels need at least {n + 1} steps, got {lp.shape[0]}")
    if n == 0:
        return labels
    cost = -lp[:n, labels]  # (n, n): step t x label j
    if method == "mla":
        return labels[_assign(cost)]
    if method != "pla":
        raise ValueError(f"unknown alignment method {method!r}: 'mla' or 'pla'")
    if variant == "paper":
        return _pla_paper(lp, labels, cost)
    if variant == "code":
        return _pla_code(lp, labels, cost)
    raise ValueError(f"unknown PLA variant {variant!r}: 'paper' or 'code'")


def _pla_paper(lp: np.ndarray, labels: np.ndarray, cost: np.ndarray) -> np.ndarray:
    n = len(labels)
    column = {int(label): j for j, label in enumerate(labels)}
    predicted = lp[:n].argmax(axis=1)
    targets = np.full(n, -1, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)  # label columns already fixed
    for t, p in enumerate(predicted):
        j = column.get(int(p))
        if j is not None and not taken[j]:  # first occurrence of a ground-truth label
            targets[t], taken[j] = p, True
    free_steps = np.flatnonzero(targets < 0)
    if free_steps.size:
        free_labels = np.flatnonzero(~taken)
        assigned = _assign(cost[np.ix_(free_steps, free_labels)])
        targets[free_steps] = labels[free_labels[assigned]]
    return targets


def _pla_code(lp: np.ndarray, labels: np.ndarray, cost: np.ndarray) -> np.ndarray:
    n = len(labels)
    predicted_all = lp.argmax(axis=1)  # every step, also after <end>
    common = set(labels.tolist()) & set(predicted_all.tolist())
    never_predicted = set(labels.tolist()) - common
    targets = labels.copy()
    for t in range(n):
        p = int(predicted_all[t])
        if p in common:  # fix at its first step < n: swap it into slot t
            k = int(np.flatnonzero(targets == p)[0])
            targets[t], targets[k] = p, targets[t]
            common.remove(p)
    if len(never_predicted) > 1:
        column = {int(label): j for j, label in enumerate(labels)}
        slots = np.array([t for t in range(n) if int(targets[t]) in never_predicted])
        slot_labels = targets[slots]
        columns = [column[int(label)] for label in slot_labels]
        assigned = _assign(cost[np.ix_(slots, columns)])
        targets[slots] = slot_labels[assigned]
    return targets


def predicted_sequences(tokens: np.ndarray | torch.Tensor, end_token: int) -> list[list[int]]:
    """The decoded labels of each row before its first ``<end>`` (duplicates kept).

    Args:
        tokens: (N, T) argmax tokens.
        end_token: The ``<end>`` index (= C).
    """
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else np.asarray(tokens).tolist()
    out = []
    for row in rows:
        cut = row.index(end_token) if end_token in row else len(row)
        out.append(row[:cut])
    return out


def duplicate_ratio(sequences: Sequence[Sequence[int]]) -> float:
    """Fraction of sequences that repeat a label (NaN for no sequences)."""
    if not sequences:
        return float("nan")
    return sum(len(set(s)) < len(s) for s in sequences) / len(sequences)


def order_rigidness(sequences: Sequence[Sequence[int]]) -> float:
    """Σ over class pairs of the more frequent ordering's count / all pair occurrences.

    Each sequence is de-duplicated keeping first occurrences; every pair of its labels counts
    (not only adjacent ones). NaN when no sequence has two distinct labels.
    """
    ordered: Counter[tuple[int, int]] = Counter()
    for sequence in sequences:
        distinct = list(dict.fromkeys(sequence))
        ordered.update(combinations(distinct, 2))  # (a, b): a came before b
    total = sum(ordered.values())
    if total == 0:
        return float("nan")
    pairs = {tuple(sorted(pair)) for pair in ordered}
    return sum(max(ordered[(a, b)], ordered[(b, a)]) for a, b in pairs) / total


def check_label_counts(manifest: Manifest, splits: Sequence[str], max_labels: int) -> None:
    """Raise before training when an image has more labels than the decoder can emit.

    Raises:
        ManifestError: Names the first offending row of each split checked, in order.
    """
    for split in splits:
        rows = manifest.split_rows(split)
        for position, labels in enumerate(manifest.label_lists(rows)):
            if len(labels) > max_labels:
                image_id = manifest.table.column("image_id")[int(rows[position])].as_py()
                raise ManifestError(
                    f"{manifest.root}: {split} row {position} (image_id={image_id!r}) has "
                    f"{len(labels)} labels, more than model.rnn.max_steps = {max_labels}; "
                    "raise model.rnn.max_steps or drop the image"
                )


def sequence_report(
    log_probs: np.ndarray, tokens: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """Scores and metrics of decoded sequences against multi-hot targets.

    Args:
        log_probs: (N, T, C + 1) step log-probabilities.
        tokens: (N, T) decoded (argmax) tokens.
        targets: (N, C) multi-hot ground truth.

    Returns:
        The (N, C) scores (max probability before the first ``<end>``, our extension) and
        ``mAP`` (of those scores), ``CP CR CF1 OP OR OF1`` (of the predicted label *sets*, as
        the paper evaluates), ``duplicate_ratio``, ``order_rigidness``, ``pred_length`` and
        ``true_length`` (mean distinct labels predicted / present per image) and ``mla_loss``
        (the MLA-aligned cross-entropy per token: one loss every order can be compared on).
    """
    num_steps, end = log_probs.shape[1], log_probs.shape[2] - 1
    scores = sequence_scores(torch.from_numpy(log_probs).exp(), torch.from_numpy(tokens)).numpy()
    sequences = predicted_sequences(tokens, end)
    predicted = np.zeros_like(targets)
    for i, sequence in enumerate(sequences):
        predicted[i, sequence] = 1
    set_report = multilabel_report(predicted, targets)
    cost, count = 0.0, 0
    for i in range(len(targets)):
        labels = np.flatnonzero(targets[i])
        n = len(labels)
        if n >= num_steps:
            raise ValueError(f"row {i} has {n} labels; the decoder runs only {num_steps} steps")
        aligned = align_targets(log_probs[i], labels, "mla")
        cost -= log_probs[i, np.arange(n), aligned].sum() + log_probs[i, n, end]
        count += n + 1
    metrics = {
        "mAP": mean_average_precision(scores, targets),
        **{k: set_report[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")},
        "duplicate_ratio": duplicate_ratio(sequences),
        "order_rigidness": order_rigidness(sequences),
        "pred_length": float(predicted.sum(1).mean()),
        "true_length": float(targets.sum(1).mean()),
        "mla_loss": float(cost / count),
    }
    return scores, metrics


@torch.no_grad()
def decode_loader(
    model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy decoding of an ``OrderlessRNN`` over a loader.

    Returns:
        Step log-probabilities (N, T, C + 1) float32, tokens (N, T) and targets (N, C).
    """
    model.eval()
    log_probs, tokens, targets = [], [], []
    for raw in loader:
        batch = unpack(raw, device, channels_last=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, decoded = model.decode(batch.images)
        log_probs.append(logits.float().log_softmax(dim=-1).cpu())
        tokens.append(decoded.cpu())
        targets.append(batch.targets.cpu())
    return torch.cat(log_probs).numpy(), torch.cat(tokens).numpy(), torch.cat(targets).numpy()


def evaluate_sequences(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
) -> Evaluation:
    """The ``mlcore.train.Evaluator`` of the orderless RNN: greedy decoding, then
    :func:`sequence_report`."""
    log_probs, tokens, targets = decode_loader(model, loader, device, amp=amp)
    scores, metrics = sequence_report(log_probs, tokens, targets)
    return Evaluation(scores.astype(np.float32), targets, metrics)
