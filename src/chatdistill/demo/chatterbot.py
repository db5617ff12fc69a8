"""Human-written small-talk dialogues from the chatterbot-corpus package, as chat rows.

The corpus (BSD licence) holds YAML files per language whose `conversations:` are lists of
statements, each answering the one before. Statements alternate user / assistant; a trailing
user statement is cut so every row ends with an answer. Broken entries are dropped and counted by
reason, so the README can say what was left out.
"""

import random
from collections import Counter
from importlib import resources
from pathlib import Path

import yaml

from chatdistill.errors import UserError

# Corpus folder -> language code. Latin-script languages with enough usable dialogues keep the
# demo tokenizer's 4096-entry vocabulary efficient.
LANGUAGES = {
    "english": "en",
    "spanish": "es",
    "german": "de",
    "french": "fr",
    "italian": "it",
    "portuguese": "pt",
    "dutch": "nl",
    "swedish": "sv",
    "indonesian": "id",
    "turkish": "tr",
}
HELD_OUT_SHARE = 0.05  # per language, for validation and again for test


def corpus_dir() -> Path:
    """The installed chatterbot-corpus data folder (one subfolder per language)."""
    try:
        root = resources.files("chatterbot_corpus") / "data"
    except ModuleNotFoundError:
        raise UserError(
            "chatterbot-corpus is not installed; run `pip install chatterbot-corpus` to rebuild "
            "the demo data"
        ) from None
    return Path(str(root))


def _turns(conversation: object, dropped: Counter) -> list[str] | None:
    """Clean statements of one conversation, or None (counted in `dropped`) when unusable."""
    if not isinstance(conversation, list):
        dropped["not_a_list"] += 1
        return None
    if not all(isinstance(t, str) for t in conversation):
        dropped["non_string_turn"] += 1
        return None
    turns = [" ".join(t.split()) for t in conversation]
    if not all(turns):
        dropped["empty_turn"] += 1
        return None
    if len(turns) % 2:
        turns = turns[:-1]
        dropped["trailing_user_turn_cut"] += 1
    if not turns:
        dropped["too_short"] += 1
        return None
    return turns


def convert_chatterbot(
    data_dir: Path, languages: dict[str, str] | None = None
) -> tuple[list[dict[str, object]], Counter]:
    """Read `data_dir/<language>/*.yml` into chat rows; return (rows, dropped counts by reason).

    Rows keep corpus order; exact duplicate dialogues within a language are dropped.
    """
    languages = LANGUAGES if languages is None else languages
    rows: list[dict[str, object]] = []
    dropped: Counter = Counter()
    for folder, code in languages.items():
        seen: set[tuple[str, ...]] = set()
        for path in sorted((data_dir / folder).glob("*.yml")):
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                dropped["unreadable_file"] += 1
                continue
            conversations = doc.get("conversations") if isinstance(doc, dict) else None
            if not isinstance(conversations, list):
                dropped["file_without_conversations"] += 1
                continue
            for conversation in conversations:
                turns = _turns(conversation, dropped)
                if turns is None:
                    continue
                if tuple(turns) in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(tuple(turns))
                roles = ("user", "assistant") * (len(turns) // 2)
                rows.append(
                    {
                        "messages": [
                            {"role": r, "content": t} for r, t in zip(roles, turns, strict=True)
                        ],
                        "source": f"chatterbot/{folder}/{path.name}",
                        "lang": code,
                    }
                )
    return rows, dropped


def split_by_language(
    rows: list[dict[str, object]], seed: int
) -> dict[str, list[dict[str, object]]]:
    """Split conversations per language: `HELD_OUT_SHARE` each to validation and test (at least
    one each where a language has three or more), the rest to train."""
    out: dict[str, list[dict[str, object]]] = {"train": [], "validation": [], "test": []}
    for code in dict.fromkeys(r["lang"] for r in rows):
        group = [r for r in rows if r["lang"] == code]
        random.Random(f"{seed}/chatterbot/{code}").shuffle(group)
        n = max(1, round(HELD_OUT_SHARE * len(group))) if len(group) >= 3 else 0
        out["test"].extend(group[:n])
        out["validation"].extend(group[n : 2 * n])
        out["train"].extend(group[2 * n :])
    return out


def build_chatterbot_data(seed: int) -> dict[str, list[dict[str, object]]]:
    """Chatterbot dialogues in `LANGUAGES` per split ({"train", "validation", "test"} -> rows)."""
    rows, _ = convert_chatterbot(corpus_dir())
    return split_by_language(rows, seed)
