"""Teacher and student must share one tokenizer for token-by-token distillation."""

import hashlib
import json

from chatdistill.errors import UserError


def tokenizer_fingerprint(tok) -> str:
    """A stable hash of the vocabulary and special tokens (used to compare and to key caches)."""
    vocab = sorted(tok.get_vocab().items())
    blob = json.dumps([vocab, tok.eos_token, tok.bos_token, tok.pad_token], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_vocab(teacher_tok, student_tok, teacher_model=None, student_model=None) -> int:
    """Return the shared vocabulary size, or raise if the two cannot be distilled token by token.

    Identical tokenizers are required. Embedding matrices may be padded to different sizes (as
    Qwen2.5 151936 vs 152064); then only the tokenizer's vocabulary is compared.
    """
    nt, ns = len(teacher_tok), len(student_tok)
    if nt != ns or tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise UserError(
            f"teacher and student tokenizers differ (vocab {nt} vs {ns}); distillation on logits "
            "needs the same tokenizer: cut the student from the teacher or pick one of its family"
        )
    for model, who in ((teacher_model, "teacher"), (student_model, "student")):
        if model is not None and model.get_output_embeddings().weight.shape[0] < nt:
            rows = model.get_output_embeddings().weight.shape[0]
            raise UserError(f"{who} output layer has {rows} rows, fewer than the vocab ({nt})")
    return nt
