"""TextWorld-Express adapter on the real engine: gold paths win, bad actions are harmless,
and a pool survives its JVM being killed."""

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("textworld_express", reason="textworld-express is not installed (pip install 'tcod-fast[envs]')")

from tcod_fast.envs import Env, EnvError, EnvPool, EnvSpec, PoolConfig, make_env  # noqa: E402
from tcod_fast.envs.textworld_express import TextWorldExpressEnv  # noqa: E402

pytestmark = pytest.mark.envs

GAMES = ("coin", "cookingworld", "twc", "mapreader")


@pytest.fixture(scope="module")
def envs():
    built = {game: make_env(f"twx-{game}", max_tasks_per_split=5) for game in GAMES}
    yield built
    for env in built.values():
        env.close()


@pytest.mark.parametrize("game", GAMES)
def test_gold_path_wins_in_every_split(envs, game):
    env = envs[game]
    assert isinstance(env, Env) and isinstance(env, TextWorldExpressEnv)
    for split, fold in (("train", "train"), ("valid_seen", "dev"), ("valid_unseen", "test")):
        tasks = env.list_tasks(split)
        assert len(tasks) == 5 and all(task.startswith(f"{game}/{fold}/") for task in tasks)
        for task in tasks[:2]:
            observation = env.reset(task)
            assert observation.task_text and observation.observation and observation.admissible_actions
            gold = env.expert_actions()
            assert gold and not gold[0].startswith("ERROR")
            for turn, action in enumerate(gold):
                step = env.step(action)
                assert not step.info["invalid_action"], (task, action)
                assert step.done == (turn == len(gold) - 1), (task, turn, action)
            assert step.won and step.info["score"] == pytest.approx(1.0), task


def test_splits_have_disjoint_seeds(envs):
    env = envs["coin"]
    seeds = {
        split: {task.split("/")[2] for task in env.list_tasks(split)}
        for split in ("train", "valid_seen", "valid_unseen")
    }
    assert not seeds["train"] & seeds["valid_seen"] and not seeds["train"] & seeds["valid_unseen"]


def test_invalid_action_is_harmless(envs):
    env = envs["coin"]
    task = env.list_tasks("train")[1]
    env.reset(task)
    gold = env.expert_actions()
    step = env.step("dance with the coin")
    assert step.info["invalid_action"] and not step.done and not step.won
    assert step.observation  # the engine explains, it does not raise
    for action in gold:
        step = env.step(action)
    assert step.won


def test_task_ids_are_checked(envs):
    with pytest.raises(ValueError, match="plays 'coin'"):
        envs["coin"].reset("twc/train/0")
    with pytest.raises(ValueError, match="look like 'coin/train/17'"):
        envs["coin"].reset("coin/17")
    with pytest.raises(ValueError, match="game must be one of"):
        make_env("twx-zork")


def _java_children(pid):
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and "java" in name:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finding the JVM process needs Linux /proc")
def test_pool_survives_a_killed_jvm():
    tasks = ["coin/train/0", "coin/train/1"]
    # One worker holds both episodes: killing its JVM loses slot 0's step in flight, and
    # slot 1 must be replayed into the replacement worker.
    with EnvPool(EnvSpec("twx-coin"), num_slots=2, config=PoolConfig(num_workers=1, step_timeout_s=20)) as pool:
        pool.reset_many(tasks)
        experts = pool.expert_actions_many()
        assert pool.step_many([None, experts[1][0]])[1].info["invalid_action"] is False
        java_pids = _java_children(pool.worker_pids()[0])
        assert len(java_pids) == 2, java_pids
        for java_pid in java_pids:
            os.kill(java_pid, signal.SIGKILL)

        first = pool.step_many([experts[0][0], None])
        assert isinstance(first[0], EnvError) and first[0].kind in ("exception", "timeout")
        assert pool.restarts == 1
        for action in experts[1][1:]:
            step = pool.step_many([None, action])[1]
        assert step.won

        # The replaced worker plays a new episode normally.
        pool.reset_many([tasks[0]])
        for action in experts[0]:
            step = pool.step_many([action])[0]
        assert step.won
