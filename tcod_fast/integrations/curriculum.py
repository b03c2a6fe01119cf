"""TCOD-F2B/B2F, Guided-OPD and ATOD schedules for one's own rollout code (TRL, verl, ...).

One object answers, for a training step and a trajectory, the questions a rollout and a loss
ask: which turns the student plays and which are trained (the turn window), how long the
expert/teacher prefix is (B2F), whether the teacher takes a turn (Guided-OPD's coin), and the
ATOD coefficients. It asks the same algorithm records the ``tcod-fast`` trainer uses
(:mod:`tcod_fast.algorithms`, :mod:`tcod_fast.curriculum`), so the answers are the trainer's.

Turn index ``k`` counts every turn of a trajectory from 0, whoever plays it.

Example (TCOD-F2B with TRL: train only the first ``1 + step // 5`` agent turns)::

    from tcod_fast.integrations.curriculum import TurnCurriculum
    f2b = TurnCurriculum("tcod_f2b", max_turns=10, eta=5)
    f2b.turn_window(step=12)                  # (0, 3)
    trainer = FusedDistillationTrainer(..., turn_window=f2b.turn_window)

Guided-OPD in a rollout loop::

    guided = TurnCurriculum("guided_opd", max_turns=10, guided={"p_init": 0.5, "decay_steps": 100})
    for k in range(10):
        actor = teacher if guided.teacher_acts(step, k, trajectory_index=i) else student
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tcod_fast.algorithms import get_algorithm
from tcod_fast.curriculum import (
    ATODAnnealing,
    CurriculumSampler,
    CurriculumSettings,
    EpisodePlan,
    EpisodeSlot,
    InterventionSchedule,
)

__all__ = ["TurnCurriculum"]


class TurnCurriculum:
    """A curriculum that plans one trajectory at a time.

    Args:
        algorithm: a registered algorithm (``opd``, ``tcod_f2b``, ``tcod_b2f``, ``guided_opd``,
            ``atod``, ``sod``, ``grpo`` or one registered later).
        max_turns: turn budget of a trajectory.
        seed: seeds every coin (Guided-OPD turns, smooth pacing).
        **options: any other :class:`tcod_fast.curriculum.CurriculumSettings` field: ``eta``,
            ``pacing``, ``stage_starts``, ``f2b_after_depth``, ``b2f_prefix_source``,
            ``b2f_default_expert_len``, ``guided`` (an
            :class:`~tcod_fast.curriculum.InterventionSchedule` or a dict of its fields) and
            ``atod`` (an :class:`~tcod_fast.curriculum.ATODAnnealing` or a dict of its fields).
            An unknown name is a ``TypeError`` naming it.

    Plans depend only on ``(seed, step, trajectory_index)``: the same call gives the same plan,
    in any order and on any worker, and ``trajectory_index = i`` gives the plan the trainer's
    :class:`~tcod_fast.curriculum.CurriculumSampler` gives episode ``i`` of its first batch.
    """

    def __init__(self, algorithm: str, *, max_turns: int, seed: int = 0, **options: Any) -> None:
        for name, schedule in (("guided", InterventionSchedule), ("atod", ATODAnnealing)):
            if isinstance(options.get(name), dict):
                options[name] = schedule(**options[name])
        self.config = CurriculumSettings(algorithm=algorithm, max_turns=max_turns, seed=seed, **options)
        self.sampler = CurriculumSampler(self.config, get_algorithm(algorithm))

    def plan(self, step: int, trajectory_index: int = 0, *, expert_len: int | None = None) -> EpisodePlan:
        """The :class:`~tcod_fast.curriculum.EpisodePlan` of trajectory ``trajectory_index`` at
        training ``step``: ``players`` (who plays each turn), ``turn_window``, ``f2b_depth``,
        ``b2f_prefix_len``, ``intervention_prob``.

        ``expert_len``: the task's expert action count ``L`` (B2F's prefix is defined by it;
        ``b2f_default_expert_len`` is used when it is ``None``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if trajectory_index < 0:
            raise ValueError(f"trajectory_index must be >= 0, got {trajectory_index}")
        slot = EpisodeSlot(
            step=step,
            task_index=trajectory_index,
            episode_index=trajectory_index,
            expert_len=expert_len,
            # The seed layout of CurriculumSampler.plan_batch with batch counter 0.
            rng=np.random.default_rng([self.config.seed, step, 0, trajectory_index]),
            max_turns=self.config.max_turns,
            algorithm=self.config.algorithm,
        )
        return self.sampler.algorithm.plan_episode(self.sampler, slot)

    def turn_window(self, step: int, trajectory_index: int = 0, *, expert_len: int | None = None) -> tuple[int, int]:
        """``(lo, hi)``: turns ``lo <= k < hi`` are trained (F2B ``(0, depth)``, B2F
        ``(prefix, max_turns)``, otherwise ``(0, max_turns)``)."""
        return self.plan(step, trajectory_index, expert_len=expert_len).turn_window

    def prefix_len(self, step: int, expert_len: int | None = None, trajectory_index: int = 0) -> int:
        """Turns the expert/teacher plays before the student (B2F); 0 for other algorithms."""
        return self.plan(step, trajectory_index, expert_len=expert_len).b2f_prefix_len or 0

    def teacher_acts(
        self, step: int, turn_index: int, trajectory_index: int = 0, *, expert_len: int | None = None
    ) -> bool:
        """Guided-OPD's coin: does the teacher (or, in a B2F prefix, the expert) play turn
        ``turn_index`` of this trajectory?"""
        plan = self.plan(step, trajectory_index, expert_len=expert_len)
        return plan.player(turn_index) in ("teacher", "expert")

    def intervention_prob(self, step: int) -> float:
        """Guided-OPD's teacher-takeover probability at ``step``."""
        return float(self.sampler.intervention(step))

    def atod_coefficients(self, step: int) -> tuple[float, float]:
        """ATOD's ``(kappa, rho)`` at ``step``: OPD and GRPO weights (eqs. 10-12)."""
        return self.sampler.atod.kappa(step), self.sampler.atod.rho(step)

    @staticmethod
    def turn_ids(plan: EpisodePlan, token_turns: Sequence[int]):
        """Turn ids of a trajectory's tokens for the loss: ``token_turns[t]`` is the turn index
        of token ``t`` (``-1`` for tokens of no turn: prompt, observations); the result is an
        int64 tensor with ``k`` on the trained student turns of ``plan`` and ``-1`` elsewhere,
        ready for ``fused_turn_kl(..., turn_ids=...)``."""
        import torch

        return torch.tensor([plan.turn_id(k) if k >= 0 else -1 for k in token_turns], dtype=torch.int64)
