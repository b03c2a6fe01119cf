"""WebShop in text mode behind the :class:`~tcod_fast.envs.base.Env` protocol.

The shop has four kinds of page, each shown as WebShop's text mode shows it (the page's
elements joined by ``[SEP]``, the instruction on every page):

* **search**: ``WebShop [SEP] Instruction: [SEP] <instruction> [SEP] Search``; the only action is
  ``search[<query>]``;
* **results**: ten products a page (up to ``max_results`` in all, ranked by BM25), each as
  ``<ASIN> [SEP] <title> [SEP] $<price>``, with ``Back to Search``, ``< Prev`` and ``Next >``;
* **item**: the product's options (each option name followed by its values), title, price and
  rating, and the buttons ``Description``, ``Features``, ``Reviews`` and ``Buy Now``;
* **description / features / reviews**: that text, with ``< Prev`` back to the item.

Actions are ``search[<query>]`` on the search page and ``click[<button>]`` on the others, the
button written as shown, in lower case (``click[next >]``, ``click[b0abc12345]``,
``click[large]``, ``click[buy now]``). Clicking an option value chooses it. Any other action,
or a button the page does not show, changes nothing and says why. ``Buy Now`` ends the
episode with the reward of :func:`~tcod_fast.envs.webshop.reward.purchase_reward`;
``info["score"]`` is 100 times it and the episode is won when it is 1. An episode that
reaches ``max_steps`` actions without buying ends with reward 0.

The expert (:meth:`WebShopEnv.expert_actions`) searches with the instruction up to its
options and price bound, goes through the results in order and buys the first product that can earn reward 1,
choosing the goal's options; when none can, it searches the goal product's title.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tcod_fast.envs.base import SPLITS, EnvObservation, EnvStep
from tcod_fast.envs.webshop.catalogue import Catalogue, Goal, Product, generate_catalogue, load_webshop_data
from tcod_fast.envs.webshop.reward import FUZZY_MATCH_THRESHOLD, purchase_reward, token_set_ratio

__all__ = ["WebShopConfig", "WebShopEnv", "make_webshop_env", "parse_webshop_action"]

SEP = " [SEP] "
SEARCH_TEMPLATE = "search[<your query>]"
_ACTION = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
_SUB_PAGES = ("description", "features", "reviews")
# What an instruction says before its options and price bound.
_QUERY_PART = re.compile(r",\s*(?:with |and price )")


@dataclass
class WebShopConfig:
    """The shop and its episodes.

    Attributes:
        data_path: a folder of WebShop's own data files (``items_shuffle*.json``,
            ``items_ins_v2*.json``, optionally ``items_human_ins.json``); None generates the
            catalogue.
        seed: seeds the generated catalogue and goals (and the prices drawn for WebShop's files).
        products_per_kind: generated products of each of the 15 product kinds.
        num_tasks: goals per split (generated), or at most this many per split (WebShop's files).
        max_steps: the episode ends unbought after this many actions.
        results_per_page: products on a results page.
        max_results: products a search returns in all.
        human_goals: with ``data_path``, use WebShop's human-written goals when the file is there.
    """

    data_path: str | None = None
    seed: int = 0
    products_per_kind: int = 40
    num_tasks: dict[str, int] = field(default_factory=lambda: {"train": 500, "valid_seen": 100, "valid_unseen": 100})
    max_steps: int = 15
    results_per_page: int = 10
    max_results: int = 50
    human_goals: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.results_per_page < 1 or self.max_results < 1:
            raise ValueError(
                "max_steps, results_per_page and max_results must be >= 1, got "
                f"{self.max_steps}, {self.results_per_page} and {self.max_results}"
            )
        unknown = sorted(set(self.num_tasks) - set(SPLITS))
        if unknown:
            raise ValueError(f"num_tasks keys must be among {SPLITS}, got {unknown}")


def parse_webshop_action(action: str) -> tuple[str, str] | None:
    """``("search", "red shoes")`` for ``search[red shoes]``, ``("click", "next >")`` for
    ``click[Next >]``; None for anything else."""
    match = _ACTION.match(action if isinstance(action, str) else "")
    if match is None:
        return None
    kind, argument = match.group(1).lower(), " ".join(match.group(2).split())
    return kind, argument if kind == "search" else argument.lower()


def _product_text(product: Product) -> str:
    options = " ".join(value for values in product.options.values() for value in values)
    return " ".join([product.title, product.product_category, " ".join(product.features), product.description, options])


def _price(price: float) -> str:
    return f"${price:.2f}"


@dataclass
class _Page:
    """Where the agent is: ``search``, ``results``, ``item`` or a sub-page of the item."""

    kind: str = "search"
    query: str = ""
    results: list[str] = field(default_factory=list)
    page: int = 1
    asin: str = ""
    chosen: dict[str, str] = field(default_factory=dict)


class WebShopEnv:
    """WebShop's text-mode shop (see the module doc). Task ids are ``webshop/<split>/<index>``."""

    name = "webshop"

    def __init__(self, config: WebShopConfig | None = None):
        from tcod_fast.envs.retrieval import BM25Index

        self.config = config or WebShopConfig()
        if self.config.data_path:
            self.catalogue: Catalogue = load_webshop_data(self.config.data_path, self.config.seed, self.config.human_goals)
        else:
            self.catalogue = generate_catalogue(self.config.seed, self.config.products_per_kind, self.config.num_tasks)
        self._index = BM25Index([_product_text(product) for product in self.catalogue.products])
        self._goal: Goal | None = None
        self._task = ""
        self._page = _Page()
        self._steps = 0
        self._over = False

    # -- protocol -------------------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        count = len(self.catalogue.goals.get(split, []))
        if self.config.data_path:
            count = min(count, self.config.num_tasks.get(split, count))
        return [f"webshop/{split}/{i}" for i in range(count)]

    def reset(self, task: str) -> EnvObservation:
        """Start ``task`` on the search page."""
        self._goal = self._goal_of(task)
        self._task = task
        self._page = _Page()
        self._steps = 0
        self._over = False
        return EnvObservation(
            observation=self._render(),
            admissible_actions=self._admissible(),
            task_text=self._goal.instruction,
            info={"task": task},
        )

    def step(self, action: str) -> EnvStep:
        """Play ``search[...]`` or ``click[...]``; anything else changes nothing but costs a step."""
        if self._goal is None:
            raise RuntimeError("WebShopEnv.step called before reset")
        if self._over:
            return EnvStep("The episode is over.", 0.0, True, False, [], {"task": self._task})
        self._steps += 1
        info: dict[str, Any] = {"task": self._task, "invalid_action": False, "score": 0.0}
        problem = self._apply(action)
        if problem == "bought":
            product = self.catalogue.by_asin[self._page.asin]
            breakdown = purchase_reward(product.as_dict(), self._goal.as_dict(), product.price, self._page.chosen)
            self._over = True
            won = breakdown.reward >= 1.0 - 1e-9
            info.update(score=breakdown.score, reward_terms=asdict(breakdown), bought=product.asin)
            observation = SEP.join([
                "Thank you for shopping with us!", "Purchased", product.asin, product.title,
                "Your score (min 0.0, max 1.0)", f"{breakdown.reward:.2f}",
            ])
            return EnvStep(observation, breakdown.reward, True, won, [], info)
        observation = self._render()
        if problem:
            info["invalid_action"] = True
            observation = f"Invalid action: {problem}." + SEP + observation
        done = self._steps >= self.config.max_steps
        if done:
            self._over = True
            info["truncated"] = True
        return EnvStep(observation, 0.0, done, False, [] if done else self._admissible(), info)

    def expert_actions(self) -> list[str] | None:
        """Actions that buy a reward-1 product from the reset state (see the module doc); when
        no retrieved product can earn 1, those buying the best one; None when nothing is found."""
        if self._goal is None:
            return None
        best: tuple[float, list[str]] | None = None
        for query in (_QUERY_PART.split(self._goal.instruction)[0], self._goal.name):
            results = self._search(query)
            for position, asin in enumerate(results):
                product = self.catalogue.by_asin[asin]
                chosen = _options_for(product, self._goal.goal_options)
                reward = purchase_reward(product.as_dict(), self._goal.as_dict(), product.price, chosen).reward
                if best is None or reward > best[0]:
                    pages = position // self.config.results_per_page
                    clicks = ["click[next >]"] * pages + [f"click[{asin.lower()}]"]
                    clicks += [f"click[{value}]" for value in chosen.values()] + ["click[buy now]"]
                    best = (reward, [f"search[{query}]", *clicks])
                if reward >= 1.0 - 1e-9:
                    return best[1]
        return best[1] if best else None

    def close(self) -> None:
        """Nothing to release."""

    # -- the shop -------------------------------------------------------------------
    def _goal_of(self, task: str) -> Goal:
        parts = task.split("/") if isinstance(task, str) else []
        if len(parts) != 3 or parts[0] != "webshop" or parts[1] not in SPLITS or not parts[2].isdigit():
            raise ValueError(f"WebShop task ids look like 'webshop/<split>/<index>' with split in {SPLITS}, got {task!r}")
        goals = self.catalogue.goals.get(parts[1], [])
        index = int(parts[2])
        if index >= len(goals):
            raise ValueError(f"task {task!r}: split {parts[1]!r} has {len(goals)} goals")
        return goals[index]

    def _search(self, query: str) -> list[str]:
        positions = self._index.search(query, self.config.max_results)
        return [self.catalogue.products[i].asin for i in positions]

    def _page_results(self) -> list[str]:
        start = (self._page.page - 1) * self.config.results_per_page
        return self._page.results[start : start + self.config.results_per_page]

    def _buttons(self) -> list[str]:
        """The clickable buttons of the current page, in lower case."""
        page = self._page
        if page.kind == "search":
            return []
        buttons = ["back to search"]
        if page.kind == "results":
            if page.page > 1:
                buttons.append("< prev")
            if page.page * self.config.results_per_page < len(page.results):
                buttons.append("next >")
            buttons += [asin.lower() for asin in self._page_results()]
        elif page.kind == "item":
            product = self.catalogue.by_asin[page.asin]
            buttons.append("< prev")
            buttons += [value for values in product.options.values() for value in values]
            buttons += [*_SUB_PAGES, "buy now"]
        else:
            buttons.append("< prev")
        return buttons

    def _admissible(self) -> list[str]:
        if self._page.kind == "search":
            return [SEARCH_TEMPLATE]
        return [f"click[{button}]" for button in dict.fromkeys(self._buttons())]

    def _apply(self, action: str) -> str | None:
        """Change the page; None when done, ``"bought"`` on Buy Now, else what was wrong."""
        parsed = parse_webshop_action(action)
        if parsed is None:
            return f"{action!r} is neither search[<query>] nor click[<button>]"
        kind, argument = parsed
        page = self._page
        if kind == "search":
            if page.kind != "search":
                return "search[...] works on the search page only; click[back to search] first"
            if not argument:
                return "search[...] needs a query"
            self._page = _Page(kind="results", query=argument, results=self._search(argument))
            return None
        if argument not in self._buttons():
            return f"there is no {argument!r} button on this page"
        if argument == "back to search":
            self._page = _Page()
        elif argument == "next >":
            page.page += 1
        elif argument == "< prev":
            if page.kind == "results":
                page.page -= 1
            elif page.kind == "item":
                page.kind, page.asin, page.chosen = "results", "", {}
            else:
                page.kind = "item"
        elif page.kind == "results":
            page.kind, page.asin, page.chosen = "item", argument.upper(), {}
            if page.asin not in self.catalogue.by_asin:  # WebShop's own ids are not all upper case
                page.asin = next(a for a in self._page_results() if a.lower() == argument)
        elif argument == "buy now":
            return "bought"
        elif argument in _SUB_PAGES:
            page.kind = argument
        else:
            product = self.catalogue.by_asin[page.asin]
            name = next(name for name, values in product.options.items() if argument in values)
            page.chosen[name] = argument
        return None

    def _render(self) -> str:
        assert self._goal is not None
        head = ["WebShop", "Instruction:", self._goal.instruction]
        page = self._page
        if page.kind == "search":
            return SEP.join([*head, "Search"])
        parts = [*head, "Back to Search"]
        if page.kind == "results":
            parts.append(f"Page {page.page} (Total results: {len(page.results)})")
            if page.page > 1:
                parts.append("< Prev")
            if page.page * self.config.results_per_page < len(page.results):
                parts.append("Next >")
            for asin in self._page_results():
                product = self.catalogue.by_asin[asin]
                parts += [asin, product.title, _price(product.price)]
            if not page.results:
                parts.append("No products match your search.")
            return SEP.join(parts)
        product = self.catalogue.by_asin[page.asin]
        parts.append("< Prev")
        if page.kind == "item":
            for name, values in product.options.items():
                parts += [name, *values]
            rating = f"{sum(s for s, _ in product.reviews) / len(product.reviews):.1f}" if product.reviews else "N.A."
            parts += [product.title, f"Price: {_price(product.price)}", f"Rating: {rating}"]
            parts += ["Description", "Features", "Reviews", "Buy Now"]
        elif page.kind == "description":
            parts.append(product.description or "No description.")
        elif page.kind == "features":
            parts += list(product.features) or ["No features listed."]
        else:
            parts += [f"{score}/5: {text}" for score, text in product.reviews] or ["No reviews yet."]
        return SEP.join(parts)


def _options_for(product: Product, goal_options: tuple[str, ...]) -> dict[str, str]:
    """The product's option values closest to the goal's, one per option name."""
    chosen: dict[str, str] = {}
    for wanted in goal_options:
        candidates = [
            (token_set_ratio(value, wanted), name, value)
            for name, values in product.options.items()
            if name not in chosen
            for value in values
        ]
        if candidates:
            score, name, value = max(candidates, key=lambda c: c[0])
            if score > FUZZY_MATCH_THRESHOLD:
                chosen[name] = value
    return chosen


def make_webshop_env(**config_kwargs: Any) -> WebShopEnv:
    """Build a :class:`WebShopEnv`; keyword arguments go to :class:`WebShopConfig`."""
    return WebShopEnv(WebShopConfig(**config_kwargs))
