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

A reset or step that returns something other than a well-formed
:class:`~tcod_fast.envs.base.EnvObservation` / :class:`~tcod_fast.envs.base.EnvStep`
(None, another type, an observation that is not ``str`` or is longer than
``PoolConfig.max_observation_chars``, admissible actions that are not a list of ``str``)
also ends only its episode, with an ``EnvError`` of kind ``"invalid_result"``. Workers
check results before sending them, so an oversized observation never crosses the pipe.
Every command carries a sequence number that its reply echoes with the slot; a worker
whose replies are not the ones awaited (a batch abandoned by an exception such as Ctrl-C
leaves replies unread) is replaced before its next use, so no reply reaches another slot.

Environment factories must be picklable: a module-level function, a
:class:`functools.partial` of one, or an :class:`~tcod_fast.envs.registry.EnvSpec`.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import numbers
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
        max_observation_chars: a reset or step whose observation is longer ends its episode
            (``EnvError`` kind ``"invalid_result"``); the worker refuses it before sending.
    """

    num_workers: int | None = None
    step_timeout_s: float = 60.0
    reset_timeout_s: float = 180.0
    start_method: str = field(
        default_factory=lambda: "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    )
    max_observation_chars: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_observation_chars < 1:
            raise ValueError(f"max_observation_chars must be at least 1, got {self.max_observation_chars}")


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


# What a well-formed reply to each checked command is.
_RESULT_TYPES = {"reset": EnvObservation, "step": EnvStep}
# Characters of a wrong value quoted in an error message.
_QUOTED_CHARS = 40


def _describe_value(value: Any) -> str:
    """A short description of ``value`` for an error message, never its whole text."""
    if value is None:
        return "None"
    kind = type(value).__name__
    if isinstance(value, (str, bytes, bytearray)):
        return f"{kind} of length {len(value):,} starting {value[:_QUOTED_CHARS]!r}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{kind} of {len(value):,} items"
    return kind


def _result_problem(op: str, result: Any, max_observation_chars: int) -> str | None:
    """What is wrong with a reset (``op="reset"``) or step result, as "expected ...,
    received ..."; None when it is well formed."""
    expected_type = _RESULT_TYPES[op]
    if not isinstance(result, expected_type):
        return f"expected an {expected_type.__name__}, received {_describe_value(result)}"
    observation = result.observation
    if not isinstance(observation, str):
        return f"expected observation to be a str, received {_describe_value(observation)}"
    if len(observation) > max_observation_chars:
        return (
            f"expected an observation of at most {max_observation_chars:,} characters "
            f"(PoolConfig.max_observation_chars), received {len(observation):,} characters"
        )
    actions = result.admissible_actions
    if not isinstance(actions, list):
        return f"expected admissible_actions to be a list of str, received {_describe_value(actions)}"
    for index, action in enumerate(actions):
        if not isinstance(action, str):
            return (
                f"expected admissible_actions to be a list of str, received {_describe_value(action)} "
                f"at index {index}"
            )
    if not isinstance(result.info, dict):
        return f"expected info to be a dict, received {_describe_value(result.info)}"
    if op == "reset" and not isinstance(result.task_text, str):
        return f"expected task_text to be a str, received {_describe_value(result.task_text)}"
    if op == "step" and not isinstance(result.reward, numbers.Real):
        return f"expected reward to be a real number, received {_describe_value(result.reward)}"
    return None


def _env_name(env: Any) -> str:
    return getattr(env, "name", None) or type(env).__name__


def _invalid_result_text(env: Any, problem: str) -> str:
    return f"env {_env_name(env)!r} returned a malformed result: {problem}"


def _worker_main(conn: Connection, env_factory: EnvFactory, max_observation_chars: int) -> None:
    """Serve env commands for the slots of one worker until told to close.

    A command is ``(sequence, op, local_slot, argument)``; its reply is
    ``(sequence, local_slot, status, payload)`` with status ``"ok"``, ``"error"`` (the env
    raised; payload is the traceback) or ``"invalid"`` (the env returned a malformed
    result; payload says what was expected and received).
    """
    # Ctrl-C goes to the whole process group; let the parent decide how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs: dict[int, Env] = {}
    while True:
        try:
            sequence, op, local_slot, argument = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            break
        if op == "close":
            break
        env = None
        try:
            if local_slot not in envs:
                envs[local_slot] = env_factory()
            env = envs[local_slot]
            if op == "start":  # the env above is all that was asked for
                payload: Any = None
            elif op == "reset":
                payload = env.reset(argument)
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
            problem = _result_problem(op, payload, max_observation_chars) if op in _RESULT_TYPES else None
            if problem is None:
                reply = (sequence, local_slot, "ok", payload)
            else:
                # Checked here so a malformed (possibly huge) payload never crosses the pipe.
                reply = (sequence, local_slot, "invalid", _invalid_result_text(env, problem))
        except Exception as exc:  # any env failure is reported, never fatal to the worker
            reply = (sequence, local_slot, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):  # the parent is gone
            break
        except Exception as exc:  # the payload does not pickle; nothing was written yet
            problem = f"expected a picklable result, received one that fails to pickle: {type(exc).__name__}: {exc}"
            reply = (sequence, local_slot, "invalid", _invalid_result_text(env, problem))
            conn.send(reply)
        if reply[2] == "invalid" or op == "list_tasks":
            # The slot's next episode gets a fresh env; the listing env exists only for
            # listing, so its engine is freed now.
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
    def __init__(self, context, env_factory: EnvFactory, max_observation_chars: int):
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child_conn, env_factory, max_observation_chars), daemon=True
        )
        self.process.start()
        child_conn.close()
        # (sequence, local slot) of the command sent whose reply was not read yet.
        self.awaiting: tuple[int, int] | None = None

    def send(self, sequence: int, op: str, local_slot: int, argument: Any) -> None:
        """Send one command; a dead worker shows up as EOF on the next receive."""
        # Marked before sending: a send cut short (Ctrl-C) also leaves the stream unusable.
        self.awaiting = (sequence, local_slot)
        try:
            self.conn.send((sequence, op, local_slot, argument))
        except (BrokenPipeError, OSError):
            pass

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
        self._sequence = itertools.count(1)
        self._workers = [self._new_worker() for _ in range(self.num_workers)]
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
        results = self._run_on_episodes({slot: ("step", a) for slot, a in enumerate(actions) if a is not None})
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
        results = self._run_on_episodes({slot: (op, None) for slot in slots})
        return [results[slot] for slot in slots]

    def _run_on_episodes(self, commands: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        """Run ``commands`` (slot -> ``(op, argument)``) in slots that hold an episode; a slot
        whose env failed answers its :class:`EnvError` without a command. Raises ValueError
        for a slot that was never reset."""
        results: dict[int, Any] = {}
        live = {}
        for slot, (op, argument) in commands.items():
            state = self._slots[slot]
            if state.task is None:
                sent = f" got action {argument!r} but" if op == "step" else ""
                raise ValueError(f"slot {slot}{sent} has no episode; call reset_many first")
            if state.error is not None:
                results[slot] = state.error
            else:
                live[slot] = (op, argument)
        results.update(self._run(live, self.config.step_timeout_s))
        return results

    def start_envs(self, *, progress: bool = False, description: str = "starting envs") -> list[EnvError | None]:
        """Construct every slot's env now, in parallel across the workers, instead of at its
        first reset (engines such as a JVM take seconds to start).

        Args:
            progress: show a bar of the started envs on stderr.
            description: the bar's label.

        Returns:
            One entry per slot: None when its env started, else the :class:`EnvError` (the
            slot's next reset tries again with a fresh env).
        """
        from tqdm.auto import tqdm

        if self._closed:
            raise RuntimeError("the pool is closed")
        commands = {slot: ("start", None) for slot in range(self.num_slots) if self._slots[slot].task is None}
        with tqdm(total=len(commands), desc=description, unit="env", disable=not progress) as bar:
            results = self._run(commands, self.config.reset_timeout_s, on_result=lambda: bar.update(1))
        return [results.get(slot) if isinstance(results.get(slot), EnvError) else None for slot in range(self.num_slots)]

    def list_tasks(self, split: str) -> list[str]:
        """The env's task ids of ``split``, asked of a throwaway env in worker 0."""
        if self.num_workers == 0:
            env = self.env_factory()
            try:
                return env.list_tasks(split)
            finally:
                env.close()
        self._replace_out_of_step_workers()
        try:
            return self._call(0, "list_tasks", _LISTING_SLOT, split, self.config.reset_timeout_s, "list_tasks")
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
                worker.conn.send((0, "close", 0, None))
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

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self.env_factory, self.config.max_observation_chars)

    def _replace_out_of_step_workers(self) -> None:
        """Replace every worker with a reply still unread (its batch was abandoned by an
        exception), so that late reply can never be taken for another command's. Replaying
        rebuilds its episodes as recorded: an abandoned step is as if never played."""
        for worker_index, worker in enumerate(self._workers):
            if worker.awaiting is not None:
                self._restart_worker(worker_index)

    def _record(self, slot: int, op: str, argument: Any, payload: Any) -> None:
        if op == "step":
            self._slots[slot].actions.append(argument)
        if op in ("reset", "step"):
            self._slots[slot].last_observation = payload.observation

    def _fail(self, slot: int, error: EnvError) -> EnvError:
        self._slots[slot].error = error
        self.errors.append((slot, error))
        return error

    def _run(
        self, commands: dict[int, tuple[str, Any]], timeout_s: float, on_result: Callable[[], None] | None = None
    ) -> dict[int, Any]:
        """Run one command per slot; ``on_result`` is called as each one finishes."""
        if not commands:
            return {}
        if self.num_workers > 0:
            return self._run_in_workers(commands, timeout_s, on_result)
        results: dict[int, Any] = {}
        for slot, command in commands.items():
            results.update(self._run_inline({slot: command}))
            if on_result is not None:
                on_result()
        return results

    def _run_inline(self, commands: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        results: dict[int, Any] = {}
        for slot, (op, argument) in commands.items():
            try:
                if slot not in self._inline_envs:
                    self._inline_envs[slot] = self.env_factory()
                env = self._inline_envs[slot]
                if op == "start":
                    result = None
                elif op == "reset":
                    result = env.reset(argument)
                elif op == "step":
                    result = env.step(argument)
                elif op == "expert_action":
                    result = _current_expert_action(env)
                else:
                    result = env.expert_actions()
            except Exception as exc:
                _close_quietly(self._inline_envs.pop(slot, None))
                self.restarts += 1
                results[slot] = self._fail(slot, EnvError("exception", f"{type(exc).__name__}: {exc}"))
                continue
            problem = _result_problem(op, result, self.config.max_observation_chars) if op in _RESULT_TYPES else None
            if problem is not None:
                # The slot's next episode gets a fresh env, as in a worker.
                _close_quietly(self._inline_envs.pop(slot, None))
                message = f"{self._slot_text(slot, op)}: {_invalid_result_text(env, problem)}"
                results[slot] = self._fail(slot, EnvError("invalid_result", message))
                continue
            self._record(slot, op, argument, result)
            results[slot] = result
        return results

    def _slot_text(self, slot: int, op: str) -> str:
        return f"slot {slot} ({self._slots[slot].task}) {op}"

    def _run_in_workers(
        self, commands: dict[int, tuple[str, Any]], timeout_s: float, on_result: Callable[[], None] | None = None
    ) -> dict[int, Any]:
        self._replace_out_of_step_workers()
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
                    self._workers[worker_index].send(next(self._sequence), op, self._local_slot(slot), argument)
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
                    payload, error, replace_worker = self._receive(worker, self._slot_text(slot, op))
                elif now >= deadline:
                    error = EnvError("timeout", f"{self._slot_text(slot, op)} took longer than {timeout_s:g} s")
                    replace_worker = True
                else:
                    continue
                del in_flight[worker_index]
                if on_result is not None:
                    on_result()
                if error is None:
                    self._record(slot, op, argument, payload)
                    results[slot] = payload
                    continue
                results[slot] = self._fail(slot, error)
                if not replace_worker:  # a malformed result: the worker and its stream are fine
                    continue
                restart_began = time.monotonic()
                self._restart_worker(worker_index)
                # The other workers' commands were not being watched during the restart;
                # don't charge that time to them.
                paused_s = time.monotonic() - restart_began
                for other, (*command, deadline) in in_flight.items():
                    in_flight[other] = (*command, deadline + paused_s)
        return results

    def _receive(self, worker: _Worker, what: str) -> tuple[Any, EnvError | None, bool]:
        """Read the reply to the command ``worker`` awaits (``what`` names it in errors).

        Returns ``(payload, None, False)`` for a good reply, else ``(None, error,
        replace_worker)``: the worker must be replaced unless the env merely returned a
        malformed result.
        """
        awaited = worker.awaiting
        try:
            sequence, local_slot, status, payload = worker.conn.recv()
        except (EOFError, OSError):
            return None, EnvError("worker_died", self._death_message(worker, what)), True
        except Exception as exc:  # bytes that do not decode to a reply: the stream is broken
            message = (
                f"{what}: worker process {worker.process.pid} sent an unreadable reply: {type(exc).__name__}: {exc}"
            )
            return None, EnvError("out_of_step", message), True
        if (sequence, local_slot) != awaited:
            message = (
                f"{what}: worker process {worker.process.pid} answered command {sequence} of its slot "
                f"{local_slot} while command {awaited[0]} of its slot {awaited[1]} was awaited"
            )
            return None, EnvError("out_of_step", message), True
        worker.awaiting = None
        if status == "ok":
            return payload, None, False
        if status == "invalid":
            return None, EnvError("invalid_result", f"{what}: {payload}"), False
        return None, EnvError("exception", f"{what}: {payload}"), True

    def _death_message(self, worker: _Worker, what: str) -> str:
        worker.process.join(timeout=1)
        return f"{what}: worker process {worker.process.pid} died with exit code {worker.process.exitcode}"

    def _call(
        self, worker_index: int, op: str, local_slot: int, argument: Any, timeout_s: float, what: str
    ) -> Any:
        """Send one command and wait for its reply (``what`` names it in errors); raise
        _WorkerFailure on any failure."""
        worker = self._workers[worker_index]
        worker.send(next(self._sequence), op, local_slot, argument)
        if not worker.conn.poll(timeout_s):
            raise _WorkerFailure(EnvError("timeout", f"{what} took longer than {timeout_s:g} s"))
        payload, error, _ = self._receive(worker, what)
        if error is not None:
            raise _WorkerFailure(error)
        return payload

    def _restart_worker(self, worker_index: int) -> None:
        """Replace a worker and replay the live episodes of its other slots into it."""
        self._workers[worker_index].kill()
        self._workers[worker_index] = self._new_worker()
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
                what = self._slot_text(slot, "reset")
                replayed = self._call(worker_index, "reset", local_slot, state.task, self.config.reset_timeout_s, what)
                for action in state.actions:
                    what = self._slot_text(slot, "step")
                    replayed = self._call(worker_index, "step", local_slot, action, self.config.step_timeout_s, what)
            except _WorkerFailure as failure:
                # A replay that fails means the env is not reproducible or keeps dying;
                # end the remaining siblings rather than looping on restarts.
                self._workers[worker_index].kill()
                self._workers[worker_index] = self._new_worker()
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
