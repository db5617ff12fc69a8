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
from chatdistill.models.students import hidden_and_head


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) bool: positions t whose next token t+1 carries loss."""
    return labels[:, 1:] != -100


def forward_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give a causal LM for a (B, T) padding mask: None when every row is
    padded on the right only (as `data.collate` pads). Causal attention already keeps each real
    token from seeing the later padding, so the outputs at real positions are the same, and the
    model takes its mask-free path (no 4D mask built, causal attention kernels)."""
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True
    return None if right_padded else mask


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
        mask = forward_mask(batch["attention_mask"])
        out = self.base(input_ids=batch["input_ids"], attention_mask=mask)
        hidden = out.last_hidden_state[:, :-1][loss_positions(batch["labels"])]  # (N, H)
        v = self.vocab_size
        return lambda s: self.head(hidden[s])[:, :v]
