"""One record per environment family: :class:`EnvFamily`.

An :class:`EnvFamily` says everything the rest of tcod-fast needs to know about one family of
environments (``toy``, ``twx-<game>``, ``scienceworld``, ``alfworld``, or one of your own):

* **its names**: ``name``, and for a family with a parameter (``parameter="game"``) every
  ``<name>-<value>`` env name, whose value goes to the factory as that keyword;
* **how it is built**: ``factory(**kwargs)`` with ``env.kwargs`` as keywords, checked
  against the fields of ``config_class``;
* **how the agent is prompted and read**: the :class:`PromptPreset` (the prompt's opening
  sentence and any preset prompt options) and the :class:`~tcod_fast.envs.actions.ActionProtocol` (stop strings and
  reply parsing);
* **its tiny settings**: the ``--set`` values a ``TCOD_FAST_TINY=1`` run adds;
* **its expert**: an :class:`Expert` description, or None;
* **what it needs**: Python packages (:class:`PythonPackage`, with the ``tcod-fast`` extra
  that installs them) and data files (``check_data``), reported in one line by
  :meth:`EnvFamily.check_requirements` without importing the engine.

The records are registered and looked up in :mod:`tcod_fast.envs.registry`; the registry,
the prompts, the rollout, the trainer and the tiny settings ask the record and never branch
on an env name. Adding an environment is adding one record.

This module is light: it imports no engine and nothing from :mod:`tcod_fast.rollout`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from tcod_fast.envs.actions import ACTION_TAGS, ActionProtocol

__all__ = [
    "EnvFamily",
    "Expert",
    "PromptPreset",
    "PythonPackage",
]


@dataclass(frozen=True)
class PromptPreset:
    """A family's defaults for the agent prompt (:class:`~tcod_fast.rollout.prompts.PromptConfig`).

    Attributes:
        description: the prompt's opening sentence naming the environment
            (``PromptConfig.env_description``).
        overrides: other ``PromptConfig`` fields the family sets, e.g.
            ``{"max_admissible_actions": 50}`` where the engine lists hundreds of actions.
    """

    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Expert:
    """A family's expert, as its environments offer it.

    Every :class:`~tcod_fast.envs.base.Env` answers ``expert_actions()`` (a winning action list
    from the reset state, or None); some also answer ``expert_action()``, the expert's next
    action from the current state, which DAgger-style labels need.

    Attributes:
        source: where the expert's actions come from, in a few words.
        from_any_state: the family's environments answer ``expert_action()`` in any state.
    """

    source: str
    from_any_state: bool = False


@dataclass(frozen=True)
class PythonPackage:
    """An optional Python package an engine needs.

    Attributes:
        module: its top-level import name, looked up with ``importlib.util.find_spec``
            (the package is not imported).
        distribution: what ``pip install`` takes to install it alone, e.g. ``"scienceworld==1.2.3"``.
    """

    module: str
    distribution: str


def _field_names(config_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config_class))


@dataclass(frozen=True)
class EnvFamily:
    """One family of environments.

    Attributes:
        name: the ``env.name`` that selects it; with ``parameter``, the prefix of its env
            names (``twx`` for ``twx-coin``, ``twx-cookingworld``...).
        summary: one line: what the environments are.
        factory: builds one environment; called with the ``env.kwargs`` (fields of
            ``config_class``) and, with ``parameter``, that keyword set from the env name.
            Imports its engine inside, so registering the family imports nothing heavy.
        config_class: the dataclass ``env.kwargs`` configure; its fields are the keys
            ``env.kwargs`` may hold.
        prompt: the prompt's opening sentence and preset options.
        parameter: None for a single env name; else the ``config_class`` field an env name
            ``<name>-<value>`` sets (``game`` for TextWorld-Express), which ``env.kwargs``
            may then not hold.
        action_protocol: how replies carry actions (stop strings, parsing).
        expert: the family's expert, or None when it has none.
        tiny_overrides: ``--set`` values a new ``train`` run in this family adds under
            ``TCOD_FAST_TINY=1`` (:mod:`tcod_fast.tiny_settings`).
        packages: the Python packages its engine imports.
        pip_extra: the ``tcod-fast`` extra that installs ``packages`` (``pip install
            "tcod-fast[<extra>]"``); None names the packages themselves.
        check_data: ``(env_kwargs) -> str | None``: one line saying which data files are
            missing and the command or setting that provides them, or None when they are
            there. Must not import the engine.

    Callables must be module-level functions (not lambdas): a worker pool pickles the record
    to build its environments in other processes.
    """

    name: str
    summary: str
    factory: Callable[..., Any]
    config_class: type
    prompt: PromptPreset
    parameter: str | None = None
    action_protocol: ActionProtocol = ACTION_TAGS
    expert: Expert | None = None
    tiny_overrides: tuple[str, ...] = ()
    packages: tuple[PythonPackage, ...] = ()
    pip_extra: str | None = None
    check_data: Callable[[Mapping[str, Any]], str | None] | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"EnvFamily.name must be a non-empty string, got {self.name!r}")
        if not callable(self.factory):
            raise TypeError(f"EnvFamily {self.name!r}: factory must be callable, got {self.factory!r}")
        if self.check_data is not None and not callable(self.check_data):
            raise TypeError(f"EnvFamily {self.name!r}: check_data must be callable, got {self.check_data!r}")
        if not (isinstance(self.config_class, type) and is_dataclass(self.config_class)):
            raise TypeError(f"EnvFamily {self.name!r}: config_class must be a dataclass, got {self.config_class!r}")
        if self.parameter is not None and self.parameter not in _field_names(self.config_class):
            raise ValueError(
                f"EnvFamily {self.name!r}: parameter must be a field of {self.config_class.__name__}, got {self.parameter!r}"
            )
        if not isinstance(self.prompt, PromptPreset):
            raise TypeError(f"EnvFamily {self.name!r}: prompt must be a PromptPreset, got {type(self.prompt).__name__}")
        if not isinstance(self.action_protocol, ActionProtocol):
            raise TypeError(
                f"EnvFamily {self.name!r}: action_protocol must be an ActionProtocol, got {type(self.action_protocol).__name__}"
            )

    @property
    def display_name(self) -> str:
        """How its env names are written in lists: ``toy``, ``twx-<game>``."""
        return self.name if self.parameter is None else f"{self.name}-<{self.parameter}>"

    def matches(self, env_name: str) -> bool:
        """Whether ``env_name`` selects this family (``<name>-<value>`` with a non-empty value
        for a family with a parameter)."""
        if not isinstance(env_name, str):
            return False
        if self.parameter is None:
            return env_name == self.name
        prefix = f"{self.name}-"
        return env_name.startswith(prefix) and len(env_name) > len(prefix)

    def name_kwargs(self, env_name: str) -> dict[str, str]:
        """The factory keywords ``env_name`` sets: ``{"game": "coin"}`` for ``twx-coin``, else ``{}``.

        Args:
            env_name: an env name this family matches.
        """
        if not self.matches(env_name):
            raise ValueError(f"env name {env_name!r} is not of family {self.display_name!r}")
        if self.parameter is None:
            return {}
        return {self.parameter: env_name[len(self.name) + 1 :]}

    def kwarg_names(self) -> tuple[str, ...]:
        """The keys ``env.kwargs`` may hold: the fields of ``config_class`` but ``parameter``."""
        return tuple(name for name in _field_names(self.config_class) if name != self.parameter)

    def make(self, env_name: str, **kwargs: Any) -> Any:
        """Build one environment of ``env_name``.

        Args:
            env_name: an env name this family matches.
            **kwargs: fields of ``config_class``.
        """
        return self.factory(**self.name_kwargs(env_name), **kwargs)

    def install_hint(self) -> str:
        """The command that installs the family's packages."""
        if self.pip_extra:
            return f'pip install "tcod-fast[{self.pip_extra}]"'
        return "pip install " + " ".join(package.distribution for package in self.packages)

    def check_requirements(self, env_name: str, kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` with one line when a package or data file ``env_name`` needs is missing.

        Packages are looked up with ``importlib.util.find_spec`` (nothing is imported), then
        ``check_data`` reads ``kwargs``.

        Args:
            env_name: the env name, for the message.
            kwargs: the ``env.kwargs`` the environment would be built with.
        """
        for package in self.packages:
            if _find_spec(package.module) is None:
                raise ValueError(
                    f"env.name {env_name!r} needs the Python package {package.distribution} "
                    f"(module {package.module!r}), which is not installed: {self.install_hint()}"
                )
        if self.check_data is not None:
            problem = self.check_data(dict(kwargs or {}))
            if problem:
                raise ValueError(problem)


def _find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        return None
