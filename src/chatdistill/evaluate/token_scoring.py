"""A model scored on the reference answers' tokens: CE, and KL and top-1 agreement to the
teacher. This runs the models; the arithmetic on logits is `scores.position_scores`."""

import torch

from chatdistill.data import Example, collate
from chatdistill.distill.positions import hidden_at_loss_positions
from chatdistill.evaluate import scores
from chatdistill.models.students import hidden_and_head


def scored_logits(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """The model's logits at the scored positions of a right-padded batch, (N, V): the body runs
    over every token, the vocabulary projection only where a label is scored (a tenth of the
    positions of a chat with a long system prompt, and the projection is a large share of a
    small model's work)."""
    base, head = hidden_and_head(model)
    return head(hidden_at_loss_positions(base, ids, mask, labels))


@torch.no_grad()
def score(
    model, examples: list[Example], batch_size: int, pad_id: int, teacher=None, vocab_size=None
) -> scores.TokenSums:
    """Token-weighted CE of `model` on the examples' assistant tokens; with `teacher`, also
    KL(teacher||model) and top-1 agreement on the same tokens. Batches are length-sorted so
    padding stays small."""
    sums = scores.TokenSums()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[b : b + batch_size]], pad_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        logits = scored_logits(model, ids, mask, labels)
        t_logits = None
        if teacher is not None:
            t_dev = next(teacher.parameters()).device
            t_logits = scored_logits(teacher, ids.to(t_dev), mask.to(t_dev), labels.to(t_dev))
            t_logits = t_logits.to(device)
        _, targets = scores.scored_positions(labels)
        sums.add(scores.position_scores(logits, targets, t_logits, vocab_size))
    return sums
