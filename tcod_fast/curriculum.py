"""Curricula for multi-turn on-policy distillation: who plays which turn, and when.

The schedules a trainer needs to run TCOD-F2B/B2F, Guided-OPD and the ATOD annealing
live here, as plain functions and small schedule objects, plus one sampler that turns
"training step + batch of tasks" into one :class:`EpisodePlan` per episode by asking the
configured algorithm's record (:mod:`tcod_fast.algorithms`) to plan each one.

Turn index ``k`` counts every turn of an episode from 0, whoever plays it
(docs/turns.md#turn-ids). A plan says who plays turn ``k``; the rollout gives the student's turns turn id
``k`` and every other turn turn id ``-1``; the plan's ``turn_window = (lo, hi)`` is the
matching window for the loss (``lo <= turn_id < hi``).

Schedules (all are callables ``schedule(step) -> float``):

* **Pacing** (how far the TCOD curriculum has advanced, in turns):
  :class:`LinearPacing` (TCOD: ``step // eta``), :class:`StagedPacing` (advance by one
  turn at listed steps) and :class:`SmoothPacing` (``step / eta``, fractional; the
  sampler rounds it per episode with a seeded coin so the *expected* depth grows
  linearly instead of by jumps).
* **Guided-OPD intervention probability** :class:`InterventionSchedule`: hold ``p_init``
  for ``warmup_steps``, then decay to ``p_final`` (0 by default) over ``decay_steps``
  with a linear, cosine or exponential shape; exactly ``p_final`` afterwards.
* **ATOD annealing** :class:`ATODAnnealing`: ``kappa(step)`` and ``rho(step)`` as in
  ATOD eqs. (10)-(12).
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "PLAYERS",
    "ATODAnnealing",
    "CurriculumSettings",
    "CurriculumSampler",
    "EpisodePlan",
    "EpisodePlanner",
    "EpisodeSlot",
    "InterventionSchedule",
    "LinearPacing",
    "Pacing",
    "Schedule",
    "SmoothPacing",
    "StagedPacing",
    "atod_kappa",
    "atod_progress",
    "atod_rho",
    "b2f_prefix_len",
    "build_pacing",
    "depth_from_advance",
    "f2b_depth",
    "prefix_from_advance",
    "turn_windows_tensor",
]

PLAYERS = ("student", "teacher", "expert", "random", "stop")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class EpisodePlan:
    """Who plays each turn of one episode.

    Rollout code needs only :attr:`max_turns` and :meth:`player`. Turn index ``k``
    counts every turn of the episode from 0, whoever plays it.

    Attributes:
        max_turns: the episode never has more than this many turns.
        players: ``players[k]`` is the player of turn ``k`` for ``k < len(players)``;
            turns at or past ``len(players)`` are ``"stop"``. Each entry is one of
            ``"student"`` (sampled and trained, turn id ``k``), ``"teacher"`` (teacher
            model acts, turn id -1), ``"expert"`` (stored expert action ``k`` replayed,
            turn id -1; only as a prefix, since the stored actions are planned from the
            reset state), ``"random"`` (a uniformly random admissible action, turn id -1;
            exploration noise) or ``"stop"`` (end the episode before this turn).
        turn_window: ``(lo, hi)``; the loss keeps tokens with ``lo <= turn_id < hi``.
        algorithm: name of the algorithm that made the plan (a registered algorithm,
            :func:`tcod_fast.algorithms.algorithm_names`).
        task_index: index of the task in the list given to the sampler; episodes of the
            same task form one GRPO group.
        episode_index: index of the episode within its planned batch.
        f2b_depth: turns the student plays (TCOD-F2B), else ``None``.
        b2f_prefix_len: prefix turns played by teacher/expert (TCOD-B2F), else ``None``.
        intervention_prob: Guided-OPD teacher-takeover probability used, else ``None``.
        is_eval: evaluation plan (full depth, student only).
    """

    max_turns: int
    players: tuple[str, ...]
    turn_window: tuple[int, int]
    algorithm: str = "opd"
    task_index: int = 0
    episode_index: int = 0
    f2b_depth: int | None = None
    b2f_prefix_len: int | None = None
    intervention_prob: float | None = None
    is_eval: bool = False

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if len(self.players) > self.max_turns:
            raise ValueError(
                f"players has {len(self.players)} entries but max_turns is {self.max_turns}"
            )
        unknown = sorted(set(self.players) - set(PLAYERS))
        if unknown:
            raise ValueError(f"players must be among {PLAYERS}, got {unknown}")
        # Environments plan their expert actions from the reset state, so an expert turn is only
        # meaningful while nobody else has moved yet.
        first_other = next((k for k, who in enumerate(self.players) if who != "expert"), len(self.players))
        late_expert = next((k for k in range(first_other, len(self.players)) if self.players[k] == "expert"), None)
        if late_expert is not None:
            raise ValueError(
                f"expert turns must form a prefix of players (the stored expert actions are planned from "
                f"the reset state), but turn {late_expert} is 'expert' after turn {first_other} was "
                f"{self.players[first_other]!r}: players={self.players}"
            )

    def player(self, turn_index: int) -> str:
        """Player of turn ``turn_index``: "student", "teacher", "expert" or "stop"."""
        if turn_index < 0:
            raise ValueError(f"turn_index must be >= 0, got {turn_index}")
        if turn_index >= len(self.players):
            return "stop"
        return self.players[turn_index]

    def turn_id(self, turn_index: int) -> int:
        """Turn id the tokens of turn ``turn_index`` carry: the index for the student's
        turns inside :attr:`turn_window`, -1 (not trained) otherwise."""
        lo, hi = self.turn_window
        if self.player(turn_index) == "student" and lo <= turn_index < hi:
            return turn_index
        return -1

    @property
    def num_student_turns(self) -> int:
        """Most turns the student can play in this episode (the episode may end early)."""
        return sum(1 for who in self.players if who == "student")


@dataclass(frozen=True)
class EpisodeSlot:
    """One episode of a training batch, before its algorithm plans it.

    The sampler hands one to the algorithm's ``plan_episode(sampler, slot)``
    (:class:`tcod_fast.algorithms.Algorithm`), which returns ``slot.plan(...)``.

    Attributes:
        step: global training step.
        task_index: index of the task in the batch (episodes of one task form a GRPO group).
        episode_index: index of the episode within its planned batch.
        expert_len: the task's expert action count ``L``; ``None`` where unknown or when
            the algorithm did not ask for it (``needs_expert_lens``).
        rng: this episode's own generator, seeded by ``(seed, step, batch counter,
            episode index)``; every coin of the plan is flipped with it.
        max_turns: turn budget of the episode.
        algorithm: name of the algorithm planning it.
    """

    step: int
    task_index: int
    episode_index: int
    expert_len: int | None
    rng: np.random.Generator
    max_turns: int
    algorithm: str

    def plan(self, players: Sequence[str], turn_window: tuple[int, int], **details: Any) -> EpisodePlan:
        """The :class:`EpisodePlan` of this slot with ``players``, ``turn_window`` and
        ``details`` (``f2b_depth``, ``b2f_prefix_len``, ``intervention_prob``)."""
        return EpisodePlan(
            max_turns=self.max_turns,
            players=tuple(players),
            turn_window=tuple(turn_window),
            algorithm=self.algorithm,
            task_index=self.task_index,
            episode_index=self.episode_index,
            **details,
        )


def turn_windows_tensor(plans: Sequence[EpisodePlan]):
    """Per-sequence turn windows of ``plans`` as an int64 tensor of shape ``(B, 2)``,
    ready for ``fused_turn_kl(..., turn_window=...)``."""
    import torch

    return torch.tensor([list(plan.turn_window) for plan in plans], dtype=torch.int64).reshape(
        len(plans), 2
    )


# ------------------------------------------------------------- TCOD formulas


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def f2b_depth(step: int, eta: int, max_turns: int) -> int:
    """TCOD-F2B depth: the student plays turns ``0 .. k-1`` with
    ``k = min(1 + step // eta, max_turns)``. Full depth from step ``eta*(max_turns-1)``."""
    _check_step(step)
    if eta < 1:
        raise ValueError(f"eta must be >= 1, got {eta}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    return min(1 + step // eta, max_turns)


def b2f_prefix_len(step: int, eta: int, expert_len: int) -> int:
    """TCOD-B2F prefix: ``clip(L - 1 - step // eta, 0, L - 1)`` turns, ``L = expert_len``,
    are played by the expert/teacher before the student takes over. Reaches 0 at step
    ``eta*(L-1)``. ``expert_len = 0`` (nothing to replay) gives 0."""
    _check_step(step)
    if eta < 1:
        raise ValueError(f"eta must be >= 1, got {eta}")
    if expert_len < 0:
        raise ValueError(f"expert_len must be >= 0, got {expert_len}")
    return prefix_from_advance(step // eta, expert_len)


def depth_from_advance(advance: int, max_turns: int) -> int:
    """F2B depth after the curriculum advanced ``advance`` turns: ``min(1 + advance, max_turns)``."""
    return min(1 + advance, max_turns)


def prefix_from_advance(advance: int, expert_len: int) -> int:
    """B2F prefix after the curriculum advanced ``advance`` turns:
    ``clip(L - 1 - advance, 0, L - 1)`` with ``L = expert_len``."""
    upper = max(expert_len - 1, 0)
    return min(max(expert_len - 1 - advance, 0), upper)


# ------------------------------------------------------------------ schedules


class Schedule(ABC):
    """A function of the training step: ``schedule(step) -> float``."""

    @abstractmethod
    def __call__(self, step: int) -> float:
        """Value at training step ``step`` (>= 0)."""


class Pacing(Schedule):
    """How many turns the TCOD curriculum has advanced at a step.

    F2B depth is ``min(1 + advance, max_turns)``; the B2F prefix is
    ``clip(L - 1 - advance, 0, L - 1)``. An integer-valued pacing is used as is; a
    fractional one is rounded per episode by the sampler (floor plus a seeded coin with
    the fractional part as probability).
    """


@dataclass(frozen=True)
class LinearPacing(Pacing):
    """TCOD's linear pacing: advance by one turn every ``eta`` steps (``step // eta``)."""

    eta: int

    def __post_init__(self) -> None:
        if self.eta < 1:
            raise ValueError(f"LinearPacing.eta must be >= 1, got {self.eta}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(step // self.eta)


@dataclass(frozen=True)
class StagedPacing(Pacing):
    """Stepwise pacing: advance by one turn at each step listed in ``stage_starts``
    (strictly increasing); the value is how many listed steps are ``<= step``."""

    stage_starts: tuple[int, ...]

    def __post_init__(self) -> None:
        starts = tuple(int(s) for s in self.stage_starts)
        if any(b <= a for a, b in zip(starts, starts[1:])) or any(s < 0 for s in starts):
            raise ValueError(
                f"StagedPacing.stage_starts must be non-negative and strictly increasing, got {starts}"
            )
        object.__setattr__(self, "stage_starts", starts)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(bisect.bisect_right(self.stage_starts, step))


@dataclass(frozen=True)
class SmoothPacing(Pacing):
    """Smooth pacing: ``step / eta`` turns, fractional. With the sampler's per-episode
    stochastic rounding the expected F2B depth is ``1 + step/eta`` (until capped), so a
    batch moves to the next depth gradually instead of all at once."""

    eta: float

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"SmoothPacing.eta must be > 0, got {self.eta}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        return step / self.eta


def build_pacing(kind: str, *, eta: float = 5, stage_starts: Sequence[int] = ()) -> Pacing:
    """Pacing by name: ``"linear"`` (needs ``eta``), ``"staged"`` (needs
    ``stage_starts``) or ``"smooth"`` (needs ``eta``)."""
    if kind == "linear":
        if int(eta) != eta:
            raise ValueError(f"linear pacing needs an integer eta, got {eta}")
        return LinearPacing(int(eta))
    if kind == "staged":
        return StagedPacing(tuple(stage_starts))
    if kind == "smooth":
        return SmoothPacing(float(eta))
    raise ValueError(f"pacing must be 'linear', 'staged' or 'smooth', got {kind!r}")


_DECAY_SHAPES = ("linear", "cosine", "exponential", "constant")


@dataclass(frozen=True)
class InterventionSchedule(Schedule):
    """Guided-OPD teacher-intervention probability ``p(step)``.

    ``p_init`` for ``step < warmup_steps``; then, with ``u = (step - warmup_steps) /
    decay_steps`` clipped to ``[0, 1]``, ``p = p_final + (p_init - p_final) * g(u)``:

    * ``linear``: ``g(u) = 1 - u``;
    * ``cosine``: ``g(u) = (1 + cos(pi u)) / 2``;
    * ``exponential``: ``g(u) = (exp(-r u) - exp(-r)) / (1 - exp(-r))`` with
      ``r = exp_rate``: an exponential decay shifted so it reaches ``p_final`` exactly
      at ``u = 1`` (a plain ``exp(-r u)`` never reaches it);
    * ``constant``: ``g(u) = 1`` (no decay; an ablation).

    The paper fixes none of these constants; all are explicit here.
    """

    shape: Literal["linear", "cosine", "exponential", "constant"] = "linear"
    p_init: float = 0.5
    decay_steps: int = 100
    warmup_steps: int = 0
    p_final: float = 0.0
    exp_rate: float = 5.0

    def __post_init__(self) -> None:
        if self.shape not in _DECAY_SHAPES:
            raise ValueError(f"shape must be one of {_DECAY_SHAPES}, got {self.shape!r}")
        for name in ("p_init", "p_final"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1, got {self.decay_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.exp_rate > 0:
            raise ValueError(f"exp_rate must be > 0, got {self.exp_rate}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return self.p_init
        u = min((step - self.warmup_steps) / self.decay_steps, 1.0)
        if self.shape == "linear":
            g = 1.0 - u
        elif self.shape == "cosine":
            g = 0.5 * (1.0 + math.cos(math.pi * u))
        elif self.shape == "exponential":
            floor = math.exp(-self.exp_rate)
            g = (math.exp(-self.exp_rate * u) - floor) / (1.0 - floor)
        else:
            g = 1.0
        if u >= 1.0 and self.shape != "constant":
            return self.p_final  # exact, not 1e-17 from cos(pi)
        return self.p_final + (self.p_init - self.p_final) * g


def atod_progress(step: int, anneal_steps: int) -> float:
    """ATOD eq. (10): ``p(s) = min(s / T, 1)``; ``T = 0`` means already annealed."""
    _check_step(step)
    if anneal_steps < 0:
        raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
    if anneal_steps == 0:
        return 1.0
    return min(step / anneal_steps, 1.0)


def atod_kappa(step: int, anneal_steps: int, kappa_init: float, kappa_min: float) -> float:
    """ATOD eq. (11): ``max(kappa_min, kappa_init - (kappa_init - kappa_min) p(s))``."""
    progress = atod_progress(step, anneal_steps)
    return max(kappa_min, kappa_init - (kappa_init - kappa_min) * progress)


def atod_rho(step: int, anneal_steps: int, rho_init: float, rho_max: float) -> float:
    """ATOD eq. (12): ``rho_init + (rho_max - rho_init) p(s)``."""
    progress = atod_progress(step, anneal_steps)
    return rho_init + (rho_max - rho_init) * progress


@dataclass(frozen=True)
class ATODAnnealing:
    """ATOD's OPD/RL coefficient annealing (eqs. 10-12): the OPD weight ``kappa`` falls
    from ``kappa_init`` to the floor ``kappa_min`` and the GRPO weight ``rho`` rises from
    ``rho_init`` to ``rho_max`` over ``anneal_steps``. The paper's Table 2 values are
    not in its text; these defaults are ours (OPD-only start, equal weights at the end
    with a 0.1 teacher anchor)."""

    anneal_steps: int = 100
    kappa_init: float = 1.0
    kappa_min: float = 0.1
    rho_init: float = 0.0
    rho_max: float = 1.0

    def __post_init__(self) -> None:
        if self.anneal_steps < 0:
            raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}")
        if self.kappa_min > self.kappa_init:
            raise ValueError(
                f"kappa_min ({self.kappa_min}) must be <= kappa_init ({self.kappa_init})"
            )

    def kappa(self, step: int) -> float:
        """OPD coefficient at ``step``."""
        return atod_kappa(step, self.anneal_steps, self.kappa_init, self.kappa_min)

    def rho(self, step: int) -> float:
        """GRPO coefficient at ``step``."""
        return atod_rho(step, self.anneal_steps, self.rho_init, self.rho_max)


# -------------------------------------------------------------------- sampler


@dataclass
class CurriculumSettings:
    """Everything the :class:`CurriculumSampler` needs.

    Attributes:
        algorithm: a registered algorithm (:func:`tcod_fast.algorithms.algorithm_names`);
            its record plans the episodes. ``opd``, ``atod``, ``sod`` and ``grpo`` plan
            full student episodes; ``tcod_f2b``, ``tcod_b2f`` and ``guided_opd`` run
            their curriculum.
        max_turns: turn budget of an episode.
        seed: seeds every coin the sampler flips (Guided-OPD turns, smooth pacing).
        episodes_per_task: episodes planned per task (the GRPO group size ``G``); plans
            come task-major: task 0's episodes, then task 1's, ...
        pacing: ``"linear"`` (TCOD), ``"staged"`` or ``"smooth"``; see the module doc.
        eta: pacing period in steps (TCOD uses 5-6 on ALFWorld/ScienceWorld, 4 on
            WebShop; the paper also reports 2 and 3).
        stage_starts: steps at which staged pacing advances by one turn.
        f2b_after_depth: TCOD-F2B after the student's ``f2b_depth`` turns: ``"stop"``
            ends the episode (the reference code) or ``"teacher"`` lets the teacher
            finish it with stop-gradient (the paper's variant).
        b2f_prefix_source: who plays the B2F prefix: ``"expert"`` replays stored expert
            actions (the reference code) or ``"teacher"`` runs the teacher model (the
            paper's description).
        b2f_default_expert_len: ``L`` used when a task's expert length is unknown
            (``None``); if this is also ``None`` such a task is an error, because the
            B2F prefix is defined by ``L``.
        guided: the Guided-OPD :class:`InterventionSchedule` (``guided.p_init``,
            ``guided.decay_steps``, ...).
        atod: the :class:`ATODAnnealing` of ATOD and SOD (``atod.anneal_steps``,
            ``atod.kappa_min``, ...).
    """

    algorithm: str = "opd"
    max_turns: int = 30
    seed: int = 0
    episodes_per_task: int = 1
    pacing: Literal["linear", "staged", "smooth"] = "linear"
    eta: float = 5
    stage_starts: tuple[int, ...] = ()
    f2b_after_depth: Literal["stop", "teacher"] = "stop"
    b2f_prefix_source: Literal["expert", "teacher"] = "expert"
    b2f_default_expert_len: int | None = None
    guided: InterventionSchedule = field(default_factory=InterventionSchedule)
    atod: ATODAnnealing = field(default_factory=ATODAnnealing)

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.episodes_per_task < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.f2b_after_depth not in ("stop", "teacher"):
            raise ValueError(
                f"f2b_after_depth must be 'stop' or 'teacher', got {self.f2b_after_depth!r}"
            )
        if self.b2f_prefix_source not in ("expert", "teacher"):
            raise ValueError(
                f"b2f_prefix_source must be 'expert' or 'teacher', got {self.b2f_prefix_source!r}"
            )
        self.stage_starts = tuple(int(s) for s in self.stage_starts)


class EpisodePlanner(Protocol):
    """What the sampler asks of an algorithm's record (:class:`tcod_fast.algorithms.Algorithm`)."""

    name: str

    def plan_episode(self, sampler: CurriculumSampler, slot: EpisodeSlot) -> EpisodePlan: ...

    def curriculum_summary(self, sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict: ...


class CurriculumSampler:
    """Plans the episodes of each training batch for the configured algorithm.

    ``plan_batch(step, tasks, expert_lens)`` returns ``len(tasks) * episodes_per_task``
    :class:`EpisodePlan` objects (task-major), each planned by ``algorithm``, the record of
    ``config.algorithm`` (a :class:`tcod_fast.algorithms.Algorithm`: its ``plan_episode``
    says who plays each turn and which turns are trained).

    Coins come from a generator seeded by ``(seed, step, batch counter, episode)``, so
    the same seed gives the same plans, and :meth:`state_dict` (which saves the batch
    counter) resumes the sequence exactly. Evaluation plans (:meth:`plan_eval_batch`)
    are always full depth, student only, and flip no coins.

    Custom schedules can replace the configured ones: pass ``pacing`` (any
    :class:`Pacing`) or ``intervention`` (any ``step -> probability`` callable).
    """

    def __init__(
        self,
        config: CurriculumSettings,
        algorithm: EpisodePlanner,
        *,
        pacing: Pacing | None = None,
        intervention: Schedule | None = None,
    ) -> None:
        if algorithm.name != config.algorithm:
            raise ValueError(f"the algorithm record must be config.algorithm's, {config.algorithm!r}, got {algorithm.name!r}")
        self.config = config
        self.algorithm = algorithm
        self.pacing = pacing or build_pacing(
            config.pacing, eta=config.eta, stage_starts=config.stage_starts
        )
        self.intervention = intervention or config.guided
        self.atod = config.atod
        self.num_batches_planned = 0
        self.last_step: int | None = None
        self._last_plans: list[EpisodePlan] = []

    # ---- planning

    def plan_batch(
        self,
        step: int,
        tasks: Sequence[Any],
        expert_lens: Sequence[int | None] | None = None,
    ) -> list[EpisodePlan]:
        """One training plan per episode for ``tasks`` at training ``step``.

        Args:
            step: global training step (>= 0).
            tasks: the batch's tasks; only their number and order are used.
            expert_lens: expert action count ``L`` per task (``None`` where unknown);
                needed only by algorithms that say so (``needs_expert_lens``: ``tcod_b2f``).

        Returns:
            ``len(tasks) * episodes_per_task`` plans, task-major.
        """
        _check_step(step)
        cfg = self.config
        if expert_lens is None:
            expert_lens = [None] * len(tasks)
        if len(expert_lens) != len(tasks):
            raise ValueError(
                f"expert_lens has {len(expert_lens)} entries but tasks has {len(tasks)}"
            )
        batch_counter = self.num_batches_planned
        plans = []
        for task_index, expert_len in enumerate(expert_lens):
            for repeat in range(cfg.episodes_per_task):
                episode_index = task_index * cfg.episodes_per_task + repeat
                slot = EpisodeSlot(
                    step=step,
                    task_index=task_index,
                    episode_index=episode_index,
                    expert_len=expert_len,
                    rng=np.random.default_rng([cfg.seed, step, batch_counter, episode_index]),
                    max_turns=cfg.max_turns,
                    algorithm=cfg.algorithm,
                )
                plans.append(self.algorithm.plan_episode(self, slot))
        self.num_batches_planned += 1
        self.last_step = step
        self._last_plans = plans
        return plans

    def plan_eval_batch(self, tasks: Sequence[Any]) -> list[EpisodePlan]:
        """Evaluation plans: one per task, full depth, student only. Uses no coins and
        leaves the sampler state unchanged."""
        max_turns = self.config.max_turns
        return [
            EpisodePlan(
                max_turns=max_turns,
                players=("student",) * max_turns,
                turn_window=(0, max_turns),
                algorithm=self.config.algorithm,
                task_index=index,
                episode_index=index,
                is_eval=True,
            )
            for index in range(len(tasks))
        ]

    def advance(self, step: int, rng: np.random.Generator) -> int:
        """Turns the curriculum has advanced for one episode at ``step``: the pacing's
        value, rounded down plus a coin (from ``rng``) with the fractional part as
        probability, so fractional (smooth) pacing keeps its mean."""
        advance = float(self.pacing(step))
        whole = math.floor(advance)
        fraction = advance - whole
        return int(whole) + int(fraction > 0.0 and rng.random() < fraction)

    # ---- logging

    def summary(self, step: int | None = None) -> dict[str, float]:
        """Current curriculum values for logging, keys prefixed ``curriculum/``.

        ``step`` defaults to the last planned step. Gives the step and the algorithm's
        ``curriculum_summary``: its scheduled value (``f2b_depth``, ``b2f_advance`` =
        prefix turns removed so far, ``intervention_prob``, ``atod_kappa``/``atod_rho``)
        and, when the last batch was planned at that step, batch means
        (``f2b_depth_mean``, ``b2f_prefix_len_mean``, ``teacher_turn_fraction``).
        """
        if step is None:
            step = self.last_step if self.last_step is not None else 0
        out: dict[str, float] = {"curriculum/step": float(step)}
        plans = self._last_plans if step == self.last_step else []
        out.update(self.algorithm.curriculum_summary(self, step, plans))
        return out

    # ---- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the plan sequence exactly (plain Python data)."""
        return {
            "config": asdict(self.config),
            "num_batches_planned": self.num_batches_planned,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore :meth:`state_dict` output. With ``strict`` the saved config must equal
        this sampler's, since a different config would not reproduce the saved run."""
        saved = dict(state["config"])
        saved["stage_starts"] = tuple(saved.get("stage_starts", ()))
        current = asdict(self.config)
        if strict:
            differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            if differing:
                detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {current.get(k)!r}" for k in differing)
                raise ValueError(f"curriculum state was saved with a different config ({detail})")
        self.num_batches_planned = int(state["num_batches_planned"])
        self.last_step = state["last_step"]
        self._last_plans = []
