"""The alchemy game: Markov observations, an expert that wins from any state, mistakes that
spoil the brew, splits that differ, a vocabulary the training split covers, and no action
shared with the key-and-door game."""

import json
import pickle
import random
import re

import pytest

from tcod_fast.envs import SPLITS, Env, EnvObservation, EnvStep
from tcod_fast.envs.actions import ACTION_TAGS
from tcod_fast.envs.alchemy import ALCHEMY, IDLE_ACTIONS, AlchemyConfig, AlchemyEnv, is_held_out_ingredient
from tcod_fast.envs.registry import ENV_NAMES, EnvSpec, check_env_settings, get_env_family, make_env
from tcod_fast.envs.toy import KeyDoorEnv
from tcod_fast.tiny_models import WORD_PIECE_PATTERN
from tcod_fast.tiny_settings import tiny_train_overrides


@pytest.fixture
def env():
    return AlchemyEnv()


def play(env, actions):
    step = None
    for action in actions:
        step = env.step(action)
    return step


def _state_part(observation_text):
    """The observation without the feedback of the previous action: it starts at the lab sentence."""
    at = observation_text.find("You stand at the cauldron")
    return observation_text[at:] if at >= 0 else observation_text


def _random_walk_states(env, tasks, rng, walks_per_task, max_actions=12):
    """(task, observation text, expert action) over random walks of admissible actions, the
    idle ones left out so the episode only ends by winning or losing: many states off the
    expert's path (decoys fetched, jars returned, the wrong jar in hand)."""
    for task in tasks:
        for _ in range(walks_per_task):
            observation = env.reset(task)
            text, admissible = observation.observation, observation.admissible_actions
            for _ in range(rng.randint(0, max_actions)):
                yield task, text, env.expert_action()
                step = env.step(rng.choice([a for a in admissible if a not in IDLE_ACTIONS]))
                if step.done:
                    break
                text, admissible = step.observation, step.admissible_actions
            else:
                yield task, text, env.expert_action()


def _first_task(env, split, predicate):
    for task in env.list_tasks(split):
        env.reset(task)
        if predicate(env.recipe):
            return task
    raise AssertionError(f"no {split} task fits")


# ------------------------------------------------------------------ protocol and expert


def test_follows_the_env_protocol(env):
    assert isinstance(env, Env)
    observation = env.reset("alchemy/train/0")
    assert isinstance(observation, EnvObservation)
    assert observation.task_text == f"brew the {env.recipe.potion} by its recipe card and bottle it."
    assert isinstance(env.step("wait"), EnvStep)


@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins_every_task_with_admissible_actions(env, split):
    lengths = []
    for task in env.list_tasks(split):
        observation = env.reset(task)
        expert = env.expert_actions()
        assert env.expert_plan() == expert
        lengths.append(len(expert))
        admissible = observation.admissible_actions
        for turn, action in enumerate(expert):
            assert action in admissible, (task, action, admissible)
            assert env.expert_action() == action  # the planned path is the current-state expert's
            step = env.step(action)
            assert step.done == (turn == len(expert) - 1)
            admissible = step.admissible_actions
        assert step.won and step.reward == 1.0, task
        assert env.expert_action() is None and env.expert_plan() is None  # the episode is over
        assert env.expert_actions() == expert  # still the plan from the reset state
    # episodes are short, vary in length, and the unseen ones are longer
    assert 6 <= min(lengths) and max(lengths) <= (13 if split == "valid_unseen" else 10)
    assert len(set(lengths)) >= 3
    if split == "valid_unseen":
        assert min(lengths) >= 8


@pytest.mark.parametrize("split", ["train", "valid_unseen"])
def test_expert_action_is_a_function_of_the_observation_text(split):
    """The Markov property: two states that read the same call for the same action, over
    thousands of on- and off-path states of many tasks."""
    env = AlchemyEnv(AlchemyConfig(num_tasks={split: 120}))
    rng = random.Random(f"markov:{split}")
    action_for_text: dict[str, str] = {}
    states = 0
    for task, text, action in _random_walk_states(env, env.list_tasks(split), rng, walks_per_task=6):
        key = _state_part(text)
        assert action_for_text.setdefault(key, action) == action, (task, key, action_for_text[key], action)
        states += 1
    assert states > 1000
    assert len(action_for_text) > 300


def test_random_walks_reach_off_path_states(env):
    """The states above include ones the expert's own path never visits."""
    rng = random.Random(1)
    tasks = env.list_tasks("train")
    on_path: set[str] = set()
    for task in tasks:
        on_path.add(_state_part(env.reset(task).observation))
        for action in env.expert_actions():
            on_path.add(_state_part(env.step(action).observation))
    visited = {_state_part(text) for _, text, _ in _random_walk_states(env, tasks, rng, walks_per_task=4)}
    assert len(visited - on_path) > len(visited) // 3


@pytest.mark.parametrize("split", SPLITS)
def test_expert_action_from_random_states_wins(env, split):
    """From any reachable state that has not lost, following expert_action wins, along the
    plan expert_plan gave in that state."""
    rng = random.Random(f"expert-from-anywhere:{split}")
    episodes = 0
    for task in env.list_tasks(split):
        for _ in range(4):
            observation = env.reset(task)
            admissible, step = observation.admissible_actions, None
            for _ in range(rng.randint(1, 8)):  # a random detour, avoiding the idle actions
                step = env.step(rng.choice([a for a in admissible if a not in IDLE_ACTIONS]))
                if step.done:
                    break
                admissible = step.admissible_actions
            if step.done:
                continue  # the detour won or lost by itself (a wrong step spoils the brew)
            episodes += 1
            plan, played = env.expert_plan(), []
            while not step.done:
                action = env.expert_action()
                assert action in step.admissible_actions, (task, action, step.observation)
                played.append(action)
                step = env.step(action)
            assert step.won, (task, step.observation)
            assert played == plan
    assert episodes > len(env.list_tasks(split))


# ------------------------------------------------------------------ the world


def test_observation_states_card_progress_shelves_and_hands(env):
    task = _first_task(env, "train", lambda recipe: recipe.steps[1] in ("use flame", "use spoon"))
    observation = env.reset(task).observation
    recipe = env.recipe
    first, second = recipe.ingredients[:2]
    assert f"The recipe card for the {recipe.potion} reads: {', '.join(recipe.steps)}." in observation
    assert "The cauldron is empty." in observation and f"Next step: pour {first}." in observation
    assert "Your hands are empty." in observation
    for ingredient in recipe.shelves:
        assert ingredient in observation
    step = play(env, [f"fetch {first}"])
    assert f"You hold the jar of {first}." in step.observation
    assert first not in step.observation.split("The shelves hold jars of ")[1].split(".")[0]
    assert set(step.admissible_actions) == {f"pour {first}", f"return {first}", *IDLE_ACTIONS}
    step = play(env, [f"pour {first}", recipe.steps[1]])
    assert f"Done so far: pour {first}, {recipe.steps[1]}." in step.observation
    assert f"Next step: pour {second}." in step.observation and "Your hands are empty." in step.observation
    assert {"use flame", "use spoon", "bottle"} <= set(step.admissible_actions)


def test_decoys_share_a_word_with_the_recipe_and_returning_a_jar_costs_turns_only(env):
    for task in env.list_tasks("train"):
        env.reset(task)
        recipe = env.recipe
        words = {word for ingredient in recipe.ingredients for word in ingredient.split()}
        assert len(recipe.decoys) == 2 and not set(recipe.decoys) & set(recipe.ingredients)
        assert any(words & set(decoy.split()) for decoy in recipe.decoys), task
    decoy = recipe.decoys[0]
    step = play(env, [f"fetch {decoy}", f"return {decoy}"])
    assert not step.done and f"fetch {decoy}" in step.admissible_actions
    assert _state_part(step.observation) == _state_part(env.reset(task).observation)


def test_every_wrong_step_in_the_cauldron_spoils_the_brew(env):
    # pouring a decoy
    env.reset("alchemy/train/0")
    decoy = env.recipe.decoys[0]
    step = play(env, [f"fetch {decoy}", f"pour {decoy}"])
    assert step.done and not step.won and step.reward == 0.0
    assert "The brew is spoiled. You lost." in step.observation
    assert env.step(env.recipe.steps[0]).observation == "The game is over."
    assert env.expert_action() is None
    # pouring the recipe's later ingredient first
    env.reset("alchemy/train/0")
    later = env.recipe.ingredients[1]
    assert play(env, [f"fetch {later}", f"pour {later}"]).observation.endswith("You lost.")
    # a treatment out of turn, bottling a half-made brew
    task = _first_task(env, "train", lambda recipe: recipe.steps[1].startswith("pour "))
    for wrong, message in (("use flame", "boils over"), ("use spoon", "curdles"), ("bottle", "half-made")):
        env.reset(task)
        first = env.recipe.ingredients[0]
        step = play(env, [f"fetch {first}", f"pour {first}", wrong])
        assert step.done and not step.won and message in step.observation, (wrong, step.observation)


def test_invalid_and_idle_actions_waste_turns_and_lose_in_a_row():
    env = AlchemyEnv(AlchemyConfig(max_idle_steps=3))
    observation = env.reset("alchemy/valid_seen/3")
    for action in ("dance wildly", "", "go east", "take gem", "use flame", "bottle", "pour " + env.recipe.ingredients[0], None, 7):
        env.reset("alchemy/valid_seen/3")
        step = env.step(action)
        assert step.observation.startswith("Nothing happens."), action
        assert step.info["invalid_action"] and not step.done and step.reward == 0.0
        assert step.admissible_actions == observation.admissible_actions
    env.reset("alchemy/valid_seen/3")
    assert not play(env, ["read card", "wait"]).done
    step = env.step("nonsense")
    assert step.done and not step.won and "3 steps in a row changed nothing. You lost." in step.observation
    # a useful step in between resets the count; actions are read case- and space-insensitively
    env.reset("alchemy/valid_seen/3")
    first = env.recipe.ingredients[0]
    step = play(env, ["wait", "wait", f"  FETCH   {first.title()} ", "wait", "wait"])
    assert not step.done and f"You hold the jar of {first}." in step.observation

    env = AlchemyEnv(AlchemyConfig(max_steps=4, max_idle_steps=0))
    env.reset("alchemy/valid_seen/3")
    step = play(env, ["wait"] * 4)
    assert step.done and not step.won and step.observation.endswith("You ran out of time.")


def test_random_agent_mostly_fails(env):
    rng = random.Random(0)
    wins = 0
    tasks = env.list_tasks("valid_seen")
    for task in tasks:
        admissible = env.reset(task).admissible_actions
        step = None
        while step is None or not step.done:
            step = env.step(rng.choice(admissible))
            admissible = step.admissible_actions
        wins += step.won
    assert wins < len(tasks) // 4


# ------------------------------------------------------------------ tasks and splits


def test_tasks_are_deterministic_and_varied():
    first, second = AlchemyEnv(), AlchemyEnv()
    tasks = first.list_tasks("train")
    for task in tasks[:10]:
        assert first.reset(task) == second.reset(task)
        assert first.expert_actions() == second.expert_actions()
        assert play(first, first.expert_actions()) == play(second, second.expert_actions())
    openings, experts = set(), set()
    for task in tasks:
        openings.add(first.reset(task).observation)
        experts.add(tuple(first.expert_actions()))
    assert len(experts) > len(tasks) * 3 // 4 and len(openings) > len(tasks) * 3 // 4
    # the splits draw different tasks
    seen = set()
    for task in first.list_tasks("valid_seen"):
        first.reset(task)
        seen.add(tuple(first.expert_actions()))
    assert len(seen - experts) > len(seen) // 2


def test_unseen_split_uses_held_out_ingredients_and_longer_recipes():
    env = AlchemyEnv(AlchemyConfig(num_tasks={"train": 200, "valid_seen": 50, "valid_unseen": 50}))

    def recipes(split):
        found = []
        for task in env.list_tasks(split):
            env.reset(task)
            found.append(env.recipe)
        return found

    def pairings(recipe):
        return [tuple(ingredient.split()) for ingredient in recipe.shelves]

    train, seen, unseen = recipes("train"), recipes("valid_seen"), recipes("valid_unseen")
    for recipe in train + seen:
        assert not any(is_held_out_ingredient(*pairing) for pairing in pairings(recipe))
    assert all(is_held_out_ingredient(*pairing) for recipe in unseen for pairing in pairings(recipe))
    assert {len(recipe.ingredients) for recipe in train} == {2, 3}
    assert {len(recipe.ingredients) for recipe in unseen} == {3, 4}
    # no unseen ingredient was ever on a training shelf, yet each of its words was
    train_shelves = {ingredient for recipe in train for ingredient in recipe.shelves}
    unseen_shelves = {ingredient for recipe in unseen for ingredient in recipe.shelves}
    assert not train_shelves & unseen_shelves
    assert {w for i in unseen_shelves for w in i.split()} <= {w for i in train_shelves for w in i.split()}


def _words(texts):
    return {piece.strip() for text in texts for piece in re.findall(WORD_PIECE_PATTERN, text) if piece.strip()}


def _walk_texts(env, tasks, rng, walks_per_task):
    """Every text random walks (the idle actions included) show: task, observations, admissible actions."""
    texts = []
    for task in tasks:
        for _ in range(walks_per_task):
            observation = env.reset(task)
            texts += [observation.task_text, observation.observation, *observation.admissible_actions]
            step = None
            while step is None or not step.done:
                step = env.step(rng.choice(observation.admissible_actions + ["nonsense"]))
                texts += [step.observation, *step.admissible_actions]
                observation = step
    return texts


def _expert_texts(env, tasks):
    """Every text expert episodes show or say: task, observations, admissible actions, actions."""
    texts = []
    for task in tasks:
        observation = env.reset(task)
        texts += [observation.task_text, observation.observation, *observation.admissible_actions]
        for action in env.expert_actions():
            step = env.step(action)
            texts += [action, step.observation, *step.admissible_actions]
    return texts


def test_every_word_of_every_split_occurs_in_training_texts(env):
    # The environment's part of the texts a tokenizer is learnt from: expert episodes. (The
    # prompt's step counter of the longer unseen episodes is the prompter's, not the game's.)
    train_words = _words(_expert_texts(env, env.list_tasks("train")))
    for split in ("valid_seen", "valid_unseen"):
        assert not _words(_expert_texts(env, env.list_tasks(split))) - train_words, split
    # Off the expert's path too: whatever a random walk of any split shows, training walks show.
    rng = random.Random("vocabulary")
    train_words |= _words(_walk_texts(env, env.list_tasks("train"), rng, walks_per_task=8))
    for split in ("valid_seen", "valid_unseen"):
        assert not _words(_walk_texts(env, env.list_tasks(split), rng, walks_per_task=4)) - train_words, split


# ------------------------------------------------------------------ apart from the toy game


def _admissible_actions_seen(env, tasks, rng):
    """Every admissible action of random walks and expert episodes over ``tasks``."""
    actions = set()
    for task in tasks:
        actions |= set(env.reset(task).admissible_actions)
        for action in env.expert_actions():
            actions |= set(env.step(action).admissible_actions)
        for _ in range(3):
            admissible, step = env.reset(task).admissible_actions, None
            while step is None or not step.done:
                step = env.step(rng.choice(admissible))
                admissible = step.admissible_actions
                actions |= set(admissible)
    return actions


def test_no_action_of_one_game_is_admissible_in_the_other():
    rng = random.Random("apart")
    alchemy, toy = AlchemyEnv(), KeyDoorEnv()
    alchemy_actions = set().union(*(_admissible_actions_seen(alchemy, alchemy.list_tasks(s), rng) for s in SPLITS))
    toy_actions = set().union(*(_admissible_actions_seen(toy, toy.list_tasks(s), rng) for s in SPLITS))
    assert not alchemy_actions & toy_actions
    # not even a verb in common
    assert not {a.split()[0] for a in alchemy_actions} & {a.split()[0] for a in toy_actions}
    # the other game's expert plays only wasted turns here
    for mine, other in ((alchemy, toy), (toy, alchemy)):
        other.reset(other.list_tasks("train")[0])
        foreign = other.expert_actions()
        mine.reset(mine.list_tasks("train")[0])
        for action in foreign:
            step = mine.step(action)
            assert step.info["invalid_action"], action
            if step.done:
                break
        assert not step.won


def test_no_noun_of_the_toy_game_occurs_in_alchemy_texts(env):
    from tcod_fast.envs import toy

    toy_nouns = {*toy._ROOM_NAMES, *toy._CONTAINERS, *toy._COLOURS, "key", "door", "vault", "gem", "room", "exits", "east", "west"}
    texts = _walk_texts(env, env.list_tasks("train"), random.Random(3), walks_per_task=2)
    assert not _words(texts) & toy_nouns


# ------------------------------------------------------------------ the family record


def test_config_errors_are_one_line():
    for kwargs, pattern in (
        ({"min_ingredients": 1}, "2 <= min_ingredients <= max_ingredients"),
        ({"min_ingredients": 3, "max_ingredients": 2}, "got min_ingredients=3, max_ingredients=2"),
        ({"max_ingredients": 8}, r"max_ingredients \+ unseen_extra_ingredients \+ num_decoys <= 10"),
        ({"num_decoys": -1}, "num_decoys must be >= 0"),
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"num_tasks": {"test": 3}}, "num_tasks must map splits among"),
    ):
        with pytest.raises(ValueError, match=pattern) as raised:
            AlchemyConfig(**kwargs)
        assert "\n" not in str(raised.value)


def test_errors_name_what_was_expected(env):
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("wait")
    for task in ("alchemy/test/1", "keydoor/train/1", "alchemy/train", "alchemy/train/x"):
        with pytest.raises(ValueError, match="alchemy/<split>/<index>"):
            env.reset(task)
    with pytest.raises(ValueError, match="split must be one of"):
        env.list_tasks("test")


def test_the_record_is_a_built_in_family():
    assert "alchemy" in ENV_NAMES and get_env_family("alchemy") is ALCHEMY
    assert ALCHEMY.action_protocol is ACTION_TAGS and ALCHEMY.expert.from_any_state
    assert ALCHEMY.prompt.description != get_env_family("toy").prompt.description
    env = make_env("alchemy", num_tasks={"train": 3, "valid_seen": 1, "valid_unseen": 1})
    assert env.list_tasks("train") == ["alchemy/train/0", "alchemy/train/1", "alchemy/train/2"]
    assert tiny_train_overrides("alchemy")[-1] == "env.kwargs={max_ingredients: 2, max_steps: 8}"
    check_env_settings("alchemy", {"max_ingredients": 2, "max_steps": 8})
    with pytest.raises(ValueError) as raised:
        check_env_settings("alchemy", {"max_ingredient": 2})
    assert str(raised.value).startswith(
        "unknown key env.kwargs.max_ingredient (did you mean env.kwargs.max_ingredients?): expected a field of AlchemyConfig"
    )
    spec = pickle.loads(pickle.dumps(EnvSpec("alchemy", {"max_ingredients": 2})))
    assert spec.family == ALCHEMY and spec().list_tasks("valid_unseen")[0] == "alchemy/valid_unseen/0"


@pytest.fixture
def _restore_torch_threads():
    # train sets torch's thread count from its settings; do not leak it
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore")
def test_a_tiny_training_run_from_the_command_line(tmp_path, monkeypatch, _restore_torch_threads):
    from tcod_fast.cli import main
    from tcod_fast.trainer.config import load_config

    monkeypatch.setenv("TCOD_FAST_TINY", "1")
    run_dir = tmp_path / "run"
    assert main(["train", "--output-dir", str(run_dir), "--set", "env.name=alchemy"]) == 0
    config = load_config(str(run_dir / "config.yaml"), [])
    assert config.env.name == "alchemy" and config.env.kwargs == {"max_ingredients": 2, "max_steps": 8}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if record.get("kind") == "train"] == [0, 1]
    vocabulary = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {" cauldron", " fetch", " pour", " bottle"} <= set(vocabulary)
