"""The trainer's algorithms, one record each.

An :class:`Algorithm` says everything the trainer needs to know about one algorithm:

* **who plays each turn**: ``plan_episode(sampler, slot)`` turns one
  :class:`~tcod_fast.curriculum.EpisodeSlot` (step, task, the episode's own coin) into an
  :class:`~tcod_fast.curriculum.EpisodePlan`;
* **what signal trains a turn**: ``coefficients(loss, sampler, step)`` gives the step's
  :class:`LossCoefficients` (OPD weight, GRPO weight, turn weighting);
* **what it needs**: a teacher model in process, a teacher generator in the rollout, the
  tasks' expert action counts, GRPO groups of at least ``min_group_size`` episodes;
* **what it logs**: ``curriculum_summary(sampler, step, plans)``, the ``curriculum/``
  metrics of its schedule.

The records are registered once (:func:`register_algorithm`); a run's
``curriculum.algorithm`` is looked up once (:func:`get_algorithm`), where the run is built,
and the sampler and the loop receive the record and never branch on a name. Adding an
algorithm is adding one record.

The built-in algorithms (:data:`ALGORITHMS`), with ``kl_coef`` and ``sod_coef`` from
the loss settings (:class:`~tcod_fast.loss_settings.LossSettings`) and ``kappa``/``rho`` the
ATOD annealing of the curriculum (``sampler.atod``):

============  ==============================  ===============  ===============  ============  =====
algorithm     who plays                       OPD coefficient  GRPO coefficient turn weights  group
============  ==============================  ===============  ===============  ============  =====
opd           student, every turn             ``kl_coef``      0                none          1
tcod_f2b      student turns ``0..d-1``        ``kl_coef``      0                none          1
tcod_b2f      expert/teacher prefix, student  ``kl_coef``      0                none          1
guided_opd    teacher or student per coin     ``kl_coef``      0                none          1
atod          student, every turn             ``kappa(step)``  ``rho(step)``    T-DUR         2
sod           student, every turn             ``sod_coef``     1                SOD           2
grpo          student, every turn             0                1                none          2
============  ==============================  ===============  ===============  ============  =====

How the OPD term is estimated (``loss.estimator``) is the loss's business, not the
algorithm's: see :mod:`tcod_fast.trainer.loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tcod_fast.curriculum import depth_from_advance, prefix_from_advance
from tcod_fast.loss_settings import LossSettings

if TYPE_CHECKING:
    from tcod_fast.curriculum import CurriculumSampler, EpisodePlan, EpisodeSlot

__all__ = [
    "ALGORITHMS",
    "TURN_WEIGHTINGS",
    "Algorithm",
    "LossCoefficients",
    "algorithm_names",
    "get_algorithm",
    "register_algorithm",
    "unregister_algorithm",
]

#: Per-turn weightings a loss knows: ATOD's T-DUR and SOD's step-wise weights.
TURN_WEIGHTINGS = ("tdur", "sod")


@dataclass
class LossCoefficients:
    """The training signal of a step.

    Attributes:
        opd_coef: weight of the OPD (teacher) term.
        grpo_coef: weight of the GRPO group-relative advantage.
        turn_weighting: per-turn weights of the OPD term: ``None``, ``"tdur"`` or ``"sod"``.
    """

    opd_coef: float
    grpo_coef: float
    turn_weighting: str | None  # None or one of TURN_WEIGHTINGS


PlanEpisode = Callable[["CurriculumSampler", "EpisodeSlot"], "EpisodePlan"]
Coefficients = Callable[[LossSettings, "CurriculumSampler", int], LossCoefficients]
CurriculumSummary = Callable[["CurriculumSampler", int, Sequence["EpisodePlan"]], dict]


def no_curriculum_summary(sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict:
    """Nothing to log: the algorithm has no schedule."""
    return {}


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of the trainer.

    Attributes:
        name: the ``curriculum.algorithm`` value that selects it.
        summary: one line: what it does.
        plan_episode: ``(sampler, slot) -> EpisodePlan``: who plays each turn of one
            episode and which turns are trained. ``sampler`` gives the configuration
            (``sampler.config``), the pacing (``sampler.advance(step, rng)``) and the
            schedules (``sampler.intervention``, ``sampler.atod``); ``slot`` the step, the
            task, its expert action count and the episode's own seeded generator
            (``slot.plan(players, turn_window, ...)`` builds the plan).
        coefficients: ``(loss, sampler, step) -> LossCoefficients``, the step's training
            signal from the run's loss settings and the sampler's schedules.
        has_grpo_term: its loss has a GRPO term (``grpo_coef`` not always 0), trained
            through the PPO clipped surrogate.
        min_group_size: fewest episodes per task (``curriculum.episodes_per_task``) it
            trains with; by default 2 for an algorithm with a GRPO term (whose advantage is 0
            in a group of one), else 1.
        needs_teacher_model: trains on a teacher model in process (False: the teacher is
            loaded only for the KL logs).
        needs_teacher_generator: the rollout always gets a teacher generator (the teacher
            may act in any episode); without it a teacher generator is passed only when a
            plan has a teacher turn.
        needs_expert_lens: plans need the tasks' expert action counts (``slot.expert_len``).
        curriculum_summary: ``(sampler, step, plans) -> {"curriculum/...": float}``, the
            schedule's values at ``step`` and, when ``plans`` (the batch planned at that
            step, else empty) are given, their batch means.
    """

    name: str
    summary: str
    plan_episode: PlanEpisode
    coefficients: Coefficients
    has_grpo_term: bool = False
    min_group_size: int | None = None
    needs_teacher_model: bool = True
    needs_teacher_generator: bool = False
    needs_expert_lens: bool = False
    curriculum_summary: CurriculumSummary = no_curriculum_summary

    def __post_init__(self) -> None:
        if self.min_group_size is None:
            object.__setattr__(self, "min_group_size", 2 if self.has_grpo_term else 1)
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"Algorithm.name must be a non-empty string, got {self.name!r}")
        if self.min_group_size < 1:
            raise ValueError(f"Algorithm {self.name!r}: min_group_size must be >= 1, got {self.min_group_size}")
        for attribute in ("plan_episode", "coefficients", "curriculum_summary"):
            if not callable(getattr(self, attribute)):
                raise TypeError(f"Algorithm {self.name!r}: {attribute} must be callable, got {getattr(self, attribute)!r}")


# ---------------------------------------------------------------------- registry

_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Make ``algorithm`` selectable as ``curriculum.algorithm = algorithm.name``.

    A name already registered is an error unless ``replace``. Returns ``algorithm``.
    """
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register_algorithm expects an Algorithm record, got {type(algorithm).__name__}")
    if algorithm.name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {algorithm.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def unregister_algorithm(name: str) -> Algorithm:
    """Remove a registered algorithm; returns its record."""
    if name not in _REGISTRY:
        raise ValueError(f"algorithm must be one of {algorithm_names()}, got {name!r}")
    return _REGISTRY.pop(name)


def get_algorithm(name: str) -> Algorithm:
    """The record of algorithm ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"algorithm must be one of {algorithm_names()}, got {name!r}") from None


def algorithm_names() -> tuple[str, ...]:
    """Names of every registered algorithm, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


# ------------------------------------------------------------------ who plays


def plan_student_episode(sampler: CurriculumSampler, slot: EpisodeSlot) -> EpisodePlan:
    """The student plays every turn; window ``(0, max_turns)``."""
    return slot.plan(("student",) * slot.max_turns, (0, slot.max_turns))


def plan_f2b_episode(sampler: CurriculumSampler, slot: EpisodeSlot) -> EpisodePlan:
    """TCOD-F2B: the student plays turns ``0 .. d-1`` with ``d`` the F2B depth; then the
    episode stops or the teacher finishes it (``f2b_after_depth``); window ``(0, d)``."""
    max_turns = slot.max_turns
    depth = depth_from_advance(sampler.advance(slot.step, slot.rng), max_turns)
    tail = ("teacher",) * (max_turns - depth) if sampler.config.f2b_after_depth == "teacher" else ()
    return slot.plan(("student",) * depth + tail, (0, depth), f2b_depth=depth)


def plan_b2f_episode(sampler: CurriculumSampler, slot: EpisodeSlot) -> EpisodePlan:
    """TCOD-B2F: the expert (stored actions) or teacher plays turns ``0 .. c-1`` with ``c``
    the B2F prefix length from the task's expert length; the student plays from turn
    ``c``; window ``(c, max_turns)``. ``c`` is capped at ``max_turns - 1`` so the student
    always gets at least one turn."""
    config, max_turns = sampler.config, slot.max_turns
    expert_len = slot.expert_len if slot.expert_len is not None else config.b2f_default_expert_len
    if expert_len is None:
        raise ValueError(
            f"tcod_b2f needs the expert action count of task {slot.task_index}, got None "
            "(pass expert_lens or set CurriculumSettings.b2f_default_expert_len)"
        )
    prefix = prefix_from_advance(sampler.advance(slot.step, slot.rng), int(expert_len))
    prefix = min(prefix, max_turns - 1)
    players = (config.b2f_prefix_source,) * prefix + ("student",) * (max_turns - prefix)
    return slot.plan(players, (prefix, max_turns), b2f_prefix_len=prefix)


def plan_guided_episode(sampler: CurriculumSampler, slot: EpisodeSlot) -> EpisodePlan:
    """Guided-OPD: each turn is the teacher's with probability ``p(step)`` by its own
    seeded coin, else the student's; window ``(0, max_turns)`` (teacher turns carry turn
    id -1 anyway)."""
    probability = float(sampler.intervention(slot.step))
    teacher_turn = slot.rng.random(slot.max_turns) < probability
    players = tuple("teacher" if flag else "student" for flag in teacher_turn)
    return slot.plan(players, (0, slot.max_turns), intervention_prob=probability)


# ------------------------------------------------------------------ coefficients


def opd_coefficients(loss: LossSettings, sampler: CurriculumSampler, step: int) -> LossCoefficients:
    """Distillation only: ``loss.kl_coef`` on the OPD term."""
    return LossCoefficients(loss.kl_coef, 0.0, None)


def atod_coefficients(loss: LossSettings, sampler: CurriculumSampler, step: int) -> LossCoefficients:
    """ATOD: ``kappa(step)`` on the T-DUR-weighted OPD term, ``rho(step)`` on GRPO."""
    return LossCoefficients(sampler.atod.kappa(step), sampler.atod.rho(step), "tdur")


def sod_coefficients(loss: LossSettings, sampler: CurriculumSampler, step: int) -> LossCoefficients:
    """SOD: ``loss.sod_coef`` on the SOD-weighted OPD term, 1 on GRPO."""
    return LossCoefficients(loss.sod_coef, 1.0, "sod")


def grpo_coefficients(loss: LossSettings, sampler: CurriculumSampler, step: int) -> LossCoefficients:
    """GRPO alone: no teacher term."""
    return LossCoefficients(0.0, 1.0, None)


# ------------------------------------------------------------------ logging


def f2b_summary(sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict:
    """Scheduled F2B depth and, for a planned batch, its mean."""
    out = {"curriculum/f2b_depth": float(min(1.0 + float(sampler.pacing(step)), sampler.config.max_turns))}
    if plans:
        out["curriculum/f2b_depth_mean"] = float(np.mean([p.f2b_depth for p in plans]))
    return out


def b2f_summary(sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict:
    """Prefix turns removed so far and, for a planned batch, the mean prefix length."""
    out = {"curriculum/b2f_advance": float(sampler.pacing(step))}
    if plans:
        out["curriculum/b2f_prefix_len_mean"] = float(np.mean([p.b2f_prefix_len for p in plans]))
    return out


def guided_summary(sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict:
    """Intervention probability and, for a planned batch, the fraction of teacher turns."""
    out = {"curriculum/intervention_prob": float(sampler.intervention(step))}
    if plans:
        teacher = sum(p.players.count("teacher") for p in plans)
        out["curriculum/teacher_turn_fraction"] = teacher / sum(len(p.players) for p in plans)
    return out


def atod_summary(sampler: CurriculumSampler, step: int, plans: Sequence[EpisodePlan]) -> dict:
    """ATOD's ``kappa`` and ``rho`` at ``step``."""
    return {"curriculum/atod_kappa": sampler.atod.kappa(step), "curriculum/atod_rho": sampler.atod.rho(step)}


# ------------------------------------------------------------------ the built-ins

for _record in (
    Algorithm(
        name="opd",
        summary="Vanilla on-policy distillation: the student plays whole episodes; reverse KL to the teacher on every student token.",
        plan_episode=plan_student_episode,
        coefficients=opd_coefficients,
    ),
    Algorithm(
        name="tcod_f2b",
        summary="TCOD front to back: the student plays the first 1 + step // eta turns; the curriculum deepens with the step.",
        plan_episode=plan_f2b_episode,
        coefficients=opd_coefficients,
        curriculum_summary=f2b_summary,
    ),
    Algorithm(
        name="tcod_b2f",
        summary="TCOD back to front: the expert or teacher plays a prefix that shrinks with the step; the student plays the rest.",
        plan_episode=plan_b2f_episode,
        coefficients=opd_coefficients,
        needs_expert_lens=True,
        curriculum_summary=b2f_summary,
    ),
    Algorithm(
        name="guided_opd",
        summary="Guided-OPD: the teacher takes each turn with a probability that decays with the step; the student's turns are trained.",
        plan_episode=plan_guided_episode,
        coefficients=opd_coefficients,
        needs_teacher_generator=True,
        curriculum_summary=guided_summary,
    ),
    Algorithm(
        name="atod",
        summary="ATOD: T-DUR-weighted OPD annealed from kappa_init to kappa_min, plus GRPO rising from rho_init to rho_max.",
        plan_episode=plan_student_episode,
        coefficients=atod_coefficients,
        has_grpo_term=True,
        curriculum_summary=atod_summary,
    ),
    Algorithm(
        name="sod",
        summary="SOD: GRPO plus sod_coef times OPD with step-wise weights that shrink where the student drifted from the teacher.",
        plan_episode=plan_student_episode,
        coefficients=sod_coefficients,
        has_grpo_term=True,
    ),
    Algorithm(
        name="grpo",
        summary="GRPO: group-relative success advantage in a PPO clipped surrogate, no teacher term.",
        plan_episode=plan_student_episode,
        coefficients=grpo_coefficients,
        has_grpo_term=True,
        needs_teacher_model=False,
    ),
):
    register_algorithm(_record)
del _record

#: The built-in algorithms, in the order of the table above. :func:`algorithm_names` also
#: lists algorithms registered later.
ALGORITHMS: tuple[str, ...] = algorithm_names()
