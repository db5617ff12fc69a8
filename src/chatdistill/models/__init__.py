"""Models at the bottom of the pipeline: the one loader every command uses (Hugging Face
directories, GGUF files, hub ids asked for with `hf:`), the vocabulary check, students cut from
teachers."""

from chatdistill.models.load import (
    DTYPES,
    default_dtype,
    load_model,
    load_pretrained,
    load_tokenizer,
)
from chatdistill.models.source import ModelSource, resolve
from chatdistill.models.students import (
    count_parameters,
    cut_student,
    even_layers,
    hidden_and_head,
    student_from_config,
)
from chatdistill.models.vocab import check_vocab, tokenizer_fingerprint

__all__ = [
    "DTYPES",
    "ModelSource",
    "check_vocab",
    "count_parameters",
    "cut_student",
    "default_dtype",
    "even_layers",
    "hidden_and_head",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "resolve",
    "student_from_config",
    "tokenizer_fingerprint",
]
