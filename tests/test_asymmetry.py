"""Tests for mlcore.losses.asymmetry: the update rule, and the paper's convergence on toy data."""

from __future__ import annotations

import math

import pytest
import torch

from mlcore.losses.asl import AsymmetricLoss
from mlcore.losses.asymmetry import AsymmetryController, mean_confidences


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    return torch.logit(torch.tensor(probs, dtype=torch.float64))


# p_t+ = mean(0.9, 0.3) = 0.6 and p_t- = mean(1 - 0.2, 1 - 0.6) = 0.6, so Δp = 0.
HAND_LOGITS = logits_of([[0.9, 0.2], [0.6, 0.3]])
HAND_TARGETS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_mean_confidences_by_hand():
    p_pos, p_neg = mean_confidences(HAND_LOGITS, HAND_TARGETS)
    assert p_pos == pytest.approx(0.6, abs=1e-12)
    assert p_neg == pytest.approx(0.6, abs=1e-12)
    assert mean_confidences(HAND_LOGITS, torch.zeros(2, 2)) == (None, pytest.approx(0.5))
    assert mean_confidences(HAND_LOGITS, torch.ones(2, 2)) == (pytest.approx(0.5), None)


def test_update_rule_by_hand():
    loss = AsymmetricLoss(gamma_neg=4.0, clip=0.05)
    ctrl = AsymmetryController(loss, target_gap=0.1, step_size=0.5)
    out = ctrl.update(HAND_LOGITS, HAND_TARGETS)
    # Δp = 0 is below the target, so γ- grows by λ (Δp_target - Δp) = 0.5 · 0.1.
    assert loss.gamma_neg == pytest.approx(4.05, abs=1e-12)
    assert out["gamma_neg"] == loss.gamma_neg and out["clip"] == 0.05
    assert out["delta_p"] == pytest.approx(0.0, abs=1e-12)
    assert out["updated"] == 1.0
    # Δp = 0.9 - (1 - 0.4) = 0.3 above target 0.1: γ- falls by 0.5 · 0.2.
    ctrl.update(logits_of([[0.9, 0.4]]), torch.tensor([[1.0, 0.0]]))
    assert loss.gamma_neg == pytest.approx(4.05 - 0.1, abs=1e-12)


def test_margin_variant_by_hand():
    loss = AsymmetricLoss(gamma_neg=4.0, clip=None)
    ctrl = AsymmetryController(loss, target_gap=0.1, step_size=0.05, adapt="margin")
    out = ctrl.update(HAND_LOGITS, HAND_TARGETS)
    assert loss.clip == pytest.approx(0.005, abs=1e-12) and loss.gamma_neg == 4.0
    assert out["clip"] == loss.clip


def test_bounds_clamp():
    loss = AsymmetricLoss(gamma_neg=1.0)
    ctrl = AsymmetryController(loss, target_gap=1.0, step_size=100.0, gamma_neg_bounds=(0.5, 3.0))
    ctrl.update(HAND_LOGITS, HAND_TARGETS)
    assert loss.gamma_neg == 3.0
    ctrl.target_gap = -1.0
    ctrl.update(HAND_LOGITS, HAND_TARGETS)
    assert loss.gamma_neg == 0.5
    margin = AsymmetricLoss(clip=0.05)
    mctrl = AsymmetryController(margin, target_gap=1.0, step_size=100.0, adapt="margin")
    mctrl.update(HAND_LOGITS, HAND_TARGETS)
    assert margin.clip == 0.5


def test_warmup():
    loss = AsymmetricLoss(gamma_neg=4.0)
    ctrl = AsymmetryController(loss, step_size=0.5, warmup_steps=3)
    outs = [ctrl.update(HAND_LOGITS, HAND_TARGETS) for _ in range(4)]
    assert [o["updated"] for o in outs] == [0.0, 0.0, 0.0, 1.0]
    assert [o["gamma_neg"] for o in outs[:3]] == [4.0] * 3
    assert outs[3]["gamma_neg"] == pytest.approx(4.05)
    assert outs[0]["delta_p"] == pytest.approx(0.0)  # measured even during warm-up


@pytest.mark.parametrize("labels", [torch.zeros(2, 2), torch.ones(2, 2)])
def test_batch_without_positives_or_negatives_is_skipped(labels):
    loss = AsymmetricLoss(gamma_neg=4.0)
    ctrl = AsymmetryController(loss)
    out = ctrl.update(HAND_LOGITS, labels)
    assert loss.gamma_neg == 4.0 and out["updated"] == 0.0 and out["step"] == 1.0
    assert all(math.isfinite(v) for v in out.values())


def test_state_round_trip_resumes_identically():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 6, generator=g) * 3, (torch.rand(16, 6, generator=g) < 0.2).float())
        for _ in range(12)
    ]

    def make() -> AsymmetryController:
        return AsymmetryController(AsymmetricLoss(gamma_neg=2.0), step_size=0.7, warmup_steps=4)

    straight = make()
    expected = [straight.update(*b)["gamma_neg"] for b in batches]

    first = make()
    resumed = [first.update(*b)["gamma_neg"] for b in batches[:6]]
    state = first.state_dict()
    second = make()  # fresh loss at γ- = 2 and a fresh step counter
    second.load_state_dict(state)
    assert second.loss.gamma_neg == first.loss.gamma_neg and second.steps == 6
    resumed += [second.update(*b)["gamma_neg"] for b in batches[6:]]
    assert resumed == expected
    assert len(set(expected)) > 3  # the sequence actually moved


def test_invalid_arguments():
    loss = AsymmetricLoss()
    with pytest.raises(ValueError, match="adapt"):
        AsymmetryController(loss, adapt="gamma_pos")
    with pytest.raises(ValueError, match="step_size"):
        AsymmetryController(loss, step_size=0.0)
    with pytest.raises(ValueError, match="bounds"):
        AsymmetryController(loss, gamma_neg_bounds=(3.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Toy training: Gaussian features, 20 long-tailed classes (prevalence 0.3 down to 0.02), labels
# drawn from a noisy logistic model so that probabilities stay away from 0 and 1.
STEPS = 300
TARGET = 0.1


def toy_data(n: int = 4096, dim: int = 32, classes: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, classes, generator=g) * 3 / math.sqrt(dim)
    prevalence = torch.logspace(math.log10(0.3), math.log10(0.02), classes)
    y = torch.bernoulli(torch.sigmoid(x @ w + torch.logit(prevalence)), generator=g)
    return x, y


@pytest.fixture
def one_thread():
    # Tiny matmuls: intra-op threads only add synchronisation, badly so on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(loss: AsymmetricLoss, adapt) -> tuple[list[float], list[float], list[float]]:
    """Train a linear classifier; ``adapt(logits, targets)`` runs after each step."""
    x, y = toy_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    gammas, clips, gaps = [], [], []
    for _ in range(STEPS):
        idx = torch.randint(0, x.shape[0], (256,), generator=g)
        logits = model(x[idx])
        value = loss(logits, y[idx])
        opt.zero_grad()
        value.backward()
        opt.step()
        gaps.append(adapt(logits, y[idx]))
        gammas.append(loss.gamma_neg)
        clips.append(loss.clip)
    return gammas, clips, gaps


def tail(values: list[float]) -> list[float]:
    return values[int(0.8 * len(values)) :]


def measure_gap(logits: torch.Tensor, targets: torch.Tensor) -> float:
    p_pos, p_neg = mean_confidences(logits, targets)
    return p_pos - p_neg


def test_premise_larger_asymmetry_raises_the_gap(one_thread):
    """The fact the controller's sign rests on: with fixed settings, Δp grows with γ- and m."""
    gaps = []
    for gamma_neg, clip in [(0.0, 0.0), (2.0, 0.0), (4.0, 0.0), (0.0, 0.4)]:
        loss = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=0.0, clip=clip, reduction="mean")
        tail_gaps = tail(train(loss, measure_gap)[2])
        gaps.append(sum(tail_gaps) / len(tail_gaps))
    # Measured: BCE -0.208, γ- = 2: 0.064, γ- = 4: 0.222, m = 0.4: 0.059.
    bce, gamma2, gamma4, margin = gaps
    assert bce < -0.15
    assert gamma2 > bce + 0.2
    assert gamma4 > gamma2 + 0.1
    assert margin > bce + 0.2


@pytest.mark.parametrize("start", [0.0, 4.0])
def test_gamma_neg_converges_to_target_gap(start, one_thread):
    loss = AsymmetricLoss(gamma_neg=start, gamma_pos=0.0, clip=0.0, reduction="mean")
    ctrl = AsymmetryController(loss, target_gap=TARGET)
    gammas, _, gaps = train(loss, lambda z, t: ctrl.update(z, t)["delta_p"])
    # Measured: mean Δp over the last 60 steps 0.101, γ- range 0.05, final γ- 2.33 / 2.38.
    assert abs(sum(tail(gaps)) / len(tail(gaps)) - TARGET) < 0.015
    assert max(tail(gammas)) - min(tail(gammas)) < 0.25
    assert 1.0 < gammas[-1] < 4.0  # an interior value, not a bound


@pytest.mark.parametrize("start", [1.0, 4.0])
def test_printed_sign_of_eq11_is_unstable(start, one_thread):
    """γ- ← γ- + λ(Δp - Δp_target), as printed, drives γ- to a bound from either side."""
    loss = AsymmetricLoss(gamma_neg=start, gamma_pos=0.0, clip=0.0, reduction="mean")

    def printed_rule(logits: torch.Tensor, targets: torch.Tensor) -> float:
        gap = measure_gap(logits, targets)
        loss.gamma_neg = min(max(loss.gamma_neg + 0.5 * (gap - TARGET), 0.0), 10.0)
        return gap

    gammas, _, gaps = train(loss, printed_rule)
    # Measured: from 1 it ends at 0 (Δp -0.21), from 4 at 10 (Δp +0.46).
    assert gammas[-1] in (0.0, 10.0)
    assert abs(sum(tail(gaps)) / len(tail(gaps)) - TARGET) > 0.1


def test_margin_variant_converges_to_target_gap(one_thread):
    loss = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, reduction="mean")
    ctrl = AsymmetryController(loss, target_gap=TARGET, adapt="margin")
    _, clips, gaps = train(loss, lambda z, t: ctrl.update(z, t)["delta_p"])
    # Measured: mean Δp over the last 60 steps 0.098, margin range 0.007, final margin 0.45.
    assert abs(sum(tail(gaps)) / len(tail(gaps)) - TARGET) < 0.015
    assert max(tail(clips)) - min(tail(clips)) < 0.03
    assert 0.0 < clips[-1] < 0.5


def test_controller_from_config_under_the_products_schedule(one_thread):
    """Batch 32 and OneCycle, as training from config runs it (issue: γ- wound up to its bound
    during the lr warm-up, then wandered). Measured before the fix (no warm-up wait, λ per
    batch): γ- 4 → 7.6 during warm-up and a 0.44 range over the last 20% of steps; after: γ-
    held during warm-up, range 0.03, tail Δp 0.099."""
    from mlcore.config import LossConfig
    from mlcore.losses import AdaptiveAsymmetrySettings, ASLSettings, build_loss, build_observer

    adaptive = AdaptiveAsymmetrySettings(enabled=True)
    cfg = LossConfig(name="asl", settings=ASLSettings(gamma_neg=4.0, clip=0.05, adaptive=adaptive))
    loss = build_loss(cfg)
    steps, batch, lr = 1500, 32, 0.01
    warmup = round(0.2 * steps)
    ctrl, _ = build_observer(cfg, loss, batch_size=batch, lr_warmup_steps=warmup)
    x, y = toy_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(1)
    gammas, gaps = [], []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        logits = model(x[idx])
        value = loss(logits, y[idx])
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        gaps.append(ctrl.update(logits.detach(), y[idx])["delta_p"])
        gammas.append(loss.gamma_neg)
    assert max(gammas[:warmup]) == 4.0  # no wind-up while the lr ramps
    assert abs(sum(tail(gaps)) / len(tail(gaps)) - TARGET) < 0.01
    assert max(tail(gammas)) - min(tail(gammas)) < 0.25
    assert 0.0 < gammas[-1] < 10.0
