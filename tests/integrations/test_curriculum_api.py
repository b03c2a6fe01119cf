"""The standalone curriculum API gives the trainer's plans, one trajectory at a time."""

from __future__ import annotations

import pytest
import torch

from tcod_fast.algorithms import get_algorithm
from tcod_fast.curriculum import CurriculumSampler, CurriculumSettings, InterventionSchedule, b2f_prefix_len, f2b_depth
from tcod_fast.integrations.curriculum import TurnCurriculum


@pytest.mark.parametrize("step", [0, 4, 5, 13, 60])
def test_f2b_window_is_the_tcod_depth(step):
    f2b = TurnCurriculum("tcod_f2b", max_turns=8, eta=5)
    assert f2b.turn_window(step) == (0, f2b_depth(step, 5, 8))
    assert f2b.prefix_len(step) == 0


@pytest.mark.parametrize("step", [0, 3, 9, 30])
def test_b2f_prefix_is_the_tcod_prefix(step):
    b2f = TurnCurriculum("tcod_b2f", max_turns=10, eta=3)
    prefix = b2f_prefix_len(step, 3, 6)
    assert b2f.prefix_len(step, expert_len=6) == prefix
    assert b2f.turn_window(step, expert_len=6) == (prefix, 10)
    assert [b2f.teacher_acts(step, k, expert_len=6) for k in range(6)] == [k < prefix for k in range(6)]
    with pytest.raises(ValueError, match="expert action count"):
        b2f.plan(step)


@pytest.mark.parametrize("algorithm", ["guided_opd", "tcod_f2b", "opd"])
def test_plans_equal_the_trainers_sampler(algorithm):
    options = dict(max_turns=6, seed=3, eta=2.5, pacing="smooth", guided=InterventionSchedule(p_init=0.6, decay_steps=10))
    api = TurnCurriculum(algorithm, **options)
    for step in (0, 4, 7):
        sampler = CurriculumSampler(CurriculumSettings(algorithm=algorithm, **options), get_algorithm(algorithm))
        batch = sampler.plan_batch(step, tasks=list(range(5)))
        assert [api.plan(step, i) for i in range(5)] == batch


def test_guided_coin_follows_the_intervention_probability():
    guided = TurnCurriculum("guided_opd", max_turns=10, guided={"p_init": 0.5, "decay_steps": 100})
    for step in (0, 50, 100):
        p = guided.intervention_prob(step)
        coins = [guided.teacher_acts(step, k, trajectory_index=i) for i in range(400) for k in range(10)]
        assert abs(sum(coins) / len(coins) - p) < 0.03, (step, p)
    assert guided.intervention_prob(100) == 0.0
    # the same question gets the same answer
    assert guided.teacher_acts(10, 3, 7) == guided.teacher_acts(10, 3, 7)


def test_turn_ids_and_atod():
    f2b = TurnCurriculum("tcod_f2b", max_turns=5, eta=1)
    plan = f2b.plan(step=1)  # depth 2
    ids = TurnCurriculum.turn_ids(plan, [-1, 0, 0, -1, 1, 1, 2])
    assert torch.equal(ids, torch.tensor([-1, 0, 0, -1, 1, 1, -1]))
    atod = TurnCurriculum("atod", max_turns=5, atod={"anneal_steps": 10, "kappa_min": 0.2})
    assert atod.atod_coefficients(0) == (1.0, 0.0)
    assert atod.atod_coefficients(10) == (pytest.approx(0.2), 1.0)
    with pytest.raises(TypeError, match="not_an_option"):
        TurnCurriculum("opd", max_turns=3, not_an_option=1)
