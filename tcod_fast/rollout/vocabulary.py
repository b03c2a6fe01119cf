"""Texts an agent will see and say, for learning a word-level tokenizer offline.

:func:`tcod_fast.tiny_models.build_word_tokenizer` maps pieces it never saw to
``<unk>``; a tokenizer for tests and CPU demos should therefore be learnt from the very
texts the rollout renders. :func:`expert_episode_texts` plays the expert on a few tasks
and renders every message the prompter builds along the way (first prompt, follow-up
messages, windowed-history prompts, expert replies, format-error feedback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tcod_fast.rollout.prompter import PaperPrompter, PromptState

__all__ = ["expert_episode_texts"]


def expert_episode_texts(
    env: Any,
    tasks: Sequence[str],
    prompter: Any = None,
    *,
    max_turns: int = 50,
) -> list[str]:
    """Render everything an expert episode of each task shows or says.

    Args:
        env: an environment (:class:`tcod_fast.envs.base.Env`); it is reset per task.
        tasks: task ids to play.
        prompter: the rollout's prompter (default :class:`PaperPrompter`).
        max_turns: most expert actions played per task.

    Returns:
        a list of texts: prompts, observations, actions, replies and the format-error
        feedback, plus one text with every piece preceded by a space (word pieces carry
        their leading space, so ``" look"`` and ``"look"`` are different pieces).
    """
    prompter = prompter if prompter is not None else PaperPrompter()
    texts: list[str] = []
    for task in tasks:
        first = env.reset(task)
        state = PromptState(first.task_text, first.observation, list(first.admissible_actions), 0)
        texts += [first.task_text, first.observation, *first.admissible_actions]
        texts += [prompter.first_message(state), prompter.window_message(state)]
        for action in (env.expert_actions() or [])[:max_turns]:
            step = env.step(action)
            texts += [action, prompter.expert_reply(action), step.observation]
            texts += step.admissible_actions
            state = PromptState(
                state.task_text,
                step.observation,
                list(step.admissible_actions),
                state.step_count + 1,
                state.history + [(state.observation, action)],
            )
            texts += [prompter.observation_message(state), prompter.window_message(state)]
            if step.done:
                break
        # A wasted turn shows the feedback, and the history then lists the placeholder
        # action of a wasted turn.
        wasted = prompter.parse_action("", state.admissible_actions)
        texts.append(prompter.format_error_feedback(wasted))
        wasted_state = PromptState(
            state.task_text,
            state.observation,
            state.admissible_actions,
            state.step_count + 1,
            state.history + [(state.observation, None)],
        )
        texts.append(prompter.window_message(wasted_state))
    texts.append(" ".join(texts))
    return texts
