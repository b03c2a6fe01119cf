"""Adding an algorithm is adding one record: a teacher-first-turn OPD, registered here, trains
end to end with nothing else changed."""

import math

import pytest
from toy_algorithm import TEACHER_FIRST_TURN_OPD
from trainer_helpers import tiny_config

from tcod_fast.algorithms import register_algorithm, unregister_algorithm
from tcod_fast.trainer import loop
from tcod_fast.trainer.metrics_log import read_metrics


@pytest.fixture
def teacher_first_turn_opd():
    register_algorithm(TEACHER_FIRST_TURN_OPD)
    yield TEACHER_FIRST_TURN_OPD.name
    unregister_algorithm(TEACHER_FIRST_TURN_OPD.name)


def test_a_registered_algorithm_trains_one_step(teacher_first_turn_opd, tmp_path, toy_tokenizer):
    config = tiny_config(tmp_path, f"curriculum.algorithm={teacher_first_turn_opd}", "trainer.steps=1", "eval.num_tasks=0")
    run = loop.train(config, tokenizer=toy_tokenizer)

    assert run.algorithm is TEACHER_FIRST_TURN_OPD and run.state.next_step == 1
    (record,) = read_metrics(tmp_path / "metrics.jsonl", kind="train")
    assert record["algorithm"] == teacher_first_turn_opd
    assert record["curriculum/teacher_first_turns"] == 2.0  # two tasks, one episode each
    assert record["turns/teacher_mean"] == 1.0  # the teacher played exactly the first turn
    assert record["opd_coef"] == 1.0 and record["grpo_coef"] == 0.0
    assert math.isfinite(record["loss"]) and record["loss/kl_term"] > 0 and record["trained_tokens"] > 0
    # nothing is trained on turn 0; the student's turns from 1 on are
    assert record["kl_by_turn_count"][0] == 0 and sum(record["kl_by_turn_count"][1:]) > 0
