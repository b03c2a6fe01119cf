"""A small deterministic pure-Python text game, for tests and CPU demos without Java.

*Key and door*: a few rooms in a row from west to east, a key in a closed container in one
of them, and a locked vault door in the east-most room. The goal is to take the gem in the
vault: walk to the key, open its container, take the key, walk to the door, unlock it, open
it, go east into the vault and take the gem.

Wrong choices are possible and costly: a decoy key of another colour lies in a second
container, and trying the wrong key jams the lock, which loses the episode. Actions not
in the admissible list waste a turn, and so do ``look`` and ``inventory`` (the observation
already says everything); a few wasted turns in a row lose the episode. The engine's own
step limit also ends it.

**Markov observations.** Every observation describes the whole state the right next action
depends on: the room, its exits, the door's state when it is here, every container here
with what it holds once opened, which key opens the door, where that key is (its container,
its room and the direction to walk) or, once carried, where the door is, and what the
agent carries. So the expert's next action is a function of the observation text alone, and
:meth:`KeyDoorEnv.expert_action` gives it from *any* state, on or off the expert's path
(what DAgger-style teachers are trained on).

Splits: ``train`` and ``valid_seen`` draw the key's (container, colour) pairing from the same
set, with different task seeds; ``valid_unseen`` uses pairings never used in ``train`` and one
more room than any training layout can have, so its episodes are longer. Every word of
every split also occurs in training texts, so a tokenizer learnt from them spells it.

:class:`FaultInjectingEnv` wraps any env factory and raises, hangs or kills its own
process at a chosen step of chosen tasks; it exists to test the worker pool.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.base import SPLITS, Env, EnvObservation, EnvStep
from tcod_fast.envs.game_steps import end_step

_ROOM_NAMES = ("hall", "kitchen", "library", "study", "pantry", "gallery", "workshop", "cellar")
_CONTAINERS = ("drawer", "cabinet", "box", "crate", "chest", "locker")
_COLOURS = ("red", "blue", "green", "silver", "golden")
_TASK_TEXT = "take the gem from the vault."


def is_held_out_pairing(container: str, colour: str) -> bool:
    """Key (container, colour) pairings reserved for ``valid_unseen`` (a third of them;
    every container and colour also occurs in pairings used for training)."""
    return (_CONTAINERS.index(container) + _COLOURS.index(colour)) % 3 == 0


@dataclass
class KeyDoorConfig:
    """Sizes of the key-and-door game.

    Attributes:
        num_tasks: tasks per split, keyed by split name.
        min_rooms / max_rooms: rooms in the row of ``train`` and ``valid_seen`` layouts (the
            door is in the east-most room).
        unseen_extra_rooms: ``valid_unseen`` layouts have ``max_rooms`` to
            ``max_rooms + unseen_extra_rooms`` rooms.
        max_steps: the episode is lost after this many steps without a win.
        max_idle_steps: the episode is lost after this many steps in a row that change
            nothing (an inadmissible action, ``look``, ``inventory``); 0 never ends it so.
    """

    num_tasks: dict[str, int] = field(default_factory=lambda: {"train": 64, "valid_seen": 16, "valid_unseen": 16})
    min_rooms: int = 2
    max_rooms: int = 4
    unseen_extra_rooms: int = 1
    max_steps: int = 30
    max_idle_steps: int = 3

    def __post_init__(self) -> None:
        if not 2 <= self.min_rooms <= self.max_rooms <= len(_ROOM_NAMES) - self.unseen_extra_rooms:
            raise ValueError(
                f"rooms must satisfy 2 <= min_rooms <= max_rooms <= {len(_ROOM_NAMES)} - unseen_extra_rooms, "
                f"got min_rooms={self.min_rooms}, max_rooms={self.max_rooms}, unseen_extra_rooms={self.unseen_extra_rooms}"
            )
        if self.unseen_extra_rooms < 0 or self.max_steps < 1 or self.max_idle_steps < 0:
            raise ValueError(
                "unseen_extra_rooms and max_idle_steps must be >= 0 and max_steps >= 1, got "
                f"{self.unseen_extra_rooms}, {self.max_idle_steps} and {self.max_steps}"
            )


@dataclass(frozen=True)
class _Layout:
    """Where things are in one task; rooms are listed west to east."""

    rooms: tuple[str, ...]
    start_room: int
    key_room: int
    key_container: str
    key_colour: str
    decoy_room: int
    decoy_container: str
    decoy_colour: str

    @property
    def door_room(self) -> int:
        return len(self.rooms) - 1

    @property
    def key(self) -> str:
        return f"{self.key_colour} key"

    @property
    def decoy(self) -> str:
        return f"{self.decoy_colour} key"


@dataclass
class _State:
    """The mutable part of an episode."""

    room: int
    in_vault: bool = False
    opened: set[tuple[int, str]] = field(default_factory=set)
    carried: set[str] = field(default_factory=set)
    door: str = "locked"  # locked -> unlocked -> open; or jammed
    steps: int = 0
    idle_steps: int = 0  # steps in a row that changed nothing
    over: bool = False


def _layout_for(task: str, config: KeyDoorConfig) -> _Layout:
    try:
        prefix, split, index_text = task.split("/")
        index = int(index_text)
    except ValueError:
        raise ValueError(f"toy task ids look like 'keydoor/<split>/<index>', got {task!r}") from None
    if prefix != "keydoor" or split not in SPLITS:
        raise ValueError(f"toy task ids look like 'keydoor/<split>/<index>' with split in {SPLITS}, got {task!r}")
    # A string seed is hashed with SHA-512 by `random`, so layouts are the same on every
    # machine and Python run (unlike hash()).
    rng = random.Random(f"keydoor:{split}:{index}")
    unseen = split == "valid_unseen"
    if unseen:
        num_rooms = rng.randint(config.max_rooms, config.max_rooms + config.unseen_extra_rooms)
    else:
        num_rooms = rng.randint(config.min_rooms, config.max_rooms)
    rooms = tuple(rng.sample(_ROOM_NAMES, num_rooms))
    pairings = [(c, k) for c in _CONTAINERS for k in _COLOURS if is_held_out_pairing(c, k) == unseen]
    key_container, key_colour = rng.choice(pairings)
    decoy_container, decoy_colour = rng.choice(
        [(c, k) for c, k in pairings if c != key_container and k != key_colour]
    )
    start_room = rng.randrange(num_rooms)
    # The key is never where the agent starts, so every episode has to walk.
    key_room = rng.choice([r for r in range(num_rooms) if r != start_room])
    decoy_room = rng.randrange(num_rooms)
    return _Layout(rooms, start_room, key_room, key_container, key_colour, decoy_room, decoy_container, decoy_colour)


def _direction(from_room: int, to_room: int) -> str:
    return "here" if to_room == from_room else ("to the east" if to_room > from_room else "to the west")


class KeyDoorEnv:
    """The key-and-door game behind the :class:`~tcod_fast.envs.base.Env` protocol.

    Task ids are ``"keydoor/<split>/<index>"``. Reward is 1.0 on the winning step, else 0.
    Besides the protocol it offers :meth:`expert_action`, the expert's action from the
    current state.
    """

    name = "toy"

    def __init__(self, config: KeyDoorConfig | None = None):
        self.config = config or KeyDoorConfig()
        self._layout: _Layout | None = None
        self._state: _State | None = None
        self._task = ""

    @property
    def layout(self) -> _Layout | None:
        """The current task's layout (rooms west to east, key and decoy places); for tests."""
        return self._layout

    # -- protocol -------------------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split``."""
        if split not in self.config.num_tasks:
            raise ValueError(f"split must be one of {sorted(self.config.num_tasks)}, got {split!r}")
        return [f"keydoor/{split}/{i}" for i in range(self.config.num_tasks[split])]

    def reset(self, task: str) -> EnvObservation:
        """Start ``task`` in its start room with nothing in hand."""
        self._layout = _layout_for(task, self.config)
        self._task = task
        self._state = _State(room=self._layout.start_room)
        return EnvObservation(
            observation=self._describe(),
            admissible_actions=self._admissible(),
            task_text=_TASK_TEXT,
            info={"task": task},
        )

    def step(self, action: str) -> EnvStep:
        """Play one action; unknown or inadmissible actions change nothing but cost a step."""
        if self._layout is None:
            raise RuntimeError("KeyDoorEnv.step called before reset")
        state, layout = self._state, self._layout
        if state.over:
            return EnvStep("The game is over.", 0.0, True, False, [], {"task": self._task})
        state.steps += 1
        action = " ".join(action.strip().lower().split())
        info: dict[str, Any] = {"task": self._task, "invalid_action": False}
        won = lost = False
        if action not in self._admissible():
            feedback = "Nothing happens."
            info["invalid_action"] = True
        elif action == "go east":
            if state.room == layout.door_room:
                state.in_vault = True
                feedback = "You walk through the vault door."
            else:
                state.room += 1
                feedback = "You go east."
        elif action == "go west":
            if state.in_vault:
                state.in_vault = False
                feedback = "You leave the vault."
            else:
                state.room -= 1
                feedback = "You go west."
        elif action == "open door":
            state.door = "open"
            feedback = "The vault door swings open."
        elif action.startswith("open "):
            container = action[len("open ") :]
            state.opened.add((state.room, container))
            inside = self._items_in(state.room, container)
            feedback = f"You open the {container}. " + (f"Inside is a {inside[0]}." if inside else "It is empty.")
        elif action == "take gem":
            feedback = "You take the gem. You won!"
            won = True
        elif action.startswith("take "):
            item = action[len("take ") :]
            state.carried.add(item)
            feedback = f"You take the {item}."
        elif action.startswith("unlock door with "):
            key = action[len("unlock door with ") :]
            if key == layout.key:
                state.door = "unlocked"
                feedback = "The lock clicks open."
            else:
                state.door = "jammed"
                lost = True
                feedback = f"The {key} breaks in the lock. The vault door is jammed for good. You lost."
        else:  # look, inventory: the description below says it all
            feedback = ""
        idle = info["invalid_action"] or action in ("look", "inventory")
        return end_step(
            state, self.config, feedback=feedback, won=won, lost=lost, idle=idle, info=info,
            describe=self._describe, admissible=self._admissible,
        )

    def expert_action(self) -> str | None:
        """The expert's next action from the current state (on or off its own path);
        ``None`` before a reset or once the episode is over."""
        if self._state is None or self._state.over:
            return None
        return _expert_action(self._layout, self._state)

    def expert_actions(self) -> list[str] | None:
        """The shortest winning action list from the reset state of the current task."""
        if self._layout is None:
            return None
        layout = self._layout
        state = _State(room=layout.start_room)
        actions = []
        while not actions or actions[-1] != "take gem":
            action = _expert_action(layout, state)
            _apply_expert_action(layout, state, action)
            actions.append(action)
        return actions

    def close(self) -> None:
        """Nothing to release."""

    # -- world model ---------------------------------------------------------------
    def _containers_in(self, room: int) -> list[str]:
        layout = self._layout
        found = []
        if room == layout.key_room:
            found.append(layout.key_container)
        if room == layout.decoy_room and layout.decoy_container not in found:
            found.append(layout.decoy_container)
        return sorted(found)

    def _items_in(self, room: int, container: str) -> list[str]:
        layout, state = self._layout, self._state
        items = []
        if room == layout.key_room and container == layout.key_container:
            items.append(layout.key)
        if room == layout.decoy_room and container == layout.decoy_container:
            items.append(layout.decoy)
        return [item for item in items if item not in state.carried]

    def _exits(self) -> list[str]:
        layout, state = self._layout, self._state
        if state.in_vault:
            return ["west"]
        exits = []
        if state.room < layout.door_room or state.door == "open":
            exits.append("east")
        if state.room > 0:
            exits.append("west")
        return exits

    def _describe(self) -> str:
        layout, state = self._layout, self._state
        if state.in_vault:
            parts = ["You are in the vault. A gem glitters on a pedestal."]
        else:
            parts = [f"You are in the {layout.rooms[state.room]}."]
            if state.room == layout.door_room:
                parts.append(f"The vault door is here ({state.door}).")
            for container in self._containers_in(state.room):
                if (state.room, container) not in state.opened:
                    parts.append(f"There is a {container} here (closed).")
                else:
                    inside = self._items_in(state.room, container)
                    parts.append(f"There is a {container} here (open, " + (f"holding a {inside[0]})." if inside else "empty)."))
        parts.append("Exits: " + ", ".join(self._exits()) + ".")
        parts.append(f"The vault door opens with the {layout.key}.")
        if layout.key in state.carried:
            if not state.in_vault and state.room != layout.door_room:
                parts.append(f"The vault door is in the {layout.rooms[layout.door_room]}, to the east.")
        else:
            where = _direction(state.room, layout.key_room)
            parts.append(
                f"The {layout.key} is in the {layout.key_container} of the {layout.rooms[layout.key_room]}, {where}."
            )
        parts.append("You carry " + (" and ".join(f"the {item}" for item in sorted(state.carried)) or "nothing") + ".")
        return " ".join(parts)

    def _admissible(self) -> list[str]:
        layout, state = self._layout, self._state
        actions = [f"go {exit_}" for exit_ in self._exits()]
        if state.in_vault:
            actions.append("take gem")
        else:
            for container in self._containers_in(state.room):
                if (state.room, container) in state.opened:
                    actions += [f"take {item}" for item in self._items_in(state.room, container)]
                else:
                    actions.append(f"open {container}")
            if state.room == layout.door_room:
                if state.door == "locked":
                    keys = sorted(item for item in state.carried if item.endswith(" key"))
                    actions += [f"unlock door with {key}" for key in keys]
                elif state.door == "unlocked":
                    actions.append("open door")
        actions += ["look", "inventory"]
        return sorted(actions)


def _expert_action(layout: _Layout, state: _State) -> str:
    """The shortest way to the gem from ``state``: every branch reads a fact the
    observation states (the door's state, the key's container, room and direction, the
    carried keys)."""
    if state.in_vault:
        return "take gem"
    if layout.key in state.carried:
        if state.room != layout.door_room:
            return "go east"
        return {"locked": f"unlock door with {layout.key}", "unlocked": "open door"}.get(state.door, "go east")
    if state.room != layout.key_room:
        return "go east" if layout.key_room > state.room else "go west"
    if (state.room, layout.key_container) in state.opened:
        return f"take {layout.key}"
    return f"open {layout.key_container}"


def _apply_expert_action(layout: _Layout, state: _State, action: str) -> None:
    """The state change of an expert action (never a losing one), for planning."""
    if action == "go east":
        if state.room == layout.door_room:
            state.in_vault = True
        else:
            state.room += 1
    elif action == "go west":
        state.room -= 1
    elif action == "open door":
        state.door = "open"
    elif action.startswith("open "):
        state.opened.add((state.room, action[len("open ") :]))
    elif action.startswith("unlock door with "):
        state.door = "unlocked"
    elif action.startswith("take ") and action != "take gem":
        state.carried.add(action[len("take ") :])


def make_key_door_env(**config_kwargs: Any) -> KeyDoorEnv:
    """Build a :class:`KeyDoorEnv`; keyword arguments go to :class:`KeyDoorConfig`."""
    return KeyDoorEnv(KeyDoorConfig(**config_kwargs))


FAULT_KINDS = ("raise", "hang", "die")


@dataclass
class FaultInjectingEnv:
    """Wraps an env and fails on purpose, to test :class:`tcod_fast.envs.pool.EnvPool`.

    Build it in the worker through :func:`make_fault_injecting_env` (a picklable factory
    is needed, the env itself is not one).

    Attributes:
        inner_factory: picklable zero-argument callable building the wrapped env.
        faults: task id -> ``"raise"`` (the step raises RuntimeError), ``"hang"`` (the
            step sleeps ``hang_s`` seconds) or ``"die"`` (the process kills itself with
            SIGKILL, as when an engine's native code crashes). Other tasks play normally.
        fault_at_step: the 1-based step of the episode that fails (0 means the reset fails).
        hang_s: how long a hang lasts.
        tag_with_pid: end every observation with the process id, which makes episodes
            differ between processes (to test that the pool detects a replay diverging).
    """

    inner_factory: Callable[[], Env]
    faults: dict[str, str]
    fault_at_step: int = 2
    hang_s: float = 3600.0
    tag_with_pid: bool = False
    name: str = "faulty"

    def __post_init__(self):
        bad = {task: kind for task, kind in self.faults.items() if kind not in FAULT_KINDS}
        if bad:
            raise ValueError(f"fault kinds must be among {FAULT_KINDS}, got {bad}")
        self._inner: Env | None = None
        self._task = ""
        self._steps = 0

    def _env(self) -> Env:
        if self._inner is None:
            self._inner = self.inner_factory()
        return self._inner

    def _maybe_fail(self) -> None:
        kind = self.faults.get(self._task)
        if kind is None or self._steps != self.fault_at_step:
            return
        if kind == "raise":
            raise RuntimeError(f"injected failure at step {self._steps} of {self._task}")
        if kind == "hang":
            time.sleep(self.hang_s)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    def list_tasks(self, split: str) -> list[str]:
        """The wrapped env's tasks."""
        return self._env().list_tasks(split)

    def reset(self, task: str) -> EnvObservation:
        """Reset the wrapped env, failing first if this task fails at step 0."""
        self._task, self._steps = task, 0
        self._maybe_fail()
        return self._tag(self._env().reset(task))

    def step(self, action: str) -> EnvStep:
        """Step the wrapped env, failing first if this is the chosen step."""
        self._steps += 1
        self._maybe_fail()
        return self._tag(self._env().step(action))

    def _tag(self, result):
        if self.tag_with_pid:
            result.observation += f" [pid {os.getpid()}]"
        return result

    def expert_actions(self) -> list[str] | None:
        """The wrapped env's expert."""
        return self._env().expert_actions()

    def expert_action(self) -> str | None:
        """The wrapped env's current-state expert, when it has one."""
        return getattr(self._env(), "expert_action", lambda: None)()

    def close(self) -> None:
        """Close the wrapped env."""
        if self._inner is not None:
            self._inner.close()


def make_fault_injecting_env(
    faults: dict[str, str],
    fault_at_step: int = 2,
    hang_s: float = 3600.0,
    tag_with_pid: bool = False,
    **config_kwargs: Any,
) -> FaultInjectingEnv:
    """A :class:`FaultInjectingEnv` around a :class:`KeyDoorEnv` (``config_kwargs`` configure it).

    Use ``functools.partial(make_fault_injecting_env, faults={...})`` as a pool's factory.
    """
    return FaultInjectingEnv(
        inner_factory=functools.partial(make_key_door_env, **config_kwargs),
        faults=dict(faults),
        fault_at_step=fault_at_step,
        hang_s=hang_s,
        tag_with_pid=tag_with_pid,
    )
