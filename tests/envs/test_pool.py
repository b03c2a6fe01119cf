"""The worker pool: parallel batches, and episodes surviving broken environments.

Fault tests inject failures into some tasks of the toy env: a step that raises, one that
hangs past the step timeout, one that kills its own process, and a worker killed from
outside. Each time the batch completes, the failed episode is an EnvError, the worker is
replaced, and the other episodes (including those living in the replaced worker, which
are replayed) still win.

Envs that return malformed results (None, another type, bytes or oversized observations,
admissible actions that are not strings) end only their own episode, in worker processes
and in-process; afterwards the same pool plays a full batch whose every reply equals a
fresh in-process env's.
"""

import dataclasses
import functools
import os
import signal
import threading
import time

import pytest

from tcod_fast.envs import EnvError, EnvObservation, EnvPool, EnvSpec, EnvStep, PoolConfig
from tcod_fast.envs.toy import KeyDoorEnv, make_fault_injecting_env, make_key_door_env

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


# -- malformed results ------------------------------------------------------------------

MAX_OBSERVATION_CHARS = 1_000
OVERSIZED_OBSERVATION_CHARS = 5_000
SLOW_STEP_S = 5.0  # never waited for: the batch is abandoned after INTERRUPT_AFTER_S
INTERRUPT_AFTER_S = 0.5


class TextThatMustStayInTheWorker(str):
    """An observation that cannot be pickled: had a worker tried to send it back, the
    error would be about pickling instead of its length."""

    def __reduce__(self):
        raise TypeError("an oversized observation was about to leave its worker")


def malformed(kind, result):
    """``result`` (an EnvObservation or EnvStep) spoilt in the way ``kind`` names."""
    if kind == "none":
        return None
    if kind == "wrong_type":
        return dataclasses.asdict(result)
    if kind == "bytes":
        return dataclasses.replace(result, observation=result.observation.encode())
    if kind == "oversized":
        padded = (result.observation + " ." * OVERSIZED_OBSERVATION_CHARS)[:OVERSIZED_OBSERVATION_CHARS]
        return dataclasses.replace(result, observation=TextThatMustStayInTheWorker(padded))
    if kind == "bytes_actions":
        return dataclasses.replace(result, admissible_actions=[action.encode() for action in result.admissible_actions])
    if kind == "unpicklable_info":
        return dataclasses.replace(result, info={**result.info, "lock": threading.Lock()})
    if kind == "slow":
        time.sleep(SLOW_STEP_S)
        return result
    raise ValueError(f"unknown kind {kind!r}")


class MalformedKeyDoorEnv:
    """The toy key-and-door game, except that the tasks of ``kinds`` return a result spoilt
    as :func:`malformed` says, at their reset (``at_step=0``) or at step ``at_step``."""

    name = "malformed-keydoor"

    def __init__(self, kinds, at_step):
        self.kinds = dict(kinds)
        self.at_step = at_step
        self.inner = KeyDoorEnv()
        self.task = None
        self.steps = 0

    def list_tasks(self, split):
        return self.inner.list_tasks(split)

    def reset(self, task):
        self.task, self.steps = task, 0
        return self._maybe_spoil(self.inner.reset(task))

    def step(self, action):
        self.steps += 1
        return self._maybe_spoil(self.inner.step(action))

    def _maybe_spoil(self, result):
        kind = self.kinds.get(self.task)
        return result if kind is None or self.steps != self.at_step else malformed(kind, result)

    def expert_actions(self):
        return self.inner.expert_actions()

    def expert_action(self):
        return self.inner.expert_action()

    def close(self):
        self.inner.close()


# task -> (kind, what its EnvError says; {result} is the expected type)
MALFORMED = {
    "keydoor/train/0": ("none", "expected an {result}, received None"),
    "keydoor/train/1": ("wrong_type", "expected an {result}, received dict of "),
    "keydoor/train/2": ("bytes", "expected observation to be a str, received bytes of length "),
    "keydoor/train/3": (
        "oversized",
        f"expected an observation of at most {MAX_OBSERVATION_CHARS:,} characters "
        f"(PoolConfig.max_observation_chars), received {OVERSIZED_OBSERVATION_CHARS:,} characters",
    ),
    "keydoor/train/4": ("bytes_actions", "expected admissible_actions to be a list of str, received bytes of length"),
}
HEALTHY_TASK = "keydoor/train/5"


def play_experts(pool, tasks):
    """Reset ``tasks`` and play each slot's expert until its episode ends; returns the
    last result per slot (an EnvError where the reset or a step failed)."""
    final = list(pool.reset_many(tasks))
    experts = pool.expert_actions_many(range(len(tasks)))
    experts = [expert if isinstance(expert, list) else [] for expert in experts]  # [] where the reset failed
    for turn in range(max(map(len, experts))):
        actions = [
            expert[turn] if turn < len(expert) and not getattr(final[slot], "done", False) else None
            for slot, expert in enumerate(experts)
        ]
        for slot, result in enumerate(pool.step_many(actions)):
            if result is not None:
                final[slot] = result
    return final


def assert_batch_matches_fresh_envs(pool, tasks):
    """Every slot's every reply to a full expert batch equals that of a fresh in-process env."""
    fresh = [KeyDoorEnv() for _ in tasks]
    assert pool.reset_many(tasks) == [env.reset(task) for env, task in zip(fresh, tasks)]
    experts = [env.expert_actions() for env in fresh]
    assert pool.expert_actions_many(range(len(tasks))) == experts
    for turn in range(max(map(len, experts))):
        actions = [expert[turn] if turn < len(expert) else None for expert in experts]
        expected = [None if action is None else env.step(action) for env, action in zip(fresh, actions)]
        assert pool.step_many(actions) == expected, f"turn {turn}"
    assert all(env.expert_action() is None for env in fresh)  # every episode was won


@pytest.mark.parametrize("num_workers", [2, 0], ids=["workers", "inline"])
@pytest.mark.parametrize("at_step", [0, 2], ids=["at_reset", "at_step"])
def test_a_malformed_result_ends_only_its_episode_and_the_pool_stays_in_step(num_workers, at_step):
    kinds = {task: kind for task, (kind, _) in MALFORMED.items()}
    factory = functools.partial(MalformedKeyDoorEnv, kinds, at_step)
    config = PoolConfig(num_workers=num_workers, max_observation_chars=MAX_OBSERVATION_CHARS)
    tasks = [*MALFORMED, HEALTHY_TASK]
    op, result_type = ("reset", "EnvObservation") if at_step == 0 else ("step", "EnvStep")
    with EnvPool(factory, num_slots=len(tasks), config=config) as pool:
        final = play_experts(pool, tasks)

        for slot, (task, (_, says)) in enumerate(MALFORMED.items()):
            error = final[slot]
            assert isinstance(error, EnvError) and error.kind == "invalid_result", (task, error)
            assert error.done and not error.won
            where = f"slot {slot} ({task}) {op}: env 'malformed-keydoor' returned a malformed result: "
            assert error.message.startswith(where), error.message
            assert says.format(result=result_type) in error.message, error.message
        assert isinstance(final[-1], EnvStep) and final[-1].won
        assert sorted(pool.errors, key=lambda entry: entry[0]) == list(enumerate(final[:-1]))
        # A malformed result says nothing against the worker: none was replaced.
        assert pool.restarts == 0
        # A failed episode stays failed until its slot is reset.
        assert pool.step_many(["look"] * 5)[:5] == final[:5]

        # The same pool, every slot reset: each reply is its own slot's.
        assert_batch_matches_fresh_envs(pool, [f"keydoor/train/{index}" for index in range(10, 16)])


def test_an_unpicklable_result_ends_only_its_episode():
    factory = functools.partial(MalformedKeyDoorEnv, {"keydoor/train/0": "unpicklable_info"}, 2)
    with EnvPool(factory, num_slots=2, config=PoolConfig(num_workers=1)) as pool:
        final = play_experts(pool, ["keydoor/train/0", "keydoor/train/1"])
        assert final[0].kind == "invalid_result" and "expected a picklable result" in final[0].message
        assert "lock" in final[0].message and final[1].won and pool.restarts == 0
        assert_batch_matches_fresh_envs(pool, ["keydoor/train/2", "keydoor/train/3"])


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_a_batch_abandoned_by_an_exception_leaves_no_stale_reply_behind():
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    slow_task = "keydoor/train/21"
    factory = functools.partial(MalformedKeyDoorEnv, {slow_task: "slow"}, 1)
    tasks = ["keydoor/train/20", slow_task]
    with EnvPool(factory, num_slots=2, config=PoolConfig(num_workers=2)) as pool:
        pool.reset_many(tasks)
        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, INTERRUPT_AFTER_S)
        try:
            with pytest.raises(Interrupted):
                # Slot 1's step takes SLOW_STEP_S: the batch is abandoned before its reply comes.
                pool.step_many([expert_for(task)[0] for task in tasks])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        pids = pool.worker_pids()

        assert_batch_matches_fresh_envs(pool, ["keydoor/train/22", "keydoor/train/23"])
        # The worker whose reply was left unread was replaced; the other one was not.
        assert pool.restarts == 1
        assert pool.worker_pids()[0] == pids[0] and pool.worker_pids()[1] != pids[1]


def test_a_reply_that_is_not_the_awaited_one_is_never_given_to_a_slot():
    tasks = ["keydoor/train/30", "keydoor/train/31"]
    with EnvPool(make_key_door_env, num_slots=2, config=PoolConfig(num_workers=1)) as pool:
        fresh = [KeyDoorEnv() for _ in tasks]
        assert pool.reset_many(tasks) == [env.reset(task) for env, task in zip(fresh, tasks)]
        # A command sent behind the pool's back puts a reply it never asked for ahead of
        # the next one it awaits.
        pool._workers[0].conn.send((10**9, "expert_action", 0, None))
        actions = [env.expert_action() for env in fresh]

        results = pool.step_many(actions)

        assert results[0].kind == "out_of_step" and "was awaited" in results[0].message
        # Slot 1 shared the worker: it was replayed into the replacement and stepped there.
        assert results[1] == fresh[1].step(actions[1])
        assert pool.restarts == 1
        assert_batch_matches_fresh_envs(pool, tasks)


def test_max_observation_chars_must_be_positive():
    assert PoolConfig().max_observation_chars == 1_000_000
    with pytest.raises(ValueError, match="max_observation_chars must be at least 1, got 0"):
        PoolConfig(max_observation_chars=0)
