"""Tests for mlcore.losses.db against a scalar float64 reference of the authors' ResampleLoss.

The reference follows wutong16/DistributionBalancedLoss (mllt/models/losses/resample_loss.py,
reweight_func='rebalance') one element at a time with the ``math`` module, so it shares no
tensor code with the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlcore.losses.db import DistributionBalancedLoss

F64 = torch.float64
CLASS_FREQ = np.array([120, 40, 15, 6, 3, 1])
TRAIN_SIZE = 200


def reference_db(
    logits: np.ndarray,
    targets: np.ndarray,
    class_freq: np.ndarray,
    train_size: int,
    *,
    alpha: float = 0.1,
    beta: float = 10.0,
    mu: float = 0.2,
    neg_scale: float = 2.0,
    init_bias: float = 0.05,
    gamma: float = 2.0,
    balance: float = 2.0,
    reweight: bool = True,
    ntr: bool = True,
    focal: bool = True,
) -> np.ndarray:
    """Element losses (B, C) of the authors' loss, computed element by element."""
    batch, num_classes = logits.shape
    out = np.zeros((batch, num_classes))
    for k in range(batch):
        positives = [j for j in range(num_classes) if targets[k, j] == 1]
        instance = sum(1.0 / class_freq[j] for j in positives)  # C · P^I(x^k)
        for i in range(num_classes):
            y = targets[k, i] == 1
            if not reweight:
                weight = 1.0
            elif instance == 0:
                weight = alpha + 1.0  # r = +inf
            else:
                r = (1.0 / class_freq[i]) / instance
                weight = alpha + 1.0 / (1.0 + math.exp(-beta * (r - mu)))
            z = float(logits[k, i])
            if ntr:
                z += -math.log(train_size / class_freq[i] - 1.0) * init_bias / neg_scale
                if not y:
                    z *= neg_scale
                    weight /= neg_scale
            # BCE of the true label: log(1 + e^{-z}) for a positive, log(1 + e^{z}) for a negative.
            bce = math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))
            loss = weight * bce
            if focal:
                p_t = math.exp(-bce)
                loss = balance * (1.0 - p_t) ** gamma * loss
            out[k, i] = loss
    return out


def make_batch(b: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    c = CLASS_FREQ.size
    logits = rng.normal(scale=3.0, size=(b, c))
    targets = (rng.random((b, c)) < CLASS_FREQ / TRAIN_SIZE + 0.1).astype(np.float64)
    targets[0] = 0  # an image without positive label
    targets[1] = 0
    targets[1, 5] = 1  # single label of the rarest class
    logits[2, :2] = [25.0, -25.0]
    return torch.from_numpy(logits), torch.from_numpy(targets)


ABLATIONS = [
    {},
    {"reweight": False},
    {"ntr": False},
    {"focal": False},
    {"reweight": False, "ntr": False},
    {"reweight": False, "ntr": False, "focal": False},
    {"mu": 0.3, "neg_scale": 5.0},  # the authors' VOC-MLT setting
]


def _reference_kwargs(switches: dict) -> dict:
    return {"gamma" if key == "focal_gamma" else key: value for key, value in switches.items()}


@pytest.mark.parametrize("switches", ABLATIONS, ids=lambda d: ",".join(d) or "default")
def test_matches_reference(switches):
    logits, targets = make_batch()
    want = reference_db(
        logits.numpy(), targets.numpy(), CLASS_FREQ, TRAIN_SIZE, **_reference_kwargs(switches)
    )
    loss_none = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE, reduction="none", **switches)
    loss_mean = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE, **switches)
    got = loss_none(logits, targets)
    assert got.shape == logits.shape and got.dtype == F64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loss_mean(logits, targets).item(), want.mean(), rtol=1e-12)


@pytest.mark.parametrize("switches", ABLATIONS[:4], ids=lambda d: ",".join(d) or "default")
def test_gradcheck(switches):
    logits, targets = make_batch(b=4, seed=1)
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE, **switches)
    x = logits.clone().clamp(-6, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: loss_fn(z, targets), (x,))


def test_weights_by_hand():
    # n = (2, 8, 10), N = 16.  Image {0, 1}: C·P^I = 1/2 + 1/8 = 5/8, so r = (0.8, 0.2, 0.16).
    # Image {2}: C·P^I = 1/10, so r = (5, 1.25, 1).  Image {}: r = inf, weight α + 1.
    loss_fn = DistributionBalancedLoss([2, 8, 10], 16)
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64)

    def smooth(r: float) -> float:
        return 0.1 + 1.0 / (1.0 + math.exp(-10.0 * (r - 0.2)))

    want = torch.tensor(
        [
            [smooth(0.8), 0.6, smooth(0.16)],  # r = μ gives α + σ(0) = 0.6 exactly
            [smooth(5.0), smooth(1.25), smooth(1.0)],
            [1.1, 1.1, 1.1],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(loss_fn.rebalance_weight(targets), want, rtol=1e-14, atol=0)
    # Prior bias κ·b̂/λ with b̂ = -log(N/n - 1): p = 8/16 gives 0; p = 2/16 gives -log 7.
    torch.testing.assert_close(
        loss_fn.logit_bias,
        torch.tensor([-math.log(7) * 0.05 / 2, 0.0, -math.log(16 / 10 - 1) * 0.05 / 2], dtype=F64),
        rtol=1e-14,
        atol=0,
    )


def test_ntr_scaling_by_hand():
    # No re-weighting, no focal, κ = 0: a negative with logit z costs log(1 + e^{λz}) / λ and a
    # positive log(1 + e^{-z}) (Eq. 7 with ν = 0).
    loss_fn = DistributionBalancedLoss(
        [5, 5], 10, init_bias=0.0, neg_scale=5.0, reweight=False, focal=False, reduction="none"
    )
    logits = torch.tensor([[0.3, 0.3]], dtype=F64)
    got = loss_fn(logits, torch.tensor([[1.0, 0.0]], dtype=F64))
    want = [math.log1p(math.exp(-0.3)), math.log1p(math.exp(5 * 0.3)) / 5]
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64), rtol=1e-14, atol=0)


def test_defaults_are_coco_config():
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    settings = (loss_fn.alpha, loss_fn.beta, loss_fn.mu, loss_fn.neg_scale, loss_fn.init_bias)
    assert settings == (0.1, 10.0, 0.2, 2.0, 0.05)
    assert (loss_fn.focal_gamma, loss_fn.balance_param, loss_fn.reduction) == (2.0, 2.0, "mean")
    assert loss_fn.reweight and loss_fn.ntr and loss_fn.focal


def test_zero_frequency_is_rejected_with_class_indices():
    with pytest.raises(ValueError, match=r"classes \[1, 3\]"):
        DistributionBalancedLoss([4, 0, 2, 0], 10)


def test_class_in_every_image():
    with pytest.raises(ValueError, match=r"classes \[0\].*infinite"):
        DistributionBalancedLoss([10, 2], 10)
    # Without the prior bias the table is usable and the loss finite.
    loss_fn = DistributionBalancedLoss([10, 2], 10, init_bias=0.0)
    assert torch.isfinite(loss_fn(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 1.0]])))
    with pytest.raises(ValueError, match="more positives"):
        DistributionBalancedLoss([11, 2], 10)


def test_no_nan_for_empty_rows_and_extreme_logits():
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    logits = torch.tensor([[80.0, -80.0, 0.0, 30.0, -30.0, 5.0]] * 2, requires_grad=True)
    targets = torch.tensor([[0.0] * 6, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_float32_matches_float64():
    logits, targets = make_batch()
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    x32 = logits.float().requires_grad_(True)
    x64 = logits.clone().requires_grad_(True)
    v32, v64 = loss_fn(x32, targets.float()), loss_fn(x64, targets)
    v32.backward()
    v64.backward()
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_half_precision_is_upcast():
    logits, targets = make_batch()
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    got = loss_fn(logits.half(), targets.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss_fn(logits.half().float(), targets.float()))


def test_buffers_are_not_checkpointed_and_shape_is_checked():
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    assert loss_fn.state_dict() == {}
    with pytest.raises(ValueError, match="classes"):
        loss_fn(torch.zeros(2, 5), torch.zeros(2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits, targets = make_batch()
    loss_fn = DistributionBalancedLoss(CLASS_FREQ, TRAIN_SIZE)
    want = loss_fn(logits.float(), targets.float())
    got = loss_fn.cuda()(logits.float().cuda(), targets.float().cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
