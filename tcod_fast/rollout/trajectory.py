"""Trajectories: one multi-turn episode as plain data, with per-token turn ids.

A trajectory holds the episode twice, as the two packing modes of docs/turns.md#packing-trajectories-into-batches need:

* the **append-only sequence** ``token_ids``/``turn_ids``: the first prompt, then for
  each turn its response followed by the next observation message, concatenated token
  by token. This is the exact context the generator saw when the rollout ran in
  ``"append"`` context mode;
* per turn, the **windowed prompt** ``TurnRecord.window_prompt_token_ids`` (task, step
  count, last-k history, admissible actions) the generator saw when the rollout ran in
  ``"window"`` context mode; the row for turn ``k`` is that prompt plus the response.

Turn ids (docs/turns.md#turn-ids): tokens the student generated in turn ``k`` carry ``k``; every
other token (prompts, observations, teacher- or expert-played turns) carries ``-1``.
Turn index ``k`` counts every turn of the episode from 0, whoever played it.

Response token ids are stored exactly as generated, never re-tokenized from text, so
``tokenizer.decode(turn.response_token_ids) == turn.response_text`` by construction and
the turn ids line up with what the student sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PLAYER_STUDENT",
    "PLAYER_TEACHER",
    "PLAYER_EXPERT",
    "PLAYER_RANDOM",
    "PLAYER_STOP",
    "NOT_TRAINED",
    "TurnRecord",
    "Trajectory",
    "summarize_trajectories",
]

PLAYER_STUDENT = "student"
PLAYER_TEACHER = "teacher"
PLAYER_EXPERT = "expert"
#: Plays a uniformly random admissible action (exploration noise for DAgger-style data).
PLAYER_RANDOM = "random"
PLAYER_STOP = "stop"
#: Turn id of every token the loss ignores.
NOT_TRAINED = -1

#: Why an episode ended.
STOP_REASONS = (
    "env_done",  # the environment said done (won or lost)
    "max_turns",  # plan.max_turns turns were played
    "plan_stop",  # the plan said "stop" (F2B truncation)
    "env_error",  # the environment raised, hung or died
    "expert_exhausted",  # the plan asked for an expert action past the expert's list
    "context_limit",  # the next prompt would not fit the generator's context
)


@dataclass
class TurnRecord:
    """One turn of an episode.

    Attributes:
        turn_index: index ``k`` of the turn in the episode, counting every player.
        player: ``"student"``, ``"teacher"``, ``"expert"`` or ``"random"``.
        response_token_ids: the response as generated (student/teacher), or the
            tokenized expert reply; ends with the eos id when the model emitted it.
        response_text: ``tokenizer.decode(response_token_ids, skip_special_tokens=False)``.
        action: the action sent to the environment; ``None`` when the reply could not be
            parsed (a wasted turn, see ``format_error``).
        format_error: why the reply could not be parsed, else ``None``.
        observation: the environment's reply to the action (or the format-error feedback
            shown to the agent on a wasted turn).
        reward: reward of this turn's step (0.0 on a wasted turn).
        done: the environment ended the episode on this turn.
        won: the episode was won on this turn.
        finish_reason: ``"eos"``, ``"stop_string"``, ``"length"`` for generated replies,
            ``"expert"`` for replayed actions.
        response_start: index in the trajectory's append-only ``token_ids`` where this
            turn's response begins (the context before it is ``token_ids[:response_start]``).
        window_prompt_token_ids: the windowed-history prompt of this turn (always
            built, so both packing modes are available whatever mode generated).
        env_error: the environment failure on this turn's step, else ``None``.
        info: the environment step's ``info`` dict.
        expert_label: the action the environment's current-state expert would play in
            this turn's state (``EpisodeConfig.record_expert_labels``), else ``None``.
    """

    turn_index: int
    player: str
    response_token_ids: list[int]
    response_text: str
    action: str | None
    format_error: str | None
    observation: str
    reward: float
    done: bool
    won: bool
    finish_reason: str
    response_start: int
    window_prompt_token_ids: list[int]
    env_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    expert_label: str | None = None

    @property
    def is_student(self) -> bool:
        """The student played this turn (its tokens are trained)."""
        return self.player == PLAYER_STUDENT


@dataclass
class Trajectory:
    """One episode: tokens with turn ids, per-turn records, outcome and errors.

    Attributes:
        task: the task id given to ``env.reset``.
        task_text: the goal in words.
        token_ids: append-only token sequence of the whole episode (prompt, responses,
            observation messages), ``len == len(turn_ids)``.
        turn_ids: per-token turn id; ``k`` for student tokens of turn ``k``, ``-1`` else.
        turns: one :class:`TurnRecord` per played turn, in order.
        context_mode: ``"append"`` or ``"window"``: which context the generator saw,
            hence which packing mode reproduces the sampling distribution.
        won: the episode was won.
        stop_reason: one of :data:`STOP_REASONS`.
        env_error: description of the environment failure that ended the episode.
        plan: the episode plan the rollout followed (kept for the trainer: window, group).
        episode_index: position of the episode in its rollout batch.
    """

    task: Any
    task_text: str
    token_ids: list[int]
    turn_ids: list[int]
    turns: list[TurnRecord]
    context_mode: str
    won: bool = False
    stop_reason: str = "max_turns"
    env_error: str | None = None
    plan: Any = None
    episode_index: int = 0

    # ---------------------------------------------------------------- summaries

    @property
    def num_turns(self) -> int:
        """Turns played, every player counted."""
        return len(self.turns)

    @property
    def players(self) -> tuple[str, ...]:
        """Player of each played turn."""
        return tuple(turn.player for turn in self.turns)

    @property
    def num_student_turns(self) -> int:
        return sum(1 for turn in self.turns if turn.player == PLAYER_STUDENT)

    @property
    def num_teacher_turns(self) -> int:
        """Turns played by the teacher model (replayed expert turns not included)."""
        return sum(1 for turn in self.turns if turn.player == PLAYER_TEACHER)

    @property
    def num_expert_turns(self) -> int:
        return sum(1 for turn in self.turns if turn.player == PLAYER_EXPERT)

    @property
    def rewards(self) -> list[float]:
        """Reward of each played turn."""
        return [turn.reward for turn in self.turns]

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))

    @property
    def num_format_errors(self) -> int:
        return sum(1 for turn in self.turns if turn.format_error is not None)

    @property
    def errors(self) -> list[str]:
        """Every error of the episode as ``"turn k: ..."`` lines (format and env errors)."""
        lines = []
        for turn in self.turns:
            if turn.format_error is not None:
                lines.append(f"turn {turn.turn_index}: format error: {turn.format_error}")
            if turn.env_error is not None:
                lines.append(f"turn {turn.turn_index}: env error: {turn.env_error}")
        if self.env_error is not None and not any(t.env_error for t in self.turns):
            lines.append(f"reset: env error: {self.env_error}")
        return lines

    @property
    def num_trained_tokens(self) -> int:
        return sum(1 for turn_id in self.turn_ids if turn_id >= 0)

    def turn_ids_for(self, players: tuple[str, ...]) -> list[int]:
        """Per-token turn ids as if the turns of ``players`` were the trained ones.

        ``turn_ids_for(("student",))`` equals :attr:`turn_ids`. With ``("expert",)`` or
        ``("teacher",)`` it labels those replies instead, for supervised fine-tuning on
        demonstrations (e.g. training a teacher on expert trajectories).
        """
        labelled = [NOT_TRAINED] * len(self.token_ids)
        for turn in self.turns:
            if turn.player in players:
                stop = turn.response_start + len(turn.response_token_ids)
                labelled[turn.response_start : stop] = [turn.turn_index] * (
                    stop - turn.response_start
                )
        return labelled

    def student_token_ids(self, turn_index: int) -> list[int]:
        """Tokens of the append-only sequence carrying turn id ``turn_index``."""
        return [tok for tok, tid in zip(self.token_ids, self.turn_ids) if tid == turn_index]

    # ---------------------------------------------------------------- checks

    def validate(self) -> None:
        """Raise ``ValueError`` if the token/turn-id layout breaks the conventions.

        Checks: equal lengths; each turn's response sits at ``response_start`` in the
        sequence; student responses carry their turn index, everything else -1; no
        trained token outside a student response.
        """
        if len(self.token_ids) != len(self.turn_ids):
            raise ValueError(
                f"token_ids has {len(self.token_ids)} entries but turn_ids has {len(self.turn_ids)}"
            )
        expected = [NOT_TRAINED] * len(self.token_ids)
        for position, turn in enumerate(self.turns):
            if turn.turn_index != position:
                raise ValueError(f"turn {position} has turn_index {turn.turn_index}")
            start, stop = turn.response_start, turn.response_start + len(turn.response_token_ids)
            if self.token_ids[start:stop] != turn.response_token_ids:
                raise ValueError(
                    f"turn {turn.turn_index}: token_ids[{start}:{stop}] differ from the "
                    "recorded response tokens"
                )
            if turn.is_student:
                expected[start:stop] = [turn.turn_index] * (stop - start)
        if expected != self.turn_ids:
            bad = next(i for i, (a, b) in enumerate(zip(expected, self.turn_ids)) if a != b)
            raise ValueError(
                f"turn_ids[{bad}] is {self.turn_ids[bad]} "
                f"but the turn records imply {expected[bad]}"
            )


def summarize_trajectories(trajectories: list[Trajectory]) -> dict[str, float]:
    """Batch diagnostics every run logs (docs/algorithms.md#diagnostics-every-run-logs), as plain floats.

    Keys: ``success_rate``, ``mean_reward``, ``mean_turns``, ``mean_student_turns``,
    ``mean_teacher_turns``, ``mean_expert_turns``, ``format_error_rate`` (per played
    turn), ``env_error_rate`` (per episode), ``trained_tokens`` (total) and
    ``stop_<reason>`` (fraction of episodes that ended for each reason seen).
    """
    count = len(trajectories)
    if count == 0:
        return {}
    played_turns = sum(t.num_turns for t in trajectories)
    summary = {
        "success_rate": sum(t.won for t in trajectories) / count,
        "mean_reward": sum(t.total_reward for t in trajectories) / count,
        "mean_turns": played_turns / count,
        "mean_student_turns": sum(t.num_student_turns for t in trajectories) / count,
        "mean_teacher_turns": sum(t.num_teacher_turns for t in trajectories) / count,
        "mean_expert_turns": sum(t.num_expert_turns for t in trajectories) / count,
        "format_error_rate": sum(t.num_format_errors for t in trajectories) / max(played_turns, 1),
        "env_error_rate": sum(t.env_error is not None for t in trajectories) / count,
        "trained_tokens": float(sum(t.num_trained_tokens for t in trajectories)),
    }
    for reason in sorted({t.stop_reason for t in trajectories}):
        summary[f"stop_{reason}"] = sum(t.stop_reason == reason for t in trajectories) / count
    return summary
