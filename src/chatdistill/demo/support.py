"""Support-desk conversations about Larkwood Home, generated from the KB and question wordings.

Design (why the demo can show what distillation buys):
- Facts are spread evenly over the train rows (each KB fact is the final answer of about
  `train / len(facts)` rows), so a teacher trained on all of them can know every fact while a
  10% labelled subset misses a good share of them.
- Each question wording belongs to one split only, so test accuracy measures answering new
  phrasings about known facts, not recalling training sentences.
- Assistant sentences are fixed per intent and short, so a few-million-parameter model learns the
  form quickly and spends its capacity on the facts.
"""

import random
import re

from chatdistill.demo.data import SPLITS
from chatdistill.demo.kb import INTENT_SLOTS, SLOT_VALUES, SYSTEM_PROMPT, Fact, all_facts, fact
from chatdistill.demo.questions import CLOSERS, FOLLOW_UPS, OPENERS, QUESTIONS, FollowUp

SUPPORT_SIZES = {"train": 2000, "validation": 200, "test": 300}
# Wordings per intent (and per follow-up kind) held out for validation and test.
HELD_OUT = {"questions": (2, 3), "follow_ups": (1, 2)}
MULTI_TURN = 0.3  # share of rows that end with a follow-up question
SYSTEM_SHARE = 0.2  # share of rows that start with the shop's system prompt
_SLOT = re.compile(r"\{(\w+)\}")


def wording_splits(seed: int) -> dict[str, dict[str, list[int]]]:
    """Which wordings each split may use: {split: {wording group id: [indices]}}.

    Groups are question intents ("price") and follow-up kinds ("price>colours").
    """
    groups = {intent: len(ws) for intent, ws in QUESTIONS.items()}
    groups.update({follow_up_id(f): len(f.wordings) for f in FOLLOW_UPS})
    out: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    for group, n in groups.items():
        n_val, n_test = HELD_OUT["questions" if group in QUESTIONS else "follow_ups"]
        order = list(range(n))
        random.Random(f"{seed}/wordings/{group}").shuffle(order)
        out["test"][group] = sorted(order[:n_test])
        out["validation"][group] = sorted(order[n_test : n_test + n_val])
        out["train"][group] = sorted(order[n_test + n_val :])
    return out


def follow_up_id(f: FollowUp) -> str:
    return f"{f.first}>{f.then}" + (f":{f.change}" if f.change else "")


def _typo(text: str, rng: random.Random) -> str:
    """Swap two inner letters of one word, or drop one: the slips real customers make."""
    words = [i for i, w in enumerate(text.split(" ")) if len(w) >= 4 and w.isalpha()]
    if not words:
        return text
    parts = text.split(" ")
    i = rng.choice(words)
    w = parts[i]
    j = rng.randrange(1, len(w) - 2)
    parts[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :] if rng.random() < 0.5 else w[:j] + w[j + 1 :]
    return " ".join(parts)


def _ask(wording: str, slots: dict[str, str], rng: random.Random) -> str:
    """Fill a wording; typos touch only its own words, never the product, city or country."""
    pieces = _SLOT.split(wording)  # literal, slot, literal, slot, ...
    typo_at = rng.randrange(0, len(pieces), 2) if rng.random() < 0.15 else -1
    text = "".join(
        slots[p] if k % 2 else (_typo(p, rng) if k == typo_at else p) for k, p in enumerate(pieces)
    )
    text = text[0].upper() + text[1:]
    if rng.random() < 0.25:
        text = text.lower().rstrip("?.!")
    if rng.random() < 0.15:
        text = rng.choice(OPENERS) + text
    if rng.random() < 0.15:
        text = text + rng.choice(CLOSERS)
    return text


def _slots_of(f: Fact) -> dict[str, str]:
    return dict(f.slots)


def _context(target: Fact, fu: FollowUp, rng: random.Random) -> Fact:
    """The first-turn fact a follow-up leans on: same entity, except the `change` slot."""
    target_slots = _slots_of(target)
    slots = {}
    for name in INTENT_SLOTS[fu.first]:
        if name == fu.change or name not in target_slots:
            others = [v for v in SLOT_VALUES[name] if v != target_slots.get(name)]
            slots[name] = rng.choice(others)
        else:
            slots[name] = target_slots[name]
    return fact(fu.first, slots)


def _row(target: Fact, allowed: dict[str, list[int]], rng: random.Random) -> dict[str, object]:
    messages: list[dict[str, str]] = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    follow_ups = [f for f in FOLLOW_UPS if f.then == target.intent]
    wordings = []
    if follow_ups and rng.random() < MULTI_TURN:
        fu = rng.choice(follow_ups)
        first = _context(target, fu, rng)
        q = rng.choice(allowed[first.intent])
        wordings.append(f"{first.intent}/{q}")
        messages.append(
            {"role": "user", "content": _ask(QUESTIONS[first.intent][q], _slots_of(first), rng)}
        )
        messages.append({"role": "assistant", "content": first.text})
        k = rng.choice(allowed[follow_up_id(fu)])
        wordings.append(f"{follow_up_id(fu)}/{k}")
        question = _ask(fu.wordings[k], _slots_of(target), rng)
    else:
        q = rng.choice(allowed[target.intent])
        wordings.append(f"{target.intent}/{q}")
        question = _ask(QUESTIONS[target.intent][q], _slots_of(target), rng)
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": target.text})
    return {
        "messages": messages,
        "source": "support",
        "lang": "en",
        "intent": target.intent,
        "answer": target.answer,
        "wordings": wordings,
    }


def build_support_data(
    seed: int, sizes: dict[str, int] | None = None
) -> dict[str, list[dict[str, object]]]:
    """Support conversations per split ({"train", "validation", "test"} -> rows).

    Every split walks the facts in reshuffled rounds, so each fact is the final answer of
    `size / len(facts)` rows (rounded either way) and the train split holds every fact when
    `sizes["train"] >= len(facts)`. Deterministic for `seed`.
    """
    sizes = SUPPORT_SIZES if sizes is None else sizes
    facts = all_facts()
    allowed = wording_splits(seed)
    out = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}/support/{split}")
        targets: list[Fact] = []
        while len(targets) < sizes[split]:
            round_ = list(facts)
            rng.shuffle(round_)
            targets.extend(round_)
        out[split] = [_row(t, allowed[split], rng) for t in targets[: sizes[split]]]
    return out
