"""Label alignment (MLA Eq. 4, PLA Eq. 5 and the authors' variant) against brute-force
enumeration, the sequence metrics against hand counts, and the orderless sequence loss."""

import itertools
import math

import numpy as np
import pytest
import torch

from mlcore.losses.orderless import (
    IGNORE,
    OrderlessLoss,
    class_ranking,
    ranked_sequences,
)
from mlcore.orderless import (
    align_targets,
    duplicate_ratio,
    order_rigidness,
    predicted_sequences,
    sequence_report,
)


def _cost(log_probs, sequence):
    return -sum(log_probs[t, c] for t, c in enumerate(sequence))


def _cases(count, seed=0):
    """Random small problems whose argmaxes often hit ground-truth labels (and repeat them)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        num_classes = int(rng.integers(2, 8))
        n = int(rng.integers(1, min(num_classes, 5) + 1))
        steps = n + int(rng.integers(1, 4))
        labels = rng.choice(num_classes, n, replace=False)
        logits = rng.normal(size=(steps, num_classes + 1))
        for t in range(steps):  # boost a label (or anything) at most steps: argmax collisions
            logits[t, rng.choice(labels) if rng.random() < 0.7 else rng.integers(num_classes)] += 3
        log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        yield log_probs, labels


def _pla_fixed_steps(log_probs, labels, horizon):
    """{step: label} that Eq. 5 fixes: first step < n predicting each GT label."""
    fixed, seen = {}, set()
    for t in range(horizon):
        p = int(log_probs[t].argmax())
        if p in set(labels.tolist()) and p not in seen:
            fixed[t] = p
            seen.add(p)
    return fixed


@pytest.mark.parametrize("seed", range(3))
def test_mla_is_the_minimum_over_all_permutations(seed):
    for log_probs, labels in _cases(60, seed):
        ours = align_targets(log_probs, labels, "mla")
        assert sorted(ours.tolist()) == sorted(labels.tolist())
        best = min(_cost(log_probs, p) for p in itertools.permutations(labels.tolist()))
        assert _cost(log_probs, ours) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pla_is_the_minimum_over_permutations_keeping_correct_predictions(seed):
    checked_constraints = 0
    for log_probs, labels in _cases(60, seed):
        n = len(labels)
        fixed = _pla_fixed_steps(log_probs, labels, n)
        checked_constraints += len(fixed)
        feasible = [
            p
            for p in itertools.permutations(labels.tolist())
            if all(p[t] == label for t, label in fixed.items())
        ]
        ours = align_targets(log_probs, labels, "pla")
        assert tuple(ours.tolist()) in feasible
        best = min(_cost(log_probs, p) for p in feasible)
        assert _cost(log_probs, ours) == pytest.approx(best, abs=1e-9)
    assert checked_constraints > 50  # the cases do exercise the fixing rule


def test_paper_figure_4_orders():
    # The cost matrix of Fig. 4 (−log p; rows t1..t4), columns sports ball, chair, person,
    # baseball bat, baseball glove; ground truth is the first four.
    cost = np.array(
        [
            [12.1, 10.9, 0.0, 12.0, 11.0],
            [8.8, 9.1, 12.7, 0.0, 8.3],
            [3.0, 1.4, 7.4, 5.4, 0.9],
            [1.8, 1.0, 7.5, 5.5, 9.1],
        ]
    )
    log_probs = np.full((5, 6), -50.0)  # + one step for <end>; <end> is column 5
    log_probs[:4, :5] = -cost
    log_probs[4, 5] = 0.0
    sports_ball, chair, person, bat = 0, 1, 2, 3
    labels = [sports_ball, chair, person, bat]
    assert align_targets(log_probs, labels, "pla").tolist() == [person, bat, sports_ball, chair]
    assert align_targets(log_probs, labels, "mla").tolist() == [person, bat, chair, sports_ball]


def test_pla_code_variant_equals_eq5_unless_a_label_is_predicted_only_late():
    agreed = 0
    for log_probs, labels in _cases(200, seed=7):
        n = len(labels)
        early = {int(c) for c in log_probs[:n].argmax(1)}
        late_only = {int(c) for c in log_probs[n:].argmax(1)} - early
        if late_only & set(labels.tolist()):
            continue
        paper = align_targets(log_probs, labels, "pla", variant="paper")
        code = align_targets(log_probs, labels, "pla", variant="code")
        assert _cost(log_probs, code) == pytest.approx(_cost(log_probs, paper), abs=1e-9)
        agreed += 1
    assert agreed > 100


def test_pla_code_variant_keeps_a_late_predicted_label_in_its_base_slot():
    # Labels [0, 1, 2] (base order); steps: 3 (wrong), 3 (wrong), 3 (wrong), 0 (late).
    log_probs = np.full((4, 5), -10.0)
    log_probs[0, 3] = log_probs[1, 3] = log_probs[2, 3] = 0.0
    log_probs[3, 0] = 0.0
    log_probs[0, 2], log_probs[1, 1], log_probs[2, 0] = -1.0, -1.0, -1.0  # Eq. 5's preferences
    labels = [0, 1, 2]
    # Eq. 5: nothing is fixed in steps 0..2, so the Hungarian gives 2, 1, 0.
    assert align_targets(log_probs, labels, "pla", variant="paper").tolist() == [2, 1, 0]
    # Code: label 0 is "common" (predicted at step 3) but never fixed: it stays in slot 0, and
    # only the never-predicted labels 1 and 2 are re-assigned among their slots 1 and 2.
    assert align_targets(log_probs, labels, "pla", variant="code").tolist() == [0, 1, 2]


def test_align_edge_cases_and_errors():
    log_probs = np.log(np.full((3, 4), 0.25))
    assert align_targets(log_probs, [], "pla").tolist() == []
    with pytest.raises(ValueError, match="at least 3 steps"):
        align_targets(log_probs[:2], [0, 1], "mla")
    with pytest.raises(ValueError, match="distinct"):
        align_targets(log_probs, [1, 1], "mla")
    with pytest.raises(ValueError, match="unknown alignment method"):
        align_targets(log_probs, [1], "hungarian")
    assert align_targets(torch.from_numpy(log_probs), [2, 0], "mla").tolist() in ([2, 0], [0, 2])


def test_duplicate_ratio_and_predicted_sequences():
    tokens = np.array([[1, 2, 1, 4], [3, 4, 3, 3], [2, 2, 4, 4], [4, 1, 1, 1], [0, 1, 2, 3]])
    sequences = predicted_sequences(tokens, end_token=4)
    assert sequences == [[1, 2, 1], [3], [2, 2], [], [0, 1, 2, 3]]
    assert duplicate_ratio(sequences) == pytest.approx(2 / 5)
    assert math.isnan(duplicate_ratio([]))


def test_order_rigidness_counts_all_pairs_after_dedup():
    assert order_rigidness([[0, 1], [0, 1], [1, 0]]) == pytest.approx(2 / 3)
    assert order_rigidness([[0, 1, 0, 2]]) == 1.0  # deduplicated to 0, 1, 2: three pairs
    # Pairs {0,1}: 1-0, {0,2}: 1-1, {1,2}: 1-0 -> (1 + 1 + 1) / 4 (non-adjacent 0..2 counts).
    assert order_rigidness([[0, 1, 2], [2, 0]]) == pytest.approx(3 / 4)
    assert math.isnan(order_rigidness([[1], [2, 2], []]))


def test_sequence_report_on_a_hand_example():
    # 2 images, 3 classes (+ <end> = 3), 3 steps; image 0 predicts 0,0,<end>; image 1 2,1,<end>.
    probs = np.full((2, 3, 4), 0.1)
    for i, row in enumerate([[0, 0, 3], [2, 1, 3]]):
        for t, c in enumerate(row):
            probs[i, t, c] = 0.7
    log_probs = np.log(probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    tokens = log_probs.argmax(-1)
    targets = np.array([[1, 0, 0], [0, 1, 1]], dtype=np.float32)
    scores, report = sequence_report(log_probs, tokens, targets)
    assert scores.shape == (2, 3)
    assert scores[0, 0] == pytest.approx(0.7) and scores[0, 2] == pytest.approx(0.1)
    assert report["duplicate_ratio"] == 0.5
    assert report["order_rigidness"] == 1.0
    assert report["pred_length"] == 1.5 and report["true_length"] == 1.5
    assert report["OP"] == 1.0 and report["OR"] == 1.0 and report["CF1"] == 1.0
    # Image 0: label 0 at step 0 (0.7), <end> at step 1 where it has 0.1 (step 1 predicts 0).
    # Image 1: MLA puts 2 at step 0 and 1 at step 1 (0.7 each), <end> at step 2 (0.7).
    expected = -(4 * np.log(0.7) + np.log(0.1)) / 5
    assert report["mla_loss"] == pytest.approx(expected, rel=1e-5)


# -- the loss -----------------------------------------------------------------------------------


def test_class_rankings():
    freq = np.array([5, 9, 1, 9])
    assert class_ranking("frequent", freq).tolist() == [2, 0, 3, 1]  # ties: lower index first
    assert class_ranking("rare", freq).tolist() == [1, 2, 0, 3]
    assert class_ranking("dictionary", class_names=["dog", "cat", "zebra", "ant"]).tolist() == [
        2,
        1,
        3,
        0,
    ]
    with pytest.raises(ValueError, match="class names"):
        class_ranking("dictionary", freq)


def test_ranked_sequences_put_end_after_the_labels():
    targets = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    rank = torch.tensor([3, 0, 1, 2])  # order: 1, 2, 3, 0
    sequence = ranked_sequences(targets, rank, num_steps=5)
    assert sequence.tolist() == [
        [2, 3, 0, 4, IGNORE],
        [4, IGNORE, IGNORE, IGNORE, IGNORE],
        [1, 4, IGNORE, IGNORE, IGNORE],
    ]


def _manual_loss(logits, sequences):
    log_probs = logits.log_softmax(-1)
    total = sum(-log_probs[b, t, c] for b, seq in enumerate(sequences) for t, c in enumerate(seq))
    return total / sum(len(s) for s in sequences)


@pytest.mark.parametrize("order", ["frequent", "mla", "pla"])
def test_loss_is_mean_cross_entropy_over_valid_tokens(order):
    torch.manual_seed(0)
    num_classes, steps = 5, 4
    logits = torch.randn(3, steps, num_classes + 1, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 1, 0, 0]])
    freq = np.array([3, 1, 2, 5, 4])
    rank = class_ranking("frequent", freq) if order == "frequent" else None
    loss_fn = OrderlessLoss(num_classes, order, rank=rank)
    loss = loss_fn(logits, targets)
    expected_sequences = []
    for b in range(3):
        labels = np.flatnonzero(targets[b].numpy())
        if order == "frequent":
            ordered = sorted(labels.tolist(), key=lambda c: -freq[c])
        else:
            ordered = align_targets(logits[b].detach().log_softmax(-1).numpy(), labels, order)
        expected_sequences.append([*ordered, num_classes])
    assert loss.item() == pytest.approx(_manual_loss(logits, expected_sequences).item(), rel=1e-6)
    loss.backward()
    # Steps after <end> get no gradient: row 1 has one label, so steps 2 and 3 are unscored.
    assert logits.grad[1, 2:].abs().sum() == 0 and logits.grad[1, :2].abs().sum() > 0


def test_random_order_redraws_per_batch_and_is_a_permutation():
    torch.manual_seed(0)
    targets = torch.ones(1, 6)
    loss_fn = OrderlessLoss(6, "random")
    logits = torch.zeros(1, 7, 7)
    drawn = {tuple(loss_fn.target_sequences(logits, targets)[0, :6].tolist()) for _ in range(5)}
    assert len(drawn) > 1
    assert all(sorted(d) == list(range(6)) for d in drawn)


def test_too_many_labels_for_the_steps_is_an_error():
    loss_fn = OrderlessLoss(4, "pla")
    with pytest.raises(ValueError, match="3 labels; the decoder's 3 steps hold at most 2"):
        loss_fn(torch.zeros(1, 3, 5), torch.tensor([[1.0, 1, 1, 0]]))
