"""The worker pool: parallel batches, and episodes surviving broken environments.

Fault tests inject failures into some tasks of the toy env: a step that raises, one that
hangs past the step timeout, one that kills its own process, and a worker killed from
outside. Each time the batch completes, the failed episode is an EnvError, the worker is
replaced, and the other episodes (including those living in the replaced worker, which
are replayed) still win.
"""

import functools
import os
import signal

import pytest

from tcod_fast.envs import EnvError, EnvObservation, EnvPool, EnvSpec, EnvStep, PoolConfig
from tcod_fast.envs.toy import KeyDoorEnv, make_fault_injecting_env

FAULTS = {"keydoor/train/1": "raise", "keydoor/train/5": "hang", "keydoor/train/9": "die"}
STEP_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def pool():
    factory = functools.partial(make_fault_injecting_env, faults=FAULTS, fault_at_step=2, hang_s=600.0)
    # 4 slots on 2 workers: each worker holds 2 episodes, so a failure in one slot
    # forces the replay of its sibling.
    with EnvPool(factory, num_slots=4, config=PoolConfig(num_workers=2, step_timeout_s=STEP_TIMEOUT_S)) as pool:
        yield pool


def expert_for(task):
    env = KeyDoorEnv()
    env.reset(task)
    return env.expert_actions()


def play_batch(pool, tasks, between_steps=None):
    """Play each slot's expert until done; returns the final result per slot."""
    observations = pool.reset_many(tasks)
    assert all(isinstance(observation, EnvObservation) for observation in observations)
    experts = pool.expert_actions_many(range(len(tasks)))
    assert experts == [expert_for(task) for task in tasks]
    final = [None] * len(tasks)
    for turn in range(max(map(len, experts))):
        if between_steps is not None:
            between_steps(turn)
        actions = [
            expert[turn] if turn < len(expert) and (final[i] is None or not final[i].done) else None
            for i, expert in enumerate(experts)
        ]
        for i, result in enumerate(pool.step_many(actions)):
            if result is not None:
                final[i] = result
    return final


@pytest.mark.parametrize(
    "faulty_task, kind",
    [("keydoor/train/1", "exception"), ("keydoor/train/5", "timeout"), ("keydoor/train/9", "worker_died")],
)
def test_a_failing_env_ends_only_its_episode(pool, faulty_task, kind):
    tasks = ["keydoor/train/0", faulty_task, "keydoor/train/2", "keydoor/train/3"]
    faulty_slot = 1
    restarts, errors = pool.restarts, len(pool.errors)
    pids = pool.worker_pids()

    final = play_batch(pool, tasks)

    assert isinstance(final[faulty_slot], EnvError)
    assert final[faulty_slot].kind == kind and final[faulty_slot].done and not final[faulty_slot].won
    assert pool.errors[errors:] == [(faulty_slot, final[faulty_slot])]
    # Slot 3 shares the failed worker and was replayed into its replacement.
    for slot in (0, 2, 3):
        assert isinstance(final[slot], EnvStep) and final[slot].won, (slot, final[slot])
    assert pool.restarts == restarts + 1
    failed_worker = pool.worker_of(faulty_slot)
    assert pool.worker_pids()[failed_worker] != pids[failed_worker]
    assert pool.worker_pids()[1 - failed_worker] == pids[1 - failed_worker]
    # A failed episode stays failed until the slot is reset.
    assert pool.step_many([None, "look"])[1] is final[faulty_slot]


def test_a_worker_killed_from_outside_is_replaced(pool):
    tasks = ["keydoor/train/10", "keydoor/train/11", "keydoor/train/12", "keydoor/train/13"]
    restarts = pool.restarts

    def kill_worker_one(turn):
        if turn == 3:
            os.kill(pool.worker_pids()[1], signal.SIGKILL)

    final = play_batch(pool, tasks, between_steps=kill_worker_one)

    # Slot 1 was the worker's command in flight when the death was seen; slot 3 was replayed.
    assert isinstance(final[1], EnvError) and final[1].kind == "worker_died"
    assert "died" in final[1].message
    assert all(final[slot].won for slot in (0, 2, 3))
    assert pool.restarts == restarts + 1


def test_pool_reuses_slots_and_checks_its_inputs(pool):
    assert pool.list_tasks("valid_unseen")[:2] == ["keydoor/valid_unseen/0", "keydoor/valid_unseen/1"]
    final = play_batch(pool, ["keydoor/valid_seen/0", "keydoor/valid_unseen/0"])
    assert all(result.won for result in final)
    with pytest.raises(ValueError, match="5 tasks but the pool has 4 slots"):
        pool.reset_many(["keydoor/train/0"] * 5)


def test_stepping_a_slot_without_episode_is_an_error():
    with EnvPool(EnvSpec("toy"), num_slots=2, config=PoolConfig(num_workers=0)) as pool:
        with pytest.raises(ValueError, match="slot 1 got action 'look' but has no episode"):
            pool.step_many([None, "look"])


def test_inline_pool_plays_in_process_and_records_exceptions():
    factory = functools.partial(make_fault_injecting_env, faults={"keydoor/train/1": "raise"})
    with EnvPool(factory, num_slots=3, config=PoolConfig(num_workers=0)) as inline:
        assert inline.worker_pids() == []
        final = play_batch(inline, ["keydoor/train/0", "keydoor/train/1", "keydoor/train/2"])
        assert final[0].won and final[2].won
        assert isinstance(final[1], EnvError) and "injected failure" in final[1].message
        assert inline.errors == [(1, final[1])]


def test_a_replay_that_diverges_ends_the_sibling_episode():
    # Observations carry the worker's pid, so a sibling replayed into a new worker cannot
    # reproduce its last observation: the pool must say so rather than continue silently.
    factory = functools.partial(make_fault_injecting_env, faults={"keydoor/train/1": "raise"}, tag_with_pid=True)
    with EnvPool(factory, num_slots=2, config=PoolConfig(num_workers=1)) as pool:
        final = play_batch(pool, ["keydoor/train/1", "keydoor/train/0"])
        assert final[0].kind == "exception"
        assert final[1].kind == "replay_diverged" and "[pid" in final[1].message
        assert [slot for slot, _ in pool.errors] == [0, 1]


def test_spawn_start_method_works_too():
    factory = functools.partial(make_fault_injecting_env, faults={"keydoor/train/1": "raise"})
    config = PoolConfig(num_workers=1, start_method="spawn")
    with EnvPool(factory, num_slots=2, config=config) as pool:
        pids = pool.worker_pids()
        final = play_batch(pool, ["keydoor/train/0", "keydoor/train/1"])
        assert final[0].won and final[1].kind == "exception"
        assert pool.worker_pids() != pids and pool.restarts == 1


def test_a_failed_reset_spares_the_resets_queued_behind_it():
    factory = functools.partial(make_fault_injecting_env, faults={"keydoor/train/1": "die"}, fault_at_step=0)
    with EnvPool(factory, num_slots=3, config=PoolConfig(num_workers=1)) as pool:
        observations = pool.reset_many(["keydoor/train/1", "keydoor/train/0", "keydoor/train/2"])
        assert observations[0].kind == "worker_died"
        assert all(isinstance(observation, EnvObservation) for observation in observations[1:])
        final = pool.step_many([None, expert_for("keydoor/train/0")[0], expert_for("keydoor/train/2")[0]])
        assert final[0] is None and isinstance(final[1], EnvStep) and isinstance(final[2], EnvStep)
        assert pool.restarts == 1 and len(pool.errors) == 1


def test_unpicklable_factory_is_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="env_factory must be picklable"):
        EnvPool(lambda: KeyDoorEnv(), num_slots=1, config=PoolConfig(num_workers=1))
