"""A model scored on the reference answers' tokens: CE, and KL and top-1 agreement to the
teacher. This runs the models; the arithmetic on logits is `scores.token_scores`."""

import torch

from chatdistill.data import Example, collate
from chatdistill.evaluate import scores


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
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        t_logits = None
        if teacher is not None:
            t_dev = next(teacher.parameters()).device
            t_logits = teacher(input_ids=ids.to(t_dev), attention_mask=mask.to(t_dev)).logits
            t_logits = t_logits.to(device)
        sums.add(scores.token_scores(logits, batch["labels"].to(device), t_logits, vocab_size))
    return sums
