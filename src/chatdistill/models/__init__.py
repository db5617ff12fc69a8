"""Models at the bottom of the pipeline: the one loader every command uses (Hugging Face
directories, GGUF files, hub ids asked for with `hf:`), the vocabulary check, students cut from
teachers."""

from chatdistill.models.load import (
    DTYPES,
    PRECISIONS,
    default_dtype,
    fast_bf16,
    inference_dtype,
    load_model,
    load_pretrained,
    load_tokenizer,
)
from chatdistill.models.source import ModelSource, resolve
from chatdistill.models.students import (
    block_cut,
    count_parameters,
    cut_student,
    even_layers,
    hidden_and_head,
    student_from_config,
)
from chatdistill.models.vocab import check_vocab, tokenizer_fingerprint

__all__ = [
    "block_cut",
    "DTYPES",
    "ModelSource",
    "check_vocab",
    "count_parameters",
    "cut_student",
    "PRECISIONS",
    "default_dtype",
    "inference_dtype",
    "even_layers",
    "hidden_and_head",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "fast_bf16",
    "resolve",
    "student_from_config",
    "tokenizer_fingerprint",
]
