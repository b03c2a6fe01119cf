"""Tests of tcod_fast.curriculum: TCOD formulas, schedules, the sampler's plans,
determinism and exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tcod_fast.algorithms import get_algorithm
from tcod_fast.curriculum import (
    ATODAnnealing,
    CurriculumSampler,
    CurriculumSettings,
    EpisodePlan,
    InterventionSchedule,
    LinearPacing,
    SmoothPacing,
    StagedPacing,
    atod_kappa,
    atod_progress,
    atod_rho,
    b2f_prefix_len,
    build_pacing,
    f2b_depth,
    turn_windows_tensor,
)

# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize(
    "step, eta, max_turns, expected",
    [(0, 5, 30, 1), (4, 5, 30, 1), (5, 5, 30, 2), (14, 5, 30, 3), (145, 5, 30, 30), (10_000, 5, 30, 30),
     (7, 1, 4, 4), (0, 3, 1, 1)],
)
def test_f2b_depth_hand_values(step, eta, max_turns, expected):
    assert f2b_depth(step, eta, max_turns) == expected


@pytest.mark.parametrize("eta, max_turns", [(5, 30), (6, 30), (2, 15), (3, 7), (1, 1)])
def test_f2b_reaches_full_depth_exactly_at_eta_times_max_turns_minus_one(eta, max_turns):
    full_at = eta * (max_turns - 1)
    depths = [f2b_depth(s, eta, max_turns) for s in range(full_at + 3 * eta)]
    assert depths[full_at] == max_turns
    if full_at > 0:
        assert depths[full_at - 1] == max_turns - 1
    assert all(b - a in (0, 1) for a, b in zip(depths, depths[1:]))  # never skips or shrinks
    assert depths[0] == 1


@pytest.mark.parametrize(
    "step, eta, expert_len, expected",
    [(0, 5, 8, 7), (4, 5, 8, 7), (5, 5, 8, 6), (34, 5, 8, 1), (35, 5, 8, 0), (999, 5, 8, 0),
     (0, 2, 1, 0), (0, 4, 0, 0)],
)
def test_b2f_prefix_len_hand_values(step, eta, expert_len, expected):
    assert b2f_prefix_len(step, eta, expert_len) == expected


@pytest.mark.parametrize("eta, expert_len", [(5, 12), (2, 3), (4, 1)])
def test_b2f_prefix_reaches_zero_and_stays_in_range(eta, expert_len):
    prefixes = [b2f_prefix_len(s, eta, expert_len) for s in range(eta * expert_len + 10)]
    assert all(0 <= c <= expert_len - 1 for c in prefixes)
    assert prefixes[eta * (expert_len - 1)] == 0
    assert all(b - a in (0, -1) for a, b in zip(prefixes, prefixes[1:]))


@pytest.mark.parametrize("bad", [dict(step=-1, eta=5), dict(step=0, eta=0)])
def test_formulas_reject_bad_arguments(bad):
    with pytest.raises(ValueError):
        f2b_depth(bad["step"], bad["eta"], 10)
    with pytest.raises(ValueError):
        b2f_prefix_len(bad["step"], bad["eta"], 10)


# ------------------------------------------------------------------ schedules


def test_pacings_hand_values():
    linear = LinearPacing(5)
    assert [linear(s) for s in (0, 4, 5, 11)] == [0, 0, 1, 2]
    staged = StagedPacing((10, 25, 60))
    assert [staged(s) for s in (0, 9, 10, 24, 25, 59, 60, 1000)] == [0, 0, 1, 1, 2, 2, 3, 3]
    smooth = SmoothPacing(4.0)
    assert smooth(6) == pytest.approx(1.5)
    assert isinstance(build_pacing("staged", stage_starts=[3, 7]), StagedPacing)
    with pytest.raises(ValueError, match="strictly increasing"):
        StagedPacing((5, 5))
    with pytest.raises(ValueError, match="pacing must be"):
        build_pacing("quadratic")


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_intervention_schedule_warmup_monotone_decay_reaches_zero(shape):
    schedule = InterventionSchedule(shape=shape, p_init=0.6, decay_steps=40, warmup_steps=10)
    values = [schedule(s) for s in range(0, 80)]
    assert values[:11] == [0.6] * 11  # held through warm-up, decay starts at step 10
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert 0.0 < values[30] < 0.6
    assert values[50] == 0.0 and values[79] == 0.0  # exactly 0 from warmup + decay_steps on
    assert values[49] > 0.0


def test_intervention_schedule_hand_values():
    # u = (step - warmup) / decay = 0.5
    assert InterventionSchedule("linear", 0.8, 20, 0)(10) == pytest.approx(0.4)
    assert InterventionSchedule("cosine", 0.8, 20, 0)(10) == pytest.approx(0.4)
    assert InterventionSchedule("cosine", 0.8, 20, 0)(5) == pytest.approx(0.8 * (1 + math.cos(math.pi / 4)) / 2)
    r = 5.0
    expected = 0.8 * (math.exp(-r * 0.5) - math.exp(-r)) / (1 - math.exp(-r))
    assert InterventionSchedule("exponential", 0.8, 20, 0, exp_rate=r)(10) == pytest.approx(expected)
    assert InterventionSchedule("constant", 0.3, 20)(1000) == 0.3
    with pytest.raises(ValueError, match="p_init"):
        InterventionSchedule(p_init=1.5)


def test_atod_annealing_hand_values_and_kappa_floor():
    assert atod_progress(0, 100) == 0.0
    assert atod_progress(25, 100) == 0.25
    assert atod_progress(250, 100) == 1.0
    assert atod_progress(3, 0) == 1.0
    assert atod_kappa(25, 100, kappa_init=1.0, kappa_min=0.2) == pytest.approx(0.8)
    assert atod_rho(25, 100, rho_init=0.1, rho_max=0.9) == pytest.approx(0.3)
    annealing = ATODAnnealing(anneal_steps=50, kappa_init=2.0, kappa_min=0.25, rho_init=0.0, rho_max=1.0)
    kappas = [annealing.kappa(s) for s in range(120)]
    rhos = [annealing.rho(s) for s in range(120)]
    assert kappas[0] == 2.0 and rhos[0] == 0.0
    assert min(kappas) == pytest.approx(0.25) and kappas[50] == pytest.approx(0.25)
    assert all(k >= 0.25 for k in kappas)  # the floor keeps a teacher anchor
    assert all(b <= a for a, b in zip(kappas, kappas[1:]))
    assert all(b >= a for a, b in zip(rhos, rhos[1:])) and rhos[119] == 1.0
    # Lipschitz constants stated in ATOD A.4
    assert max(abs(b - a) for a, b in zip(kappas, kappas[1:])) <= (2.0 - 0.25) / 50 + 1e-12
    with pytest.raises(ValueError, match="kappa_min"):
        ATODAnnealing(kappa_init=0.1, kappa_min=0.5)


# ---------------------------------------------------------------------- plans


def test_episode_plan_player_and_turn_ids():
    plan = EpisodePlan(max_turns=5, players=("expert", "expert", "student", "student", "student"), turn_window=(2, 5))
    assert [plan.player(k) for k in range(7)] == ["expert", "expert", "student", "student", "student", "stop", "stop"]
    assert [plan.turn_id(k) for k in range(5)] == [-1, -1, 2, 3, 4]
    assert plan.num_student_turns == 3
    with pytest.raises(ValueError, match="players must be among"):
        EpisodePlan(max_turns=2, players=("student", "robot"), turn_window=(0, 2))
    # expert actions are planned from the reset state: an expert turn after anyone else's is refused
    with pytest.raises(ValueError, match=r"turn 2 is 'expert' after turn 1 was 'student'"):
        EpisodePlan(max_turns=4, players=("expert", "student", "expert"), turn_window=(0, 4))
    with pytest.raises(ValueError, match=r"turn 1 is 'expert' after turn 0 was 'teacher'"):
        EpisodePlan(max_turns=4, players=("teacher", "expert"), turn_window=(0, 4))
    EpisodePlan(max_turns=4, players=("expert", "expert", "teacher", "student"), turn_window=(0, 4))
    EpisodePlan(max_turns=4, players=("expert", "stop"), turn_window=(0, 4))
    with pytest.raises(ValueError, match="max_turns"):
        EpisodePlan(max_turns=1, players=("student", "student"), turn_window=(0, 1))


def _sampler_for(config: CurriculumSettings) -> CurriculumSampler:
    return CurriculumSampler(config, get_algorithm(config.algorithm))


def _sampler(**overrides) -> CurriculumSampler:
    return _sampler_for(CurriculumSettings(**{"max_turns": 6, "eta": 2, **overrides}))


@pytest.mark.parametrize("algorithm", ["opd", "atod", "sod", "grpo"])
def test_full_episode_algorithms_plan_student_only(algorithm):
    plans = _sampler(algorithm=algorithm, episodes_per_task=3).plan_batch(7, ["a", "b"])
    assert len(plans) == 6
    assert [p.task_index for p in plans] == [0, 0, 0, 1, 1, 1]
    assert [p.episode_index for p in plans] == list(range(6))
    for plan in plans:
        assert [plan.player(k) for k in range(6)] == ["student"] * 6 and plan.player(6) == "stop"
        assert plan.turn_window == (0, 6) and plan.algorithm == algorithm


@pytest.mark.parametrize("after_depth", ["stop", "teacher"])
def test_f2b_plans_follow_depth(after_depth):
    sampler = _sampler(algorithm="tcod_f2b", f2b_after_depth=after_depth)
    for step in (0, 1, 2, 5, 9, 10, 50):
        depth = f2b_depth(step, 2, 6)
        (plan,) = sampler.plan_batch(step, ["task"])
        assert plan.f2b_depth == depth and plan.turn_window == (0, depth)
        tail = "stop" if after_depth == "stop" else "teacher"
        assert [plan.player(k) for k in range(6)] == ["student"] * depth + [tail] * (6 - depth)
        assert plan.player(6) == "stop"
        assert [plan.turn_id(k) for k in range(6)] == list(range(depth)) + [-1] * (6 - depth)
    assert sampler.summary(50)["curriculum/f2b_depth"] == 6.0


@pytest.mark.parametrize("source", ["expert", "teacher"])
def test_b2f_plans_follow_prefix_per_task_length(source):
    sampler = _sampler(algorithm="tcod_b2f", b2f_prefix_source=source, max_turns=10)
    expert_lens = [4, 9, 1]
    for step in (0, 3, 6, 20):
        plans = sampler.plan_batch(step, ["a", "b", "c"], expert_lens)
        for plan, length in zip(plans, expert_lens):
            prefix = b2f_prefix_len(step, 2, length)
            assert plan.b2f_prefix_len == prefix and plan.turn_window == (prefix, 10)
            assert [plan.player(k) for k in range(10)] == [source] * prefix + ["student"] * (10 - prefix)
            assert [plan.turn_id(k) for k in range(10)] == [-1] * prefix + list(range(prefix, 10))
    windows = turn_windows_tensor(plans)
    assert windows.dtype == torch.int64 and windows.tolist() == [[0, 10], [0, 10], [0, 10]]


def test_b2f_prefix_capped_so_the_student_plays_and_unknown_length_handling():
    (plan,) = _sampler(algorithm="tcod_b2f", max_turns=4).plan_batch(0, ["x"], [20])
    assert plan.b2f_prefix_len == 3 and plan.player(3) == "student"
    with pytest.raises(ValueError, match="expert action count of task 1"):
        _sampler(algorithm="tcod_b2f").plan_batch(0, ["a", "b"], [3, None])
    plans = _sampler(algorithm="tcod_b2f", b2f_default_expert_len=5).plan_batch(0, ["a", "b"], [3, None])
    assert [p.b2f_prefix_len for p in plans] == [2, 4]
    with pytest.raises(ValueError, match="expert_lens has 1 entries but tasks has 2"):
        _sampler(algorithm="tcod_b2f").plan_batch(0, ["a", "b"], [3])


def test_guided_opd_coins_follow_probability():
    sampler = _sampler(algorithm="guided_opd", max_turns=20, guided=InterventionSchedule(p_init=0.5, decay_steps=100))
    plans = sampler.plan_batch(40, list(range(200)))  # p = 0.5 * (1 - 0.4) = 0.3
    teacher = sum(p.players.count("teacher") for p in plans)
    assert all(p.intervention_prob == pytest.approx(0.3) for p in plans)
    # 4000 coins at p=0.3: mean 1200, std ~29; 6 sigma bounds
    assert 1025 < teacher < 1375
    assert sampler.summary()["curriculum/teacher_turn_fraction"] == pytest.approx(teacher / 4000)
    for plan in plans[:5]:
        assert plan.turn_window == (0, 20)
        assert [plan.turn_id(k) for k in range(20)] == [k if who == "student" else -1 for k, who in enumerate(plan.players)]
    late = sampler.plan_batch(100, list(range(20)))
    assert all(p.players == ("student",) * 20 for p in late)  # p reached 0
    assert sampler.summary(100)["curriculum/intervention_prob"] == 0.0


def test_smooth_pacing_rounds_stochastically_around_the_mean():
    sampler = _sampler(algorithm="tcod_f2b", pacing="smooth", eta=4, max_turns=30)
    plans = sampler.plan_batch(6, list(range(400)))  # advance 1.5 -> depth 2 or 3
    depths = [p.f2b_depth for p in plans]
    assert set(depths) == {2, 3}
    assert sum(depths) / len(depths) == pytest.approx(2.5, abs=0.15)
    (plan,) = sampler.plan_batch(8, ["t"])  # integer advance, no coin
    assert plan.f2b_depth == 3


def test_staged_pacing_in_the_sampler():
    sampler = _sampler(algorithm="tcod_f2b", pacing="staged", stage_starts=(3, 10))
    assert [sampler.plan_batch(s, ["t"])[0].f2b_depth for s in (0, 2, 3, 9, 10, 99)] == [1, 1, 2, 2, 3, 3]


def test_eval_plans_are_full_depth_student_only_and_leave_state_alone():
    for algorithm in ("tcod_f2b", "tcod_b2f", "guided_opd"):
        sampler = _sampler(algorithm=algorithm, guided=InterventionSchedule(p_init=1.0))
        before = sampler.state_dict()
        plans = sampler.plan_eval_batch(["a", "b", "c"])
        assert len(plans) == 3 and sampler.state_dict() == before
        for plan in plans:
            assert plan.is_eval and plan.turn_window == (0, 6)
            assert [plan.player(k) for k in range(6)] == ["student"] * 6


# ------------------------------------------------------ determinism and resume


def _guided_config(seed: int) -> CurriculumSettings:
    return CurriculumSettings(
        algorithm="guided_opd", max_turns=12, seed=seed, episodes_per_task=2,
        guided=InterventionSchedule(shape="cosine", p_init=0.7, decay_steps=30, warmup_steps=3),
    )


def test_sampler_is_deterministic_for_a_seed():
    tasks = list(range(8))
    runs = [[_sampler_for(_guided_config(seed)).plan_batch(s, tasks) for s in range(3)] for seed in (1, 1, 2)]
    first, same_seed, other_seed = runs
    assert first == same_seed
    assert first != other_seed
    # repeated calls at one step (e.g. gradient accumulation) draw fresh coins
    sampler = _sampler_for(_guided_config(1))
    assert sampler.plan_batch(5, tasks) != sampler.plan_batch(5, tasks)


@pytest.mark.parametrize(
    "config",
    [_guided_config(7), CurriculumSettings(algorithm="tcod_f2b", pacing="smooth", eta=1.5, max_turns=9, seed=3)],
)
def test_sampler_resumes_exactly_from_state_dict(config):
    tasks = list(range(5))
    reference = _sampler_for(config)
    uninterrupted = [reference.plan_batch(step, tasks) for step in range(10)]

    first_half = _sampler_for(copy.deepcopy(config))
    for step in range(6):
        first_half.plan_batch(step, tasks)
    state = copy.deepcopy(first_half.state_dict())

    resumed = _sampler_for(copy.deepcopy(config))
    resumed.load_state_dict(state)
    assert [resumed.plan_batch(step, tasks) for step in range(6, 10)] == uninterrupted[6:]
    assert resumed.summary() == reference.summary()


def test_load_state_dict_rejects_a_different_config():
    state = _sampler_for(_guided_config(1)).state_dict()
    with pytest.raises(ValueError, match="seed: saved 1 vs 2"):
        _sampler_for(_guided_config(2)).load_state_dict(state)
    lenient = _sampler_for(_guided_config(2))
    lenient.load_state_dict(state, strict=False)
    assert lenient.num_batches_planned == 0


def test_config_validation_messages():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="the algorithm record must be config.algorithm's, 'tcod_f2b', got 'opd'"):
        CurriculumSampler(CurriculumSettings(algorithm="tcod_f2b"), get_algorithm("opd"))
    with pytest.raises(ValueError, match="f2b_after_depth"):
        CurriculumSettings(f2b_after_depth="expert")
    with pytest.raises(ValueError, match="b2f_prefix_source"):
        CurriculumSettings(b2f_prefix_source="student")


def test_summary_reports_atod_coefficients():
    sampler = _sampler_for(CurriculumSettings(algorithm="atod", atod=ATODAnnealing(anneal_steps=10, kappa_min=0.2)))
    sampler.plan_batch(5, ["t"])
    summary = sampler.summary()
    assert summary["curriculum/atod_kappa"] == pytest.approx(0.6)
    assert summary["curriculum/atod_rho"] == pytest.approx(0.5)
