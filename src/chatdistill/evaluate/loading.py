"""Every way evaluation reads a model or a tokenizer, in one place, so that one shared model
loader can replace these few functions without touching the rest of evaluation."""

from pathlib import Path

from chatdistill.errors import UserError
from chatdistill.evaluate.config import torch_dtype
from chatdistill.inference.engine import Engine
from chatdistill.models.students import check_vocab, load_tokenizer


def check_model_dir(path: str, flag: str) -> None:
    """Refuse a path that is not a saved model directory, naming the flag that gave it."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{flag} {path}: no such model directory; pass a saved model dir")
    if not (p / "config.json").is_file():
        raise UserError(
            f"{flag} {path}: no config.json there; pass a directory from save_pretrained"
        )


def check_tokenizers(teacher: str, others: list[tuple[str, str]]) -> None:
    """Refuse a model whose tokenizer differs from the teacher's; `others` are (path, flag).
    Tokenizers only: a mismatched student fails in seconds, before any model runs."""
    teacher_tok = load_tokenizer(teacher, "--teacher")
    for path, flag in others:
        try:
            check_vocab(teacher_tok, load_tokenizer(path, flag))
        except UserError as e:
            raise UserError(f"{flag} {path}: {e}") from None


def load_engine(path: str, device: str | None, dtype: str | None) -> Engine:
    """A model directory as a generation engine, on `device` in `dtype` (None: defaults)."""
    return Engine.load(path, device=device, dtype=torch_dtype(dtype))


def pad_id(tokenizer) -> int:
    """The id scoring pads batches with: the tokenizer's pad, else its end of sequence, else 0."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
