"""The closed-form loss gradients equal autograd through the reference loss functions."""

import itertools

import pytest
import torch

from chatdistill.distill.divergences import DIVERGENCES, SparseLogprobs
from chatdistill.distill.loss_grads import loss_and_logit_grad
from chatdistill.distill.losses import per_token_ce, per_token_divergence

N, V = 10, 64


def _reference(z, targets, teacher, kind, weights, **kw):
    """(loss, ce, kd, dloss/dz) by autograd through losses.per_token_*."""
    z = z.clone().requires_grad_(True)
    ce = per_token_ce(z, targets).sum()
    kd = per_token_divergence(z, teacher, kind, **kw).sum() if teacher is not None else 0 * ce
    loss = weights[0] * ce + weights[1] * kd
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), ce.detach(), kd.detach(), grad


def _check(z, targets, teacher, kind, weights, **kw):
    want = _reference(z, targets, teacher, kind, weights, **kw)
    got = loss_and_logit_grad(z, targets, teacher, kind, weights=weights, **kw)
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


CASES = list(itertools.product([1.0, 2.0, 0.7], [(0.0, 1.0), (0.5, 0.5), (0.2, 0.03)]))


@pytest.mark.parametrize("kind", list(DIVERGENCES))
@pytest.mark.parametrize(("temperature", "weights"), CASES)
def test_dense_teacher(kind, temperature, weights):
    torch.manual_seed(0)
    z, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    targets = torch.randint(0, V, (N,))
    for beta in (0.0, 0.3, 1.0) if kind == "jsd" else (0.5,):
        _check(z, targets, t, kind, weights, beta=beta, skew=0.2, temperature=temperature)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_sparse_teacher_with_unused_slots(kind):
    torch.manual_seed(1)
    z, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    top = torch.log_softmax(t / 2, -1).topk(8)
    logprobs = top.values.clone()
    logprobs[::3, -2:] = float("-inf")  # merged duplicate samples leave slots unused
    teacher = SparseLogprobs(top.indices, logprobs)
    targets = torch.randint(0, V, (N,))
    _check(z, targets, teacher, kind, (0.3, 0.7), beta=0.4, skew=0.1, temperature=2.0)


def test_ce_only_and_no_positions():
    torch.manual_seed(2)
    z, targets = torch.randn(N, V), torch.randint(0, V, (N,))
    _check(z, targets, None, "fkl", (1.0, 0.0))
    empty = loss_and_logit_grad(
        torch.zeros(0, V), torch.zeros(0, dtype=torch.long), torch.zeros(0, V), "jsd",
        weights=(0.5, 0.5),
    )  # fmt: skip
    assert empty[3].shape == (0, V) and all(float(x) == 0 for x in empty[:3])


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_peaked_distributions_stay_finite(kind):
    """Logit gaps of hundreds underflow both sides' probabilities: no NaN or inf comes out, and
    where autograd's reference is finite the two agree."""
    torch.manual_seed(3)
    z, t = torch.randn(N, V) * 80, torch.randn(N, V) * 80
    targets = torch.randint(0, V, (N,))
    got = loss_and_logit_grad(z, targets, t, kind, weights=(0.1, 0.9), beta=0.5, temperature=0.5)
    assert all(torch.isfinite(x).all() for x in got)
    want = _reference(z, targets, t, kind, (0.1, 0.9), beta=0.5, temperature=0.5)
    if all(torch.isfinite(x).all() for x in want):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


def test_bf16_logits_give_a_float32_gradient():
    torch.manual_seed(4)
    z, t = torch.randn(N, V).bfloat16(), torch.randn(N, V).bfloat16()
    targets = torch.randint(0, V, (N,))
    *_, grad = loss_and_logit_grad(z, targets, t, "jsd", weights=(0.5, 0.5))
    want = _reference(z.float(), targets, t.float(), "jsd", (0.5, 0.5))[3]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, want)
