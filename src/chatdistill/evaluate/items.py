"""Test conversations as evaluation uses them: what is scored, what is answered, against what."""

from dataclasses import dataclass

from chatdistill.data import Example, render_example, render_prompt, split_prompt_reference
from chatdistill.errors import UserError


@dataclass
class TestItem:
    """One test conversation: its scoring example (None if no assistant turn fits), the prompt to
    answer (messages before the last assistant turn), the reference answer and `answer` field."""

    example: Example | None
    prompt: list[dict]
    reference: str | None
    answer: str | None


def prepare_items(rows: list[dict], tokenizer, max_length: int, source: str) -> list[TestItem]:
    """Render rows into test items; refuse data with no assistant turn to score."""
    items = []
    for row in rows:
        prompt, reference = split_prompt_reference(row["messages"])
        ex = render_example(tokenizer, row["messages"], max_length)
        answer = row.get("answer")
        items.append(TestItem(ex, prompt, reference, None if answer is None else str(answer)))
    if not any(it.example is not None for it in items):
        raise UserError(
            f"{source}: no conversation has an assistant turn to score (within max_length="
            f"{max_length}); eval needs reference answers: rows ending with an assistant turn, "
            "or prompt/completion rows"
        )
    return items


def prompt_ids(engine, messages: list[dict], budget: int) -> list[int]:
    """Chat-template ids, keeping the most recent tokens when the context would overflow."""
    ids = render_prompt(engine.tokenizer, messages)
    room = max(1, engine.context_length - budget)
    return ids[-room:]
