"""What the built-in pure-Python games (:mod:`~tcod_fast.envs.toy`, :mod:`~tcod_fast.envs.alchemy`)
share at the end of every step: the idle and step limits, and how the observation is put
together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tcod_fast.envs.base import EnvStep

__all__ = ["end_step"]


def end_step(
    state: Any,
    config: Any,
    *,
    feedback: str,
    won: bool,
    lost: bool,
    idle: bool,
    info: dict,
    describe: Callable[[], str],
    admissible: Callable[[], list[str]],
) -> EnvStep:
    """Close one step of a built-in game.

    Args:
        state: the game's state, with ``steps``, ``idle_steps`` and ``over`` (updated here).
        config: the game's config, with ``max_steps`` and ``max_idle_steps`` (0: no idle limit).
        feedback: what the action did, in words ("" when the description says it all).
        won / lost: the action won or lost the episode.
        idle: the action changed nothing (an inadmissible action, or one that only looks).
        info: the step's extras; ``steps`` is added.
        describe / admissible: the state's description and admissible actions, asked only
            while the episode goes on.

    Returns:
        The :class:`~tcod_fast.envs.base.EnvStep`: on a win or loss the feedback alone, else
        the feedback, the description and, when a limit ended the episode, why.
    """
    state.idle_steps = state.idle_steps + 1 if idle else 0
    stalled = not won and not lost and 0 < config.max_idle_steps <= state.idle_steps
    out_of_steps = not won and not lost and state.steps >= config.max_steps
    state.over = won or lost or stalled or out_of_steps
    if won or lost:
        observation = feedback
    else:
        observation = " ".join(part for part in (feedback, describe()) if part)
        if stalled:
            observation += f" {state.idle_steps} steps in a row changed nothing. You lost."
        elif out_of_steps:
            observation += " You ran out of time."
    info["steps"] = state.steps
    return EnvStep(
        observation=observation,
        reward=1.0 if won else 0.0,
        done=state.over,
        won=won,
        admissible_actions=[] if state.over else admissible(),
        info=info,
    )
