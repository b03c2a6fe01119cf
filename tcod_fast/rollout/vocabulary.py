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

from tcod_fast.rollout.prompter import PaperPrompter, PromptState, action_protocol_of

__all__ = ["expert_episode_texts", "format_error_feedback_texts"]


def expert_episode_texts(
    env: Any,
    tasks: Sequence[str],
    prompter: Any = None,
    *,
    include_feedback: bool = True,
) -> list[str]:
    """Every message an expert episode of each task shows or says, in both prompt layouts.

    Args:
        env: an environment (:class:`tcod_fast.envs.base.Env`); it is reset per task.
        tasks: task ids to play (the expert plays each to its end).
        prompter: the rollout's prompter (default :class:`PaperPrompter`).
        include_feedback: also render the feedback messages for malformed replies.

    Returns:
        per task, in order: the first message and windowed prompt; per expert action, the
        expert's reply, the follow-up message, the windowed prompt and the admissible
        actions; the windowed prompt after a wasted turn (its placeholder in the history).
        Then, with ``include_feedback``, the feedback for malformed replies. A word-level
        tokenizer learnt from these covers the prompts, observations and expert replies;
        states off the expert path may still show a few unseen words (``<unk>``).
    """
    prompter = prompter if prompter is not None else PaperPrompter()
    texts: list[str] = []
    for task in tasks:
        first = env.reset(task)
        state = PromptState(first.task_text, first.observation, list(first.admissible_actions), 0, [])
        texts += [prompter.first_message(state), prompter.window_message(state)]
        for action in env.expert_actions() or []:
            texts.append(prompter.expert_reply(action))
            result = env.step(action)
            state = PromptState(
                first.task_text,
                result.observation,
                list(result.admissible_actions),
                state.step_count + 1,
                state.history + [(state.observation, action)],
            )
            texts += [prompter.observation_message(state), prompter.window_message(state)]
            texts += result.admissible_actions
            if result.done:
                break
        wasted = PromptState(first.task_text, first.observation, list(first.admissible_actions), 1, [(first.observation, None)])
        texts.append(prompter.window_message(wasted))
    return texts + format_error_feedback_texts(prompter) if include_feedback else texts


def format_error_feedback_texts(prompter: Any = None) -> list[str]:
    """The feedback messages ``prompter`` shows for malformed replies: its action protocol's
    ``malformed_replies`` (for ``<action></action>`` replies: no tags, an empty action, no action)."""
    prompter = prompter if prompter is not None else PaperPrompter()
    protocol = action_protocol_of(prompter)
    return [
        prompter.format_error_feedback(protocol.parse(reply, None, prompter.prompt_config))
        for reply in protocol.malformed_replies
    ]
