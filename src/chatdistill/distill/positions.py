"""A causal LM's hidden states at the loss positions of a padded batch: what the student's loss,
the live teacher and the teacher cache all project to the vocabulary, and nothing more."""

import torch

from chatdistill.data import loss_positions


def forward_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give a causal LM for a (B, T) padding mask: None when every row is
    padded on the right only (as `data.collate` pads). Causal attention already keeps each real
    token from seeing the later padding, so the outputs at real positions are the same, and the
    model takes its mask-free path (no 4D mask built, causal attention kernels)."""
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) if mask.shape[1] > 1 else True
    return None if right_padded else mask


def hidden_at_loss_positions(
    base: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Run the model's body (`models.students.hidden_and_head`) over the batch, (B, T) each, and
    keep the last hidden states at `data.loss_positions`, row-major: (N, H)."""
    out = base(input_ids=input_ids, attention_mask=forward_mask(attention_mask))
    return out.last_hidden_state[:, :-1][loss_positions(labels)]
