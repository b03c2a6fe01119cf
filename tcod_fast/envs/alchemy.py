"""A second small deterministic pure-Python text game: brewing a potion by its recipe card.

*Alchemy lab*: the agent stands at a cauldron by shelves of ingredient jars. A recipe card
names the potion and its steps in order: pour two to four ingredients, some of them
followed by a treatment of the brew with a tool (``use flame`` heats it, ``use spoon`` stirs
it), then ``bottle``. A jar is brought from the shelves with ``fetch <ingredient>`` (one jar at
a time), emptied into the cauldron with ``pour <ingredient>``, or put back with ``return
<ingredient>``.

The word that tells two actions of a verb apart (the ingredient, the tool) follows the verb:
the word-level tokenizers of small models learnt from scratch give a word inside a sentence
(`` flame``) and the same word opening a reply (``flame``) different ids, so a deciding word
that came first would have to be learnt as a mapping, not copied from the card. Treatments
named by a bare verb (``heat``/``stir``) were: teachers and students of several seeds played
them at chance.

Wrong choices are possible and costly: decoy ingredients sharing a word with the recipe's
(``moon dew`` beside ``moon nectar``) stand on the same shelves, and any step in the cauldron
that is not the card's next one (pouring another ingredient, a treatment out of turn,
bottling a half-made brew) spoils the brew, which loses the episode. Fetching the wrong jar
costs turns only. ``read card`` and ``wait`` change nothing (the observation already says
everything); a few such turns in a row, or inadmissible actions, lose the episode. The
engine's own step limit also ends it.

The game shares no action word with the key-and-door game of :mod:`tcod_fast.envs.toy`, and
no noun but the common ones of the engine messages, so a teacher of one game cannot play the
other; it speaks the same action protocol (:data:`~tcod_fast.envs.actions.ACTION_TAGS`), so
one student can learn both.

**Markov observations.** Every observation states the whole state the right next action
depends on: the recipe card, the steps done so far and the next one, the jars left on the
shelves and the jar in hand. So the expert's next action is a function of the observation
text alone, and :meth:`AlchemyEnv.expert_action` gives it from *any* state, on or off the
expert's path.

Splits: ``train`` and ``valid_seen`` draw the ingredients (an essence and a base, ``frost
oil``) from the same pairings, with different task seeds; ``valid_unseen`` uses pairings never
used in ``train`` and recipes with more ingredients than any training recipe can have, so its
episodes are longer. Every word of every split also occurs in training texts, so a
tokenizer learnt from them spells it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tcod_fast.envs.base import SPLITS, EnvObservation, EnvStep
from tcod_fast.envs.family import EnvFamily, Expert, PromptPreset
from tcod_fast.envs.game_steps import end_step

__all__ = [
    "ALCHEMY",
    "AlchemyConfig",
    "AlchemyEnv",
    "IDLE_ACTIONS",
    "is_held_out_ingredient",
    "make_alchemy_env",
]

_ESSENCES = ("frost", "ember", "moon", "marsh", "storm", "thorn")
_BASES = ("dew", "oil", "sap", "ink", "nectar")
_POTIONS = (
    "sleeping draught",
    "healing tonic",
    "courage elixir",
    "fortune philter",
    "clarity tincture",
    "swiftness cordial",
)
#: Steps of a recipe that act on the whole brew (a recipe's pours may be followed by one).
_TREATMENTS = ("use flame", "use spoon")
#: Admissible actions that change nothing.
IDLE_ACTIONS = ("read card", "wait")
_TASK_PREFIX = "alchemy"

_TREATMENT_DONE = {
    "use flame": "You hold the cauldron over the flame until the brew simmers.",
    "use spoon": "You stir the brew with the spoon until it is smooth.",
}
_TREATMENT_SPOILS = {
    "use flame": "The brew boils over the flame and burns. The brew is spoiled. You lost.",
    "use spoon": "The brew curdles under the spoon. The brew is spoiled. You lost.",
}


def is_held_out_ingredient(essence: str, base: str) -> bool:
    """Ingredient (essence, base) pairings reserved for ``valid_unseen`` (a third of them;
    every essence and base also occurs in pairings used for training)."""
    return (_ESSENCES.index(essence) + _BASES.index(base)) % 3 == 0


def _ingredient_pool(held_out: bool) -> list[str]:
    return [f"{essence} {base}" for essence in _ESSENCES for base in _BASES if is_held_out_ingredient(essence, base) == held_out]


#: The largest recipe plus decoys that fit the smaller (held-out) pool of ingredients.
_MAX_JARS = len(_ingredient_pool(True))


@dataclass
class AlchemyConfig:
    """Sizes of the alchemy game.

    Attributes:
        num_tasks: tasks per split, keyed by split name.
        min_ingredients / max_ingredients: ingredients a ``train`` or ``valid_seen`` recipe pours.
        unseen_extra_ingredients: ``valid_unseen`` recipes pour ``max_ingredients`` to
            ``max_ingredients + unseen_extra_ingredients`` ingredients.
        num_decoys: ingredients on the shelves that the recipe does not use.
        max_steps: the episode is lost after this many steps without a win.
        max_idle_steps: the episode is lost after this many steps in a row that change
            nothing (an inadmissible action, ``read card``, ``wait``); 0 never ends it so.
    """

    num_tasks: dict[str, int] = field(default_factory=lambda: {"train": 64, "valid_seen": 16, "valid_unseen": 16})
    min_ingredients: int = 2
    max_ingredients: int = 3
    unseen_extra_ingredients: int = 1
    num_decoys: int = 2
    max_steps: int = 30
    max_idle_steps: int = 3

    def __post_init__(self) -> None:
        counts = self.num_tasks
        if not isinstance(counts, dict) or any(
            split not in SPLITS or not isinstance(count, int) or count < 0 for split, count in counts.items()
        ):
            raise ValueError(f"num_tasks must map splits among {SPLITS} to task counts >= 0, got {counts!r}")
        if self.unseen_extra_ingredients < 0 or self.num_decoys < 0:
            raise ValueError(
                "unseen_extra_ingredients and num_decoys must be >= 0, "
                f"got unseen_extra_ingredients={self.unseen_extra_ingredients}, num_decoys={self.num_decoys}"
            )
        most_jars = self.max_ingredients + self.unseen_extra_ingredients + self.num_decoys
        if not 2 <= self.min_ingredients <= self.max_ingredients or most_jars > _MAX_JARS:
            raise ValueError(
                "ingredients must satisfy 2 <= min_ingredients <= max_ingredients and "
                f"max_ingredients + unseen_extra_ingredients + num_decoys <= {_MAX_JARS}, got min_ingredients={self.min_ingredients}, "
                f"max_ingredients={self.max_ingredients}, unseen_extra_ingredients={self.unseen_extra_ingredients}, "
                f"num_decoys={self.num_decoys}"
            )
        if self.max_steps < 1 or self.max_idle_steps < 0:
            raise ValueError(f"max_steps must be >= 1 and max_idle_steps >= 0, got {self.max_steps} and {self.max_idle_steps}")


@dataclass(frozen=True)
class _Recipe:
    """What one task asks for and what stands on its shelves."""

    potion: str
    steps: tuple[str, ...]  # "pour <ingredient>", "use flame", "use spoon", ..., "bottle"
    shelves: tuple[str, ...]  # the recipe's ingredients and the decoys, sorted
    decoys: tuple[str, ...]

    @property
    def ingredients(self) -> tuple[str, ...]:
        """The ingredients the recipe pours, in order."""
        return tuple(step[len("pour ") :] for step in self.steps if step.startswith("pour "))


@dataclass
class _State:
    """The mutable part of an episode."""

    done: int = 0  # recipe steps completed
    held: str | None = None  # the jar in hand
    steps: int = 0
    idle_steps: int = 0  # steps in a row that changed nothing
    over: bool = False

    def poured(self, recipe: _Recipe) -> set[str]:
        return {step[len("pour ") :] for step in recipe.steps[: self.done] if step.startswith("pour ")}


def _task_format_error(task: str) -> ValueError:
    return ValueError(f"alchemy task ids look like '{_TASK_PREFIX}/<split>/<index>' with split in {SPLITS}, got {task!r}")


def _recipe_for(task: str, config: AlchemyConfig) -> _Recipe:
    try:
        prefix, split, index_text = task.split("/")
        int(index_text)
    except (ValueError, AttributeError):
        raise _task_format_error(task) from None
    if prefix != _TASK_PREFIX or split not in SPLITS:
        raise _task_format_error(task)
    # A string seed is hashed with SHA-512 by `random`, so recipes are the same on every
    # machine and Python run (unlike hash()).
    rng = random.Random(f"alchemy:{split}:{int(index_text)}")
    unseen = split == "valid_unseen"
    if unseen:
        count = rng.randint(config.max_ingredients, config.max_ingredients + config.unseen_extra_ingredients)
    else:
        count = rng.randint(config.min_ingredients, config.max_ingredients)
    pool = _ingredient_pool(unseen)
    ingredients = rng.sample(pool, count)
    treatments = [rng.choice(("", *_TREATMENTS)) for _ in ingredients]
    if not any(treatments):  # every recipe treats the brew at least once
        treatments[rng.randrange(count)] = rng.choice(_TREATMENTS)
    steps: list[str] = []
    for ingredient, treatment in zip(ingredients, treatments):
        steps.append(f"pour {ingredient}")
        if treatment:
            steps.append(treatment)
    steps.append("bottle")
    # Decoys share an essence or a base with a recipe ingredient where the pool allows.
    words = {word for ingredient in ingredients for word in ingredient.split()}
    others = [ingredient for ingredient in pool if ingredient not in ingredients]
    confusable = [ingredient for ingredient in others if words & set(ingredient.split())]
    decoys = rng.sample(confusable, min(config.num_decoys, len(confusable)))
    rest = [ingredient for ingredient in others if ingredient not in decoys]
    decoys += rng.sample(rest, config.num_decoys - len(decoys))
    return _Recipe(rng.choice(_POTIONS), tuple(steps), tuple(sorted(ingredients + decoys)), tuple(sorted(decoys)))


def _spoken_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class AlchemyEnv:
    """The alchemy game behind the :class:`~tcod_fast.envs.base.Env` protocol.

    Task ids are ``"alchemy/<split>/<index>"``. Reward is 1.0 on the winning step, else 0.
    Besides the protocol it offers :meth:`expert_action`, the expert's action from the
    current state, and :meth:`expert_plan`, the expert's whole plan from it.
    """

    name = "alchemy"

    def __init__(self, config: AlchemyConfig | None = None):
        self.config = config or AlchemyConfig()
        self._recipe: _Recipe | None = None
        self._state: _State | None = None
        self._task = ""

    @property
    def recipe(self) -> _Recipe | None:
        """The current task's recipe (potion, steps, shelves, decoys); for tests."""
        return self._recipe

    # -- protocol -------------------------------------------------------------------
    def list_tasks(self, split: str) -> list[str]:
        """Task ids of ``split``."""
        if split not in self.config.num_tasks:
            raise ValueError(f"split must be one of {sorted(self.config.num_tasks)}, got {split!r}")
        return [f"{_TASK_PREFIX}/{split}/{i}" for i in range(self.config.num_tasks[split])]

    def reset(self, task: str) -> EnvObservation:
        """Start ``task`` with an empty cauldron and empty hands."""
        self._recipe = _recipe_for(task, self.config)
        self._task = task
        self._state = _State()
        return EnvObservation(
            observation=self._describe(),
            admissible_actions=self._admissible(),
            task_text=f"brew the {self._recipe.potion} by its recipe card and bottle it.",
            info={"task": task},
        )

    def step(self, action: str) -> EnvStep:
        """Play one action; unknown or inadmissible actions change nothing but cost a step."""
        if self._recipe is None:
            raise RuntimeError("AlchemyEnv.step called before reset")
        state, recipe = self._state, self._recipe
        if state.over:
            return EnvStep("The game is over.", 0.0, True, False, [], {"task": self._task})
        state.steps += 1
        action = " ".join(str(action).strip().lower().split())
        info: dict[str, Any] = {"task": self._task, "invalid_action": False}
        won = lost = False
        next_step = recipe.steps[state.done]
        if action not in self._admissible():
            feedback = "Nothing happens."
            info["invalid_action"] = True
        elif action.startswith("fetch "):
            state.held = action[len("fetch ") :]
            feedback = f"You fetch the jar of {state.held} from the shelves."
        elif action.startswith("return "):
            feedback = f"You put the jar of {state.held} back on the shelves."
            state.held = None
        elif action.startswith("pour "):
            feedback = f"You pour the {state.held} into the cauldron."
            state.held = None
            if action == next_step:
                state.done += 1
            else:
                lost = True
                feedback += " It turns to black sludge. The brew is spoiled. You lost."
        elif action in _TREATMENTS:
            if action == next_step:
                state.done += 1
                feedback = _TREATMENT_DONE[action]
            else:
                lost = True
                feedback = _TREATMENT_SPOILS[action]
        elif action == "bottle":
            if action == next_step:
                won = True
                feedback = f"You fill a flask with the brew and seal it: the {recipe.potion} is ready. You won!"
            else:
                lost = True
                feedback = "You bottle a half-made brew. It is worthless. You lost."
        else:  # read card, wait: the description below says it all
            feedback = ""
        idle = info["invalid_action"] or action in IDLE_ACTIONS
        return end_step(
            state, self.config, feedback=feedback, won=won, lost=lost, idle=idle, info=info,
            describe=self._describe, admissible=self._admissible,
        )

    def expert_action(self) -> str | None:
        """The expert's next action from the current state (on or off its own path);
        ``None`` before a reset or once the episode is over."""
        if self._state is None or self._state.over:
            return None
        return _expert_action(self._recipe, self._state)

    def expert_actions(self) -> list[str] | None:
        """The shortest winning action list from the reset state of the current task."""
        if self._recipe is None:
            return None
        return _plan(self._recipe, _State())

    def expert_plan(self) -> list[str] | None:
        """The shortest winning action list from the current state; ``None`` before a reset
        or once the episode is over."""
        if self._state is None or self._state.over:
            return None
        state = self._state
        return _plan(self._recipe, _State(done=state.done, held=state.held))

    def close(self) -> None:
        """Nothing to release."""

    # -- world model ---------------------------------------------------------------
    def _on_shelves(self) -> list[str]:
        recipe, state = self._recipe, self._state
        gone = state.poured(recipe) | {state.held}
        return [ingredient for ingredient in recipe.shelves if ingredient not in gone]

    def _describe(self) -> str:
        recipe, state = self._recipe, self._state
        parts = [
            "You stand at the cauldron of the alchemy lab.",
            f"The recipe card for the {recipe.potion} reads: {', '.join(recipe.steps)}.",
            f"Done so far: {', '.join(recipe.steps[: state.done])}." if state.done else "The cauldron is empty.",
            f"Next step: {recipe.steps[state.done]}.",
        ]
        jars = self._on_shelves()
        parts.append(f"The shelves hold jars of {_spoken_list(jars)}." if jars else "The shelves are bare.")
        parts.append(f"You hold the jar of {state.held}." if state.held else "Your hands are empty.")
        return " ".join(parts)

    def _admissible(self) -> list[str]:
        state = self._state
        if state.held:
            actions = [f"pour {state.held}", f"return {state.held}"]
        else:
            actions = [f"fetch {ingredient}" for ingredient in self._on_shelves()]
        if state.done:  # the cauldron holds something
            actions += [*_TREATMENTS, "bottle"]
        actions += IDLE_ACTIONS
        return sorted(actions)


def _expert_action(recipe: _Recipe, state: _State) -> str:
    """The shortest way to the bottled potion from ``state``: it reads two facts the
    observation states (the card's next step and the jar in hand)."""
    next_step = recipe.steps[state.done]
    if not next_step.startswith("pour "):
        return next_step
    wanted = next_step[len("pour ") :]
    if state.held == wanted:
        return next_step
    if state.held:
        return f"return {state.held}"
    return f"fetch {wanted}"


def _plan(recipe: _Recipe, state: _State) -> list[str]:
    """The expert's actions from ``state`` (a copy, changed while planning) to the win."""
    actions: list[str] = []
    while not actions or actions[-1] != "bottle":
        action = _expert_action(recipe, state)
        if action.startswith("fetch "):
            state.held = action[len("fetch ") :]
        elif action.startswith("return "):
            state.held = None
        else:  # a recipe step
            state.held = None if action.startswith("pour ") else state.held
            state.done += action != "bottle"
        actions.append(action)
    return actions


def make_alchemy_env(**config_kwargs: Any) -> AlchemyEnv:
    """Build an :class:`AlchemyEnv`; keyword arguments go to :class:`AlchemyConfig`."""
    return AlchemyEnv(AlchemyConfig(**config_kwargs))


#: The alchemy game's record, registered among the built-in families by :mod:`tcod_fast.envs.registry`.
ALCHEMY = EnvFamily(
    name="alchemy",
    summary="The potion-brewing game: pure Python, microseconds a step; a second game family for tests, DAgger and multi-teacher runs.",
    factory=make_alchemy_env,
    config_class=AlchemyConfig,
    prompt=PromptPreset("You are an expert alchemist brewing a potion by its recipe card in a text game."),
    expert=Expert("the recipe's remaining steps, replanned from the current state", from_any_state=True),
    tiny_overrides=("env.kwargs={max_ingredients: 2, max_steps: 8}",),
)
