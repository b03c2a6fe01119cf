"""The key-and-door toy env: the expert wins everywhere, mistakes lose, splits differ."""

import random

import pytest

from tcod_fast.envs import SPLITS, Env, EnvObservation, EnvStep, make_env
from tcod_fast.envs.toy import KeyDoorConfig, KeyDoorEnv


@pytest.fixture
def env():
    return KeyDoorEnv()


def play(env, actions):
    step = None
    for action in actions:
        step = env.step(action)
    return step


def test_follows_the_env_protocol(env):
    assert isinstance(env, Env)
    assert isinstance(env.reset("keydoor/train/0"), EnvObservation)
    assert isinstance(env.step("look"), EnvStep)


@pytest.mark.parametrize("split", SPLITS)
def test_expert_wins_every_task_with_admissible_actions(env, split):
    for task in env.list_tasks(split):
        observation = env.reset(task)
        expert = env.expert_actions()
        assert 5 <= len(expert) <= 10, (task, expert)
        admissible = observation.admissible_actions
        for turn, action in enumerate(expert):
            assert action in admissible, (task, action, admissible)
            step = env.step(action)
            assert step.done == (turn == len(expert) - 1)
            admissible = step.admissible_actions
        assert step.won and step.reward == 1.0, task


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
    assert len(openings) > 5


def test_unseen_split_uses_held_out_colours(env):
    def colours(split):
        found = set()
        for task in env.list_tasks(split):
            env.reset(task)
            found.add(env.layout.key_colour)
            found.add(env.layout.decoy_colour)
        return found

    train = colours("train")
    assert colours("valid_seen") <= train
    assert not colours("valid_unseen") & train


def test_wrong_key_jams_the_door_and_loses(env):
    for task in env.list_tasks("train"):
        env.reset(task)
        layout = env.layout
        if layout.decoy_room > 0:  # the decoy is not in the start room: walk there
            break
    env.reset(task)
    walk_to_decoy = [f"go to {layout.rooms[r]}" for r in range(1, layout.decoy_room + 1)]
    play(env, walk_to_decoy + [f"open {layout.decoy_container}", f"take {layout.decoy_colour} key"])
    walk_to_door = [f"go to {layout.rooms[r]}" for r in range(layout.decoy_room + 1, len(layout.rooms))]
    play(env, walk_to_door)
    step = env.step(f"unlock vault door with {layout.decoy_colour} key")
    assert step.done and not step.won and step.reward == 0.0
    assert "jammed" in step.observation
    assert env.step("take gem").observation == "The game is over."


def test_invalid_action_wastes_a_turn_and_step_limit_loses():
    env = KeyDoorEnv(KeyDoorConfig(max_steps=4))
    observation = env.reset("keydoor/valid_seen/3")
    step = env.step("dance wildly")
    assert step.observation == "Nothing happens."
    assert step.info["invalid_action"] and not step.done
    assert step.admissible_actions == observation.admissible_actions
    for _ in range(3):
        step = env.step("look")
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


def test_registry_builds_the_toy_env_with_config():
    env = make_env("toy", num_tasks={"train": 3, "valid_seen": 1, "valid_unseen": 1})
    assert env.list_tasks("train") == ["keydoor/train/0", "keydoor/train/1", "keydoor/train/2"]
    with pytest.raises(ValueError, match="unknown env"):
        make_env("nethack")
    with pytest.raises(ValueError, match="offline"):
        make_env("webshop")
