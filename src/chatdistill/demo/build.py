"""Build the shipped demo data (`assets/demo/`): generate it, write the files and their README.

Two parts, mixed in every split and told apart by each row's `source`:
- `support`: Larkwood Home's support desk (see `kb.py`), each row with the checkable `answer` of
  its final turn and its `intent`;
- `chatterbot/<language>/<file>`: human-written small talk in several languages.

The shipped files are a deterministic function of `DEMO_SEED`; a test rebuilds them and compares,
so they cannot drift from this code. Regenerate with `python scripts/build_demo_data.py`. Run time
reads the files with `chatdistill.demo.data` and never imports this module.
"""

import random
from collections import Counter
from pathlib import Path

from chatdistill.demo.chatterbot import build_chatterbot_data, convert_chatterbot, corpus_dir
from chatdistill.demo.data import SPLITS, jsonl_text, labelled_subset
from chatdistill.demo.kb import PRODUCTS, SHIPPING, SHOP, STORES, Fact, all_facts
from chatdistill.demo.support import build_support_data
from chatdistill.models.tokenizer import train_bpe_tokenizer

DEMO_SEED = 0
TOKENIZER_VOCAB = 4096
FACTS: list[Fact] = all_facts()


def build_demo_splits(seed: int = DEMO_SEED) -> dict[str, list[dict[str, object]]]:
    """Support and chatterbot rows per split, shuffled together (deterministic for `seed`)."""
    support = build_support_data(seed)
    chatterbot = build_chatterbot_data(seed)
    out = {}
    for split in SPLITS:
        rows = support[split] + chatterbot[split]
        random.Random(f"{seed}/mix/{split}").shuffle(rows)
        out[split] = rows
    return out


def facts_missing(rows: list[dict[str, object]]) -> list[Fact]:
    """KB facts that no assistant turn of `rows` states: what a model trained only on `rows`
    cannot know."""
    stated = {m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"}
    return [f for f in FACTS if f.text not in stated]


def train_demo_tokenizer(train_rows: list[dict[str, object]], vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE (ChatML template) trained on the train split's turns and role names."""
    texts = [f"{m['role']}\n{m['content']}" for r in train_rows for m in r["messages"]]
    return train_bpe_tokenizer(texts, vocab_size=vocab_size)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_readme(splits: dict[str, list[dict[str, object]]], dropped: Counter, seed: int) -> str:
    """The assets README: what the data is, sizes per split and language, licence, provenance."""
    langs = sorted({r["lang"] for rows in splits.values() for r in rows})
    sizes = []
    for split, rows in splits.items():
        per_lang = Counter(r["lang"] for r in rows if r["source"] != "support")
        support = sum(r["source"] == "support" for r in rows)
        sizes.append([split, len(rows), support, *(per_lang[c] for c in langs)])
    support_train = [r for r in splits["train"] if r["source"] == "support"]
    missed = [len(facts_missing(labelled_subset(support_train, 0.1, k))) for k in range(3)]
    intents = Counter(f.intent for f in FACTS)
    reasons = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(dropped.items()))
    return f"""# Demo data

The data behind `make demo`, built by `python scripts/build_demo_data.py` (seed {seed}; the
output is deterministic and a test checks these files equal a fresh build).

Files: `train.jsonl`, `validation.jsonl`, `test.jsonl` (chat rows `{{"messages": [...],
"source": ..., "lang": ...}}`) and `tokenizer/` (byte-level BPE, {TOKENIZER_VOCAB} entries,
ChatML chat template, trained on the train split).

## Parts

**Support desk (`source: "support"`)**, written for this project: customers of {SHOP}, a
fictional home-goods shop, ask about {len(FACTS)} facts of its knowledge base
(`chatdistill/demo/kb.py`): prices, colours and weights of {len(PRODUCTS)} products, opening
hours of {len(STORES)} stores per weekday and their addresses, standard and express shipping
times and costs to {len(SHIPPING)} countries, return rules, contacts and payment. Each row
carries `intent`, `answer` (the exact fact its final assistant turn states, for scoring by
normalised containment) and `wordings` (ids of the question wordings it uses).

Every fact is the final answer of {len(support_train) // len(FACTS)} or more train rows, so a
model trained on all train rows can know all of them, while no assistant turn of a random 10%
of the train rows states {min(missed)}-{max(missed)} of the {len(FACTS)} facts (three draws).
Question wordings are split: validation and test ask in wordings the train split never uses.
Some rows are two-turn (a follow-up such as "And on Sunday?"), some open with a system prompt,
some carry typos or casual phrasing.
Facts per intent: {", ".join(f"{k} {v}" for k, v in intents.items())}.

**Small talk (`source: "chatterbot/<language>/<file>"`)**: human-written dialogues from the
[chatterbot-corpus](https://github.com/gunthercox/chatterbot-corpus) package, version 1.3.x,
converted from its YAML files: statements alternate user / assistant, a trailing user statement
is cut, broken or repeated entries are dropped ({reasons}).

## Sizes

Rows per split; small-talk rows per language code.

{_table(["split", "rows", "support", *langs], sizes)}

The prompts the demo's teacher answers are the train rows without their final assistant turn
(`chatdistill.demo.data.load_demo_split("prompts")`).

## Licence

The support-desk part is the project's own (Apache-2.0, like the code). The small-talk part is
derived from chatterbot-corpus by Gunther Cox and contributors, distributed under the BSD
licence; its copyright notice and licence terms apply to those rows.
"""


def write_demo_assets(out_dir: Path, seed: int = DEMO_SEED) -> dict[str, int]:
    """Write the shipped demo files to `out_dir`; return rows per split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = build_demo_splits(seed)
    for split, rows in splits.items():
        (out_dir / f"{split}.jsonl").write_text(jsonl_text(rows), encoding="utf-8")
    train_demo_tokenizer(splits["train"]).save_pretrained(out_dir / "tokenizer")
    _, dropped = convert_chatterbot(corpus_dir())
    (out_dir / "README.md").write_text(render_readme(splits, dropped, seed), encoding="utf-8")
    return {split: len(rows) for split, rows in splits.items()}
