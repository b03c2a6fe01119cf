"""The algorithm records: the registry, each algorithm's coefficients at a few steps, what it
needs, and that a new algorithm is one record that the sampler and config accept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from toy_algorithm import TEACHER_FIRST_TURN_OPD

from tcod_fast.algorithms import (
    ALGORITHMS,
    Algorithm,
    LossCoefficients,
    algorithm_names,
    get_algorithm,
    no_curriculum_summary,
    opd_coefficients,
    register_algorithm,
    unregister_algorithm,
)
from tcod_fast.curriculum import ATODAnnealing, CurriculumSampler, CurriculumSettings
from tcod_fast.trainer.config import TrainConfig, check_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"


def _config(algorithm: str) -> TrainConfig:
    config = TrainConfig()
    config.curriculum = CurriculumSettings(
        algorithm=algorithm,
        max_turns=6,
        eta=2,
        episodes_per_task=2,
        atod=ATODAnnealing(anneal_steps=100, kappa_init=1.0, kappa_min=0.1, rho_init=0.0, rho_max=1.0),
    )
    config.loss.kl_coef = 0.7
    config.loss.sod_coef = 0.3
    return config


# (opd_coef, grpo_coef, turn_weighting) at steps 0, 25, 50, 100, 250, by hand:
# ATOD kappa(s) = max(0.1, 1 - 0.9 min(s/100, 1)), rho(s) = min(s/100, 1).
COEFFICIENT_TABLE = {
    "opd": [(0.7, 0.0, None)] * 5,
    "tcod_f2b": [(0.7, 0.0, None)] * 5,
    "tcod_b2f": [(0.7, 0.0, None)] * 5,
    "guided_opd": [(0.7, 0.0, None)] * 5,
    "atod": [(1.0, 0.0, "tdur"), (0.775, 0.25, "tdur"), (0.55, 0.5, "tdur"), (0.1, 1.0, "tdur"), (0.1, 1.0, "tdur")],
    "sod": [(0.3, 1.0, "sod")] * 5,
    "grpo": [(0.0, 1.0, None)] * 5,
}
STEPS = (0, 25, 50, 100, 250)


def test_builtin_names_in_table_order():
    assert ALGORITHMS == ("opd", "tcod_f2b", "tcod_b2f", "guided_opd", "atod", "sod", "grpo")
    assert algorithm_names()[: len(ALGORITHMS)] == ALGORITHMS
    assert set(COEFFICIENT_TABLE) == set(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_coefficient_table_at_a_few_steps(algorithm):
    config = _config(algorithm)
    sampler = CurriculumSampler(config.curriculum, get_algorithm(config.curriculum.algorithm))
    record = get_algorithm(algorithm)
    for step, (opd_coef, grpo_coef, weighting) in zip(STEPS, COEFFICIENT_TABLE[algorithm]):
        got = record.coefficients(config.loss, sampler, step)
        assert isinstance(got, LossCoefficients)
        assert got.opd_coef == pytest.approx(opd_coef, abs=1e-12), (algorithm, step)
        assert got.grpo_coef == pytest.approx(grpo_coef, abs=1e-12), (algorithm, step)
        assert got.turn_weighting == weighting, (algorithm, step)


def _documented_table() -> dict[str, list[str]]:
    """docs/algorithms.md's table: algorithm -> [OPD coefficient, GRPO coefficient, turn weights]."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`") and cells[0] != "`--algorithm`":
            rows[cells[0].strip("`")] = cells[2:]
    return rows


def _documented_value(expression: str, config: TrainConfig, atod: ATODAnnealing, step: int) -> float:
    """A coefficient cell of the docs' table at ``step``, with ATOD's annealing as the docs write
    it: p(s) = min(s/T, 1), kappa(s) = max(kappa_min, kappa_init - (kappa_init - kappa_min) p(s)),
    rho(s) = rho_init + (rho_max - rho_init) p(s)."""
    progress = min(step / atod.anneal_steps, 1.0)
    values = {
        "0": 0.0,
        "1": 1.0,
        "`loss.kl_coef`": config.loss.kl_coef,
        "`loss.sod_coef`": config.loss.sod_coef,
        "`κ(s)`": max(atod.kappa_min, atod.kappa_init - (atod.kappa_init - atod.kappa_min) * progress),
        "`ρ(s)`": atod.rho_init + (atod.rho_max - atod.rho_init) * progress,
    }
    return values[expression]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_coefficients_follow_the_documented_table_at_every_step(algorithm):
    """Each record's coefficients at every step of an annealing of odd length and values, against
    the table and formulas of docs/algorithms.md."""
    table = _documented_table()
    assert set(table) == set(ALGORITHMS)
    opd_cell, grpo_cell, weights_cell = table[algorithm]
    config = _config(algorithm)
    sampler = CurriculumSampler(config.curriculum, get_algorithm(config.curriculum.algorithm))
    sampler.atod = atod = ATODAnnealing(anneal_steps=37, kappa_init=0.9, kappa_min=0.15, rho_init=0.2, rho_max=0.85)
    record = get_algorithm(algorithm)
    for step in range(0, 2 * 37 + 1):
        got = record.coefficients(config.loss, sampler, step)
        assert got.opd_coef == pytest.approx(_documented_value(opd_cell, config, atod, step), abs=1e-12), step
        assert got.grpo_coef == pytest.approx(_documented_value(grpo_cell, config, atod, step), abs=1e-12), step
        assert got.turn_weighting == {"none": None, "T-DUR": "tdur", "SOD": "sod"}[weights_cell]


def test_what_each_algorithm_needs():
    # (min_group_size, needs_teacher_model, needs_teacher_generator, needs_expert_lens)
    expected = {
        "opd": (1, True, False, False),
        "tcod_f2b": (1, True, False, False),
        "tcod_b2f": (1, True, False, True),
        "guided_opd": (1, True, True, False),
        "atod": (2, True, False, False),
        "sod": (2, True, False, False),
        "grpo": (2, False, False, False),
    }
    for name, needs in expected.items():
        record = get_algorithm(name)
        assert record.name == name
        assert (record.min_group_size, record.needs_teacher_model, record.needs_teacher_generator, record.needs_expert_lens) == needs
        assert record.summary and "\n" not in record.summary


def test_group_size_rule_comes_from_the_record():
    for name in ALGORITHMS:
        config = _config(name)
        config.curriculum.episodes_per_task = 1
        if get_algorithm(name).min_group_size > 1:
            with pytest.raises(ValueError, match=f"{name} needs curriculum.episodes_per_task >= 2"):
                check_config(config)
        else:
            check_config(config)


def test_registry_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"algorithm must be one of \('opd', .*got 'ppo'"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="'opd' is already registered"):
        register_algorithm(get_algorithm("opd"))
    with pytest.raises(TypeError, match="expects an Algorithm record, got dict"):
        register_algorithm({"name": "x"})
    with pytest.raises(ValueError, match="min_group_size must be >= 1, got 0"):
        Algorithm("x", "x", get_algorithm("opd").plan_episode, opd_coefficients, min_group_size=0)
    with pytest.raises(TypeError, match="coefficients must be callable"):
        Algorithm("x", "x", get_algorithm("opd").plan_episode, 0.5)


def test_a_registered_algorithm_plans_validates_and_goes_away():
    record = dataclasses.replace(
        TEACHER_FIRST_TURN_OPD,
        name="teacher_first_turn_trio",
        summary="OPD after a teacher-played first turn, in groups of three.",
        min_group_size=3,
        curriculum_summary=no_curriculum_summary,
    )
    register_algorithm(record)
    try:
        assert "teacher_first_turn_trio" in algorithm_names()
        assert "teacher_first_turn_trio" not in ALGORITHMS  # the built-ins stay as they are
        sampler = CurriculumSampler(CurriculumSettings(algorithm="teacher_first_turn_trio", max_turns=4, episodes_per_task=3), get_algorithm("teacher_first_turn_trio"))
        plans = sampler.plan_batch(5, ["a", "b"])
        assert len(plans) == 6 and [p.task_index for p in plans] == [0, 0, 0, 1, 1, 1]
        for plan in plans:
            assert plan.players == ("teacher", "student", "student", "student")
            assert plan.turn_window == (1, 4) and plan.algorithm == "teacher_first_turn_trio"
            assert [plan.turn_id(k) for k in range(4)] == [-1, 1, 2, 3]
        assert sampler.summary(5) == {"curriculum/step": 5.0}
        config = _config("teacher_first_turn_trio")
        with pytest.raises(ValueError, match="episodes_per_task >= 3"):
            check_config(config)
        config.curriculum.episodes_per_task = 3
        check_config(config)
    finally:
        assert unregister_algorithm("teacher_first_turn_trio") is record
    with pytest.raises(ValueError, match="curriculum.algorithm must be one of"):
        check_config(_config("teacher_first_turn_trio"))
