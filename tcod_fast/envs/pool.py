"""Run a batch of episodes in parallel worker processes, surviving broken environments.

An :class:`EnvPool` has ``num_slots`` episode slots spread over ``num_workers`` worker
processes (started with ``forkserver`` or ``spawn``, so a parent's JVMs and threads are
never forked). Slot ``i`` lives
in worker ``i % num_workers``; a worker steps its own slots one after another and the
workers run side by side. The caller drives all slots at once::

    pool = EnvPool(EnvSpec("twx-coin"), num_slots=8)
    observations = pool.reset_many(tasks)           # one task per slot
    results = pool.step_many(actions)               # one action (or None) per slot

When an environment raises, hangs past its timeout, or its process (or JVM) dies, that
slot's result is an :class:`~tcod_fast.envs.base.EnvError` (its episode is over) and the
worker process is replaced. Other episodes living in the replaced worker are rebuilt by
replaying their tasks and actions in the new worker, so nothing else is lost (this relies
on the environments being deterministic, which all adapters here are).

Environment factories must be picklable: a module-level function, a
:class:`functools.partial` of one, or an :class:`~tcod_fast.envs.registry.EnvSpec`.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from tcod_fast.envs.base import Env, EnvError, EnvObservation, EnvStep

EnvFactory = Callable[[], Env]

_LISTING_SLOT = -1


@dataclass
class PoolConfig:
    """How the pool runs its workers.

    Attributes:
        num_workers: worker processes; None means ``min(num_slots, os.cpu_count())``.
            0 runs every env in this process (no timeouts, no crash isolation; for
            debugging and pure-Python envs).
        step_timeout_s: a step (or expert query) taking longer ends its episode.
        reset_timeout_s: a reset taking longer ends its episode; it covers the worker's
            start and the env's construction (a JVM start) on first use.
        start_method: multiprocessing start method. ``forkserver`` (the default where the
            platform has it) forks workers from a clean server process that imported this
            module once, so a restart takes milliseconds instead of a fresh interpreter's
            imports; ``spawn`` starts each worker from scratch. Both are safe with JVMs and
            threads in the parent, unlike ``fork``.
    """

    num_workers: int | None = None
    step_timeout_s: float = 60.0
    reset_timeout_s: float = 180.0
    start_method: str = field(
        default_factory=lambda: "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    )


@dataclass
class _Slot:
    task: str | None = None
    actions: list[str] = field(default_factory=list)
    last_observation: str | None = None  # to check that a replay reproduced the episode
    error: EnvError | None = None  # set when the episode was ended by a failure


class _WorkerFailure(Exception):
    def __init__(self, error: EnvError):
        super().__init__(error.message)
        self.error = error


def _worker_main(conn: Connection, env_factory: EnvFactory) -> None:
    """Serve env commands for the slots of one worker until told to close."""
    # Ctrl-C goes to the whole process group; let the parent decide how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs: dict[int, Env] = {}
    while True:
        try:
            op, local_slot, argument = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if op == "close":
            break
        try:
            if local_slot not in envs:
                envs[local_slot] = env_factory()
            env = envs[local_slot]
            if op == "reset":
                payload: Any = env.reset(argument)
            elif op == "step":
                payload = env.step(argument)
            elif op == "expert":
                payload = env.expert_actions()
            elif op == "expert_action":
                payload = _current_expert_action(env)
            elif op == "list_tasks":
                payload = env.list_tasks(argument)
            else:
                raise ValueError(f"unknown pool command {op!r}")
            reply = ("ok", payload)
        except Exception as exc:  # any env failure is reported, never fatal to the worker
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        conn.send(reply)
        if op == "list_tasks":
            # The listing env exists only for listing; free its engine now.
            _close_quietly(envs.pop(local_slot, None))
    for env in envs.values():
        _close_quietly(env)
    conn.close()


def _current_expert_action(env: Any) -> str | None:
    return env.expert_action() if hasattr(env, "expert_action") else None


def _close_quietly(env: Env | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception:  # closing a broken engine may fail; the process is exiting anyway
        pass


class _Worker:
    def __init__(self, context, env_factory: EnvFactory):
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_conn, env_factory), daemon=True)
        self.process.start()
        child_conn.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class EnvPool:
    """``num_slots`` environments in worker processes, stepped as a batch.

    Args:
        env_factory: picklable zero-argument callable returning a fresh env.
        num_slots: the most episodes played at once.
        config: worker count and timeouts (:class:`PoolConfig`).

    Attributes:
        restarts: how many times a worker process was replaced.
        errors: every failure so far as ``(slot, EnvError)``, oldest first.
    """

    def __init__(self, env_factory: EnvFactory, num_slots: int, config: PoolConfig | None = None):
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        self.env_factory = env_factory
        self.num_slots = num_slots
        self.config = config or PoolConfig()
        num_workers = self.config.num_workers
        if num_workers is None:
            num_workers = min(num_slots, os.cpu_count() or 1)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = min(num_workers, num_slots)
        if self.num_workers > 0:
            try:
                pickle.dumps(env_factory)
            except Exception as error:
                raise TypeError(
                    "env_factory must be picklable to reach the worker processes (a module-level "
                    f"function, a functools.partial of one, or an EnvSpec); got {env_factory!r}: {error}"
                ) from None
        self.restarts = 0
        self.errors: list[tuple[int, EnvError]] = []
        self._slots = [_Slot() for _ in range(num_slots)]
        self._context = mp.get_context(self.config.start_method)
        if self.config.start_method == "forkserver":
            # Only effective before the server starts (once per process); later pools reuse it.
            self._context.set_forkserver_preload([__name__])
        self._workers = [_Worker(self._context, env_factory) for _ in range(self.num_workers)]
        self._inline_envs: dict[int, Env] = {}
        self._closed = False

    # -- public API -------------------------------------------------------------------
    def reset_many(self, tasks: Sequence[str | None]) -> list[EnvObservation | EnvError | None]:
        """Start ``tasks[i]`` in slot ``i`` (None leaves slot ``i`` untouched).

        Returns one entry per task: the first observation, an :class:`EnvError` if the
        reset failed, or None where the task was None.
        """
        self._check_batch(tasks, "tasks")
        commands = {}
        for slot, task in enumerate(tasks):
            if task is not None:
                self._slots[slot] = _Slot(task=task)
                commands[slot] = ("reset", task)
        results = self._run(commands, self.config.reset_timeout_s)
        return [results.get(slot) for slot in range(len(tasks))]

    def step_many(self, actions: Sequence[str | None]) -> list[EnvStep | EnvError | None]:
        """Play ``actions[i]`` in slot ``i`` (None skips the slot, e.g. a finished episode).

        Returns one entry per action: the step, an :class:`EnvError` if the env failed
        (now or while its worker was being replaced), or None where the action was None.
        Raises ValueError for an action sent to a slot that was never reset.
        """
        self._check_batch(actions, "actions")
        commands = {}
        results: dict[int, Any] = {}
        for slot, action in enumerate(actions):
            if action is None:
                continue
            state = self._slots[slot]
            if state.task is None:
                raise ValueError(f"slot {slot} got action {action!r} but has no episode; call reset_many first")
            if state.error is not None:
                results[slot] = state.error
            else:
                commands[slot] = ("step", action)
        results.update(self._run(commands, self.config.step_timeout_s))
        return [results.get(slot) for slot in range(len(actions))]

    def expert_actions_many(self, slots: Sequence[int] | None = None) -> list[list[str] | None | EnvError]:
        """The expert's actions for the current episode of each slot (all slots by default)."""
        return self._ask_expert("expert", slots)

    def expert_action_many(self, slots: Sequence[int] | None = None) -> list[str | None | EnvError]:
        """The current-state expert's next action in each slot (all slots by default);
        ``None`` where the env has no ``expert_action`` or its episode is over."""
        return self._ask_expert("expert_action", slots)

    def _ask_expert(self, op: str, slots: Sequence[int] | None) -> list:
        slots = list(range(self.num_slots)) if slots is None else list(slots)
        results: dict[int, Any] = {}
        commands = {}
        for slot in slots:
            state = self._slots[slot]
            if state.task is None:
                raise ValueError(f"slot {slot} has no episode; call reset_many first")
            if state.error is not None:
                results[slot] = state.error
            else:
                commands[slot] = (op, None)
        results.update(self._run(commands, self.config.step_timeout_s))
        return [results[slot] for slot in slots]

    def list_tasks(self, split: str) -> list[str]:
        """The env's task ids of ``split``, asked of a throwaway env in worker 0."""
        if self.num_workers == 0:
            env = self.env_factory()
            try:
                return env.list_tasks(split)
            finally:
                env.close()
        try:
            return self._call(0, ("list_tasks", _LISTING_SLOT, split), self.config.reset_timeout_s)
        except _WorkerFailure as failure:
            self._restart_worker(0)
            raise RuntimeError(f"listing tasks of split {split!r} failed: {failure.error.message}") from None

    def worker_pids(self) -> list[int]:
        """Process ids of the workers, in worker order (for monitoring and fault tests)."""
        return [worker.process.pid for worker in self._workers]

    def worker_of(self, slot: int) -> int:
        """The worker that runs ``slot``."""
        return slot % self.num_workers

    def close(self) -> None:
        """Stop every worker (and its engines). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for env in self._inline_envs.values():
            _close_quietly(env)
        for worker in self._workers:
            try:
                worker.conn.send(("close", 0, None))
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            worker.kill()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals --------------------------------------------------------------------
    def _check_batch(self, items: Sequence[Any], what: str) -> None:
        if self._closed:
            raise RuntimeError("the pool is closed")
        if len(items) > self.num_slots:
            raise ValueError(f"got {len(items)} {what} but the pool has {self.num_slots} slots")

    def _local_slot(self, slot: int) -> int:
        return slot // self.num_workers

    def _record(self, slot: int, op: str, argument: Any, payload: Any) -> None:
        if op == "step":
            self._slots[slot].actions.append(argument)
        if op in ("reset", "step"):
            self._slots[slot].last_observation = payload.observation

    def _fail(self, slot: int, error: EnvError) -> EnvError:
        self._slots[slot].error = error
        self.errors.append((slot, error))
        return error

    def _run(self, commands: dict[int, tuple[str, Any]], timeout_s: float) -> dict[int, Any]:
        if not commands:
            return {}
        if self.num_workers == 0:
            return self._run_inline(commands)
        return self._run_in_workers(commands, timeout_s)

    def _run_inline(self, commands: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        results: dict[int, Any] = {}
        for slot, (op, argument) in commands.items():
            try:
                if slot not in self._inline_envs:
                    self._inline_envs[slot] = self.env_factory()
                env = self._inline_envs[slot]
                if op == "reset":
                    results[slot] = env.reset(argument)
                elif op == "step":
                    results[slot] = env.step(argument)
                elif op == "expert_action":
                    results[slot] = _current_expert_action(env)
                else:
                    results[slot] = env.expert_actions()
                self._record(slot, op, argument, results[slot])
            except Exception as exc:
                _close_quietly(self._inline_envs.pop(slot, None))
                self.restarts += 1
                results[slot] = self._fail(slot, EnvError("exception", f"{type(exc).__name__}: {exc}"))
        return results

    def _run_in_workers(self, commands: dict[int, tuple[str, Any]], timeout_s: float) -> dict[int, Any]:
        queues: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        for slot, (op, argument) in sorted(commands.items()):
            queues[self.worker_of(slot)].append((slot, op, argument))
        results: dict[int, Any] = {}
        in_flight: dict[int, tuple[int, str, Any, float]] = {}
        while queues or in_flight:
            for worker_index in list(queues):
                if worker_index in in_flight:
                    continue
                queue = queues[worker_index]
                while queue:
                    slot, op, argument = queue.popleft()
                    if self._slots[slot].error is not None:  # lost while its worker was replaced
                        results[slot] = self._slots[slot].error
                        continue
                    try:
                        self._workers[worker_index].conn.send((op, self._local_slot(slot), argument))
                    except (BrokenPipeError, OSError):
                        pass  # a dead worker shows up as EOF on the receive below
                    in_flight[worker_index] = (slot, op, argument, time.monotonic() + timeout_s)
                    break
                if not queue:
                    del queues[worker_index]
            if not in_flight:
                continue
            next_deadline = min(deadline for *_, deadline in in_flight.values())
            connections = {self._workers[w].conn: w for w in in_flight}
            ready = wait(list(connections), timeout=max(0.0, next_deadline - time.monotonic()))
            now = time.monotonic()
            for worker_index in list(in_flight):
                slot, op, argument, deadline = in_flight[worker_index]
                worker = self._workers[worker_index]
                if worker.conn in ready:
                    try:
                        status, payload = worker.conn.recv()
                    except (EOFError, OSError):
                        error = EnvError("worker_died", self._death_message(worker, slot, op))
                    else:
                        if status == "ok":
                            self._record(slot, op, argument, payload)
                            results[slot] = payload
                            del in_flight[worker_index]
                            continue
                        error = EnvError("exception", f"slot {slot} ({self._slots[slot].task}) {op}: {payload}")
                elif now >= deadline:
                    error = EnvError(
                        "timeout", f"slot {slot} ({self._slots[slot].task}) {op} took longer than {timeout_s:g} s"
                    )
                else:
                    continue
                del in_flight[worker_index]
                results[slot] = self._fail(slot, error)
                restart_began = time.monotonic()
                self._restart_worker(worker_index)
                # The other workers' commands were not being watched during the restart;
                # don't charge that time to them.
                paused_s = time.monotonic() - restart_began
                for other, (*command, deadline) in in_flight.items():
                    in_flight[other] = (*command, deadline + paused_s)
        return results

    def _death_message(self, worker: _Worker, slot: int, op: str) -> str:
        worker.process.join(timeout=1)
        return (
            f"slot {slot} ({self._slots[slot].task}) {op}: worker process {worker.process.pid} "
            f"died with exit code {worker.process.exitcode}"
        )

    def _call(self, worker_index: int, message: tuple, timeout_s: float) -> Any:
        """Send one command and wait for its reply; raise _WorkerFailure on any failure."""
        worker = self._workers[worker_index]
        try:
            worker.conn.send(message)
        except (BrokenPipeError, OSError):
            pass
        if not worker.conn.poll(timeout_s):
            raise _WorkerFailure(EnvError("timeout", f"{message[0]} took longer than {timeout_s:g} s"))
        try:
            status, payload = worker.conn.recv()
        except (EOFError, OSError):
            raise _WorkerFailure(EnvError("worker_died", f"worker process died during {message[0]}")) from None
        if status != "ok":
            raise _WorkerFailure(EnvError("exception", payload))
        return payload

    def _restart_worker(self, worker_index: int) -> None:
        """Replace a worker and replay the live episodes of its other slots into it."""
        self._workers[worker_index].kill()
        self._workers[worker_index] = _Worker(self._context, self.env_factory)
        self.restarts += 1
        # Slots whose reset has not run yet (queued in this batch) have nothing to replay.
        siblings = [
            slot
            for slot in range(worker_index, self.num_slots, self.num_workers)
            if self._slots[slot].last_observation is not None and self._slots[slot].error is None
        ]
        for position, slot in enumerate(siblings):
            state = self._slots[slot]
            local_slot = self._local_slot(slot)
            try:
                replayed = self._call(worker_index, ("reset", local_slot, state.task), self.config.reset_timeout_s)
                for action in state.actions:
                    replayed = self._call(worker_index, ("step", local_slot, action), self.config.step_timeout_s)
            except _WorkerFailure as failure:
                # A replay that fails means the env is not reproducible or keeps dying;
                # end the remaining siblings rather than looping on restarts.
                self._workers[worker_index].kill()
                self._workers[worker_index] = _Worker(self._context, self.env_factory)
                self.restarts += 1
                for lost in siblings[position:]:
                    self._fail(
                        lost,
                        EnvError(failure.error.kind, f"replay after worker restart failed: {failure.error.message}"),
                    )
                return
            if replayed.observation != state.last_observation:
                self._fail(
                    slot,
                    EnvError(
                        "replay_diverged",
                        f"slot {slot} ({state.task}): replaying {len(state.actions)} actions after a worker "
                        f"restart ended on {replayed.observation!r}, not {state.last_observation!r}",
                    ),
                )
