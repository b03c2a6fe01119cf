"""Environment families by name: ``make_env("twx-coin")``, ``make_env("scienceworld")``...

Each family is one :class:`~tcod_fast.envs.family.EnvFamily` record, registered once
(:func:`register_env_family`) and looked up by env name (:func:`get_env_family`). The
built-in families (:data:`ENV_NAMES`):

* ``toy`` -- :class:`tcod_fast.envs.toy.KeyDoorEnv` (pure Python, no engine needed);
* ``twx-<game>`` -- :class:`tcod_fast.envs.textworld_express.TextWorldExpressEnv` for one
  TextWorld-Express game (``twx-coin``, ``twx-cookingworld``, ``twx-twc``...);
* ``scienceworld`` -- :class:`tcod_fast.envs.scienceworld.ScienceWorldEnv`;
* ``alfworld`` -- ``tcod_fast.envs.alfworld.AlfWorldEnv``;
* ``webshop`` -- :class:`tcod_fast.envs.webshop.WebShopEnv` (a generated catalogue, or WebShop's files);
* ``search_qa`` -- :class:`tcod_fast.envs.search_qa.SearchQAEnv` (a generated corpus, or the user's JSONL files);
* ``alchemy`` -- :class:`tcod_fast.envs.alchemy.AlchemyEnv` (pure Python: a second game with its
  own objects, rules and action words, for runs on several environments).

Several environments in one run are one :class:`~tcod_fast.envs.mixture.EnvMixture`.

The engines are imported only when their adapter is built, so a missing engine only
matters when used; :func:`check_env_settings` reports it (and unknown names, unknown
``env.kwargs`` keys, missing data files) in one line before anything is built.
Names in :data:`UNAVAILABLE_ENVS` are refused with the reason (none at present).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.alchemy import ALCHEMY
from tcod_fast.envs.alfworld.adapter import AlfWorldConfig, AlfWorldEnv, missing_games
from tcod_fast.envs.base import Env
from tcod_fast.envs.family import EnvFamily, Expert, PromptPreset, PythonPackage
from tcod_fast.envs.scienceworld import ScienceWorldConfig, make_scienceworld_env
from tcod_fast.envs.search_qa.corpus import missing_qa_files
from tcod_fast.envs.search_qa.env import SearchQAConfig, make_search_qa_env
from tcod_fast.envs.textworld_express import TextWorldExpressConfig, make_textworld_express_env
from tcod_fast.envs.toy import KeyDoorConfig, make_key_door_env
from tcod_fast.envs.webshop.catalogue import missing_webshop_files
from tcod_fast.envs.webshop.env import WebShopConfig, make_webshop_env

__all__ = [
    "ENV_NAMES",
    "UNAVAILABLE_ENVS",
    "EnvSpec",
    "check_env_settings",
    "env_families",
    "env_names",
    "find_env_family",
    "get_env_family",
    "make_env",
    "register_env_family",
    "unregister_env_family",
]

#: Env names that are known but cannot run here, with the reason.
UNAVAILABLE_ENVS: dict[str, str] = {}

# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, EnvFamily] = {}


def register_env_family(family: EnvFamily, *, replace: bool = False) -> EnvFamily:
    """Make ``family`` selectable as ``env.name`` (``family.name``, or ``<name>-<value>`` for a
    family with a parameter).

    Args:
        family: the record.
        replace: replace a family of the same name (else that is an error).

    Returns:
        ``family``.
    """
    if not isinstance(family, EnvFamily):
        raise TypeError(f"register_env_family expects an EnvFamily record, got {type(family).__name__}")
    if family.name in _REGISTRY and not replace:
        raise ValueError(f"env family {family.name!r} is already registered (pass replace=True to replace it)")
    if family.name in UNAVAILABLE_ENVS:
        raise ValueError(f"env family {family.name!r} is a name kept for an unavailable env: {UNAVAILABLE_ENVS[family.name]}")
    _REGISTRY[family.name] = family
    return family


def unregister_env_family(name: str) -> EnvFamily:
    """Remove a registered family; returns its record.

    Args:
        name: the family's ``name`` (``twx``, not ``twx-coin``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"env family must be one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY.pop(name)


def env_families() -> tuple[EnvFamily, ...]:
    """Every registered family, built-in ones first, in registration order."""
    return tuple(_REGISTRY.values())


def env_names() -> tuple[str, ...]:
    """The env names of every registered family as written in lists (``toy``, ``twx-<game>``...)."""
    return tuple(family.display_name for family in _REGISTRY.values())


def find_env_family(env_name: str) -> EnvFamily | None:
    """The family ``env_name`` selects, or None.

    A family without a parameter named ``env_name`` wins over a ``<name>-<value>`` match; among
    those, the longest family name wins.

    Args:
        env_name: an env name (``toy``, ``twx-coin``...).
    """
    exact = _REGISTRY.get(env_name) if isinstance(env_name, str) else None
    if exact is not None and exact.parameter is None:
        return exact
    matching = [family for family in _REGISTRY.values() if family.parameter is not None and family.matches(env_name)]
    return max(matching, key=lambda family: len(family.name)) if matching else None


def get_env_family(env_name: str) -> EnvFamily:
    """The family ``env_name`` selects; an unknown name is a ``ValueError`` listing the known ones.

    Args:
        env_name: an env name (``toy``, ``twx-coin``...).
    """
    family = find_env_family(env_name)
    if family is None:
        if env_name in UNAVAILABLE_ENVS:
            raise ValueError(UNAVAILABLE_ENVS[env_name])
        raise ValueError(f"unknown env {env_name!r}; expected one of {env_names()}")
    return family


# ------------------------------------------------------------------ building


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment called ``name``; ``kwargs`` go to its family's config dataclass.

    Args:
        name: an env name of a registered family: ``"toy"``, ``"twx-<game>"``,
            ``"scienceworld"``, ``"alfworld"``, ``"webshop"``, ``"search_qa"`` or one of :func:`env_names`.
        **kwargs: fields of the family's ``config_class`` (``KeyDoorConfig``,
            ``TextWorldExpressConfig``, ``ScienceWorldConfig``, ``AlfWorldConfig``, ``WebShopConfig``...).
    """
    return get_env_family(name).make(name, **kwargs)


@dataclass
class EnvSpec:
    """A picklable recipe for an env: calling it runs ``make_env(name, **kwargs)``.

    Pass it to :class:`tcod_fast.envs.pool.EnvPool` as the env factory. The family record
    travels with it, so a family registered at run time builds in worker processes too.

    Attributes:
        name: the env name.
        kwargs: fields of the family's config dataclass.
        family: the family ``name`` selects (found when the spec is made; None if unknown,
            which building then reports).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    family: EnvFamily | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = find_env_family(self.name)

    def __call__(self) -> Env:
        if self.family is None:
            return make_env(self.name, **self.kwargs)
        return self.family.make(self.name, **self.kwargs)


# ------------------------------------------------------------------ checking


def check_env_settings(name: str, kwargs: Mapping[str, Any] | None) -> None:
    """Check ``env.name`` and ``env.kwargs`` before anything is built.

    Raises ``ValueError`` with one line for the first problem found, in this order: an
    unknown env name (listing the known ones), an ``env.kwargs`` key that is not a field of
    the family's config class (with a did-you-mean), a missing Python package (with the
    install command), missing data files (with the command or setting that provides them).
    Imports no engine.

    Args:
        name: ``env.name``.
        kwargs: ``env.kwargs`` (None or empty: the config's defaults).
    """
    family = find_env_family(name)
    if family is None:
        reason = f" ({UNAVAILABLE_ENVS[name]})" if isinstance(name, str) and name in UNAVAILABLE_ENVS else ""
        raise ValueError(f"env.name must be one of {', '.join(env_names())}, got {name!r}{reason}")
    kwargs = dict(kwargs or {})
    allowed = list(family.kwarg_names())
    for key in kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean env.kwargs.{close[0]}?)" if close else ""
            raise ValueError(
                f"unknown key env.kwargs.{key}{hint}: expected a field of {family.config_class.__name__} for env {name!r} "
                f"({', '.join(allowed)}), got {key!r}"
            )
    family.check_requirements(name, kwargs)


# ------------------------------------------------------------------ the built-ins

#: The ``tcod-fast`` extra that installs every engine (``pyproject.toml``).
_ENGINES_EXTRA = "envs"

#: The BM25 library WebShop's search and Search-QA's retriever use (tcod_fast.envs.retrieval).
_BM25 = PythonPackage("bm25s", "bm25s==0.3.16")


def missing_webshop_data(env_kwargs: Mapping[str, Any]) -> str | None:
    """What ``env.kwargs.data_path`` lacks of WebShop's data files; None when unset (the
    generated catalogue) or complete."""
    data_path = env_kwargs.get("data_path")
    return missing_webshop_files(str(data_path)) if data_path else None


def missing_search_qa_data(env_kwargs: Mapping[str, Any]) -> str | None:
    """What is wrong with ``env.kwargs.corpus_path`` / ``qa_path``; None when both are unset
    (the generated corpus) or both name files."""
    return missing_qa_files(env_kwargs.get("corpus_path"), env_kwargs.get("qa_path"))


for _record in (
    EnvFamily(
        name="toy",
        summary="The key-and-door game: pure Python, microseconds a step; for tests, the CPU demo and DAgger.",
        factory=make_key_door_env,
        config_class=KeyDoorConfig,
        prompt=PromptPreset("You are an expert agent exploring a small house in a text adventure."),
        expert=Expert("the shortest solution, replanned from the current state", from_any_state=True),
        tiny_overrides=("env.kwargs={max_rooms: 2, max_steps: 6}",),
    ),
    EnvFamily(
        name="twx",
        summary="One TextWorld-Express game (twx-coin, twx-cookingworld, twx-twc...): Java engine, about 1-2 ms a step.",
        factory=make_textworld_express_env,
        config_class=TextWorldExpressConfig,
        parameter="game",
        prompt=PromptPreset("You are an expert agent playing a TextWorld-Express text game."),
        expert=Expert("the engine's gold path"),
        packages=(PythonPackage("textworld_express", "textworld-express==1.1.0"),),
        pip_extra=_ENGINES_EXTRA,
    ),
    EnvFamily(
        name="scienceworld",
        summary="ScienceWorld's 30 science-experiment tasks: Java engine, about 0.13 s a step.",
        factory=make_scienceworld_env,
        config_class=ScienceWorldConfig,
        prompt=PromptPreset(
            "You are an expert agent operating in ScienceWorld, a text-based virtual science laboratory.",
            # The engine lists hundreds of admissible actions.
            {"max_admissible_actions": 50},
        ),
        expert=Expert("the engine's gold action sequence"),
        packages=(PythonPackage("scienceworld", "scienceworld==1.2.3"),),
        pip_extra=_ENGINES_EXTRA,
    ),
    EnvFamily(
        name="alfworld",
        summary="ALFWorld's household tasks on its TextWorld engine, from game folders (tcod-fast envs make-alfworld-tasks).",
        factory=AlfWorldEnv,
        config_class=AlfWorldConfig,
        prompt=PromptPreset("You are an expert agent operating in the ALFRED Embodied Environment."),
        expert=Expert("the game's stored walkthrough, else Fast Downward's plan"),
        packages=(PythonPackage("alfworld", "alfworld==0.4.2"), PythonPackage("textworld", "textworld")),
        pip_extra=_ENGINES_EXTRA,
        check_data=missing_games,
    ),
    EnvFamily(
        name="webshop",
        summary="WebShop's text-mode shop (search, results, item pages; the paper's reward) on a generated catalogue "
        "or WebShop's own files; pure Python and BM25.",
        factory=make_webshop_env,
        config_class=WebShopConfig,
        prompt=PromptPreset("You are an expert agent shopping on WebShop, a web store, to buy the product an instruction asks for."),
        expert=Expert("searches the instruction and buys the first retrieved product that earns reward 1"),
        tiny_overrides=("env.kwargs={products_per_kind: 4, num_tasks: {train: 8, valid_seen: 4, valid_unseen: 4}}",),
        packages=(_BM25,),
        pip_extra=_ENGINES_EXTRA,
        check_data=missing_webshop_data,
    ),
    EnvFamily(
        name="search_qa",
        summary="Multi-hop question answering by BM25 search over passages (search[...], answer[...]), on a generated "
        "corpus or the user's JSONL files; pure Python.",
        factory=make_search_qa_env,
        config_class=SearchQAConfig,
        prompt=PromptPreset("You are an expert agent answering a question by searching a collection of passages."),
        expert=Expert("the question's hidden plan: a search per hop, then the answer"),
        tiny_overrides=("env.kwargs={people: 8, num_tasks: {train: 8, valid_seen: 4, valid_unseen: 4}}",),
        packages=(_BM25,),
        pip_extra=_ENGINES_EXTRA,
        check_data=missing_search_qa_data,
    ),
    ALCHEMY,
):
    register_env_family(_record)
del _record

#: The built-in families' env names, in the order above. :func:`env_names` also lists
#: families registered later.
ENV_NAMES: tuple[str, ...] = env_names()
