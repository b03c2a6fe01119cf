"""ALFWorld's TextWorld engine, its experts, and the wheel's domain and grammar.

Every TextWorld PDDL engine ``dlopen``s its own 34 MB copy of Fast Downward's library,
which is never unloaded, so engines are kept and reloaded with the next game
(:class:`EnginePool`) instead of being built per game.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

EXPERT_HANDCODED = "handcoded"
EXPERT_PLANNER = "planner"


def alfworld_domain_and_grammar() -> tuple[str, str]:
    """The wheel's ``alfred.pddl`` and ``alfred.twl2`` texts."""
    try:
        import alfworld
    except ImportError as error:
        raise ImportError("ALFWorld tasks need the `alfworld` package: pip install alfworld==0.4.2") from error
    data_dir = os.path.join(os.path.dirname(alfworld.__file__), "data")
    with open(os.path.join(data_dir, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(data_dir, "alfred.twl2")) as f:
        grammar = f.read()
    return domain, grammar


def start_engine(game_file: str, *, expert_type: str | None = None, walkthrough: bool = False):
    """Load ``game_file`` in TextWorld's PDDL engine with ALFWorld's wrappers.

    Args:
        game_file: path to a ``game.tw-pddl`` (its folder must hold ``traj_data.json``
            when ``expert_type == "handcoded"``).
        expert_type: None, ``"handcoded"`` or ``"planner"``; adds ALFWorld's expert
            wrapper, whose next action is ``state["extra.expert_plan"][0]``.
        walkthrough: also request ``extra.walkthrough`` at reset (the game's stored
            walkthrough, or a Fast Downward plan from the initial state when it has none).

    Returns:
        The wrapped TextWorld environment (``reset()``, ``step(command)``, ``load(file)``).
    """
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

    extras = ["gamefile"]
    if expert_type is not None:
        extras.append("expert_plan")
    if walkthrough:
        extras.append("walkthrough")
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
    wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
    if expert_type is not None:
        wrappers.append(AlfredExpert(expert_type=expert_type))
    return textworld.start(game_file, infos, wrappers=wrappers)


class EnginePool:
    """One engine per wrapper setup, reloaded for each game."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str | None, bool], object] = {}

    def load(self, game_file: str, *, expert_type: str | None = None, walkthrough: bool = False):
        """An engine with ``game_file`` loaded (see :func:`start_engine` for the options)."""
        key = (expert_type, walkthrough)
        engine = self._engines.get(key)
        if engine is None:
            engine = start_engine(game_file, expert_type=expert_type, walkthrough=walkthrough)
            self._engines[key] = engine
            return engine
        try:
            engine.load(game_file)
        except BaseException:
            # A failed load may leave the engine half-loaded; build a fresh one next time.
            self._engines.pop(key, None)
            raise
        return engine

    def close(self) -> None:
        """Close every engine. Safe to call twice."""
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()


def track_moves_as_puts(policy) -> None:
    """Make a policy of ALFWorld's handcoded expert record ``move X to Y`` as the placement it is.

    ALFWorld 0.4 renamed the placing command ``put X in/on Y`` to ``move X to Y``, and its
    handcoded expert's predicates follow, but its state tracking
    (``BasePolicy.update_state_tracking``) still recognises a placement by the word ``put``.
    After placing an object it therefore believes it still carries it: a task that ends with
    that placement is won anyway, but in ``pick_two_obj_and_place`` it walks back to where it
    took the first object to return it there, issues ``move <first object> to ...`` for the
    second, which the engine refuses, and falls back on random admissible commands. It loses
    such tasks whatever the layout (the cause is in its code, not in the games) unless chance saves it.
    This gives that one step of its bookkeeping the ``put`` it expects, changing nothing else.

    Args:
        policy: the expert's task policy (``HandCodedTWAgent.policy``, made at each reset).
    """
    track = policy.update_state_tracking

    def update_state_tracking(game_state, last_action):
        command = str(last_action)
        if command.startswith("move ") and " to " in command:
            placed, receptacle = command[len("move ") :].split(" to ", 1)
            command = f"put {placed} in/on {receptacle}"
        return track(game_state, command)

    policy.update_state_tracking = update_state_tracking


def run_handcoded_expert(
    pool: EnginePool, game_file: str, max_steps: int, seed: int, *, track_moves: bool = True
) -> list[str] | None:
    """Play ALFWorld's handcoded expert on ``game_file``; its actions if it wins, else None.

    A game already won at reset counts as a failure (an empty plan teaches nothing).

    Args:
        pool: the engines.
        game_file: a ``game.tw-pddl`` beside its ``traj_data.json``.
        max_steps: the expert gives up after this many steps.
        seed: seeds the expert's tie-breaking.
        track_moves: correct the expert's tracking of placements (:func:`track_moves_as_puts`);
            False plays it exactly as ALFWorld 0.4.2 ships it.
    """
    # The expert breaks ties with the global `random`; seed it so a task's walkthrough
    # is reproducible, and leave the caller's random state as it was.
    saved_state = random.getstate()
    random.seed(seed)
    try:
        engine = pool.load(game_file, expert_type=EXPERT_HANDCODED)
        engine._handcoded_expert.max_steps = max_steps
        state = engine.reset()
        if track_moves:
            track_moves_as_puts(engine._handcoded_expert.policy)
        if state["won"]:
            return None
        actions: list[str] = []
        for _ in range(max_steps):
            action = state["extra.expert_plan"][0]
            state, _, _ = engine.step(action)
            actions.append(action)
            if state["won"]:
                return actions
        return None
    except (Exception, SystemExit):  # noqa: BLE001 - the expert raises on timeout; the translator exits on bad input
        return None
    finally:
        random.setstate(saved_state)


def run_planner(pool: EnginePool, game_file: str) -> list[str] | None:
    """Play Fast Downward's plan from the initial state of ``game_file``; the plan if it wins."""
    try:
        engine = pool.load(game_file, walkthrough=True)
        state = engine.reset()
        if state["won"]:
            return None
        plan = list(state["extra.walkthrough"] or [])
        for action in plan:
            if action not in state["admissible_commands"]:
                return None
            state, _, _ = engine.step(action)
        return plan if plan and state["won"] else None
    except (Exception, SystemExit):  # noqa: BLE001 - an unsolvable problem raises (or exits) in the translator
        return None


def replay_wins(pool: EnginePool, game_file: str, actions: Sequence[str]) -> bool:
    """Replay ``actions`` from the initial state; True if every action was admissible when
    played and the game is won after the last one (and not before)."""
    engine = pool.load(game_file)
    state = engine.reset()
    for action in actions:
        if state["won"] or action not in state["admissible_commands"]:
            return False
        state, _, _ = engine.step(action)
    return bool(state["won"])
