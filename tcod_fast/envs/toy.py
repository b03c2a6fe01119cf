"""A small deterministic pure-Python text game, for tests and CPU demos without Java.

*Key and door*: a few rooms in a row, a key hidden in a closed container in one of them,
and a locked vault door at the end of the row. The goal is to take the gem in the vault.
The expert walks to the key, opens the container, takes the key, walks to the door,
unlocks it, opens it, enters the vault and takes the gem: 6 to 10 actions.

Wrong choices are possible and costly: a decoy key of another colour lies in a second
container, and trying the wrong key jams the lock, which loses the episode. Actions not
in the admissible list waste a turn. The engine's own step limit also ends the episode.

Splits: ``train`` and ``valid_seen`` draw containers and colours from the same vocabulary
(different task seeds); ``valid_unseen`` uses containers and colours never seen in
``train``, in the spirit of ALFWorld's unseen split.

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

_ROOM_NAMES = ("hall", "kitchen", "library", "study", "pantry", "gallery", "workshop")
_SEEN_CONTAINERS = ("drawer", "cabinet", "box", "crate")
_UNSEEN_CONTAINERS = ("chest", "locker")
_SEEN_COLOURS = ("red", "blue", "green")
_UNSEEN_COLOURS = ("silver", "golden")


@dataclass
class KeyDoorConfig:
    """Sizes of the key-and-door game.

    Attributes:
        num_tasks: tasks per split, keyed by split name.
        min_rooms / max_rooms: rooms in the row before the vault (the door is in the last).
        max_steps: the episode is lost after this many steps without a win.
    """

    num_tasks: dict[str, int] = field(default_factory=lambda: {"train": 64, "valid_seen": 16, "valid_unseen": 16})
    min_rooms: int = 2
    max_rooms: int = 4
    max_steps: int = 30


@dataclass
class _Layout:
    """Where things are in one task: rooms in walking order, then key and decoy places."""

    rooms: list[str]
    key_room: int
    key_container: str
    key_colour: str
    decoy_room: int
    decoy_container: str
    decoy_colour: str


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
    containers = _UNSEEN_CONTAINERS + _SEEN_CONTAINERS[:1] if unseen else _SEEN_CONTAINERS
    colours = _UNSEEN_COLOURS if unseen else _SEEN_COLOURS
    num_rooms = rng.randint(config.min_rooms, config.max_rooms)
    rooms = rng.sample(_ROOM_NAMES, num_rooms)
    key_container, decoy_container = rng.sample(containers, 2)
    key_colour, decoy_colour = rng.sample(colours, 2)
    # The key is never in the first room, so the expert always has to walk.
    key_room = rng.randint(1, num_rooms - 1)
    decoy_room = rng.randint(0, num_rooms - 1)
    return _Layout(rooms, key_room, key_container, key_colour, decoy_room, decoy_container, decoy_colour)


class KeyDoorEnv:
    """The key-and-door game behind the :class:`~tcod_fast.envs.base.Env` protocol.

    Task ids are ``"keydoor/<split>/<index>"``. Reward is 1.0 on the winning step, else 0.
    """

    name = "toy"

    def __init__(self, config: KeyDoorConfig | None = None):
        self.config = config or KeyDoorConfig()
        self._layout: _Layout | None = None
        self._task = ""

    @property
    def layout(self) -> _Layout | None:
        """The current task's hidden layout (rooms, key and decoy places); for tests and debugging."""
        return self._layout

    # -- protocol -------------------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split``."""
        if split not in self.config.num_tasks:
            raise ValueError(f"split must be one of {sorted(self.config.num_tasks)}, got {split!r}")
        return [f"keydoor/{split}/{i}" for i in range(self.config.num_tasks[split])]

    def reset(self, task: str) -> EnvObservation:
        """Start ``task`` in its first room with nothing in hand."""
        self._layout = _layout_for(task, self.config)
        self._task = task
        self._room = 0
        self._opened: set[tuple[int, str]] = set()
        self._taken: set[str] = set()
        self._door = "locked"  # locked -> unlocked -> open; or jammed
        self._in_vault = False
        self._steps = 0
        self._over = False
        return EnvObservation(
            observation=self._describe(),
            admissible_actions=self._admissible(),
            task_text="take the gem from the vault.",
            info={"task": task},
        )

    def step(self, action: str) -> EnvStep:
        """Play one action; unknown or inadmissible actions change nothing but cost a step."""
        if self._layout is None:
            raise RuntimeError("KeyDoorEnv.step called before reset")
        if self._over:
            return EnvStep("The game is over.", 0.0, True, False, [], {"task": self._task})
        self._steps += 1
        action = " ".join(action.strip().lower().split())
        info: dict[str, Any] = {"task": self._task, "invalid_action": False}
        won = lost = False
        if action not in self._admissible():
            observation = "Nothing happens."
            info["invalid_action"] = True
        elif action.startswith("go to "):
            target = action[len("go to ") :]
            if target == "vault":
                self._in_vault = True
            else:
                self._in_vault = False
                self._room = self._layout.rooms.index(target)
            observation = self._describe()
        elif action.startswith("open ") and action != "open vault door":
            container = action[len("open ") :]
            self._opened.add((self._room, container))
            inside = self._items_in(self._room, container)
            observation = f"You open the {container}. " + (
                f"Inside you see a {inside[0]}." if inside else "It is empty."
            )
        elif action.startswith("take "):
            item = action[len("take ") :]
            if item == "gem":
                observation = "You take the gem. You won!"
                won = True
            else:
                self._taken.add(item)
                observation = f"You take the {item}."
        elif action.startswith("unlock vault door with "):
            key = action[len("unlock vault door with ") :]
            if key == f"{self._layout.key_colour} key":
                self._door = "unlocked"
                observation = "The lock clicks open."
            else:
                self._door = "jammed"
                lost = True
                observation = f"The {key} breaks in the lock. The vault door is jammed for good. You lost."
        elif action == "open vault door":
            self._door = "open"
            observation = "The vault door swings open."
        elif action == "look":
            observation = self._describe()
        else:  # inventory
            observation = "You carry: " + (", ".join(sorted(self._taken)) or "nothing") + "."
        out_of_steps = not won and not lost and self._steps >= self.config.max_steps
        if out_of_steps:
            observation += " You ran out of time."
        self._over = won or lost or out_of_steps
        info["steps"] = self._steps
        return EnvStep(
            observation=observation,
            reward=1.0 if won else 0.0,
            done=self._over,
            won=won,
            admissible_actions=[] if self._over else self._admissible(),
            info=info,
        )

    def expert_actions(self) -> list[str] | None:
        """The shortest winning action list from the reset state of the current task."""
        if self._layout is None:
            return None
        layout = self._layout
        actions = [f"go to {layout.rooms[r]}" for r in range(1, layout.key_room + 1)]
        actions += [f"open {layout.key_container}", f"take {layout.key_colour} key"]
        actions += [f"go to {layout.rooms[r]}" for r in range(layout.key_room + 1, len(layout.rooms))]
        actions += [f"unlock vault door with {layout.key_colour} key", "open vault door", "go to vault", "take gem"]
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
        layout = self._layout
        items = []
        if room == layout.key_room and container == layout.key_container:
            items.append(f"{layout.key_colour} key")
        if room == layout.decoy_room and container == layout.decoy_container:
            items.append(f"{layout.decoy_colour} key")
        return [item for item in items if item not in self._taken]

    def _neighbours(self) -> list[str]:
        layout = self._layout
        if self._in_vault:
            return [layout.rooms[-1]]
        names = [layout.rooms[r] for r in (self._room - 1, self._room + 1) if 0 <= r < len(layout.rooms)]
        if self._room == len(layout.rooms) - 1 and self._door == "open":
            names.append("vault")
        return names

    def _describe(self) -> str:
        layout = self._layout
        if self._in_vault:
            return "You are in the vault. A gem glitters on a pedestal."
        parts = [f"You are in the {layout.rooms[self._room]}."]
        for container in self._containers_in(self._room):
            state = "open" if (self._room, container) in self._opened else "closed"
            parts.append(f"There is a {container} here ({state}).")
        if self._room == len(layout.rooms) - 1:
            parts.append(f"A vault door with a {layout.key_colour}-rimmed lock is here ({self._door}).")
        parts.append("Exits: " + ", ".join(self._neighbours()) + ".")
        return " ".join(parts)

    def _admissible(self) -> list[str]:
        actions = [f"go to {name}" for name in self._neighbours()]
        if self._in_vault:
            actions.append("take gem")
        else:
            for container in self._containers_in(self._room):
                if (self._room, container) in self._opened:
                    actions += [f"take {item}" for item in self._items_in(self._room, container)]
                else:
                    actions.append(f"open {container}")
            if self._room == len(self._layout.rooms) - 1:
                if self._door == "locked":
                    keys = sorted(item for item in self._taken if item.endswith(" key"))
                    actions += [f"unlock vault door with {key}" for key in keys]
                elif self._door == "unlocked":
                    actions.append("open vault door")
        actions += ["look", "inventory"]
        return sorted(actions)


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
