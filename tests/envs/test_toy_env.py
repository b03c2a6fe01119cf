"""The key-and-door toy env: Markov observations, an expert that wins from any state,
mistakes that lose, and splits that differ."""

import random

import pytest

from tcod_fast.envs import SPLITS, Env, EnvObservation, EnvStep, make_env
from tcod_fast.envs.toy import KeyDoorConfig, KeyDoorEnv, is_held_out_pairing


@pytest.fixture
def env():
    return KeyDoorEnv()


def play(env, actions):
    step = None
    for action in actions:
        step = env.step(action)
    return step


def walk(env, from_room, to_room):
    """Step east or west from room ``from_room`` to ``to_room``."""
    direction = "go east" if to_room > from_room else "go west"
    return play(env, [direction] * abs(to_room - from_room)) if to_room != from_room else None


def test_follows_the_env_protocol(env):
    assert isinstance(env, Env)
    assert isinstance(env.reset("keydoor/train/0"), EnvObservation)
    assert isinstance(env.step("look"), EnvStep)


@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins_every_task_with_admissible_actions(env, split):
    lengths = set()
    for task in env.list_tasks(split):
        observation = env.reset(task)
        expert = env.expert_actions()
        lengths.add(len(expert))
        admissible = observation.admissible_actions
        for turn, action in enumerate(expert):
            assert action in admissible, (task, action, admissible)
            assert env.expert_action() == action  # the planned path is the current-state expert's
            step = env.step(action)
            assert step.done == (turn == len(expert) - 1)
            admissible = step.admissible_actions
        assert step.won and step.reward == 1.0, task
        assert env.expert_action() is None  # the episode is over
    # episodes have to walk and vary in length
    assert min(lengths) >= 6 and len(lengths) >= 3


def _random_state_observations(env, tasks, rng, walks_per_task):
    """(observation text, expert action) over random walks of admissible actions: many
    states off the expert's path (decoy taken, containers opened, wrong direction)."""
    for task in tasks:
        for _ in range(walks_per_task):
            observation = env.reset(task)
            text, admissible = observation.observation, observation.admissible_actions
            for _ in range(rng.randint(0, 12)):
                yield task, text, env.expert_action()
                # never the idle actions, so the episode only ends by winning or losing
                choices = [a for a in admissible if a not in ("look", "inventory")]
                step = env.step(rng.choice(choices))
                if step.done:
                    break
                text, admissible = step.observation, step.admissible_actions
            else:
                yield task, text, env.expert_action()


def _state_part(observation_text):
    """The observation without the feedback of the previous action: it starts at the room
    sentence."""
    at = observation_text.find("You are in the ")
    return observation_text[at:] if at >= 0 else observation_text


@pytest.mark.parametrize("split", ["train", "valid_unseen"])
def test_expert_action_is_a_function_of_the_observation_text(split):
    """The Markov property: two states that read the same call for the same action, over
    thousands of on- and off-path states of many tasks."""
    env = KeyDoorEnv(KeyDoorConfig(num_tasks={split: 150}))
    rng = random.Random(f"markov:{split}")
    action_for_text: dict[str, str] = {}
    states = 0
    for task, text, action in _random_state_observations(env, env.list_tasks(split), rng, walks_per_task=6):
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
        env.reset(task)
        for action in env.expert_actions():
            on_path.add(_state_part(env.step(action).observation) if action != "take gem" else "")
        on_path.add(_state_part(env.reset(task).observation))
    visited = {_state_part(text) for _, text, _ in _random_state_observations(env, tasks, rng, walks_per_task=4)}
    assert len(visited - on_path) > len(visited) // 2


@pytest.mark.parametrize("split", SPLITS)
def test_expert_action_from_random_states_wins(env, split):
    """From any reachable state that has not lost, following expert_action wins."""
    rng = random.Random(f"expert-from-anywhere:{split}")
    episodes = 0
    for task in env.list_tasks(split):
        for _ in range(4):
            observation = env.reset(task)
            admissible, step = observation.admissible_actions, None
            for _ in range(rng.randint(1, 10)):  # a random detour, avoiding the idle actions
                step = env.step(rng.choice([a for a in admissible if a not in ("look", "inventory")]))
                if step.done:
                    break
                admissible = step.admissible_actions
            if step.done:
                continue  # the detour won or lost by itself (a wrong key jams the door)
            episodes += 1
            while not step.done:
                action = env.expert_action()
                assert action in step.admissible_actions, (task, action, step.observation)
                step = env.step(action)
            assert step.won, (task, step.observation)
    assert episodes > len(env.list_tasks(split)) * 2


def test_observation_states_key_door_and_carried_items(env):
    observation = env.reset("keydoor/train/5").observation
    layout = env.layout
    assert f"The vault door opens with the {layout.key}." in observation
    assert f"in the {layout.key_container} of the {layout.rooms[layout.key_room]}" in observation
    assert "You carry nothing." in observation
    walk(env, layout.start_room, layout.key_room)
    play(env, [f"open {layout.key_container}", f"take {layout.key}"])
    step = env.step("look")
    if layout.key_room != layout.door_room:
        assert f"The vault door is in the {layout.rooms[layout.door_room]}, to the east." in step.observation
    assert f"You carry the {layout.key}." in step.observation


def test_tasks_are_deterministic_and_varied():
    first, second = KeyDoorEnv(), KeyDoorEnv()
    tasks = first.list_tasks("train")
    openings = {first.reset(task).observation for task in tasks}
    for task in tasks[:10]:
        assert first.reset(task) == second.reset(task)
        assert first.expert_actions() == second.expert_actions()
    experts = set()
    for task in tasks:
        first.reset(task)
        experts.add(tuple(first.expert_actions()))
    assert len(experts) > len(tasks) // 2
    assert len(openings) > len(tasks) // 2


def test_unseen_split_uses_held_out_pairings_and_longer_layouts():
    env = KeyDoorEnv(KeyDoorConfig(num_tasks={"train": 200, "valid_seen": 50, "valid_unseen": 50}))

    def layouts(split):
        found = []
        for task in env.list_tasks(split):
            env.reset(task)
            found.append(env.layout)
        return found

    for layout in layouts("train") + layouts("valid_seen"):
        assert not is_held_out_pairing(layout.key_container, layout.key_colour)
    unseen = layouts("valid_unseen")
    assert all(is_held_out_pairing(layout.key_container, layout.key_colour) for layout in unseen)
    assert max(len(layout.rooms) for layout in unseen) > env.config.max_rooms
    assert min(len(layout.rooms) for layout in unseen) >= env.config.max_rooms
    assert all(len(layout.rooms) <= env.config.max_rooms for layout in layouts("train"))
    # every container and colour of the unseen pairings also occurs in training pairings
    train = layouts("train")
    assert {layout.key_container for layout in unseen} <= {layout.key_container for layout in train}
    assert {layout.key_colour for layout in unseen} <= {layout.key_colour for layout in train}


def test_wrong_key_jams_the_door_and_loses(env):
    for task in env.list_tasks("train"):
        env.reset(task)
        layout = env.layout
        if layout.decoy_room != layout.key_room:
            break
    env.reset(task)
    walk(env, layout.start_room, layout.decoy_room)
    play(env, [f"open {layout.decoy_container}", f"take {layout.decoy}"])
    walk(env, layout.decoy_room, layout.door_room)
    assert f"unlock door with {layout.decoy}" in env.step("look").admissible_actions
    step = env.step(f"unlock door with {layout.decoy}")
    assert step.done and not step.won and step.reward == 0.0
    assert "jammed" in step.observation
    assert env.step("take gem").observation == "The game is over."


def test_idle_steps_in_a_row_lose_and_step_limit_loses():
    env = KeyDoorEnv(KeyDoorConfig(max_idle_steps=3))
    observation = env.reset("keydoor/valid_seen/3")
    step = env.step("dance wildly")
    assert step.observation.startswith("Nothing happens.")
    assert step.info["invalid_action"] and not step.done
    assert step.admissible_actions == observation.admissible_actions
    step = env.step("look")
    assert not step.done
    step = env.step("inventory")
    assert step.done and not step.won and "3 steps in a row changed nothing" in step.observation
    # a useful step in between resets the count
    env.reset("keydoor/valid_seen/3")
    play(env, ["look", "look", env.expert_action(), "look", "look"])
    assert not env._state.over

    env = KeyDoorEnv(KeyDoorConfig(max_steps=4, max_idle_steps=0))
    env.reset("keydoor/valid_seen/3")
    step = play(env, ["look"] * 4)
    assert step.done and not step.won
    assert "ran out of time" in step.observation


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
    assert wins < len(tasks) // 2


def test_errors_name_what_was_expected(env):
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("look")
    with pytest.raises(ValueError, match="keydoor/<split>/<index>"):
        env.reset("keydoor/test/1")
    with pytest.raises(ValueError, match="split must be one of"):
        env.list_tasks("test")
    with pytest.raises(ValueError, match="min_rooms"):
        KeyDoorConfig(min_rooms=1)


def test_registry_builds_the_toy_env_with_config():
    env = make_env("toy", num_tasks={"train": 3, "valid_seen": 1, "valid_unseen": 1})
    assert env.list_tasks("train") == ["keydoor/train/0", "keydoor/train/1", "keydoor/train/2"]
    with pytest.raises(ValueError, match="unknown env"):
        make_env("nethack")
