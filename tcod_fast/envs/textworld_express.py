"""TextWorld-Express games (cookingworld, coin, twc, mapreader, ...) behind the Env protocol.

Wraps ``textworld_express.TextWorldExpressEnv`` (pip ``textworld-express``; its jar runs
on Java 8+). The engine is fast (a few ms a step), which makes it the environment of
choice for CPU tests and demos.

Tasks are ``"<game>/<fold>/<seed>"``. The engine keeps disjoint seed ranges per fold; our
splits map ``train -> train``, ``valid_seen -> dev`` and ``valid_unseen -> test``. For
``twc`` the folds also hold disjoint object sets (truly unseen objects); for the other
games the dev/test folds are new seeds of the same generator.

The expert is the engine's gold path, generated at reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tcod_fast.envs.base import EnvObservation, EnvStep, JvmEngineEnv

#: Our split name -> the engine's fold name.
SPLIT_TO_FOLD = {"train": "train", "valid_seen": "dev", "valid_unseen": "test"}

#: Small, short-episode settings per game, used when no ``game_params`` are given. The
#: engine's defaults make long episodes (e.g. cookingworld with many rooms and doors).
DEFAULT_GAME_PARAMS = {
    "cookingworld": "numLocations=1,numIngredients=2,numDistractorItems=2,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=3,numDistractorItems=2,includeDoors=0",
    "twc": "numLocations=1,numItemsToPutAway=2",
    "mapreader": "numLocations=4,maxDistanceApart=2,includeDoors=0,maxDistractorItemsPerLocation=1",
}


@dataclass
class TextWorldExpressConfig:
    """Which TextWorld-Express game to play and how.

    Attributes:
        game: one of the engine's games (``textworld_express.GAME_NAMES``).
        game_params: the engine's generation parameters, e.g. ``"numLocations=3,includeDoors=0"``;
            None picks :data:`DEFAULT_GAME_PARAMS` for the game (or the engine's defaults).
        env_step_limit: the engine ends the episode after this many steps.
        max_tasks_per_split: list at most this many seeds per split (None: all the engine has).
        generate_gold_path: ask the engine for the gold path at reset (the expert).
    """

    game: str = "coin"
    game_params: str | None = None
    env_step_limit: int = 50
    max_tasks_per_split: int | None = None
    generate_gold_path: bool = True


class TextWorldExpressEnv(JvmEngineEnv):
    """One TextWorld-Express game behind :class:`~tcod_fast.envs.base.Env`.

    Starts its own JVM on construction (about half a second). Rewards are the engine's
    score deltas (the score is 1.0 on a win); ``info["score"]`` carries the score itself.
    """

    def __init__(self, config: TextWorldExpressConfig | None = None):
        from textworld_express import GAME_NAMES
        from textworld_express import TextWorldExpressEnv as _Engine

        self.config = config or TextWorldExpressConfig()
        if self.config.game not in GAME_NAMES:
            raise ValueError(f"game must be one of {GAME_NAMES}, got {self.config.game!r}")
        self.name = f"twx-{self.config.game}"
        self._game_params = (
            self.config.game_params
            if self.config.game_params is not None
            else DEFAULT_GAME_PARAMS.get(self.config.game, "")
        )
        self._engine = _Engine(envStepLimit=self.config.env_step_limit)
        self._engine.load(self.config.game, self._game_params)
        self._seeds_by_fold: dict[str, list[int]] | None = None
        self._gold: list[str] | None = None
        self._admissible: list[str] = []

    def list_tasks(self, split: str) -> list[str]:
        """Task ids ``"<game>/<fold>/<seed>"`` of ``split``, seeds in the engine's order."""
        if split not in SPLIT_TO_FOLD:
            raise ValueError(f"split must be one of {list(SPLIT_TO_FOLD)}, got {split!r}")
        if self._seeds_by_fold is None:
            self._seeds_by_fold = {
                "train": self._engine.getValidSeedsTrain(),
                "dev": self._engine.getValidSeedsDev(),
                "test": self._engine.getValidSeedsTest(),
            }
        fold = SPLIT_TO_FOLD[split]
        seeds = self._seeds_by_fold[fold][: self.config.max_tasks_per_split]
        return [f"{self.config.game}/{fold}/{seed}" for seed in seeds]

    def reset(self, task: str) -> EnvObservation:
        """Generate the game of ``task`` (``"<game>/<fold>/<seed>"``) and return its first view."""
        game, fold, seed = _parse_task(task)
        if game != self.config.game:
            raise ValueError(f"this env plays {self.config.game!r}; task {task!r} is for {game!r}")
        observation, infos = self._engine.reset(
            seed=seed, gameFold=fold, generateGoldPath=self.config.generate_gold_path
        )
        self._gold = self._engine.getGoldActionSequence() if self.config.generate_gold_path else None
        self._admissible = sorted(infos["validActions"])
        return EnvObservation(
            observation=observation.strip(),
            admissible_actions=list(self._admissible),
            task_text=infos["taskDescription"].strip(),
            info={"task": task, "game": game, "fold": fold, "seed": seed},
        )

    def step(self, action: str) -> EnvStep:
        """Play ``action``; the engine answers unknown actions with a message, not an error."""
        if self._gold is None and not self._admissible:
            raise RuntimeError("TextWorldExpressEnv.step called before reset")
        was_admissible = action in self._admissible
        observation, reward, done, infos = self._engine.step(action)
        self._admissible = sorted(infos["validActions"])
        info: dict[str, Any] = {
            "score": float(infos["score"]),
            "invalid_action": not was_admissible,
            "moves": int(infos["numMoves"]),
        }
        return EnvStep(
            observation=observation.strip(),
            reward=float(reward),
            done=bool(done),
            won=bool(infos["tasksuccess"]),
            admissible_actions=list(self._admissible),
            info=info,
        )


def _parse_task(task: str) -> tuple[str, str, int]:
    parts = task.split("/")
    if len(parts) != 3 or parts[1] not in SPLIT_TO_FOLD.values() or not parts[2].isdigit():
        raise ValueError(f"TextWorld-Express task ids look like 'coin/train/17', got {task!r}")
    return parts[0], parts[1], int(parts[2])


def make_textworld_express_env(game: str = "coin", **config_kwargs: Any) -> TextWorldExpressEnv:
    """Build a :class:`TextWorldExpressEnv`; keyword arguments go to :class:`TextWorldExpressConfig`."""
    return TextWorldExpressEnv(TextWorldExpressConfig(game=game, **config_kwargs))
