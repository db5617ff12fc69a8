"""Grounded support rows: the shop's notes on the entities a question is about, in the system
prompt, as a retrieval-backed support bot gets them.

A pretrained chat model brings reading and answering from notes; what it cannot bring is a
fictional shop's prices. So the demo on a real teacher asks the support questions with the
relevant knowledge-base card in the system prompt:
the teacher adapts to the desk's style in a few LoRA steps, and a student cut from it must keep
the skill of finding the fact in the notes, not memorise 262 facts.

The shipped rows stay ungrounded (the test fixtures train on them); `ground_row` derives the
grounded form at run time from the facts the row's assistant turns state.
"""

from chatdistill.demo.kb import (
    CATEGORY_WORDS,
    POLICIES,
    PRODUCTS,
    RETURN_WINDOWS,
    SHIPPING,
    SHOP,
    STORES,
    WEEKDAYS,
    Fact,
    all_facts,
)

GROUNDED_PROMPT = (
    f"You are the customer support assistant of {SHOP}. Answer briefly and exactly, "
    "using only these notes:\n"
)
_BY_TEXT: dict[str, Fact] = {f.text: f for f in all_facts()}


def _product_card(name: str) -> str:
    p = next(p for p in PRODUCTS if p.name == name)
    return (
        f"- {p.name}: price {p.price}; colours {p.colours}; weight {p.weight}; "
        f"returns within {RETURN_WINDOWS[p.category]}."
    )


def _store_card(city: str) -> str:
    s = next(s for s in STORES if s.city == city)
    hours = ", ".join(f"{d} {h}" for d, h in zip(WEEKDAYS, s.hours, strict=True))
    return f"- {s.city} store: {s.address}. Hours: {hours}."


def _shipping_card(country: str) -> str:
    s = next(s for s in SHIPPING if s.country == country)
    return (
        f"- Shipping to {s.country}: standard {s.standard_time}, {s.standard_cost}; "
        f"express {s.express_time}, {s.express_cost}."
    )


def _returns_card() -> str:
    windows = "; ".join(f"{CATEGORY_WORDS[c]} {w}" for c, w in RETURN_WINDOWS.items())
    return f"- Return windows: {windows}."


def _policies_card() -> str:
    return "- " + " ".join(text for _, text in POLICIES.values())


# The card of each entity slot.
_CARDS = {"product": _product_card, "city": _store_card, "country": _shipping_card}


def card_for(f: Fact) -> str:
    """The card of notes that states `f` (a product's, a store's, a country's shipping, the
    return windows or the shop's policies), among other facts of the same entity."""
    slots = dict(f.slots)
    for slot, card in _CARDS.items():
        if slot in slots:
            return card(slots[slot])
    return _returns_card() if f.intent == "return_window" else _policies_card()


def ground_row(row: dict[str, object]) -> dict[str, object]:
    """A support row with the notes its answers come from in the system prompt (replacing any
    system prompt it had); other rows unchanged."""
    if row.get("source") != "support":
        return row
    messages = [m for m in row["messages"] if m["role"] != "system"]
    cards: list[str] = []
    for m in messages:
        f = _BY_TEXT.get(m["content"]) if m["role"] == "assistant" else None
        if f and card_for(f) not in cards:
            cards.append(card_for(f))
    if not cards:
        raise ValueError("ground_row needs a full support row (its answers name its notes)")
    system = {"role": "system", "content": GROUNDED_PROMPT + "\n".join(cards)}
    return {**row, "messages": [system, *messages]}
