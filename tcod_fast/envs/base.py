"""The environment protocol every text environment in tcod-fast follows.

An environment plays one episode at a time: ``reset(task)`` starts the episode named
``task`` (an id from ``list_tasks(split)``) and ``step(action)`` plays one action text.
Everything crossing this boundary is plain data (strings, floats, bools, dicts of plain
values) so it can be pickled to and from worker processes (:mod:`tcod_fast.envs.pool`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Task splits. ``train`` tasks are trained on; ``valid_seen`` are held-out tasks drawn
#: from the training distribution; ``valid_unseen`` are held-out layouts/objects/variations
#: the student never trains on (the papers' "unseen" setting).
SPLITS = ("train", "valid_seen", "valid_unseen")


@dataclass
class EnvObservation:
    """What the agent sees after ``reset``.

    Attributes:
        observation: the environment's text right after the reset (room description...).
        admissible_actions: actions the engine accepts now; empty when it cannot list them.
        task_text: the goal in words, e.g. "put a clean mug in the coffee machine".
        info: engine-specific extras (task id, variation, seed...), plain values only.
    """

    observation: str
    admissible_actions: list[str]
    task_text: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnvStep:
    """What one ``step(action)`` returns.

    Attributes:
        observation: the engine's reply to the action.
        reward: the reward for this step (engine-specific scale; 1.0 on a win for most).
        done: the episode is over (won, lost or out of the engine's own step limit).
        won: the goal was reached.
        admissible_actions: actions the engine accepts after this step.
        info: engine-specific extras, e.g. ``score`` or ``invalid_action``.
    """

    observation: str
    reward: float
    done: bool
    won: bool
    admissible_actions: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnvError:
    """An episode ended by an environment failure rather than by the game.

    Returned by :class:`tcod_fast.envs.pool.EnvPool` in place of an :class:`EnvStep`
    or :class:`EnvObservation` when the environment raised, hung past its timeout, its
    process died, or it returned a malformed result. The episode is over; a worker that
    may be broken has been replaced.

    Attributes:
        kind: ``"exception"``, ``"timeout"``, ``"worker_died"``, ``"invalid_result"`` (the
            reset or step returned something other than a well-formed
            :class:`EnvObservation` / :class:`EnvStep`, e.g. None, a bytes observation or
            one longer than the pool allows), ``"out_of_step"`` (the worker's reply was not
            the one awaited; the worker was replaced), or ``"replay_diverged"`` (the
            episode shared a replaced worker and could not be rebuilt identically).
        message: what happened, including the exception text when there is one.
        done: always True, so callers may treat it like a terminal step.
        won: always False.
    """

    kind: str
    message: str
    done: bool = True
    won: bool = False

    @property
    def env_error(self) -> bool:
        """Always True; lets callers test ``getattr(result, "env_error", False)``."""
        return True


@runtime_checkable
class Env(Protocol):
    """A text environment playing one episode at a time.

    Implementations: :class:`tcod_fast.envs.toy.KeyDoorEnv`,
    :class:`tcod_fast.envs.textworld_express.TextWorldExpressEnv`,
    :class:`tcod_fast.envs.scienceworld.ScienceWorldEnv`,
    ``tcod_fast.envs.alfworld.AlfWorldEnv``, :class:`tcod_fast.envs.webshop.WebShopEnv`,
    :class:`tcod_fast.envs.search_qa.SearchQAEnv`. Build them by name with
    :func:`tcod_fast.envs.registry.make_env`.
    """

    name: str

    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split`` (one of :data:`SPLITS`), in a fixed order."""
        ...

    def reset(self, task: str) -> EnvObservation:
        """Start the episode of ``task`` (an id from :meth:`list_tasks`)."""
        ...

    def step(self, action: str) -> EnvStep:
        """Play one action text; an action the engine does not know is not an error."""
        ...

    def expert_actions(self) -> list[str] | None:
        """Actions that win the current episode from its reset state, or None if unknown."""
        ...

    def close(self) -> None:
        """Release the engine (JVM, files). Safe to call twice."""
        ...


class JvmEngineEnv:
    """What the environments driving a Java engine (ScienceWorld, TextWorld-Express) share.

    Subclasses hold the engine in ``self._engine`` and its gold action sequence for the loaded
    game (``None`` when the engine gives none) in ``self._gold``.
    """

    _engine: Any = None
    _gold: list[str] | None = None

    def expert_actions(self) -> list[str] | None:
        """The engine's gold action sequence for the loaded game, from its reset state."""
        return list(self._gold) if self._gold is not None else None

    def close(self) -> None:
        """Shut the JVM down. Safe to call twice."""
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.close()
