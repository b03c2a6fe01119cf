"""A list of in-process environments behind the batch API of ``EnvPool`` (``reset_many``,
``step_many``, ``expert_actions_many``, ``expert_action_many``), for the episode runner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tcod_fast.envs.base import EnvError

__all__ = ["EnvListDriver"]


class EnvListDriver:
    """Steps a list of in-process environments with the :class:`EnvPool` batch API.

    An environment that raises ends its episode with an ``EnvError`` (kind
    ``"exception"``), like the pool does; there is no timeout or crash isolation here.
    """

    def __init__(self, envs: Sequence[Any]):
        self.envs = list(envs)
        self.num_slots = len(self.envs)
        self._failed: dict[int, Any] = {}

    def _call(self, slot: int, method: str, *args):
        if slot in self._failed:
            return self._failed[slot]
        try:
            return getattr(self.envs[slot], method)(*args)
        except Exception as exc:  # an env failure ends that episode only
            error = EnvError("exception", f"slot {slot} {method}: {type(exc).__name__}: {exc}")
            self._failed[slot] = error
            return error

    def reset_many(self, tasks: Sequence[str | None]) -> list:
        results = []
        for slot, task in enumerate(tasks):
            if task is None:
                results.append(None)
                continue
            self._failed.pop(slot, None)
            results.append(self._call(slot, "reset", task))
        return results

    def step_many(self, actions: Sequence[str | None]) -> list:
        return [
            None if a is None else self._call(slot, "step", a) for slot, a in enumerate(actions)
        ]

    def expert_actions_many(self, slots: Sequence[int]) -> list:
        return [self._call(slot, "expert_actions") for slot in slots]

    def expert_action_many(self, slots: Sequence[int]) -> list:
        """The current-state expert's action per slot (``None`` where the env has none)."""
        return [
            self._call(slot, "expert_action") if hasattr(self.envs[slot], "expert_action") else None
            for slot in slots
        ]
