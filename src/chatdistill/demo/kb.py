"""Knowledge base and question wordings of Larkwood Home, the demo's fictional home-goods shop.

Everything a support answer states comes from the tables here, so a test can check every shipped
answer against them. The facts are arbitrary on purpose (prices, hours, addresses): a model can
only know them by having seen them, which is what makes a teacher trained on all labelled rows
worth distilling into a student that sees only a few labels.

Answer values are written so that none is a token-bounded part of another value of the same
intent (`chatdistill.evaluate.scores.answer_correct` could not tell them apart otherwise).
"""

from dataclasses import dataclass

SHOP = "Larkwood Home"
SYSTEM_PROMPT = f"You are the customer support assistant of {SHOP}. Answer briefly and exactly."


@dataclass(frozen=True)
class Product:
    name: str
    category: str
    price: str
    colours: str
    weight: str


# name, category, price, colours (in the order the answer states them), weight
PRODUCTS = [
    Product("Alder desk lamp", "lighting", "€49.90", "sage, sand and charcoal", "1.8 kg"),
    Product("Birch floor lamp", "lighting", "€129.00", "white and black", "6.4 kg"),
    Product("Cedar pendant light", "lighting", "€84.50", "brass and slate", "2.3 kg"),
    Product("Dune wall light", "lighting", "€39.95", "ivory, rust and navy", "0.9 kg"),
    Product("Ember table lamp", "lighting", "€62.00", "ochre and teal", "2.7 kg"),
    Product("Fern reading lamp", "lighting", "€74.90", "forest green and white", "3.1 kg"),
    Product("Glade string lights", "lighting", "€19.90", "warm white", "0.4 kg"),
    Product("Heron lantern", "lighting", "€27.50", "black, copper and sage", "1.2 kg"),
    Product("Isle wool blanket", "textiles", "€89.00", "oatmeal and charcoal", "1.6 kg"),
    Product("Juniper cushion", "textiles", "€24.90", "rust, mustard and blush", "0.6 kg"),
    Product("Kestrel throw", "textiles", "€54.00", "navy and cream", "1.1 kg"),
    Product("Linden bath towel", "textiles", "€16.50", "white, stone and sea blue", "0.7 kg"),
    Product("Moss rug", "textiles", "€149.00", "moss green and grey", "5.2 kg"),
    Product("Nettle bed linen set", "textiles", "€99.90", "linen, clay and white", "2.2 kg"),
    Product("Otter duvet", "textiles", "€119.00", "snow white", "2.9 kg"),
    Product("Pebble curtain", "textiles", "€44.90", "dove grey and olive", "1.3 kg"),
    Product("Quill kitchen knife", "kitchen", "€59.00", "steel and walnut", "0.3 kg"),
    Product("Rowan teapot", "kitchen", "€36.90", "cobalt, cream and matte black", "1.0 kg"),
    Product("Sorrel mug set", "kitchen", "€28.00", "speckled white and terracotta", "1.5 kg"),
    Product("Thistle chopping board", "kitchen", "€33.50", "oak and walnut", "2.0 kg"),
    Product("Umber cast-iron pan", "kitchen", "€69.90", "black and cherry red", "3.6 kg"),
    Product("Vale coffee grinder", "kitchen", "€47.00", "copper and silver", "1.4 kg"),
    Product("Willow fruit bowl", "kitchen", "€22.90", "natural and dark stain", "0.8 kg"),
    Product("Yarrow salad bowl", "kitchen", "€31.00", "olive wood", "1.7 kg"),
    Product("Acorn bookshelf", "furniture", "€239.00", "oak, ash and white", "28 kg"),
    Product("Brook side table", "furniture", "€79.00", "walnut and black", "7.5 kg"),
    Product("Clover armchair", "furniture", "€349.00", "mustard, teal and grey", "19 kg"),
    Product("Drift coffee table", "furniture", "€189.00", "oak and smoked oak", "16 kg"),
    Product("Elm dining chair", "furniture", "€119.50", "natural and black", "6.1 kg"),
    Product("Flint desk", "furniture", "€279.00", "white oak and graphite", "31 kg"),
    Product("Grove wardrobe", "furniture", "€599.00", "white and pine", "84 kg"),
    Product("Harbor bed frame", "furniture", "€449.00", "ash and charcoal", "46 kg"),
    Product("Iris watering can", "garden", "€18.90", "zinc and green", "0.5 kg"),
    Product("Jasper planter", "garden", "€42.00", "terracotta and stone", "4.8 kg"),
    Product("Kelp garden bench", "garden", "€219.00", "teak", "22 kg"),
    Product("Lark bird feeder", "garden", "€14.95", "red and green", "0.65 kg"),
    Product("Maple hammock", "garden", "€65.00", "striped blue and sunset orange", "1.9 kg"),
    Product("North parasol", "garden", "€139.00", "ecru and anthracite", "9.3 kg"),
    Product("Oak fire pit", "garden", "€169.00", "corten steel", "14 kg"),
    Product("Poppy plant stand", "garden", "€57.50", "bamboo and black", "3.4 kg"),
]

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Store:
    city: str
    address: str
    hours: tuple[str, ...]  # one entry per WEEKDAYS day: "HH:MM-HH:MM" or "closed"


STORES = [
    Store(
        "Utrecht",
        "Oudegracht 112",
        ("09:00-18:00",) * 3 + ("09:00-21:00", "09:00-18:00", "10:00-17:00", "closed"),
    ),
    Store(
        "Ghent",
        "Veldstraat 41",
        ("closed",) + ("10:00-18:30",) * 4 + ("09:30-18:00", "12:00-17:00"),
    ),
    Store(
        "Lyon",
        "Rue Mercière 18",
        ("closed",) + ("10:00-19:00",) * 5 + ("closed",),
    ),
    Store(
        "Porto",
        "Rua de Santa Catarina 205",
        ("10:00-20:00",) * 6 + ("11:00-19:00",),
    ),
    Store(
        "Leipzig",
        "Grimmaische Straße 9",
        ("09:30-19:00",) * 5 + ("09:30-16:00", "closed"),
    ),
    Store(
        "Aarhus",
        "Søndergade 27",
        ("10:00-17:30",) * 4 + ("10:00-19:00", "10:00-16:00", "closed"),
    ),
    Store(
        "Bologna",
        "Via dell'Indipendenza 54",
        ("15:30-19:30",) + ("09:30-19:30",) * 5 + ("10:30-13:00",),
    ),
    Store(
        "Graz",
        "Herrengasse 7",
        ("08:30-18:00",) * 5 + ("08:30-17:00", "closed"),
    ),
]


@dataclass(frozen=True)
class Shipping:
    country: str
    standard_time: str
    standard_cost: str
    express_time: str
    express_cost: str


SHIPPING = [
    Shipping("the Netherlands", "1-2 business days", "€3.95", "1 business day", "€8.95"),
    Shipping("Belgium", "2-3 business days", "€4.95", "1 business day", "€9.50"),
    Shipping("Germany", "2-3 business days", "€5.50", "1-2 business days", "€11.00"),
    Shipping("France", "3-4 business days", "€6.90", "2 to 3 business days", "€13.90"),
    Shipping("Luxembourg", "2-4 business days", "€5.95", "1-2 business days", "€12.50"),
    Shipping("Austria", "3-5 business days", "€7.50", "2 to 3 business days", "€15.00"),
    Shipping("Denmark", "3-5 business days", "€8.90", "2 to 3 business days", "€16.50"),
    Shipping("Sweden", "4-6 business days", "€9.90", "2 to 4 business days", "€18.90"),
    Shipping("Finland", "5-7 business days", "€11.50", "3 to 4 business days", "€21.00"),
    Shipping("Ireland", "4-6 business days", "€10.50", "2 to 4 business days", "€19.50"),
    Shipping("Spain", "4-7 business days", "€8.50", "2 to 4 business days", "€17.90"),
    Shipping("Portugal", "5-8 business days", "€9.50", "3 to 5 business days", "€18.50"),
    Shipping("Italy", "4-6 business days", "€8.20", "2 to 4 business days", "€16.90"),
    Shipping("Poland", "3-6 business days", "€7.90", "2 to 3 business days", "€14.50"),
    Shipping("Czechia", "3-5 business days", "€7.20", "2 to 3 business days", "€14.00"),
    Shipping("Norway", "6-9 business days", "€14.90", "3 to 5 business days", "€29.00"),
]

# How long a customer has to return an item, per product category.
RETURN_WINDOWS = {
    "lighting": "30 days",
    "textiles": "60 days",
    "kitchen": "45 days",
    "furniture": "14 days",
    "garden": "21 days",
}
# How customers name a category in a question.
CATEGORY_WORDS = {
    "lighting": "lamps and lights",
    "textiles": "textiles",
    "kitchen": "kitchenware",
    "furniture": "furniture",
    "garden": "garden items",
}

# Single facts: intent -> (answer value, assistant sentence containing it).
POLICIES = {
    "return_conditions": (
        "unused and in the original packaging",
        "Returned items must be unused and in the original packaging.",
    ),
    "refund_time": (
        "8 working days",
        "We refund you within 8 working days of receiving your return.",
    ),
    "return_cost": (
        "€5.95",
        "A return label costs €5.95, which we deduct from your refund.",
    ),
    "contact_email": (
        "help@larkwood-home.example",
        "You can email us at help@larkwood-home.example.",
    ),
    "contact_phone": (
        "+31 30 555 0142",
        "You can call us on +31 30 555 0142.",
    ),
    "phone_hours": (
        "08:00-20:00 on weekdays",
        "Our phone line is open 08:00-20:00 on weekdays.",
    ),
    "trade_email": (
        "trade@larkwood-home.example",
        "For business and bulk orders, email trade@larkwood-home.example.",
    ),
    "payment": (
        "card, PayPal, iDEAL and bank transfer",
        "We accept card, PayPal, iDEAL and bank transfer.",
    ),
    "gift_card": (
        "3 years",
        "Gift cards are valid for 3 years from the date of purchase.",
    ),
}

# The assistant sentence of each per-entity intent; the slot holding the fact is its answer.
ANSWERS = {
    "price": "The {product} costs {price}.",
    "colours": "The {product} comes in {colours}.",
    "weight": "The {product} weighs {weight}.",
    "hours_open": "On {day} the {city} store is open {hours}.",
    "hours_closed": "On {day} the {city} store is closed.",
    "address": "The {city} store is at {address}.",
    "ship_time": "{Method} delivery to {country} takes {time}.",
    "ship_cost": "{Method} shipping to {country} costs {cost}.",
    "return_window": "You can return {category_words} within {window} of delivery.",
}

# Which slots pin down a fact of each intent; intents not listed are single shop-wide facts.
INTENT_SLOTS: dict[str, tuple[str, ...]] = {
    "price": ("product",),
    "colours": ("product",),
    "weight": ("product",),
    "hours": ("city", "day"),
    "address": ("city",),
    "ship_time": ("country", "method"),
    "ship_cost": ("country", "method"),
    "return_window": ("category_words",),
    **{intent: () for intent in POLICIES},
}
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "product": tuple(p.name for p in PRODUCTS),
    "city": tuple(s.city for s in STORES),
    "day": WEEKDAYS,
    "country": tuple(s.country for s in SHIPPING),
    "method": ("standard", "express"),
    "category_words": tuple(CATEGORY_WORDS.values()),
}


@dataclass(frozen=True)
class Fact:
    """One checkable fact: the assistant sentence `text` states `answer` verbatim."""

    intent: str
    slots: tuple[tuple[str, str], ...]  # (slot, value) in INTENT_SLOTS order
    answer: str
    text: str


def fact(intent: str, slots: dict[str, str]) -> Fact:
    """The KB fact for `intent` about `slots` (only the intent's own slots are read)."""
    own = {k: slots[k] for k in INTENT_SLOTS[intent]}
    key = tuple(own.items())
    if intent in POLICIES:
        answer, text = POLICIES[intent]
        return Fact(intent, key, answer, text)
    if intent in ("price", "colours", "weight"):
        p = next(p for p in PRODUCTS if p.name == own["product"])
        answer = getattr(p, intent)
        return Fact(intent, key, answer, ANSWERS[intent].format(product=p.name, **{intent: answer}))
    if intent in ("hours", "address"):
        s = next(s for s in STORES if s.city == own["city"])
        if intent == "address":
            return Fact(intent, key, s.address, ANSWERS["address"].format(**own, address=s.address))
        hours = s.hours[WEEKDAYS.index(own["day"])]
        form = "hours_closed" if hours == "closed" else "hours_open"
        return Fact(intent, key, hours, ANSWERS[form].format(**own, hours=hours))
    if intent in ("ship_time", "ship_cost"):
        s = next(s for s in SHIPPING if s.country == own["country"])
        kind = "time" if intent == "ship_time" else "cost"
        answer = getattr(s, f"{own['method']}_{kind}")
        text = ANSWERS[intent].format(
            Method=own["method"].capitalize(), country=s.country, **{kind: answer}
        )
        return Fact(intent, key, answer, text)
    category = next(c for c, w in CATEGORY_WORDS.items() if w == own["category_words"])
    window = RETURN_WINDOWS[category]
    return Fact(intent, key, window, ANSWERS[intent].format(**own, window=window))


def all_facts() -> list[Fact]:
    """Every fact in the KB, in a fixed order (intent, then slot values)."""
    from itertools import product

    facts = []
    for intent, names in INTENT_SLOTS.items():
        for values in product(*(SLOT_VALUES[n] for n in names)):
            facts.append(fact(intent, dict(zip(names, values, strict=True))))
    return facts
