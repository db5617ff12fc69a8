"""Chat data: read rows, render with the chat template, mask the loss, batch with little padding.

A row is `{"messages": [{"role": ..., "content": ...}, ...], ...}` (OpenAI chat shape, multi-turn)
or `{"prompt": ..., "completion": ...}`; other fields (e.g. `answer`) are kept. A row whose last
turn is the user's is prompt-only: on-policy training and `generate-data` answer it; modes that
need a reference answer refuse it.
"""

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from chatdistill.errors import UserError
from chatdistill.models.tokenizer import CHATML_TEMPLATE

ROLES = ("system", "user", "assistant")
IGNORE = -100
# Row field `generate-data` sets on an answer cut at --max-new-tokens (see `render_example`).
TRUNCATED = (
    "truncated"  # the label of a token that carries no loss (also PyTorch's and HF's default)
)


@dataclass
class Example:
    """One rendered conversation. `labels` is aligned with `input_ids` (IGNORE = no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_positions(self) -> int:
        """How many positions t have a next token t+1 that carries loss (see loss_positions)."""
        return sum(label != IGNORE for label in self.labels[1:])


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T-1) bool: positions t whose next token t+1 carries loss.

    Labels are aligned with input_ids (HF convention), so the output at t predicts label t+1.
    """
    return labels[:, 1:] != IGNORE


# A conversation longer than this is far beyond any context a student trains on; bounding it keeps
# one bad row from taking gigabytes in the tokenizer (its offsets cost ~100x the text's size).
MAX_ROW_BYTES = 2 << 20


def _too_long(loc: str) -> UserError:
    return UserError(
        f"{loc}: row is larger than {MAX_ROW_BYTES >> 20} MB, the most a row may hold; shorten "
        "or split it (training truncates it to data.max_length tokens anyway)"
    )


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    with path.open("rb") as f:
        n = 0
        # A bounded readline: a huge line (or a binary file without newlines) is never read whole.
        while line := f.readline(MAX_ROW_BYTES + 1):
            n += 1
            if len(line) > MAX_ROW_BYTES:
                raise _too_long(f"{path}:{n}")
            try:
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line); is it binary "
                    "or UTF-16? save the data as UTF-8 JSONL"
                ) from None
            if not text.strip():
                continue
            try:
                rows.append((n, json.loads(text)))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line"
                ) from None
            except RecursionError:
                raise UserError(
                    f"{path}:{n}: JSON nested too deeply to read; a row is an object with "
                    "'messages' (a list of {role, content} objects)"
                ) from None
    return rows


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read Parquet file ({e})") from None
    return [(n, r) for n, r in enumerate(table.to_pylist(), 1)]


def _normalise(row: object, loc: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{loc}: expected a JSON object with 'messages' or 'prompt'/'completion'")
    if "messages" not in row:
        if "prompt" in row:
            msgs = [{"role": "user", "content": row["prompt"]}]
            if row.get("completion") is not None:
                msgs.append({"role": "assistant", "content": row["completion"]})
            rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
            row = {"messages": msgs, **rest}
        else:
            raise UserError(f"{loc}: row has no 'messages' (or 'prompt'/'completion') field")
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{loc}: 'messages' must be a non-empty list of {{role, content}} objects")
    clean, size = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{loc}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(
                f"{loc}: messages[{i}] has unknown role {m['role']!r}; "
                f"use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise UserError(f"{loc}: messages[{i}].content must be a string")
        try:
            size += len(m["content"].encode("utf-8"))
        except UnicodeEncodeError as e:
            raise UserError(
                f"{loc}: messages[{i}].content has an unpaired surrogate "
                f"({m['content'][e.start]!r} at character {e.start}), which is not text; "
                "fix the text that produced it"
            ) from None
        if size > MAX_ROW_BYTES:
            raise _too_long(loc)
        clean.append({"role": m["role"], "content": m["content"]})
    if all(m["role"] == "system" for m in clean):
        raise UserError(f"{loc}: conversation has no user or assistant turn")
    return {**row, "messages": clean}


def load_rows(path: str | Path) -> list[dict]:
    """Read JSONL or Parquet chat rows, validated and normalised to the `messages` shape."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: data file not found")
    raw = _read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p)
    rows = [_normalise(r, f"{p}:{n}") for n, r in raw]
    if not rows:
        raise UserError(f"{p}: dataset is empty")
    return rows


def has_reference(messages: list[dict]) -> bool:
    """True when the conversation ends with an assistant turn (it can be trained on directly)."""
    return messages[-1]["role"] == "assistant"


def split_prompt_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """Messages before the last assistant turn and that turn's text (None for prompt-only rows)."""
    if has_reference(messages):
        return messages[:-1], messages[-1]["content"]
    return messages, None


def require_references(rows: list[dict], path: str | Path, mode: str) -> None:
    """Refuse prompt-only rows in modes that train on reference answers."""
    for n, row in enumerate(rows, 1):
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise UserError(
                f"{path}: row {n} has no assistant answer, which {mode} needs; prompt-only rows "
                "work with on-policy training (--on-policy-fraction) or `chatdistill generate-data`"
            )


def _template(tokenizer) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt.

    Message content is text, never control tokens: content that spells a special token (a user
    typing `<|im_end|>\n<|im_start|>system`) is encoded as those characters, so it cannot forge
    a turn. Content without such text encodes exactly as the template renders it.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise UserError(f"messages[{i}]: needs a 'role' and a string 'content'")
    specials = _special_texts(tokenizer)
    if not any(sp in m["content"] for m in messages for sp in specials):
        return list(
            tokenizer.apply_chat_template(
                messages,
                chat_template=_template(tokenizer),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    return _render_with_literal_content(tokenizer, messages, specials)


def _special_texts(tokenizer) -> list[str]:
    """The texts the tokenizer turns into special tokens, longest first (so that a token that
    contains another is matched whole)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = {*tokenizer.all_special_tokens, *(t.content for t in added if t.special)}
    return sorted((t for t in texts if t), key=len, reverse=True)


def _render_with_literal_content(tokenizer, messages: list[dict], specials: list[str]) -> list[int]:
    """Render with each special-token text in the content swapped for a marker the template
    copies as it is, split the rendering at the template's own special tokens, then encode each
    piece between them with the markers restored and special-token matching off."""
    used = "".join(m["content"] for m in messages)
    # Two private-use characters that no content holds bracket each marker.
    free = (c for c in map(chr, range(0xE000, 0xF900)) if c not in used)
    left, right = next(free), next(free)
    marker = {sp: f"{left}{i}{right}" for i, sp in enumerate(specials)}
    swap = re.compile("|".join(map(re.escape, specials)))
    masked = [{**m, "content": swap.sub(lambda h: marker[h[0]], m["content"])} for m in messages]
    text = tokenizer.apply_chat_template(
        masked, chat_template=_template(tokenizer), add_generation_prompt=True, tokenize=False
    )
    restore = re.compile(f"{left}(\\d+){right}")
    ids: list[int] = []
    for piece in re.split(f"({swap.pattern})", text):
        if piece in marker:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            literal = restore.sub(lambda hit: specials[int(hit[1])], piece)
            ids += tokenizer.encode(literal, add_special_tokens=False, split_special_tokens=True)
    return ids


def _render_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=_template(tokenizer),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def assistant_spans(
    tokenizer, messages: list[dict], open_end: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return its text and the character spans of assistant turns.

    Each span runs from the end of the generation prompt before the turn to the end of the
    rendering that includes it, so the turn's end-of-turn token is learned too (that is what makes
    the model stop). With `open_end` the last turn's span stops at its text: an answer that was
    cut at a length budget must not teach the model to end there.
    """
    text = _render_text(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_text(tokenizer, messages[:i], True) if i else ""
        through = _render_text(tokenizer, messages[: i + 1], False)
        if not text.startswith(through) or not through.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render conversations incrementally, so "
                "assistant tokens cannot be located; pass a tokenizer with a standard template"
            )
        end = len(through.rstrip("\n")) if through.endswith("\n") else len(through)
        at = through.find(m["content"], len(before)) if open_end and i == len(messages) - 1 else -1
        spans.append((len(before), at + len(m["content"]) if at >= 0 else end))
    return text, spans


def render_example(
    tokenizer, messages: list[dict], max_length: int, open_end: bool = False
) -> Example | None:
    """Tokenise a conversation with loss on assistant tokens only, truncated to `max_length`;
    `open_end`: the last answer was cut short, so its end-of-turn carries no loss.

    Returns None when no assistant token survives truncation (the caller counts those).
    """
    text, spans = assistant_spans(tokenizer, messages, open_end)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    labels = [IGNORE] * len(ids)
    for j, (start, end) in enumerate(offsets):
        if end > start and any(a <= start < b for a, b in spans):
            labels[j] = ids[j]
    if all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels)


@dataclass
class Dataset:
    """Rendered examples plus how many rows were dropped by truncation."""

    examples: list[Example]
    dropped: int
    open_ended: int = 0  # rows marked TRUNCATED: their last answer teaches no end-of-turn


def build_dataset(rows: list[dict], tokenizer, max_length: int, source: str) -> Dataset:
    """Render rows (all must carry an answer) into a Dataset; refuse an empty result."""
    examples, dropped, open_ended = [], 0, 0
    for row in rows:
        cut = bool(row.get(TRUNCATED))
        open_ended += cut
        ex = render_example(tokenizer, row["messages"], max_length, open_end=cut)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise UserError(
            f"{source}: no conversation keeps an assistant token within max_length={max_length}; "
            "raise data.max_length"
        )
    return Dataset(examples, dropped, open_ended)


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by conversation into (train, validation); validation gets at least one row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction)) if len(rows) > 1 else 0
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [rows[i] for i in sorted(val)]


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 64
) -> list[list[int]]:
    """Shuffle, then sort within windows of `group` batches so batches hold similar lengths.

    Deterministic in (seed, epoch): a resumed run sees the same order. Returns batches of indices.
    """
    rng = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example -> input_ids, labels, attention_mask, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def iter_batches(
    dataset: Dataset, batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[tuple[int, int, list[Example]]]:
    """Endless (epoch, batch_index, examples) stream, resumable at (start_epoch, start_batch)."""
    lengths = [len(e.input_ids) for e in dataset.examples]
    epoch = start_epoch
    while True:
        batches = length_grouped_batches(lengths, batch_size, seed, epoch)
        first = start_batch if epoch == start_epoch else 0
        for b in range(first, len(batches)):
            yield epoch, b, [dataset.examples[i] for i in batches[b]]
        epoch += 1
