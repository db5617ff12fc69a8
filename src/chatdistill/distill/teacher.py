"""Teachers: where the training loop gets the teacher's distribution for each loss position.

A teacher's `targets(batch, examples)` returns a function from a slice of the selected positions
(N = positions whose next token carries loss, row-major over the batch) to that slice's teacher
logits (n, V) or `SparseLogprobs`. The loss calls it one chunk at a time.
"""

from collections.abc import Callable
from typing import Protocol

import torch

from chatdistill.data import Example
from chatdistill.distill.divergences import Teacher
from chatdistill.distill.positions import hidden_at_loss_positions
from chatdistill.models import hidden_and_head


class TeacherSource(Protocol):
    def targets(
        self, batch: dict[str, torch.Tensor], examples: list[Example]
    ) -> Callable[[slice], Teacher]: ...


class LiveTeacher:
    """Runs the teacher model on each batch, without gradients, selected positions only."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        self.model = model.eval().requires_grad_(False)
        self.vocab_size = vocab_size
        self.base, self.head = hidden_and_head(model)

    @torch.no_grad()
    def targets(
        self, batch: dict[str, torch.Tensor], examples: list[Example]
    ) -> Callable[[slice], Teacher]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hidden = hidden_at_loss_positions(self.base, ids, mask, labels)  # (N, H)
        v = self.vocab_size
        return lambda s: self.head(hidden[s])[:, :v]
