"""How evaluation reads models and tokenizers: through the one model loader (`models`), so a
directory, a GGUF file or a base + adapter is evaluated alike."""

from chatdistill.errors import UserError
from chatdistill.evaluate.config import torch_dtype
from chatdistill.inference.engine import Engine
from chatdistill.models import ModelSource, check_vocab, load_tokenizer, resolve


def check_model(path: str, flag: str) -> ModelSource:
    """Resolve a model argument before anything runs (a GGUF file converts here, once); refuse
    a path that is no model, naming the flag that gave it."""
    return resolve(path, flag)


def check_tokenizers(teacher: str, others: list[tuple[str, str]]) -> None:
    """Refuse a model whose tokenizer differs from the teacher's; `others` are (path, flag).
    Tokenizers only: a mismatched student fails in seconds, before any model runs."""
    teacher_tok = load_tokenizer(teacher, "--teacher")
    for path, flag in others:
        try:
            check_vocab(teacher_tok, load_tokenizer(path, flag))
        except UserError as e:
            raise UserError(f"{flag} {path}: {e}") from None


def load_engine(path: str | ModelSource, device: str | None, dtype: str | None) -> Engine:
    """A model as a generation engine, on `device` in `dtype` (None: defaults)."""
    return Engine.load(path, device=device, dtype=torch_dtype(dtype))
