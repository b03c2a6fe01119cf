"""An algorithm that is not built in, for the tests that show adding one is adding one record:
the teacher plays the first turn, the student plays the rest and is trained on it with OPD."""

from tcod_fast.algorithms import Algorithm, opd_coefficients


def plan_teacher_first_turn(sampler, slot):
    """The teacher plays turn 0; the student plays the rest and is trained on it."""
    return slot.plan(("teacher",) + ("student",) * (slot.max_turns - 1), (1, slot.max_turns))


def teacher_first_turn_summary(sampler, step, plans):
    return {"curriculum/teacher_first_turns": float(sum(p.players[0] == "teacher" for p in plans))}


TEACHER_FIRST_TURN_OPD = Algorithm(
    name="teacher_first_turn_opd",
    summary="OPD after a teacher-played first turn: the student learns to continue from the teacher's opening.",
    plan_episode=plan_teacher_first_turn,
    coefficients=opd_coefficients,
    needs_teacher_generator=True,
    curriculum_summary=teacher_first_turn_summary,
)
