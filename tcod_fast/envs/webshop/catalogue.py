"""WebShop's products and shopping goals: a seeded offline catalogue, or WebShop's own files.

**Generated** (:func:`generate_catalogue`): WebShop's five top-level categories (beauty,
electronics, fashion, food, furniture), three product kinds each. A kind has its category path,
its search query, its nouns, a pool of attributes (``"long lasting"``), option pools
(``color``, ``size``...) and a price range. Every product draws a brand, a noun, two or three
attributes, two to four values of each option and a price; its title, features, description and
reviews are written from those. A goal picks one product, one or two of its attributes, one
value of each of its options and a price bound above its price, so that product earns reward 1.
Goals of ``valid_unseen`` are on the kinds held out of ``train`` and ``valid_seen`` (one per
top-level category, :data:`UNSEEN_KINDS`); the catalogue sold in the shop holds every kind.

**WebShop's files** (:func:`load_webshop_data`): the folder of its ``data/`` files, read as
WebShop's own loader reads them: ``items_shuffle*.json`` (a list of products: ``asin``,
``name``, ``full_description``, ``small_description``, ``pricing``, ``customization_options``,
``product_category``, ``query``, ``category``), ``items_ins_v2*.json`` (asin -> ``attributes``,
and the synthetic ``instruction`` and ``instruction_attributes``) and, when present,
``items_human_ins.json`` (asin -> list of human goals: ``instruction``,
``instruction_attributes``, ``instruction_options``). Human goals are used when that file is
there, else the synthetic ones. Prices and price bounds are drawn as WebShop draws them.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tcod_fast.envs.base import SPLITS

__all__ = [
    "KINDS",
    "UNSEEN_KINDS",
    "Catalogue",
    "Goal",
    "Product",
    "ProductKind",
    "generate_catalogue",
    "load_webshop_data",
    "missing_webshop_files",
]


@dataclass(frozen=True)
class Product:
    """One product of the shop.

    Attributes:
        asin: its id, ten characters (``B0...``); clicked in lower case.
        title: the product's name.
        product_category: ``"Top › Middle › Leaf"``.
        query: the search query the product was collected under (WebShop's ``query``).
        attributes: short phrases it has (``"long lasting"``).
        options: option name -> the values it comes in.
        price: its price in dollars.
        features: bullet points.
        description: a paragraph.
        reviews: ``(score out of 5, text)`` pairs.
    """

    asin: str
    title: str
    product_category: str
    query: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price: float
    features: tuple[str, ...] = ()
    description: str = ""
    reviews: tuple[tuple[int, str], ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Goal:
    """One shopping instruction and what buying right means.

    Attributes:
        instruction: the text shown to the agent.
        asin: the product it was written from.
        name: that product's title (for the type match).
        query: that product's query.
        product_category: that product's category path.
        attributes: attributes the bought product must have.
        goal_options: option values to choose before buying.
        price_upper: the most it may cost.
    """

    instruction: str
    asin: str
    name: str
    query: str
    product_category: str
    attributes: tuple[str, ...]
    goal_options: tuple[str, ...]
    price_upper: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Catalogue:
    """The shop's products and the goals of each split."""

    products: list[Product]
    goals: dict[str, list[Goal]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_asin = {product.asin: product for product in self.products}


@dataclass(frozen=True)
class ProductKind:
    """A kind of product the generator makes (a leaf of the category tree)."""

    category: str
    query: str
    nouns: tuple[str, ...]
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]
    price_range: tuple[float, float]


_COLORS = ("black", "white", "red", "blue", "green", "grey", "pink", "brown", "beige", "purple", "yellow", "orange")
_SIZES = ("small", "medium", "large", "petite", "tall")

#: The generator's product kinds, three per WebShop top-level category.
KINDS: tuple[ProductKind, ...] = (
    ProductKind("Beauty & Personal Care › Hair Care › Hair Extensions", "hair extensions",
                ("hair extension", "clip in hairpiece", "ponytail extension"),
                ("natural looking", "heat resistant", "easy to apply", "tangle free", "human hair"),
                {"color": ("black", "brown", "blonde", "auburn", "burgundy"), "length": ("short", "medium", "long")},
                (12.0, 60.0)),
    ProductKind("Beauty & Personal Care › Skin Care › Face Moisturizers", "face moisturizer",
                ("face cream", "moisturizing lotion", "night cream"),
                ("fragrance free", "paraben free", "cruelty free", "dry skin", "hyaluronic acid"),
                {"size": ("travel", "regular", "jumbo")},
                (8.0, 45.0)),
    ProductKind("Beauty & Personal Care › Oral Care › Toothbrushes", "electric toothbrush",
                ("electric toothbrush", "sonic toothbrush", "toothbrush kit"),
                ("long battery life", "soft bristles", "travel case", "waterproof design", "timer"),
                {"color": _COLORS[:6]},
                (15.0, 90.0)),
    ProductKind("Electronics › Headphones › Over-Ear Headphones", "wireless headphones",
                ("wireless headphones", "bluetooth headset", "over ear headphones"),
                ("noise cancelling", "long battery life", "built in microphone", "foldable", "fast charging"),
                {"color": ("black", "white", "silver", "navy", "rose")},
                (20.0, 150.0)),
    ProductKind("Electronics › Computers › Keyboards", "mechanical keyboard",
                ("mechanical keyboard", "gaming keyboard", "wireless keyboard"),
                ("backlit keys", "usb c", "compact layout", "hot swappable", "quiet typing"),
                {"color": ("black", "white", "grey", "pink"), "switch": ("linear", "tactile", "clicky")},
                (25.0, 120.0)),
    ProductKind("Electronics › Accessories › Phone Cases", "phone case",
                ("phone case", "protective cover", "wallet case"),
                ("shockproof", "slim fit", "wireless charging compatible", "card holder", "raised edges"),
                {"color": _COLORS[:8], "model": ("compact", "standard", "max")},
                (6.0, 30.0)),
    ProductKind("Clothing, Shoes & Jewelry › Men › Running Shoes", "men running shoes",
                ("running shoes", "trail sneakers", "athletic shoes"),
                ("non slip", "breathable mesh", "lightweight", "arch support", "machine washable"),
                {"color": _COLORS[:6], "size": ("7", "8", "9", "10", "11", "12")},
                (30.0, 140.0)),
    ProductKind("Clothing, Shoes & Jewelry › Women › Dresses", "women summer dress",
                ("summer dress", "maxi dress", "casual sundress"),
                ("short sleeve", "high waist", "button front", "pockets", "flowy hem"),
                {"color": _COLORS[2:10], "size": _SIZES},
                (18.0, 70.0)),
    ProductKind("Clothing, Shoes & Jewelry › Accessories › Wallets", "leather wallet",
                ("leather wallet", "bifold wallet", "card wallet"),
                ("rfid blocking", "genuine leather", "coin pocket", "gift box", "minimalist"),
                {"color": ("black", "brown", "tan", "navy")},
                (10.0, 55.0)),
    ProductKind("Grocery & Gourmet Food › Snacks › Trail Mix", "healthy snack mix",
                ("trail mix", "nut mix", "snack packs"),
                ("gluten free", "non gmo", "low sugar", "high protein", "individually wrapped"),
                {"flavor": ("salted", "honey", "chocolate", "spicy"), "size": ("single", "family", "bulk")},
                (5.0, 35.0)),
    ProductKind("Grocery & Gourmet Food › Beverages › Tea", "green tea bags",
                ("green tea", "herbal tea", "tea bags"),
                ("caffeine free", "organic", "sugar free", "individually wrapped", "kosher"),
                {"flavor": ("jasmine", "mint", "lemon", "ginger", "peach")},
                (4.0, 28.0)),
    ProductKind("Grocery & Gourmet Food › Pantry › Olive Oil", "extra virgin olive oil",
                ("olive oil", "cooking oil", "olive oil bottle"),
                ("cold pressed", "first harvest", "glass bottle", "organic", "single origin"),
                {"size": ("half liter", "one liter", "gallon")},
                (9.0, 50.0)),
    ProductKind("Home & Kitchen › Furniture › Office Chairs", "ergonomic office chair",
                ("office chair", "desk chair", "task chair"),
                ("lumbar support", "adjustable height", "breathable mesh", "easy assembly", "swivel wheels"),
                {"color": ("black", "grey", "white", "blue")},
                (60.0, 300.0)),
    ProductKind("Home & Kitchen › Furniture › Bookcases", "wooden bookshelf",
                ("bookshelf", "bookcase", "storage shelf"),
                ("solid wood", "easy assembly", "space saving", "anti tip", "adjustable shelves"),
                {"color": ("walnut", "oak", "white", "black"), "tiers": ("three", "four", "five")},
                (40.0, 220.0)),
    ProductKind("Home & Kitchen › Bedding › Pillows", "memory foam pillow",
                ("memory foam pillow", "bed pillow", "cooling pillow"),
                ("hypoallergenic", "washable cover", "neck support", "cooling gel", "side sleepers"),
                {"size": ("queen", "king", "standard")},
                (15.0, 80.0)),
)

#: Kinds whose goals are held out for ``valid_unseen`` (one per top-level category).
UNSEEN_KINDS = frozenset({2, 5, 8, 11, 14})

_BRANDS = ("Aldora", "Brevik", "Corvana", "Dunmore", "Elstra", "Fennick", "Galvo", "Harlow", "Iverna", "Jolstad",
           "Kestrel", "Lumora", "Marlek", "Norvel", "Orsina", "Pellam", "Quinto", "Ravelle", "Sorvik", "Tamsin")
_OPENERS = ("i need", "i am looking for", "i want", "find me", "i would like")
_REVIEW_TEXTS = {5: "Exactly as described, would buy again.", 4: "Good value, arrived quickly.",
                 3: "It is fine for the price.", 2: "Not quite what I expected."}
_PRICE_STEPS = [10.0 * i for i in range(1, 100)]  # WebShop's price bounds


def _asin(rng: random.Random, used: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
        if asin not in used:
            used.add(asin)
            return asin


def _product(kind: ProductKind, rng: random.Random, used: set[str]) -> Product:
    brand, noun = rng.choice(_BRANDS), rng.choice(kind.nouns)
    attributes = tuple(rng.sample(kind.attributes, rng.randint(2, 3)))
    options = {
        name: tuple(sorted(rng.sample(values, rng.randint(2, min(4, len(values)))), key=values.index))
        for name, values in kind.options.items()
    }
    low, high = kind.price_range
    price = round(rng.uniform(low, high), 2)
    title = f"{brand} {noun.title()}, {attributes[0].title()}"
    features = tuple(f"{attribute.capitalize()}." for attribute in attributes) + (f"Sold by {brand}.",)
    description = f"The {brand} {noun} is made for everyday use. Ships in standard packaging."
    reviews = tuple((score, _REVIEW_TEXTS[score]) for score in sorted(rng.sample(sorted(_REVIEW_TEXTS), 2), reverse=True))
    return Product(_asin(rng, used), title, kind.category, kind.query, attributes, options, price, features, description, reviews)


def _price_bound(price: float, rng: random.Random) -> float:
    above = [step for step in _PRICE_STEPS if step > price][:4]
    if len(above) < 2:
        return 1_000_000.0
    return sorted(rng.sample(above, 2))[1]


def _goal(product: Product, rng: random.Random) -> Goal:
    attributes = tuple(rng.sample(product.attributes, rng.randint(1, 2)))
    goal_options = tuple(rng.choice(values) for values in product.options.values())
    price_upper = _price_bound(product.price, rng)
    noun = product.title.split(",")[0].split(" ", 1)[1].lower()
    option_text = " and ".join(f"{name}: {value}" for name, value in zip(product.options, goal_options))
    article = "" if noun.endswith("s") and not noun.endswith("ss") else "an " if noun[0] in "aeiou" else "a "
    text = f"{rng.choice(_OPENERS)} {article}{noun}, {' and '.join(attributes)}"
    if option_text:
        text += f", with {option_text}"
    if price_upper < 1_000_000:
        text += f", and price lower than {price_upper:.2f} dollars"
    return Goal(text, product.asin, product.title, product.query, product.product_category, attributes, goal_options,
                price_upper)


def generate_catalogue(seed: int, products_per_kind: int, goals_per_split: Sequence[int] | dict[str, int]) -> Catalogue:
    """A seeded catalogue of every kind and goals for each split (see the module doc).

    Args:
        seed: the same seed makes the same catalogue and goals on every machine.
        products_per_kind: products of each of the :data:`KINDS`.
        goals_per_split: split name -> number of goals.
    """
    if products_per_kind < 1:
        raise ValueError(f"products_per_kind must be >= 1, got {products_per_kind}")
    rng = random.Random(f"tcod-webshop/{seed}")
    used: set[str] = set()
    products, kind_of = [], {}
    for index, kind in enumerate(KINDS):
        for _ in range(products_per_kind):
            product = _product(kind, rng, used)
            products.append(product)
            kind_of[product.asin] = index
    goals: dict[str, list[Goal]] = {}
    for split, count in dict(goals_per_split).items():
        if split not in SPLITS:
            raise ValueError(f"goal splits must be among {SPLITS}, got {split!r}")
        split_rng = random.Random(f"tcod-webshop/{seed}/{split}")
        pool = [p for p in products if (kind_of[p.asin] in UNSEEN_KINDS) == (split == "valid_unseen")]
        goals[split] = [_goal(product, split_rng) for product in
                        (split_rng.choice(pool) for _ in range(count))]
    return Catalogue(products, goals)


# ---------------------------------------------------------------------- WebShop's files

_PRODUCTS_GLOB, _ATTRIBUTES_GLOB, _HUMAN_GOALS = "items_shuffle*.json", "items_ins_v2*.json", "items_human_ins.json"


def missing_webshop_files(data_path: str) -> str | None:
    """One line naming what WebShop's data folder ``data_path`` lacks, or None when it is complete."""
    if not os.path.isdir(data_path):
        return f"env.kwargs.data_path must be a folder of WebShop's data files, got {data_path!r}, which is not a folder"
    for pattern in (_PRODUCTS_GLOB, _ATTRIBUTES_GLOB):
        if not glob.glob(os.path.join(data_path, pattern)):
            return (
                f"env.kwargs.data_path must hold WebShop's {pattern} (its data/ folder: items_shuffle.json, "
                f"items_ins_v2.json, optionally items_human_ins.json), got {data_path!r}, which has none"
            )
    return None


def _one_file(data_path: str, pattern: str) -> str:
    # The full file (items_shuffle.json) wins over the 1000-product sample (items_shuffle_1000.json).
    return sorted(glob.glob(os.path.join(data_path, pattern)), key=len)[0]


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pricing(text) -> list[float]:
    if not text:
        return [100.0]
    prices = [float(re.sub(r"[^\d.]", "", part)) for part in str(text).split("$")[1:] if re.sub(r"[^\d.]", "", part)]
    return prices[:2] or [100.0]


def load_webshop_data(data_path: str, seed: int = 0, human_goals: bool = True) -> Catalogue:
    """The products and goals of WebShop's data folder (see the module doc).

    Splits: the goals are shuffled with ``seed``; ``valid_unseen`` takes the first
    ``min(500, n // 4)`` (WebShop's test goals), ``valid_seen`` the next ``min(1000, n // 4)``
    (its evaluation goals) and ``train`` the rest.

    Args:
        data_path: the folder.
        seed: draws the prices of products sold in a price range, the price bounds and the split.
        human_goals: use ``items_human_ins.json`` when present (else the synthetic goals).
    """
    problem = missing_webshop_files(data_path)
    if problem:
        raise ValueError(problem)
    raw_products = _read_json(_one_file(data_path, _PRODUCTS_GLOB))
    attributes = _read_json(_one_file(data_path, _ATTRIBUTES_GLOB))
    human_path = os.path.join(data_path, _HUMAN_GOALS)
    human = _read_json(human_path) if human_goals and os.path.isfile(human_path) else None
    rng = random.Random(f"tcod-webshop-data/{seed}")
    products: list[Product] = []
    seen: set[str] = set()
    for raw in raw_products:
        asin = str(raw.get("asin", ""))
        if not asin or asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        pricing = _pricing(raw.get("pricing"))
        price = pricing[0] if len(pricing) == 1 else round(rng.uniform(*pricing[:2]), 2)
        options: dict[str, tuple[str, ...]] = {}
        for name, contents in (raw.get("customization_options") or {}).items():
            if contents:
                options[name.lower()] = tuple(c["value"].strip().replace("/", " | ").lower() for c in contents)
        bullets = raw.get("small_description") or []
        if isinstance(bullets, str):
            bullets = [bullets]
        products.append(Product(
            asin=asin,
            title=raw.get("name", ""),
            product_category=raw.get("product_category", ""),
            query=str(raw.get("query", "")).lower().strip(),
            attributes=tuple((attributes.get(asin) or {}).get("attributes") or ()),
            options=options,
            price=price,
            features=tuple(str(b) for b in bullets),
            description=raw.get("full_description") or "",
        ))
    by_asin = {p.asin: p for p in products}
    goals: list[Goal] = []
    for product in products:
        entries = human.get(product.asin, []) if human is not None else [attributes.get(product.asin) or {}]
        for entry in entries:
            goal_attributes = tuple(entry.get("instruction_attributes") or ())
            text = entry.get("instruction")
            if not goal_attributes or not text:
                continue
            if human is not None:
                wanted = entry.get("instruction_options") or ()
                goal_options = tuple(wanted.values() if isinstance(wanted, dict) else wanted)
            else:  # a synthetic goal asks for one value of each option
                goal_options = tuple(rng.choice(values) for values in product.options.values())
            price_upper = _price_bound(by_asin[product.asin].price, rng)
            suffix = f", and price lower than {price_upper:.2f} dollars" if price_upper < 1_000_000 else ""
            goals.append(Goal(text.strip().strip(".") + suffix, product.asin, product.title, product.query,
                              product.product_category, goal_attributes, goal_options, price_upper))
    rng.shuffle(goals)
    n_unseen, n_seen = min(500, len(goals) // 4), min(1000, len(goals) // 4)
    split_goals = {
        "valid_unseen": goals[:n_unseen],
        "valid_seen": goals[n_unseen : n_unseen + n_seen],
        "train": goals[n_unseen + n_seen :],
    }
    return Catalogue(products, split_goals)
