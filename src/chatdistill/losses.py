"""Distillation losses as pure functions on logits.

Shapes: N = loss-carrying positions (selected from (B, T)), V = vocabulary, k = cached top-k.
Every divergence returns one value per position, (N,); `chunked_loss_sums` evaluates them a chunk
of positions at a time, recomputing logits in the backward pass, so full-vocabulary float32 logits
for the whole batch never sit in memory; `reduce_step` divides by the tokens of the whole optimizer
step so gradient accumulation does not change the result.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")


@dataclass
class SparseLogprobs:
    """Teacher top-k log-probs (already at the training temperature); the rest is one tail bucket.

    ids (N, k) int64, logprobs (N, k) float32.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __getitem__(self, s: slice) -> "SparseLogprobs":
        return SparseLogprobs(self.ids[s], self.logprobs[s])


Teacher = torch.Tensor | SparseLogprobs


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; 0·log 0 counts as 0. (N, K) -> (N,)"""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def _mix(a_log: torch.Tensor, b_log: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1-w)·b) from log-probs, stable."""
    if w <= 0:
        return b_log
    if w >= 1:
        return a_log
    return torch.logaddexp(a_log + torch.tensor(w).log(), b_log + torch.tensor(1 - w).log())


def divergence_from_logprobs(
    s_log: torch.Tensor, t_log: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-position divergence between teacher (t) and student (s) log-distributions. (N, K) -> (N,)

    fkl = KL(t||s); rkl = KL(s||t); jsd(beta) = beta·KL(t||m) + (1-beta)·KL(s||m) with
    m = beta·t + (1-beta)·s, taking its limits beta=0 -> fkl, beta=1 -> rkl (GKD, Agarwal et al.);
    skew_fkl = KL(t || skew·t + (1-skew)·s), skew_rkl = KL(s || skew·s + (1-skew)·t) (DistiLLM);
    tvd = ½·Σ|t - s|.
    """
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return _kl(t_log, s_log)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return _kl(s_log, t_log)
    if kind == "jsd":
        m = _mix(t_log, s_log, beta)
        return beta * _kl(t_log, m) + (1 - beta) * _kl(s_log, m)
    if kind == "skew_fkl":
        return _kl(t_log, _mix(t_log, s_log, skew))
    if kind == "skew_rkl":
        return _kl(s_log, _mix(s_log, t_log, skew))
    if kind == "tvd":
        return 0.5 * (t_log.exp() - s_log.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")


def _tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(logprobs)) over the last dim, clamped away from log 0. (N, k) -> (N, 1)"""
    mass = logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
    return torch.log1p(-mass)


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
        s_top = s_log.gather(-1, teacher.ids)
        t_top = teacher.logprobs.float()
        s_log = torch.cat([s_top, _tail(s_top)], dim=-1)
        t_log = torch.cat([t_top, _tail(t_top)], dim=-1)
    else:
        t_log = F.log_softmax(teacher.float() / temperature, dim=-1)
    return divergence_from_logprobs(s_log, t_log, kind, beta, skew) * temperature**2


def per_token_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position. (N, V), (N,) -> (N,)"""
    return F.cross_entropy(student_logits.float(), targets, reduction="none")


def chunked_loss_sums(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    teacher: Callable[[slice], Teacher] | None,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and divergence over N selected positions, a chunk at a time.

    student_hidden (N, H) with grad; student_head maps (n, H) -> (n, V) logits; targets (N,);
    teacher(slice) returns that chunk's teacher logits (n, V) or SparseLogprobs, or None for
    CE only. Each chunk runs under activation checkpointing, so only one chunk's logits are
    alive at a time in both passes. Returns (ce_sum, kd_sum), scalars.
    """

    def chunk_sums(h: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + h.shape[0]
        logits = student_head(h)
        ce = per_token_ce(logits, targets[start:end]).sum()
        if teacher is None:
            return ce, torch.zeros((), device=h.device)
        with torch.no_grad():
            t = teacher(slice(start, end))
        kd = per_token_divergence(
            logits, t, kind, beta=beta, skew=skew, temperature=temperature
        ).sum()
        return ce, kd

    ce_sum = torch.zeros((), device=student_hidden.device)
    kd_sum = torch.zeros((), device=student_hidden.device)
    for start in range(0, student_hidden.shape[0], chunk_size):
        h = student_hidden[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            ce, kd = checkpoint(chunk_sums, h, start, use_reentrant=False)
        else:
            ce, kd = chunk_sums(h, start)
        ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
    return ce_sum, kd_sum


def reduce_step(
    ce_sum: torch.Tensor, kd_sum: torch.Tensor, ce_weight: float, step_tokens: int | float
) -> torch.Tensor:
    """loss = (w·CE + (1-w)·D) / tokens in the whole optimizer step (0 when there are none)."""
    total = ce_weight * ce_sum + (1 - ce_weight) * kd_sum
    return total / max(step_tokens, 1)
