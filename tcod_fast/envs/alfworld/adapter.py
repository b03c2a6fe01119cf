"""ALFWorld behind the :class:`~tcod_fast.envs.base.Env` protocol, on its real TextWorld engine.

Games are folders holding ``game.tw-pddl`` and ``traj_data.json``: the ones written by
``tcod-fast envs make-alfworld-tasks`` (:mod:`tcod_fast.envs.alfworld.generator`) or the
released ALFWorld data (``$ALFWORLD_DATA/json_2.1.1/...``). They are played by TextWorld's
PDDL backend with ALFWorld's own wrappers (the demangler that names objects "drawer 3",
and the game-file info), exactly as ``alfworld``'s ``AlfredTWEnv`` plays them.

Split folders: a split's games are under ``<data_path>/<split>`` or
``<data_path>/json_2.1.1/<split>`` (the released layout), where ``<split>`` is
``train``, ``valid_seen`` or ``valid_unseen``; ``AlfWorldConfig.split_paths`` overrides
that. Task ids are game folders relative to ``data_path``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.alfworld.engine import EnginePool
from tcod_fast.envs.alfworld.generator import TASK_TYPES
from tcod_fast.envs.base import SPLITS, EnvObservation, EnvStep

_WELCOME_BANNER = re.compile(r"^\s*-= Welcome to TextWorld, ALFRED! =-\s*")
_TASK_SENTENCE = re.compile(r"\s*Your task is to:\s*(.*?)\.?\s*$", re.DOTALL)


@dataclass
class AlfWorldConfig:
    """Where the games are and how episodes run.

    Attributes:
        data_path: folder holding the split folders; None reads ``$ALFWORLD_DATA``.
        split_paths: ``{split: folder}`` overriding where a split's games are (a relative
            folder is taken under ``data_path``).
        task_types: only games of these ALFWorld task types are listed.
        max_episode_steps: the episode ends (``done``, ``info["truncated"]``) after this
            many steps; ALFWorld's evaluations use 50. None: no limit.
        strip_task_from_observation: the reset observation loses the welcome banner and
            the "Your task is to: ..." sentence, which is returned as ``task_text``
            (``info["raw_observation"]`` keeps the engine's text).
        max_tasks_per_split: list at most this many games per split (None: all).
    """

    data_path: str | None = None
    split_paths: dict[str, str] = field(default_factory=dict)
    task_types: tuple[str, ...] = TASK_TYPES
    max_episode_steps: int | None = 50
    strip_task_from_observation: bool = True
    max_tasks_per_split: int | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"task_types must be a subset of {TASK_TYPES}, got unknown {unknown}")
        bad_splits = [s for s in self.split_paths if s not in SPLITS]
        if bad_splits:
            raise ValueError(f"split_paths keys must be in {SPLITS}, got {bad_splits}")


_MAKE_TASKS = "tcod-fast envs make-alfworld-tasks --out {out} --n 50 --seed 0 --split seen"


def _holds_a_game(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if "game.tw-pddl" in files:
            return True
    return False


def missing_games(settings: Mapping[str, Any]) -> str | None:
    """One line saying that the ALFWorld settings find no games, and how to make them; None
    when some split folder holds a game.

    Reads the folders as :class:`AlfWorldEnv` does (``data_path``, else ``$ALFWORLD_DATA``;
    ``split_paths``; ``<split>/`` or ``json_2.1.1/<split>/``) without importing ``alfworld``.

    Args:
        settings: the keyword fields of :class:`AlfWorldConfig` (``env.kwargs``).
    """
    data_path = settings.get("data_path") or os.environ.get("ALFWORLD_DATA")
    split_paths = settings.get("split_paths") or {}
    split_paths = split_paths if isinstance(split_paths, Mapping) else {}
    if not data_path and not split_paths:
        return (
            "env.kwargs.data_path must name a folder of ALFWorld games, got neither it nor $ALFWORLD_DATA: make games "
            f"with `{_MAKE_TASKS.format(out='DATA/train')}` and set env.kwargs.data_path=DATA"
        )
    where = "env.kwargs.data_path" if settings.get("data_path") else "env.kwargs.data_path (unset: $ALFWORLD_DATA)"
    root = os.path.abspath(os.path.expanduser(data_path)) if data_path else os.getcwd()
    make = _MAKE_TASKS.format(out=os.path.join(root, "train"))
    if data_path and not os.path.isdir(root):
        return f"{where} must be a folder of ALFWorld games, got {str(data_path)!r}, which does not exist: make games with `{make}`"
    folders = []
    for split in SPLITS:
        if split in split_paths:
            folders.append(os.path.join(root, os.path.expanduser(str(split_paths[split]))))
        else:
            folders += [os.path.join(root, split), os.path.join(root, "json_2.1.1", split)]
    if any(os.path.isdir(folder) and _holds_a_game(folder) for folder in folders):
        return None
    if split_paths:
        return (
            f"env.kwargs.split_paths must name folders of ALFWorld games (holding game.tw-pddl files), got "
            f"{dict(split_paths)!r} under {root!r}, which hold none: make games with `{make}`"
        )
    return (
        f"{where} must be a folder of ALFWorld games (train/, valid_seen/, valid_unseen/ or json_2.1.1/<split>/ "
        f"holding game.tw-pddl files), got {str(data_path)!r}, which has none: make games with `{make}`"
    )


def split_task_text(observation: str) -> tuple[str, str]:
    """``(room description, task sentence)`` of ALFWorld's first observation.

    The banner is dropped; the task is returned without "Your task is to:" and without
    the final period ("put a clean mug in coffeemachine").
    """
    text = _WELCOME_BANNER.sub("", observation)
    marker = text.rfind("Your task is to:")
    if marker < 0:
        return text.strip(), ""
    match = _TASK_SENTENCE.match(text[marker:])
    task = match.group(1).strip() if match else ""
    return text[:marker].strip(), task


def _is_playable_game_dir(directory: str, files: list[str], task_types: set[str]) -> bool:
    # The same filters as alfworld's AlfredTWEnv.collect_game_files: movable-receptacle and
    # sliced tasks are unsupported, and a game must exist and be marked solvable.
    if "traj_data.json" not in files or "game.tw-pddl" not in files:
        return False
    if "movable" in directory or "Sliced" in directory:
        return False
    with open(os.path.join(directory, "traj_data.json")) as f:
        traj_data = json.load(f)
    if traj_data.get("task_type") not in task_types:
        return False
    with open(os.path.join(directory, "game.tw-pddl")) as f:
        game = json.load(f)
    return bool(game.get("solvable", False))


class AlfWorldEnv:
    """ALFWorld games on the real TextWorld engine, one episode at a time.

    ``reset`` loads the game (TextWorld translates its PDDL with Fast Downward: about a
    second or two); a step takes a few hundred milliseconds on CPU. Rewards are 1.0 on
    the winning step and 0.0 otherwise. An action the engine does not accept is played as
    TextWorld plays it ("Nothing happens.", state unchanged) and flagged
    ``info["invalid_action"]``.

    The expert (:meth:`expert_actions`) is the game's stored walkthrough (generated games
    keep the validated expert run) or, for games without one, Fast Downward's plan from the
    reset state. :meth:`expert_next_action` replans from the current state, for curricula
    that hand a turn to the expert after the student went astray.

    Build with keyword fields of :class:`AlfWorldConfig` (``AlfWorldEnv(data_path=...)``,
    as :func:`tcod_fast.envs.registry.make_env` does) or with a config object.
    """

    name = "alfworld"

    def __init__(self, config: AlfWorldConfig | None = None, **fields: Any):
        if config is not None and fields:
            raise TypeError(f"pass either config or keyword fields, got both (fields: {sorted(fields)})")
        # Read the user's variable before importing alfworld: importing it sets
        # ALFWORLD_DATA to ~/.cache/alfworld when unset.
        env_data_path = os.environ.get("ALFWORLD_DATA")
        self.config = config or AlfWorldConfig(**fields)
        data_path = self.config.data_path or env_data_path
        if not data_path and len(self.config.split_paths) < 1:
            raise ValueError(
                "AlfWorldEnv needs games: set data_path (or $ALFWORLD_DATA) to a folder with train/, "
                "valid_seen/, valid_unseen/ (or json_2.1.1/<split>/); generate them with "
                "`tcod-fast envs make-alfworld-tasks --out DIR/train --n N --seed S --split seen`"
            )
        self.data_path = os.path.abspath(os.path.expanduser(data_path)) if data_path else os.getcwd()
        try:
            import alfworld.agents.environment.alfred_tw_env  # noqa: F401
            import textworld  # noqa: F401 - fail here, with the install hint, not mid-episode
        except ImportError as error:
            raise ImportError("AlfWorldEnv needs the `alfworld` package: pip install alfworld==0.4.2") from error
        self._tasks: dict[str, list[str]] = {}
        # Engines are reloaded per game, never rebuilt: each one dlopens its own copy of
        # Fast Downward's 34 MB library, which stays mapped for the life of the process.
        self._engines = EnginePool()
        self._engine = None
        self._state = None
        self._game_file: str | None = None
        self._walkthrough: list[str] | None = None
        self._steps = 0
        self._won = False

    # ----------------------------------------------------------------- tasks
    def split_dir(self, split: str) -> str:
        """The folder holding ``split``'s games."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split in self.config.split_paths:
            return os.path.join(self.data_path, os.path.expanduser(self.config.split_paths[split]))
        for candidate in (os.path.join(self.data_path, split), os.path.join(self.data_path, "json_2.1.1", split)):
            if os.path.isdir(candidate):
                return candidate
        raise FileNotFoundError(
            f"no folder for split {split!r}: expected {os.path.join(self.data_path, split)} or "
            f"{os.path.join(self.data_path, 'json_2.1.1', split)} (or AlfWorldConfig.split_paths); generate one "
            f"with `tcod-fast envs make-alfworld-tasks --out {os.path.join(self.data_path, split)} --n N --seed S "
            f"--split {'unseen' if split == 'valid_unseen' else 'seen'}`"
        )

    def list_tasks(self, split: str) -> list[str]:
        """Game folders of ``split`` relative to ``data_path``, sorted."""
        if split not in self._tasks:
            root = self.split_dir(split)
            task_types = set(self.config.task_types)
            found = []
            for directory, _, files in os.walk(root):
                if _is_playable_game_dir(directory, files, task_types):
                    found.append(os.path.relpath(directory, self.data_path))
            found.sort()
            if self.config.max_tasks_per_split is not None:
                found = found[: self.config.max_tasks_per_split]
            self._tasks[split] = found
        return list(self._tasks[split])

    def _game_file_of(self, task: str) -> str:
        directory = task if os.path.isabs(task) else os.path.join(self.data_path, task)
        game_file = os.path.join(directory, "game.tw-pddl")
        if not os.path.isfile(game_file):
            raise FileNotFoundError(f"task {task!r} has no game file: expected {game_file}")
        return game_file

    # --------------------------------------------------------------- episode
    def reset(self, task: str) -> EnvObservation:
        """Load ``task`` (a game folder from :meth:`list_tasks`, or an absolute path) and start it."""
        game_file = self._game_file_of(task)
        self._engine = self._engines.load(game_file)
        self._state = self._engine.reset()
        self._game_file = game_file
        with open(game_file) as f:
            self._walkthrough = json.load(f).get("walkthrough")
        with open(os.path.join(os.path.dirname(game_file), "traj_data.json")) as f:
            traj_data = json.load(f)
        self._steps = 0
        self._won = bool(self._state["won"])
        raw = self._state["feedback"]
        room, task_text = split_task_text(raw)
        observation = room if self.config.strip_task_from_observation else raw
        return EnvObservation(
            observation=observation,
            admissible_actions=list(self._state["admissible_commands"]),
            task_text=task_text,
            info={
                "task": task,
                "task_type": traj_data.get("task_type", ""),
                "pddl_params": dict(traj_data.get("pddl_params", {})),
                "raw_observation": raw,
                "game_file": game_file,
            },
        )

    def step(self, action: str) -> EnvStep:
        """Play ``action``; unknown actions leave the state unchanged ("Nothing happens.")."""
        if self._engine is None or self._state is None:
            raise RuntimeError("AlfWorldEnv.step called before reset(task)")
        action = action.strip()
        invalid = action not in self._state["admissible_commands"]
        was_won = self._won
        self._state, _, _ = self._engine.step(action)
        self._steps += 1
        self._won = bool(self._state["won"])
        truncated = self.config.max_episode_steps is not None and self._steps >= self.config.max_episode_steps
        return EnvStep(
            observation=self._state["feedback"],
            reward=1.0 if self._won and not was_won else 0.0,
            done=self._won or truncated,
            won=self._won,
            admissible_actions=list(self._state["admissible_commands"]),
            info={"invalid_action": invalid, "steps": self._steps, "truncated": truncated and not self._won},
        )

    # ---------------------------------------------------------------- expert
    def expert_actions(self) -> list[str] | None:
        """Actions that win the current game from its reset state: the game's stored
        walkthrough, else Fast Downward's plan (computed once per game); None before reset
        or when the planner finds no plan."""
        if self._game_file is None:
            return None
        if self._walkthrough is None:
            # A second engine so the episode's own state is left untouched.
            plan = self._engines.load(self._game_file, walkthrough=True).reset()["extra.walkthrough"]
            self._walkthrough = list(plan) if plan else []
        return list(self._walkthrough) or None

    def expert_next_action(self) -> str | None:
        """The first action of Fast Downward's plan from the current state (None if the game
        is won, not started, or has no plan from here)."""
        if self._engine is None or self._won:
            return None
        # TextWorld wrappers forward attribute access to the PDDL backend.
        plan = self._engine._pddl_state.replan(self._engine._entity_infos)
        return plan[0] if plan else None

    def close(self) -> None:
        """Release the engines. Safe to call twice."""
        self._engine = None
        self._state = None
        self._game_file = None
        self._engines.close()
