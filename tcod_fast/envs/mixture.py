"""Several environments behind one: :class:`EnvMixture`, for runs that train one student on
several families at once (``envs:`` in a training config).

A mixture's task ids name their environment: ``"<env name>::<task>"`` (:func:`mixture_task`,
:func:`split_mixture_task`), so every place that holds a task id (plans, trajectories, the
worker pool's replay, checkpoints' cached expert lengths) also knows which environment and
which teacher it belongs to. ``reset`` starts the named member's episode and the steps that
follow go to that member. Members are built when first reset, so a slot that only ever plays
one family starts one engine.

:class:`MixtureSpec` is the picklable recipe a worker pool builds mixtures from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcod_fast.envs.base import Env, EnvObservation, EnvStep

__all__ = ["TASK_SEPARATOR", "EnvMixture", "MixtureSpec", "mixture_task", "route_by_task", "split_mixture_task"]

#: Between the environment's name and its own task id in a mixture's task ids.
TASK_SEPARATOR = "::"


def mixture_task(env_name: str, task: str) -> str:
    """The mixture task id of ``task`` of environment ``env_name``: ``"<env_name>::<task>"``."""
    return f"{env_name}{TASK_SEPARATOR}{task}"


def split_mixture_task(task: str) -> tuple[str, str]:
    """``(env name, the environment's own task id)`` of a mixture task id."""
    env_name, separator, inner = str(task).partition(TASK_SEPARATOR)
    if not separator or not env_name:
        raise ValueError(f"a task of a run with several environments reads '<env name>{TASK_SEPARATOR}<task>', got {task!r}")
    return env_name, inner


class EnvMixture:
    """An :class:`~tcod_fast.envs.base.Env` over several named environments.

    Args:
        members: env name -> a zero-argument factory of that environment (an
            :class:`~tcod_fast.envs.registry.EnvSpec`, for instance), in a fixed order.
    """

    name = "mixture"

    def __init__(self, members: Mapping[str, Callable[[], Env]]):
        if not members:
            raise ValueError("an environment mixture needs at least one member")
        self._factories = dict(members)
        self._built: dict[str, Env] = {}
        self._active: Env | None = None

    def member(self, env_name: str) -> Env:
        """The member ``env_name``, built on first use."""
        if env_name not in self._factories:
            raise ValueError(f"this run's environments are {', '.join(self._factories)}; got a task of {env_name!r}")
        if env_name not in self._built:
            self._built[env_name] = self._factories[env_name]()
        return self._built[env_name]

    def list_tasks(self, split: str) -> list[str]:
        """Every member's tasks of ``split``, member by member, as mixture task ids."""
        return [mixture_task(name, task) for name in self._factories for task in self.member(name).list_tasks(split)]

    def reset(self, task: str) -> EnvObservation:
        env_name, inner = split_mixture_task(task)
        self._active = self.member(env_name)
        return self._active.reset(inner)

    def _current(self) -> Env:
        if self._active is None:
            raise RuntimeError("reset(task) must start an episode before it is played")
        return self._active

    def step(self, action: str) -> EnvStep:
        return self._current().step(action)

    def expert_actions(self) -> list[str] | None:
        return self._current().expert_actions()

    def expert_action(self) -> str | None:
        """The current member's next expert action (None where the member has no such expert)."""
        answer = getattr(self._current(), "expert_action", None)
        return answer() if answer is not None else None

    def close(self) -> None:
        for env in self._built.values():
            env.close()
        self._built.clear()
        self._active = None


@dataclass(frozen=True)
class MixtureSpec:
    """A picklable recipe of an :class:`EnvMixture`: its members' recipes, in order.

    Attributes:
        members: ``(env name, zero-argument factory)`` pairs (factories must pickle, e.g.
            :class:`~tcod_fast.envs.registry.EnvSpec`).
    """

    members: tuple[tuple[str, Any], ...]

    def __call__(self) -> EnvMixture:
        return EnvMixture(dict(self.members))


def route_by_task(table: Mapping[str, Any], task: str, what: str) -> Any:
    """``table``'s entry for the environment ``task`` names (``"<env name>::<task>"``); a
    ``ValueError`` naming ``what`` and the environments it has when there is none."""
    env_name, _ = split_mixture_task(task)
    if env_name not in table:
        raise ValueError(f"no {what} for environment {env_name!r} (this run's: {', '.join(table)})")
    return table[env_name]
