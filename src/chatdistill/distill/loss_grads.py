"""The step loss and its gradient with respect to the student's logits, in closed form.

Autograd through a divergence over a (n, V) chunk records every elementwise step (log-softmax,
mixture, exp, products, masks) and replays each one backwards: dozens of passes over the chunk.
Here each divergence's gradient with respect to the student's log-probs, g = dL/ds, is written out
(beside its value, in `divergences`), and the softmax's Jacobian turns it into the logits'
gradient, dL/dz = (g - p_s·Σg) / T. That is a handful of passes, and the same numbers as autograd
through `losses.per_token_divergence` (tested). `losses.chunked_loss` uses it whenever it trains.

A sparse teacher (top-k buckets plus a tail) has only k + 1 buckets, so its g comes from autograd
over those buckets and is scattered back onto the vocabulary.
"""

import torch
import torch.nn.functional as F

from chatdistill.distill.divergences import SparseLogprobs, Teacher, divergence, sparse_divergence


def _sparse_rows_and_g(
    s: torch.Tensor, teacher: SparseLogprobs, kind: str, beta: float, skew: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence (n,) and g = dL/ds (n, V) against a sparse teacher."""
    with torch.enable_grad():
        s_top = s.gather(-1, teacher.ids).requires_grad_(True)
        rows = sparse_divergence(s_top, teacher, kind, beta, skew)
        (g_top,) = torch.autograd.grad(rows.sum(), s_top)
    return rows.detach(), torch.zeros_like(s).scatter_add_(-1, teacher.ids, g_top)


def _logit_grad(g: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """dL/dz from g = dL/ds through s = log_softmax(z / T): (g - p·Σg)·scale, in place on g."""
    return g.sub_(p * g.sum(-1, keepdim=True)).mul_(scale)


@torch.no_grad()
def loss_and_logit_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher: Teacher | None,
    kind: str,
    *,
    weights: tuple[float, float],
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce_sum, kd_sum, dloss/dlogits) of one chunk; loss = w_ce·ce_sum + w_kd·kd_sum.

    logits (n, V) any float dtype; targets (n,); teacher as in `losses.chunked_loss`. The
    divergence is scaled by T² like `losses.per_token_divergence`; the gradient is float32.
    """
    w_ce, w_kd = weights
    z = logits.float()
    T = temperature
    log_p1 = F.log_softmax(z, dim=-1)  # CE is always at temperature 1
    p1 = log_p1.exp() if w_ce or T == 1 else None
    ce = -log_p1.gather(-1, targets[:, None]).sum()
    grad = None
    if w_ce:
        grad = p1.mul(w_ce).scatter_add_(-1, targets[:, None], torch.full_like(z[:, :1], -w_ce))
    kd = torch.zeros_like(ce)
    if teacher is not None:
        s = log_p1 if T == 1 else F.log_softmax(z / T, dim=-1)
        ps = p1 if T == 1 else s.exp()
        if isinstance(teacher, SparseLogprobs):
            rows, g = _sparse_rows_and_g(s, teacher, kind, beta, skew)
        else:
            tz = teacher.float()
            t = F.log_softmax(tz if T == 1 else tz / T, dim=-1)
            rows, g = divergence(kind).rows_and_grad(s, ps, t, beta, skew)
        kd = rows.sum() * T**2
        g = _logit_grad(g, ps, w_kd * T)  # T² from the loss's scale, 1/T from the softmax
        grad = g if grad is None else grad.add_(g)
    if grad is None:
        grad = torch.zeros_like(z)
    return w_ce * ce + w_kd * kd, ce, kd, grad


class ClosedFormLoss(torch.autograd.Function):
    """(loss, ce_sum, kd_sum) of a chunk's logits whose backward is the closed-form gradient.

    `chunk_loss(logits)` returns `loss_and_logit_grad`'s four values. The gradient is kept for
    backward, so use it under activation checkpointing, which drops it and recomputes it then.
    """

    @staticmethod
    def forward(ctx, logits, chunk_loss):
        loss, ce, kd, grad = chunk_loss(logits.detach())
        ctx.save_for_backward(grad.to(logits.dtype))
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        (grad,) = ctx.saved_tensors
        return grad * g_loss, None
