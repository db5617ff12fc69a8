"""The divergences D(teacher || student) the trainer can use, each registered once with its value
and its closed-form gradient side by side. Adding one means one entry here: the recipe's
`loss.kind` and the CLI's `--loss` choices are derived from `DIVERGENCES`.

With s, t the student's and teacher's log-probs (at the training temperature) and p_s, p_t their
probabilities, each entry has:
  value(s, t, beta, skew)             -> (N,)     the divergence per position, from log-probs over
                                                  any K buckets (the vocabulary, or sparse top-k
                                                  buckets plus a tail)
  rows_and_grad(s, ps, t, beta, skew) -> (n,), (n, V)   the same rows over the vocabulary and
                                                  g = dL/ds, written out so that training needs a
                                                  handful of passes over a chunk instead of
                                                  autograd's dozens (`loss_grads`)
The gradient equals autograd through `value` (tested). rows_and_grad allocates as few (n, V)
buffers as it can and leaves s, ps and t intact.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The smallest normal float32: a mixture below it (both sides underflowed) is clamped there, so
# log(mixture) stays finite and 0·(s - m) stays 0.
_TINY = torch.finfo(torch.float32).tiny
_UNUSED = -1e4  # log-prob of an unused sparse slot: exp() is exactly 0 in float32


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


def _log_mixture(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1-w)·b) from probabilities, clamped away from log 0."""
    return (a * w).add_(b, alpha=1 - w).clamp_(min=_TINY).log_()


Rows = torch.Tensor
Grad = tuple[torch.Tensor, torch.Tensor]


# fkl: L = Σ p_t (t - s), g = -p_t
def _fkl(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    return _kl(t, s)


def _fkl_grad(s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Grad:
    pt = t.exp()
    rows = (t - s).mul_(pt).sum(-1)
    return rows, pt.neg_()


# rkl: L = Σ p_s (s - t), g = p_s (s - t + 1)
def _rkl(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    return _kl(s, t)


def _rkl_grad(s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Grad:
    g = (s - t).mul_(ps)
    rows = g.sum(-1)
    return rows, g.add_(ps)


# jsd(b), generalised (GKD, Agarwal et al.): m = log(b·p_t + (1-b)·p_s),
# L = b·Σ p_t (t - m) + (1-b)·Σ p_s (s - m), g = (1-b) p_s (s - m); b = 0 is fkl, b = 1 is rkl.
def _jsd(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    if beta == 0:
        return _fkl(s, t, beta, skew)
    if beta == 1:
        return _rkl(s, t, beta, skew)
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def _jsd_grad(s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Grad:
    if beta == 0:
        return _fkl_grad(s, ps, t, beta, skew)
    if beta == 1:
        return _rkl_grad(s, ps, t, beta, skew)
    pt = t.exp()
    m = _log_mixture(pt, ps, beta)
    g = (s - m).mul_(ps)
    rows = (t - m).mul_(pt).sum(-1).mul_(beta).add_(g.sum(-1), alpha=1 - beta)
    return rows, g.mul_(1 - beta)


# skew_fkl (DistiLLM), a = skew: m = log(a·p_t + (1-a)·p_s), L = Σ p_t (t - m),
# g = -(1-a) p_t p_s / e^m
def _skew_fkl(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    return _kl(t, _mix(t, s, skew))


def _skew_fkl_grad(
    s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float
) -> Grad:
    pt = t.exp()
    m = _log_mixture(pt, ps, skew)
    rows = (t - m).mul_(pt).sum(-1)
    return rows, m.neg_().exp_().mul_(pt).mul_(ps).mul_(-(1 - skew))


# skew_rkl (DistiLLM), a = skew: m = log(a·p_s + (1-a)·p_t), L = Σ p_s (s - m),
# g = p_s (s - m + 1 - a·p_s / e^m)
def _skew_rkl(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    return _kl(s, _mix(s, t, skew))


def _skew_rkl_grad(
    s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float
) -> Grad:
    m = _log_mixture(ps, t.exp(), skew)
    g = (s - m).mul_(ps)
    rows = g.sum(-1)
    return rows, g.add_(ps).sub_(m.neg_().exp_().mul_(ps).mul_(ps).mul_(skew))


# tvd: L = ½ Σ |p_t - p_s|, g = ½ p_s sign(p_s - p_t)
def _tvd(s: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Rows:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def _tvd_grad(s: torch.Tensor, ps: torch.Tensor, t: torch.Tensor, beta: float, skew: float) -> Grad:
    diff = ps - t.exp()
    rows = diff.abs().sum(-1).mul_(0.5)
    return rows, diff.sign_().mul_(ps).mul_(0.5)


@dataclass(frozen=True)
class Divergence:
    value: Callable[[torch.Tensor, torch.Tensor, float, float], Rows]
    rows_and_grad: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float], Grad]


DIVERGENCES: dict[str, Divergence] = {
    "fkl": Divergence(_fkl, _fkl_grad),
    "rkl": Divergence(_rkl, _rkl_grad),
    "jsd": Divergence(_jsd, _jsd_grad),
    "skew_fkl": Divergence(_skew_fkl, _skew_fkl_grad),
    "skew_rkl": Divergence(_skew_rkl, _skew_rkl_grad),
    "tvd": Divergence(_tvd, _tvd_grad),
}


def divergence(kind: str) -> Divergence:
    """The registered divergence named `kind`."""
    found = DIVERGENCES.get(kind)
    if found is None:
        raise ValueError(f"unknown divergence {kind!r}; choose from {', '.join(DIVERGENCES)}")
    return found


def divergence_from_logprobs(
    s_log: torch.Tensor, t_log: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Per-position divergence between teacher (t) and student (s) log-distributions. (N, K) -> (N,)

    beta is the generalised JSD's mix, skew the skew KLs' (see the entries above).
    """
    return divergence(kind).value(s_log, t_log, beta, skew)


# --------------------------------------------------------------------------- sparse teacher


@dataclass
class SparseLogprobs:
    """Teacher log-probs of k tokens (already at the training temperature); the rest of the
    vocabulary is one tail bucket. The tokens are the top-k, or the top ones plus tokens sampled
    from the rest, each carrying its share of the rest's mass (see cache.sparse_targets); a slot
    with log-prob -inf is unused.

    ids (N, k) int64, logprobs (N, k) float32.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __getitem__(self, s: slice) -> "SparseLogprobs":
        return SparseLogprobs(self.ids[s], self.logprobs[s])


Teacher = torch.Tensor | SparseLogprobs


def _tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - Σ exp(logprobs)) over the last dim, clamped away from log 0. (N, k) -> (N, 1)"""
    mass = logprobs.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6)
    return torch.log1p(-mass)


def sparse_divergence(
    s_top: torch.Tensor, teacher: SparseLogprobs, kind: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """Divergence over k+1 buckets, the teacher's k tokens and the mass of everything else, from
    the student's log-probs of those k tokens, s_top (N, k). (N,), not scaled by T²."""
    # -inf marks an unused slot (a merged duplicate sample): no mass on either side. A finite
    # stand-in keeps 0·(-inf - x) out of the backward pass.
    unused = torch.isneginf(teacher.logprobs)
    s_top = s_top.masked_fill(unused, _UNUSED)
    t_top = teacher.logprobs.float().masked_fill(unused, _UNUSED)
    s_log = torch.cat([s_top, _tail(s_top)], dim=-1)
    t_log = torch.cat([t_top, _tail(t_top)], dim=-1)
    return divergence_from_logprobs(s_log, t_log, kind, beta, skew)
