"""One check for every export format: does the export answer like the model it came from?

`run_check` runs the same chats through the PyTorch model and through the export's own reader,
greedy, and reports how many answers are identical and how often the export's next token agrees
with the model's when both read the model's own answer (teacher forcing: a quantised export that
once picks a different word is still compared token by token afterwards), with decode speed and
size on disk. Each format supplies an `ExportReader`; `summary` is the line the CLI prints.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from chatdistill.errors import UserError
from chatdistill.evaluate import scores

# Chats used by the check when the user gives none: short, generic assistant requests.
DEFAULT_CHECK_CHATS = [
    [{"role": "user", "content": text}]
    for text in (
        "Hello! Who are you?",
        "What can you help me with?",
        "Can you tell me your opening hours?",
        "How do I return an item I bought?",
        "Please summarise our conversation so far.",
        "Thank you, that is all.",
    )
]


@dataclass
class ExportCheck:
    """How an export answers next to its source model on the same chats (greedy)."""

    chats: int
    identical_answers: int
    token_agreement: float  # export's argmax == model's token, reading the model's answer
    compared_tokens: int
    model_tokens_per_s: float  # batch 1 decode, PyTorch
    export_tokens_per_s: float | None  # batch 1 decode in the export's runtime; None: not timed
    model_bytes: int
    export_bytes: int
    first_difference: str | None  # one chat's two answers where they differ
    model_accuracy: float | None = None  # % right, given answers (an `answer` field per row)
    export_accuracy: float | None = None
    model_answers: list[str] = field(default_factory=list)
    export_answers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ExportReader(Protocol):
    """An export opened by its own runtime or reader."""

    # False where the reader is not the runtime the export is made for (a reader that
    # dequantises to float32 decodes at PyTorch's speed, not at the export's).
    timed: bool

    def answers(
        self, chats: list[list[dict]], prompts: list[list[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy answer ids (end-of-turn excluded) per chat; `prompts` are the model's own
        encodings, for readers that take ids rather than chats."""

    def agreement(self, prompt: list[int], answer: list[int]) -> int:
        """How many of `answer`'s tokens the export predicts (argmax) reading the answer so far."""

    def decode(self, ids: list[int]) -> str:
        """Text of answer ids."""


def run_check(
    engine,
    reader: ExportReader,
    model_bytes: int,
    export_bytes: int,
    chats: list[list[dict]] | None = None,
    max_new_tokens: int = 48,
    answers: list[str | None] | None = None,
) -> ExportCheck:
    """Answer `chats` greedily with `engine` (the PyTorch model) and with `reader` and compare.

    `answers` (one per chat, None where a chat has none) adds each side's answer accuracy
    (`scores.answer_correct`: the expected answer appears in the reply)."""
    from chatdistill.inference.engine import SamplingParams

    if max_new_tokens < 1:
        raise UserError(f"--check-tokens {max_new_tokens}: must be at least 1")
    chats = chats or DEFAULT_CHECK_CHATS
    if answers is not None and len(answers) != len(chats):
        raise ValueError(f"{len(answers)} answers for {len(chats)} chats")
    prompts = [engine.encode_chat(c) for c in chats]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    # Warm-up (lazy kernel and thread-pool set-up is not decode speed).
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), batch_size=1)
    started = time.perf_counter()
    ref = [c.token_ids for c in engine.generate(prompts, params, batch_size=1)]
    model_s = time.perf_counter() - started
    reader.answers(chats[:1], prompts[:1], 2)  # warm-up
    started = time.perf_counter()
    got = reader.answers(chats, prompts, max_new_tokens)
    export_s = time.perf_counter() - started
    hits = sum(reader.agreement(p, a) for p, a in zip(prompts, ref, strict=True))
    compared = sum(len(a) for a in ref)
    texts = [engine.tokenizer.decode(a, skip_special_tokens=True) for a in ref]
    export_texts = [reader.decode(b) for b in got]
    first = next(
        (
            f"model: {a!r} | export: {b!r}"
            for a, b in zip(texts, export_texts, strict=True)
            if a != b
        ),
        None,
    )
    keyed = [i for i, a in enumerate(answers or []) if a]

    def accuracy(replies: list[str]) -> float | None:
        if not keyed:
            return None
        return scores.answer_accuracy([replies[i] for i in keyed], [answers[i] for i in keyed])

    return ExportCheck(
        chats=len(chats),
        identical_answers=sum(a == b for a, b in zip(ref, got, strict=True)),
        token_agreement=hits / compared if compared else 1.0,
        compared_tokens=compared,
        model_tokens_per_s=sum(map(len, ref)) / max(model_s, 1e-9),
        export_tokens_per_s=sum(map(len, got)) / max(export_s, 1e-9) if reader.timed else None,
        model_bytes=model_bytes,
        export_bytes=export_bytes,
        first_difference=first,
        model_accuracy=accuracy(texts),
        export_accuracy=accuracy(export_texts),
        model_answers=texts,
        export_answers=export_texts,
    )


def summary(c: ExportCheck) -> list[str]:
    """The check's result as the lines the CLI prints: agreement and size side by side."""
    speed = (
        f"decode {c.export_tokens_per_s:,.0f} vs {c.model_tokens_per_s:,.0f} tokens/s (PyTorch); "
        if c.export_tokens_per_s is not None
        else ""
    )
    lines = [
        f"check on {c.chats} chats: {c.identical_answers}/{c.chats} identical answers, "
        f"next-token agreement {c.token_agreement:.1%} over {c.compared_tokens} tokens; "
        f"{speed}weights {c.export_bytes / 1e6:.1f} vs {c.model_bytes / 1e6:.1f} MB"
    ]
    if c.model_accuracy is not None:
        lines.append(
            f"answer accuracy: export {c.export_accuracy:.1f}%, model {c.model_accuracy:.1f}%"
        )
    if c.first_difference:
        lines.append(f"first differing answer: {c.first_difference}")
    return lines
