import pytest
import torch
import torch.nn.functional as F

from chatdistill.distill.divergences import (
    DIVERGENCES,
    SparseLogprobs,
    divergence_from_logprobs,
)
from chatdistill.distill.losses import chunked_loss, per_token_divergence, step_weights

torch.manual_seed(0)
N, V, H = 12, 50, 16


def _logits():
    return torch.randn(N, V) * 2, torch.randn(N, V) * 2


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_divergence_is_zero_for_equal_inputs(kind):
    s, _ = _logits()
    assert per_token_divergence(s, s.clone(), kind).abs().max() < 1e-5


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_divergence_is_positive_for_different_inputs(kind):
    s, t = _logits()
    assert (per_token_divergence(s, t, kind) > 0).all()


def test_fkl_equals_torch_kl_div():
    s, t = _logits()
    ours = per_token_divergence(s, t, "fkl")
    ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True)
    torch.testing.assert_close(ours, ref.sum(-1))


def test_rkl_is_fkl_with_roles_swapped():
    s, t = _logits()
    torch.testing.assert_close(per_token_divergence(s, t, "rkl"), per_token_divergence(t, s, "fkl"))


def test_jsd_limits_are_forward_and_reverse_kl():
    s, t = _logits()
    torch.testing.assert_close(
        per_token_divergence(s, t, "jsd", beta=0.0), per_token_divergence(s, t, "fkl")
    )
    torch.testing.assert_close(
        per_token_divergence(s, t, "jsd", beta=1.0), per_token_divergence(s, t, "rkl")
    )


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    s, t = _logits()
    a = per_token_divergence(s, t, "jsd", beta=0.5)
    torch.testing.assert_close(a, per_token_divergence(t, s, "jsd", beta=0.5))
    assert (a <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_skew_kl_with_zero_skew_is_plain_kl():
    s, t = _logits()
    torch.testing.assert_close(
        per_token_divergence(s, t, "skew_fkl", skew=0.0), per_token_divergence(s, t, "fkl")
    )
    torch.testing.assert_close(
        per_token_divergence(s, t, "skew_rkl", skew=0.0), per_token_divergence(s, t, "rkl")
    )


def test_unknown_divergence_names_the_registered_ones():
    s, t = _logits()
    with pytest.raises(ValueError, match="unknown divergence 'kl'; choose from fkl, rkl, jsd"):
        per_token_divergence(s, t, "kl")


def test_tvd_matches_hand_computation():
    s_log = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    t_log = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert divergence_from_logprobs(s_log, t_log, "tvd").item() == pytest.approx(0.5)


def test_zero_probabilities_give_finite_kl():
    s_log = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    t_log = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    assert divergence_from_logprobs(s_log, t_log, "fkl").item() == pytest.approx(0.6931, abs=1e-4)


def test_temperature_scales_by_t_squared():
    s, t = _logits()
    raw = per_token_divergence(s / 2, t / 2, "fkl")
    torch.testing.assert_close(per_token_divergence(s, t, "fkl", temperature=2.0), raw * 4)


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_sparse_with_full_top_k_equals_dense(kind):
    s, t = _logits()
    t_log = t.log_softmax(-1)
    ids = t_log.argsort(-1, descending=True)
    sparse = SparseLogprobs(ids, t_log.gather(-1, ids))
    torch.testing.assert_close(
        per_token_divergence(s, sparse, kind),
        per_token_divergence(s, t, kind),
        atol=1e-4,
        rtol=1e-3,
    )


def test_sparse_fkl_approaches_dense_as_k_grows():
    s, t = _logits()
    t = t * 3  # peaked teacher, as real ones are
    t_log = t.log_softmax(-1)
    dense = per_token_divergence(s, t, "fkl")
    errors = []
    for k in (4, 16, 40, V):
        ids = t_log.topk(k, -1).indices
        sparse = per_token_divergence(s, SparseLogprobs(ids, t_log.gather(-1, ids)), "fkl")
        errors.append((sparse - dense).abs().mean().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def _chunked(h, head, targets, t_logits, chunk, fused=False, weights=(1.0, 1.0)):
    return chunked_loss(
        h,
        head,
        targets,
        lambda s: t_logits[s],
        "fkl",
        weights=weights,
        head_params=list(head.parameters()) if fused else None,
        chunk_size=chunk,
    )


@pytest.mark.parametrize("fused", [False, True], ids=["checkpointed", "fused"])
def test_chunked_equals_unchunked_values_and_gradients(fused):
    """Any chunking, checkpointed or with gradients taken in the forward pass, gives the plain
    (unchunked autograd) loss and the same gradients for the hidden states and the head."""
    head = torch.nn.Linear(H, V, bias=True)
    h = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    t_logits = torch.randn(N, V)
    w = (0.3, 0.7)
    ref_ce = F.cross_entropy(head(h), targets, reduction="sum")
    ref_kd = per_token_divergence(head(h), t_logits, "fkl").sum()
    ref = w[0] * ref_ce + w[1] * ref_kd
    ref_grads = torch.autograd.grad(ref, [h, head.weight, head.bias])
    for chunk in (N, 5, 1):
        h.grad = head.weight.grad = head.bias.grad = None
        loss, ce, kd = _chunked(h, head, targets, t_logits, chunk, fused, w)
        (2 * loss).backward()  # the upstream gradient scales the stored ones
        torch.testing.assert_close(torch.stack([loss, ce, kd]), torch.stack([ref, ref_ce, ref_kd]))
        for got, want in zip([h.grad, head.weight.grad, head.bias.grad], ref_grads, strict=True):
            torch.testing.assert_close(got, 2 * want)


def test_fused_loss_reaches_tied_and_frozen_parameters_correctly():
    """A head tied to an input embedding gets both gradients; a frozen head gets none."""
    emb = torch.nn.Embedding(V, H)
    ids = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))
    t_logits = torch.randn(N, V)
    grads = []
    for fused in (False, True):
        emb.weight.grad = None
        h = torch.tanh(emb(ids))
        head = lambda x: x @ emb.weight.T  # noqa: E731
        params = [emb.weight] if fused else None
        loss, _, _ = chunked_loss(
            h, head, targets, lambda s: t_logits[s], "jsd", head_params=params, chunk_size=3
        )
        loss.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    frozen = torch.nn.Linear(H, V).requires_grad_(False)
    h = torch.randn(N, H, requires_grad=True)
    loss, _, _ = _chunked(h, frozen, targets, t_logits, 4, fused=True)
    loss.backward()
    assert frozen.weight.grad is None and h.grad is not None


def test_no_loss_positions_give_zero_not_nan():
    head = torch.nn.Linear(H, V, bias=False)
    for fused in (False, True):
        h = torch.zeros(0, H, requires_grad=True)
        w = step_weights(0.5, 0)
        loss, _, _ = _chunked(
            h, head, torch.zeros(0, dtype=torch.long), torch.zeros(0, V), 4, fused, w
        )
        loss.backward()
        assert loss.item() == 0.0 and not torch.isnan(loss)


def test_step_reduction_makes_accumulation_invariant():
    """Summing per-micro-batch losses normalised by step tokens == one big batch's mean."""
    head = torch.nn.Linear(H, V, bias=False)
    h = torch.randn(N, H)
    targets = torch.randint(0, V, (N,))
    t_logits = torch.randn(N, V)
    whole, _, _ = _chunked(h, head, targets, t_logits, N, weights=step_weights(0.3, N))
    parts = 0
    for part in (slice(0, 3), slice(3, N)):
        loss, _, _ = _chunked(
            h[part], head, targets[part], t_logits[part], N, weights=step_weights(0.3, N)
        )
        parts = parts + loss
    torch.testing.assert_close(parts, whole)
