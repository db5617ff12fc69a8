"""Distillation losses as pure functions on logits.

Shapes: N = loss-carrying positions (selected from (B, T)), V = vocabulary, k = cached top-k.
The divergences themselves are registered in `divergences`; each gives one value per position,
(N,), and `per_token_divergence` applies one to logits. `chunked_loss` evaluates them a chunk of
positions at a time, taking each chunk's gradient as it goes, so full-vocabulary float32 logits
for the whole batch never sit in memory; `step_weights` divides by the tokens of the whole
optimizer step so gradient accumulation does not change the result.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chatdistill.distill.divergences import (
    SparseLogprobs,
    Teacher,
    divergence_from_logprobs,
    sparse_divergence,
)
from chatdistill.distill.loss_grads import ClosedFormLoss, loss_and_logit_grad


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher: Teacher,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Divergence per position, scaled by T² (Hinton et al.). student_logits (N, V) -> (N,)

    `teacher` is dense logits (N, V) or `SparseLogprobs` (top-k log-probs at temperature T). The
    sparse form compares k+1 buckets: the teacher's top-k tokens and the mass of everything else.
    """
    s_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, SparseLogprobs):
        rows = sparse_divergence(s_log.gather(-1, teacher.ids), teacher, kind, beta, skew)
    else:
        t_log = F.log_softmax(teacher.float() / temperature, dim=-1)
        rows = divergence_from_logprobs(s_log, t_log, kind, beta, skew)
    return rows * temperature**2


def per_token_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position. (N, V), (N,) -> (N,)"""
    return F.cross_entropy(student_logits.float(), targets, reduction="none")


def step_weights(ce_weight: float, step_tokens: int | float) -> tuple[float, float]:
    """Weights of the CE and divergence sums in the step loss (w·CE + (1-w)·D) / step tokens,
    where the tokens are those of the whole optimizer step, so gradient accumulation does not
    change the result (0 loss when there are none)."""
    n = max(step_tokens, 1)
    return ce_weight / n, (1 - ce_weight) / n


def chunk_size_for(vocab_size: int, chunk_size: int | None) -> int:
    """Positions per loss chunk: the configured size, or ~2M logits (8 MB in float32) per chunk:
    512 positions at a 4k vocabulary, 64 at 32k. Measured on CPU (bench/train_throughput.py
    --chunk-size): 4x larger chunks were no faster and raised peak memory by 18% at 4k and 44%
    at 32k."""
    return chunk_size or max(16, 2 * 2**20 // max(vocab_size, 1))


class _FusedChunks(torch.autograd.Function):
    """Chunked loss whose gradient is computed in the forward pass, one chunk at a time.

    Activation checkpointing would run every chunk's head and loss twice (forward, then again in
    the backward pass); here autograd carries each chunk's closed-form logit gradient through the
    head to the hidden states and the head's parameters right away, and the chunk's logits are
    freed. Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden, head, chunk_loss, size, *params):
        grad_h = torch.zeros_like(hidden)
        grad_p = [torch.zeros_like(p) for p in params]
        sums = torch.zeros(3, device=hidden.device)
        for start in range(0, max(hidden.shape[0], 1), size):
            h = hidden[start : start + size].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = head(h)
            *parts, grad_logits = chunk_loss(logits.detach(), start)  # (loss, ce, kd), dL/dz
            grads = torch.autograd.grad(
                logits, [h, *params], grad_logits.to(logits.dtype), allow_unused=True
            )
            grad_h[start : start + h.shape[0]] = grads[0]
            for acc, g in zip(grad_p, grads[1:], strict=True):
                if g is not None:
                    acc += g
            sums += torch.stack(parts)
        ctx.save_for_backward(grad_h, *grad_p)
        ce_sum, kd_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return sums[0].clone(), ce_sum, kd_sum

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        grad_h, *grad_p = ctx.saved_tensors
        return (grad_h * g_loss, None, None, None, *(g * g_loss for g in grad_p))


def chunked_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    teacher: Callable[[slice], Teacher] | None,
    kind: str,
    *,
    weights: tuple[float, float] = (1.0, 1.0),
    head_params: Sequence[torch.Tensor] | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, summed CE and summed divergence over N selected positions, a chunk at a time.

    student_hidden (N, H) with grad; student_head maps (n, H) -> (n, V) logits; targets (N,);
    teacher(slice) returns that chunk's teacher logits (n, V) or SparseLogprobs, or None for CE
    only. Returns (loss, ce_sum, kd_sum) with loss = weights[0]·ce_sum + weights[1]·kd_sum, the
    only output that carries a gradient (also with N = 0, so every process of a distributed run
    can call backward). Only one chunk's logits are alive at a time.

    The gradient with respect to each chunk's logits comes in closed form (`loss_grads`), not
    from autograd through the divergence. With `head_params` (the parameters `student_head`
    uses), it is carried through the head in the forward pass (no recomputation); without them,
    chunks run under activation checkpointing, which also works where parameters are sharded
    (FSDP, DeepSpeed ZeRO-3). Without gradients the plain per-token functions run.
    """
    w_ce, w_kd = weights

    def plain(h: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk's (loss, ce_sum, kd_sum) without gradients (evaluation)."""
        end = start + h.shape[0]
        logits = student_head(h)
        ce = per_token_ce(logits, targets[start:end]).sum()
        if teacher is None:
            return w_ce * ce, ce, torch.zeros_like(ce)
        t = teacher(slice(start, end))
        kd = per_token_divergence(
            logits, t, kind, beta=beta, skew=skew, temperature=temperature
        ).sum()
        return w_ce * ce + w_kd * kd, ce, kd

    def chunk_loss(logits: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """One chunk's (loss, ce_sum, kd_sum, dloss/dlogits) from its logits."""
        end = start + logits.shape[0]
        with torch.no_grad():
            t = None if teacher is None else teacher(slice(start, end))
        return loss_and_logit_grad(
            logits, targets[start:end], t, kind, weights=weights, beta=beta, skew=skew,
            temperature=temperature,
        )  # fmt: skip

    def checkpointed(h: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        return ClosedFormLoss.apply(student_head(h), partial(chunk_loss, start=start))

    if not (torch.is_grad_enabled() and student_hidden.requires_grad):
        run = torch.no_grad()(plain)
    elif head_params is not None:
        params = [p for p in head_params if p.requires_grad]
        return _FusedChunks.apply(student_hidden, student_head, chunk_loss, chunk_size, *params)
    else:
        run = partial(checkpoint, checkpointed, use_reentrant=False)
    total = [torch.zeros((), device=student_hidden.device) for _ in range(3)]
    for start in range(0, max(student_hidden.shape[0], 1), chunk_size):
        parts = run(student_hidden[start : start + chunk_size], start)
        total = [a + b for a, b in zip(total, parts, strict=True)]
    loss, ce_sum, kd_sum = total
    return loss, ce_sum, kd_sum
