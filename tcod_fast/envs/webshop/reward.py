"""WebShop's reward for buying a product, as the WebShop paper defines it.

    reward = r_type * (matched attributes + matched options + price ok) / (goal attributes + goal options + 1)

* an attribute of the goal matches when one of the product's attributes is close to it
  (:func:`token_set_ratio` above 85), or when it appears in the product's title, features
  or description;
* an option of the goal matches when one of the options chosen before buying is close to it
  (token-set ratio above 85);
* the price is ok when the product's price is at most the goal's upper bound;
* ``r_type`` (:func:`type_match`) scales it all by how well the product's type fits: 1 when
  the two share their search query, at least two category levels, or more than a fifth of the
  goal title's words; 0.5 when none of these holds; 0.1 when under a tenth of the title's words
  are shared; 0 when none is (a goal title without a content word counts as a fifth shared).

The score is ``100 * reward`` and an episode succeeds when the reward is 1. WebShop picks the
title's words with spaCy's part-of-speech tagger (nouns and proper nouns); here they are the
title's words that are not English stop words, which needs no language model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

__all__ = [
    "FUZZY_MATCH_THRESHOLD",
    "RewardBreakdown",
    "category_levels",
    "purchase_reward",
    "title_words",
    "token_set_ratio",
    "type_match",
]

#: A token-set ratio above this counts as a match (WebShop's threshold).
FUZZY_MATCH_THRESHOLD = 85

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = frozenset(
    "a an the and or of for with in on at to from by as is are be it its this that these those "
    "your you our we my me i he she they them their his her not no all any each more most other "
    "some such only own same so than too very can will just set pack new".split()
)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ratio(a: str, b: str) -> int:
    if not a and not b:
        return 0
    return round(100 * SequenceMatcher(None, a, b).ratio())


def token_set_ratio(a: str, b: str) -> int:
    """How alike two phrases are, 0-100, ignoring word order and repeated words.

    The token-set ratio of the ``fuzzywuzzy`` package (which WebShop uses), on the standard
    library's ``difflib``: the shared words sorted (``t0``), then ``t0`` followed by each side's
    other words (``t1``, ``t2``); the best of the three pairwise similarities.
    """
    words_a, words_b = set(_tokens(a)), set(_tokens(b))
    if not words_a or not words_b:
        return 0
    shared = " ".join(sorted(words_a & words_b))
    with_a = " ".join(filter(None, [shared, " ".join(sorted(words_a - words_b))]))
    with_b = " ".join(filter(None, [shared, " ".join(sorted(words_b - words_a))]))
    return max(_ratio(shared, with_a), _ratio(shared, with_b), _ratio(with_a, with_b))


def _close(a: str, b: str) -> bool:
    return token_set_ratio(a, b) > FUZZY_MATCH_THRESHOLD


def title_words(title: str) -> list[str]:
    """The words of a title that carry its meaning (no stop words, no bare numbers), in order."""
    return [word for word in _tokens(title) if word not in _STOP_WORDS and not word.isdigit()]


def category_levels(product_category: str) -> set[str]:
    """The levels of a category path ``"Beauty › Hair Care › Wigs"``, stripped and lower-cased."""
    return {level.strip().lower() for level in product_category.split("›") if level.strip()}


def type_match(product: Mapping, goal: Mapping) -> float:
    """``r_type``: 1, 0.5, 0.1 or 0 by how well the product's type fits the goal's (see the module doc).

    Args:
        product: needs ``title``, ``query`` and ``product_category``.
        goal: needs ``name`` (the target's title), ``query`` and ``product_category``.
    """
    goal_words = title_words(goal["name"])
    shared = set(goal_words) & set(title_words(product["title"]))
    # A goal title without a content word neither helps nor hurts (WebShop's 0.2).
    title_score = len(shared) / len(goal_words) if goal_words else 0.2
    query_match = bool(goal["query"]) and product["query"] == goal["query"]
    category_match = len(category_levels(product["product_category"]) & category_levels(goal["product_category"])) >= 2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


@dataclass(frozen=True)
class RewardBreakdown:
    """Every term of one purchase's reward.

    Attributes:
        attribute_matches: goal attributes the product has.
        option_matches: goal options among the options chosen.
        price_ok: the price is within the goal's bound.
        num_attributes / num_options: the goal's counts.
        r_type: the type-match factor.
        reward: ``r_type * (attribute_matches + option_matches + price_ok) / (num_attributes + num_options + 1)``.
    """

    attribute_matches: int
    option_matches: int
    price_ok: bool
    num_attributes: int
    num_options: int
    r_type: float
    reward: float

    @property
    def score(self) -> float:
        """``100 * reward``."""
        return 100.0 * self.reward


def _attribute_matches(product: Mapping, goal_attributes: Sequence[str]) -> int:
    text = " ".join([product["title"], " ".join(product["features"]), product["description"]]).lower()
    count = 0
    for wanted in goal_attributes:
        if any(_close(have, wanted) for have in product["attributes"]) or wanted.lower() in text:
            count += 1
    return count


def _option_matches(chosen: Sequence[str], goal_options: Sequence[str]) -> int:
    return sum(1 for wanted in goal_options if any(_close(have, wanted) for have in chosen))


def purchase_reward(product: Mapping, goal: Mapping, price: float, chosen_options: Mapping[str, str]) -> RewardBreakdown:
    """The reward for buying ``product`` at ``price`` with ``chosen_options`` for ``goal``.

    Args:
        product: ``title``, ``query``, ``product_category``, ``attributes``, ``features`` and
            ``description`` (a :class:`~tcod_fast.envs.webshop.catalogue.Product` as a dict).
        goal: ``name``, ``query``, ``product_category``, ``attributes``, ``goal_options``
            (a list of option values) and ``price_upper``.
        price: the price paid.
        chosen_options: option name -> the value clicked.
    """
    attributes = list(goal["attributes"])
    options = list(goal["goal_options"])
    attribute_matches = _attribute_matches(product, attributes)
    option_matches = _option_matches(list(chosen_options.values()), options)
    price_ok = price <= goal["price_upper"]
    r_type = type_match(product, goal)
    reward = r_type * (attribute_matches + option_matches + int(price_ok)) / (len(attributes) + len(options) + 1)
    return RewardBreakdown(attribute_matches, option_matches, price_ok, len(attributes), len(options), r_type, reward)
