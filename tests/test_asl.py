"""Tests for mlcore.losses.asl against an independent float64 reference of ASL Eq. 7.

The reference follows the authors' conventions (Alibaba-MIIL/ASL, src/loss_functions/losses.py)
but is written per case (positive / negative) with the paper's p_m = max(p - m, 0) instead of
the module's clamped 1 - p + m.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from mlcore.losses.asl import AsymmetricLoss

F64 = torch.float64


def reference_terms(
    logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focusing weight and -log-likelihood per element (B, C), per case from Eq. 4-7."""
    p = torch.sigmoid(logits)
    eps = torch.tensor(1e-8, dtype=logits.dtype)
    is_pos = targets == 1
    # Positive case: weight (1 - p)^γ+, term -log(p) with the log argument floored at eps.
    # Negative case: weight p_m^γ-, term -log(1 - p_m) with p_m = max(p - m, 0).
    p_m = torch.relu(p - clip)
    weight = torch.where(is_pos, (1 - p) ** gamma_pos, p_m**gamma_neg)
    nll = torch.where(
        is_pos, -torch.log(torch.maximum(p, eps)), -torch.log(torch.maximum(1 - p_m, eps))
    )
    return weight, nll


def reference_asl(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float,
    gamma_pos: float,
    clip: float,
    detach_weight: bool = True,
) -> torch.Tensor:
    """Element losses (B, C); the weight is a constant for autograd when ``detach_weight``."""
    weight, nll = reference_terms(logits, targets, gamma_neg, gamma_pos, clip)
    return (weight.detach() if detach_weight else weight) * nll


def make_batch(
    b: int = 8, c: int = 7, seed: int = 0, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits spanning ±30 (extreme values included) and sparse labels with an empty row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=F64) * 4
    logits[0, :4] = torch.tensor([30.0, -30.0, 30.0, -30.0], dtype=F64)
    targets = (torch.rand(b, c, generator=g) < 0.3).to(dtype)
    targets[0, :4] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    targets[1] = 0  # a row with no positive label
    targets[2] = 1  # a row with only positive labels
    return logits.to(dtype), targets


CONFIGS = [
    # gamma_neg, gamma_pos, clip
    (4.0, 0.0, 0.05),  # the authors' training setting
    (4.0, 1.0, 0.05),  # the authors' class default
    (2.0, 2.0, 0.0),  # focal loss
    (0.0, 0.0, 0.0),  # BCE
    (2.5, 0.5, 0.2),  # fractional exponents, large margin
]


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), CONFIGS)
def test_matches_reference_values_and_gradients(gamma_neg, gamma_pos, clip, detach):
    logits, targets = make_batch()
    loss_fn = AsymmetricLoss(gamma_neg, gamma_pos, clip, detach_focal_weight=detach)

    x = logits.clone().requires_grad_(True)
    got = loss_fn(x, targets)
    got.backward()

    x_ref = logits.clone().requires_grad_(True)
    want = reference_asl(x_ref, targets, gamma_neg, gamma_pos, clip, detach_weight=detach).sum()
    want.backward()

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-14)
    assert torch.isfinite(x.grad).all()


def test_reductions():
    logits, targets = make_batch()
    elements = AsymmetricLoss(reduction="none")(logits, targets)
    assert elements.shape == logits.shape
    torch.testing.assert_close(elements, reference_asl(logits, targets, 4.0, 0.0, 0.05))
    torch.testing.assert_close(AsymmetricLoss(reduction="sum")(logits, targets), elements.sum())
    torch.testing.assert_close(
        AsymmetricLoss(reduction="mean")(logits, targets), elements.sum() / logits.numel()
    )


def test_hand_computed_elements():
    # p = 0.8 positive, γ+ = 1: -(0.2) log 0.8.  p = 0.3 negative, m = 0.1, γ- = 2:
    # p_m = 0.2 and the loss is -(0.2^2) log 0.8.
    logits = torch.logit(torch.tensor([[0.8, 0.3]], dtype=F64))
    targets = torch.tensor([[1.0, 0.0]], dtype=F64)
    got = AsymmetricLoss(gamma_neg=2, gamma_pos=1, clip=0.1, reduction="none")(logits, targets)
    want = torch.tensor([[-0.2 * math.log(0.8), -0.04 * math.log(0.8)]], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_margin_discards_easy_negatives():
    # A negative with p < m has zero loss and zero gradient (hard threshold, §2.3).
    logits = torch.logit(torch.tensor([[0.04, 0.06]], dtype=F64)).requires_grad_(True)
    targets = torch.zeros(1, 2, dtype=F64)
    loss = AsymmetricLoss(gamma_neg=0, clip=0.05, reduction="none")(logits, targets)
    loss.sum().backward()
    assert loss[0, 0].item() == 0.0 and logits.grad[0, 0].item() == 0.0
    assert loss[0, 1].item() > 0.0 and logits.grad[0, 1].item() > 0.0


def test_bce_is_special_case():
    logits, targets = make_batch()
    # |z| <= 15 keeps p above eps, so the log clamp does not engage.
    logits = logits.clamp(-15, 15)
    x = logits.clone().requires_grad_(True)
    x_ref = logits.clone().requires_grad_(True)
    got = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(x, targets)
    want = F.binary_cross_entropy_with_logits(x_ref, targets, reduction="sum")
    got.backward()
    want.backward()
    # ASL forms log(1 - σ(z)) like the authors; the cancellation in 1 - σ(z) costs up to
    # e^|z| · 1e-16 relative (3e-10 at |z| = 15) against the log-sum-exp form of BCE.
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_focal_is_special_case(gamma):
    logits, targets = make_batch(seed=3)
    logits = logits.clamp(-15, 15)
    x = logits.clone().requires_grad_(True)
    x_ref = logits.clone().requires_grad_(True)
    got = AsymmetricLoss(gamma, gamma, clip=0, detach_focal_weight=False)(x, targets)
    want = sigmoid_focal_loss(x_ref, targets, alpha=-1, gamma=gamma, reduction="sum")
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)  # see test_bce_is_special_case
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-14)


def test_clip_none_equals_zero():
    logits, targets = make_batch()
    a = AsymmetricLoss(clip=None)(logits, targets)
    b = AsymmetricLoss(clip=0.0)(logits, targets)
    assert torch.equal(a, b)


@pytest.mark.parametrize("detach", [False, True])
def test_gradcheck(detach):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 5, generator=g, dtype=F64) * 2).requires_grad_(True)
    targets = (torch.rand(4, 5, generator=g) < 0.4).to(F64)
    loss_fn = AsymmetricLoss(gamma_neg=3.0, gamma_pos=1.0, clip=0.05, detach_focal_weight=detach)
    if not detach:
        assert torch.autograd.gradcheck(lambda z: loss_fn(z, targets), (logits,))
        return
    # With a detached weight the gradient is that of Σ w(z0) ℓ(z) at z0: check it against central
    # differences of the reference with the weight frozen at z0.
    z0 = logits.detach()
    weights, _ = reference_terms(z0, targets, 3.0, 1.0, 0.05)

    def frozen(z: torch.Tensor) -> torch.Tensor:
        return (weights * reference_terms(z, targets, 3.0, 1.0, 0.05)[1]).sum()

    numeric = torch.zeros_like(z0)
    h = 1e-6
    for i in range(z0.numel()):
        step = torch.zeros_like(z0).flatten()
        step[i] = h
        step = step.view_as(z0)
        numeric.view(-1)[i] = (frozen(z0 + step) - frozen(z0 - step)) / (2 * h)
    loss_fn(logits, targets).backward()
    torch.testing.assert_close(logits.grad, numeric, rtol=1e-6, atol=1e-8)
    # and the detached gradient really differs from the full one
    full = torch.autograd.grad(
        AsymmetricLoss(3.0, 1.0, 0.05, detach_focal_weight=False)(z0.requires_grad_(True), targets),
        z0,
    )[0]
    assert not torch.allclose(full, logits.grad)


def test_float32_matches_float64():
    logits, targets = make_batch()
    loss_fn = AsymmetricLoss()
    x32 = logits.float().requires_grad_(True)
    x64 = logits.clone().requires_grad_(True)
    v32 = loss_fn(x32, targets.float())
    v64 = loss_fn(x64, targets)
    v32.backward()
    v64.backward()
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(dtype):
    # In float16 eps = 1e-8 rounds to 0, so without the upcast log(clamp(p, eps)) is -inf.
    logits, targets = make_batch()
    x = logits.to(dtype).requires_grad_(True)
    got = AsymmetricLoss()(x, targets.to(dtype))
    got.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == dtype
    want = AsymmetricLoss()(logits.to(dtype).float(), targets.float())
    torch.testing.assert_close(got, want)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fractional_gamma_saturated_logits_have_finite_gradients(dtype):
    # In float32 σ(30) == 1 exactly, so (1 - p_t) == 0 for positives; x^0.5 has an infinite
    # derivative there and the loss term is 0, a 0 * inf that must not leak out as NaN.
    logits = torch.tensor([[30.0, 60.0, -60.0, -3.5]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=dtype)
    loss = AsymmetricLoss(0.5, 0.5, clip=0.05, detach_focal_weight=False)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_attributes_are_mutable_and_read_every_call():
    logits, targets = make_batch()
    loss_fn = AsymmetricLoss(gamma_neg=4.0, clip=0.05)
    loss_fn.gamma_neg = 1.5
    loss_fn.clip = 0.1
    assert isinstance(loss_fn.gamma_neg, float) and isinstance(loss_fn.clip, float)
    torch.testing.assert_close(
        loss_fn(logits, targets), AsymmetricLoss(gamma_neg=1.5, clip=0.1)(logits, targets)
    )


def test_grad_mode_is_restored():
    logits, targets = make_batch()
    loss_fn = AsymmetricLoss(detach_focal_weight=True)
    with torch.no_grad():
        loss_fn(logits.requires_grad_(True), targets)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert loss_fn(logits, targets).requires_grad


def test_invalid_arguments():
    with pytest.raises(ValueError, match="reduction"):
        AsymmetricLoss(reduction="avg")
    with pytest.raises(ValueError):
        AsymmetricLoss(gamma_neg=-1)
    with pytest.raises(ValueError):
        AsymmetricLoss(clip=-0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits, targets = make_batch(dtype=torch.float32)
    logits = logits.float()
    loss_fn = AsymmetricLoss()
    x_cpu = logits.clone().requires_grad_(True)
    x_gpu = logits.cuda().requires_grad_(True)
    v_cpu, v_gpu = loss_fn(x_cpu, targets), loss_fn(x_gpu, targets.cuda())
    v_cpu.backward()
    v_gpu.backward()
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-6)
