"""ScienceWorld adapter on the real engine: the gold sequence wins, bad actions are harmless."""

import pytest

pytest.importorskip("scienceworld", reason="scienceworld is not installed (pip install 'tcod-fast[envs]')")

from tcod_fast.envs import Env, make_env  # noqa: E402

pytestmark = pytest.mark.envs

# The task with the shortest gold sequence (5 actions), since a step takes ~0.2 s.
TASK_NAME = "find-non-living-thing"


@pytest.fixture(scope="module")
def env():
    env = make_env("scienceworld", task_names=[TASK_NAME], max_variations_per_task=3)
    yield env
    env.close()
    env.close()


def test_splits_are_the_engine_variation_folds(env):
    assert isinstance(env, Env)
    by_split = {split: env.list_tasks(split) for split in ("train", "valid_seen", "valid_unseen")}
    for tasks in by_split.values():
        assert len(tasks) == 3 and all(task.startswith(f"{TASK_NAME}/") for task in tasks)
    variations = {split: {int(task.split("/")[1]) for task in tasks} for split, tasks in by_split.items()}
    assert (
        max(variations["train"])
        < min(variations["valid_seen"])
        <= max(variations["valid_seen"])
        < min(variations["valid_unseen"])
    )


def test_gold_sequence_wins_after_an_invalid_action(env):
    task = env.list_tasks("valid_unseen")[0]
    observation = env.reset(task)
    assert "non-living thing" in observation.task_text
    assert observation.observation.startswith("This room is called")
    assert len(observation.admissible_actions) > 10
    gold = env.expert_actions()
    assert 2 <= len(gold) <= 15

    invalid = env.step("juggle the thermometer while singing")
    assert invalid.info["invalid_action"] and not invalid.done and invalid.reward == 0.0

    total_reward = 0.0
    for turn, action in enumerate(gold):
        step = env.step(action)
        total_reward += step.reward
        assert step.done == (turn == len(gold) - 1), (turn, action, step.info)
    assert step.won and step.info["score"] == 100
    assert total_reward + observation.info["score"] / 100 == pytest.approx(1.0)


def test_bad_task_ids_and_names_are_rejected(env):
    with pytest.raises(ValueError, match="look like 'boil/3'"):
        env.reset("boil")
    with pytest.raises(ValueError, match="unknown ScienceWorld task names"):
        make_env("scienceworld", task_names=["teleport-to-mars"])
