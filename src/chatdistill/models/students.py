"""Students: cut from a teacher (its layers kept, weights copied) or fresh from a config."""

import copy
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from chatdistill.errors import UserError, first_line


def _layer_list(model: PreTrainedModel) -> tuple[object, str]:
    """The module holding the decoder layers and the attribute name of the ModuleList."""
    base = model.base_model
    for attr in ("layers", "h", "blocks"):
        if isinstance(getattr(base, attr, None), torch.nn.ModuleList):
            return base, attr
    raise UserError(f"cannot find the decoder layers of {type(model).__name__} to cut a student")


def even_layers(n_teacher: int, n_keep: int) -> list[int]:
    """n_keep evenly spaced layer indices including the first and the last."""
    if not 1 <= n_keep <= n_teacher:
        raise UserError(f"student_num_layers={n_keep}: must be between 1 and {n_teacher}")
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_teacher - 1) / (n_keep - 1)) for i in range(n_keep)})


def cut_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student that keeps `layers` of the teacher (weights copied), everything else shared."""
    holder, attr = _layer_list(teacher)
    n = len(getattr(holder, attr))
    if not layers or any(i < 0 or i >= n for i in layers) or len(set(layers)) != len(layers):
        raise UserError(f"student_layers={layers}: need distinct indices in 0..{n - 1}")
    student = copy.deepcopy(teacher)
    s_holder, _ = _layer_list(student)
    kept = torch.nn.ModuleList([getattr(s_holder, attr)[i] for i in sorted(layers)])
    for new_idx, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # KV-cache slots are indexed by position in the stack
    setattr(s_holder, attr, kept)
    cfg = student.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(kept))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in sorted(layers)]
    student.requires_grad_(True)
    return student


@torch.no_grad()
def block_cut(model: PreTrainedModel, n_keep: int, batch: dict[str, torch.Tensor]) -> list[int]:
    """Layers to keep when cutting `model` to `n_keep` layers by removing one contiguous block,
    as Minitron's depth pruning does: of the cuts keeping the first `a` and the last
    `n_keep - a` layers (a = 1 .. n_keep - 1), the one whose next-token distributions stay
    closest to the full model's, by KL(full || cut) on the loss positions of `batch` (input_ids,
    attention_mask, labels). The model itself is left as it was."""
    from chatdistill.data import loss_positions

    holder, attr = _layer_list(model)
    full = getattr(holder, attr)
    n = len(full)
    even_layers(n, n_keep)  # the same range check as an even cut
    if n_keep in (1, n):
        return list(range(n_keep))
    pos = loss_positions(batch["labels"])

    def logprobs() -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return torch.log_softmax(out.logits[:, :-1][pos].float(), dim=-1)

    was_training = model.training
    model.eval()
    reference = logprobs()
    scored = []
    try:
        for a in range(1, n_keep):
            keep = [*range(a), *range(n - (n_keep - a), n)]
            setattr(holder, attr, torch.nn.ModuleList([full[i] for i in keep]))
            kl = (reference.exp() * (reference - logprobs())).sum(-1).mean().item()
            scored.append((kl, keep))
    finally:
        setattr(holder, attr, full)
        model.train(was_training)
    return min(scored)[1]


def student_from_config(path: str, vocab_size: int) -> PreTrainedModel:
    """A freshly initialised model from a config.json (or a model dir's config)."""
    p = Path(path)
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file():
        raise UserError(f"student_config {path}: no config.json there")
    try:
        cfg = AutoConfig.from_pretrained(str(cfg_file))
    except (OSError, ValueError) as e:
        raise UserError(f"student_config {path}: {first_line(e)}") from None
    if getattr(cfg, "vocab_size", vocab_size) < vocab_size:
        raise UserError(
            f"student_config {path}: vocab_size {cfg.vocab_size} < tokenizer vocab {vocab_size}"
        )
    return AutoModelForCausalLM.from_config(cfg)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def hidden_and_head(model: PreTrainedModel):
    """(base model, output head) so callers can select positions before the vocab projection.

    The head applies the model's final-logit softcapping where the architecture has one.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:

        def capped(h: torch.Tensor) -> torch.Tensor:
            return torch.tanh(head(h) / cap) * cap

        return model.base_model, capped
    return model.base_model, head
