"""ScienceWorld (30 science-experiment tasks) behind the Env protocol.

Wraps ``scienceworld.ScienceWorldEnv`` (pip ``scienceworld``; its jar runs on Java 8+).
About 0.2 s a step and 1-6 s to load a task variation, so keep tests short.

Tasks are ``"<task_name>/<variation>"``. Splits are the engine's own variation folds:
``train -> train``, ``valid_seen -> dev``, ``valid_unseen -> test`` (ScienceWorld's dev and
test variations use held-out objects/locations, so both are "unseen" in the ALFWorld
sense; ``valid_seen`` is the closer one). Listing a split loads each configured task once
to ask the engine for its folds, so restrict ``task_names`` when listing is on a hot path.

Rewards are score deltas divided by 100, so a won episode's rewards sum to 1.0 less the
score the reset's ``look around`` already earned (``EnvObservation.info["score"]``);
``info["score"]`` keeps the engine's 0-100 score. The episode is won
when the score reaches 100; the engine ends it early (a loss) when the score goes negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tcod_fast.envs.base import EnvObservation, EnvStep, JvmEngineEnv

SPLIT_TO_FOLD = {"train": "train", "valid_seen": "dev", "valid_unseen": "test"}

# ScienceWorld's reply to text it cannot parse into any action.
_UNKNOWN_ACTION_REPLY = "No known action matches that input."


@dataclass
class ScienceWorldConfig:
    """Which ScienceWorld tasks to play and how.

    Attributes:
        task_names: the task names to list (None: all 30 the engine has).
        simplifications: the engine's simplification string, e.g. ``"easy"`` (teleport,
            open doors and containers, no electrical actions where the task allows) or
            ``""`` for the full game.
        env_step_limit: the engine ends the episode after this many steps.
        max_variations_per_task: list at most this many variations per task and split.
    """

    task_names: tuple[str, ...] | None = None
    simplifications: str = "easy"
    env_step_limit: int = 100
    max_variations_per_task: int | None = None


class ScienceWorldEnv(JvmEngineEnv):
    """ScienceWorld behind :class:`~tcod_fast.envs.base.Env`; starts a JVM on construction."""

    name = "scienceworld"

    def __init__(self, config: ScienceWorldConfig | None = None):
        from scienceworld import ScienceWorldEnv as _Engine
        from scienceworld.constants import ID2TASK

        self.config = config or ScienceWorldConfig()
        # Checked against the package's task table before a JVM is started for nothing.
        known = list(ID2TASK.values())
        unknown = [name for name in (self.config.task_names or ()) if name not in known]
        if unknown:
            raise ValueError(f"unknown ScienceWorld task names {unknown}; the engine has {known}")
        self._task_names = list(self.config.task_names or known)
        self._engine = _Engine("", envStepLimit=self.config.env_step_limit)
        self._folds: dict[str, dict[str, list[int]]] = {}
        self._loaded: tuple[str, int] | None = None
        self._gold: list[str] | None = None
        self._admissible: list[str] = []

    def list_tasks(self, split: str) -> list[str]:
        """Task ids ``"<task_name>/<variation>"`` of ``split``, task by task."""
        if split not in SPLIT_TO_FOLD:
            raise ValueError(f"split must be one of {list(SPLIT_TO_FOLD)}, got {split!r}")
        fold = SPLIT_TO_FOLD[split]
        tasks = []
        for task_name in self._task_names:
            variations = self._variation_folds(task_name)[fold][: self.config.max_variations_per_task]
            tasks += [f"{task_name}/{variation}" for variation in variations]
        return tasks

    def reset(self, task: str) -> EnvObservation:
        """Load the variation of ``task`` and return the first ``look around``."""
        task_name, variation = _parse_task(task)
        self._engine.load(task_name, variation, self.config.simplifications, generateGoldPath=True)
        self._loaded = (task_name, variation)
        observation, infos = self._engine.reset()
        self._gold = self._engine.get_gold_action_sequence()
        self._admissible = sorted(infos["valid"])
        return EnvObservation(
            observation=observation.strip(),
            admissible_actions=list(self._admissible),
            task_text=self._engine.get_task_description().strip(),
            # ScienceWorld's reset plays "look around", which may already score a little.
            info={"task": task, "task_name": task_name, "variation": variation, "score": int(infos["score"])},
        )

    def step(self, action: str) -> EnvStep:
        """Play ``action``; unknown actions get the engine's reply and change nothing."""
        if self._loaded is None:
            raise RuntimeError("ScienceWorldEnv.step called before reset")
        observation, reward, done, infos = self._engine.step(action)
        score = int(infos["score"])
        self._admissible = sorted(infos["valid"])
        return EnvStep(
            observation=observation.strip(),
            reward=float(reward) / 100.0,
            done=bool(done) or score >= 100,
            won=score >= 100,
            admissible_actions=list(self._admissible),
            info={
                "score": score,
                "moves": int(infos["moves"]),
                "invalid_action": observation.strip() == _UNKNOWN_ACTION_REPLY,
            },
        )

    def _variation_folds(self, task_name: str) -> dict[str, list[int]]:
        # The folds are only known once a task is loaded; loading discards the current
        # episode, so forget it.
        if task_name not in self._folds:
            self._engine.load(task_name, 0, self.config.simplifications, generateGoldPath=False)
            self._loaded, self._gold = None, None
            self._folds[task_name] = {
                "train": self._engine.get_variations_train(),
                "dev": self._engine.get_variations_dev(),
                "test": self._engine.get_variations_test(),
            }
        return self._folds[task_name]


def _parse_task(task: str) -> tuple[str, int]:
    task_name, _, variation = task.rpartition("/")
    if not task_name or not variation.isdigit():
        raise ValueError(f"ScienceWorld task ids look like 'boil/3', got {task!r}")
    return task_name, int(variation)


def make_scienceworld_env(**config_kwargs: Any) -> ScienceWorldEnv:
    """Build a :class:`ScienceWorldEnv`; keyword arguments go to :class:`ScienceWorldConfig`."""
    if config_kwargs.get("task_names") is not None:
        config_kwargs["task_names"] = tuple(config_kwargs["task_names"])
    return ScienceWorldEnv(ScienceWorldConfig(**config_kwargs))
