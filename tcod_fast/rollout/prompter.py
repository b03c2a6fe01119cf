"""What the agent is shown and how its replies are read: the chat markers around messages
(:class:`ChatFormat`), the episode state a prompt is built from (:class:`PromptState`), the
:class:`Prompter` interface the runner calls, and :class:`PaperPrompter`, the papers' prompt
(its wording and parsing: :mod:`tcod_fast.rollout.prompts`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tcod_fast.envs.actions import ACTION_TAGS, ActionProtocol
from tcod_fast.rollout.prompts import (
    HistoryStep,
    PromptConfig,
    build_followup_message,
    build_step_prompt,
    format_error_observation,
)

__all__ = ["ChatFormat", "PaperPrompter", "PromptState", "Prompter", "PrompterByEnv", "action_protocol_of", "prompter_for_task"]


@dataclass(frozen=True)
class ChatFormat:
    """Chat markers around messages (ChatML by default, as Qwen models use).

    A prompt is ``system_start + system + message_end`` (when there is a system
    prompt), then ``user_start + message + message_end``, then ``assistant_start``; the
    reply follows and ends with ``end_of_reply`` (the eos token). ``end_of_reply`` is
    appended (untrained) when a reply stopped on a stop string or the length limit.
    """

    system_start: str = "<|im_start|>system\n"
    user_start: str = "<|im_start|>user\n"
    assistant_start: str = "<|im_start|>assistant\n"
    message_end: str = "<|im_end|>\n"
    end_of_reply: str = "<|im_end|>"
    after_reply: str = "\n"


@dataclass
class PromptState:
    """What a prompter may show the agent at the start of a turn.

    Attributes:
        task_text: the goal in words.
        observation: the latest observation (after the previous turn's action, or the
            reset observation at turn 0, or format-error feedback after a wasted turn).
        admissible_actions: actions the environment accepts now.
        step_count: turns already taken in this episode (= the turn index).
        history: ``(observation, action)`` of every earlier turn, oldest first: the
            observation the agent saw and the action it took (``None`` for a wasted turn).
    """

    task_text: str
    observation: str
    admissible_actions: list[str]
    step_count: int
    history: list[tuple[str, str | None]] = field(default_factory=list)


class Prompter(Protocol):
    """Turns episode state into message texts and replies into actions.

    ``system_prompt`` may be ``None``. ``window_message`` is the full user message of a
    windowed-history prompt (task, step count, last-k history, admissible actions);
    ``first_message``/``observation_message`` build the append-only chat.
    ``parse_action`` returns an object with ``action`` (``None`` = nothing to play, a
    wasted turn) and ``format_error`` (``None`` = well formed); an action may come with a
    format error and is then still played. :class:`PaperPrompter` is the default.
    A prompter may also carry an ``action_protocol`` (its stop strings end generated
    replies; :func:`action_protocol_of`).
    """

    system_prompt: str | None

    def first_message(self, state: PromptState) -> str: ...

    def observation_message(self, state: PromptState) -> str: ...

    def window_message(self, state: PromptState) -> str: ...

    def parse_action(self, reply: str, admissible_actions: Sequence[str]) -> Any: ...

    def expert_reply(self, action: str) -> str: ...

    def format_error_feedback(self, parsed: Any) -> str: ...


@dataclass
class PaperPrompter:
    """The papers' agent prompt (:mod:`tcod_fast.rollout.prompts`) behind :class:`Prompter`.

    Attributes:
        prompt_config: template options (history length k, admissible actions, think).
        system_prompt: optional system message (the papers put everything in the user
            message, so ``None`` by default).
        expert_reply_template: how a replayed expert action is written as a reply; the
            reasoning block is left empty rather than inventing reasoning. Without
            ``prompt_config.think`` the reply is the action block alone.
        wasted_turn_action: what the history shows as the action of a wasted turn.
        action_protocol: how replies carry the action (parsing, stop strings, an action
            alone written as a reply): the env family's (``EnvFamily.action_protocol``).
    """

    prompt_config: Any = None
    system_prompt: str | None = None
    expert_reply_template: str = "<think></think><action>{action}</action>"
    wasted_turn_action: str = "(no valid action)"
    action_protocol: ActionProtocol = ACTION_TAGS

    def __post_init__(self) -> None:
        if self.prompt_config is None:
            self.prompt_config = PromptConfig()

    def first_message(self, state: PromptState) -> str:
        """Turn-0 user message of the append-only chat: the full prompt, no history."""
        return build_step_prompt(
            self.prompt_config,
            state.task_text,
            state.step_count,
            [],
            state.observation,
            state.admissible_actions,
        )

    def observation_message(self, state: PromptState) -> str:
        """Follow-up user message of the append-only chat."""
        return build_followup_message(
            self.prompt_config, state.step_count, state.observation, state.admissible_actions
        )

    def window_message(self, state: PromptState) -> str:
        """Windowed-history prompt: task, step count, last-k (observation, action), now."""
        history = [
            HistoryStep(observation, action if action is not None else self.wasted_turn_action)
            for observation, action in state.history
        ]
        return build_step_prompt(
            self.prompt_config,
            state.task_text,
            state.step_count,
            history,
            state.observation,
            state.admissible_actions,
        )

    def parse_action(self, reply: str, admissible_actions: Sequence[str]):
        """The action protocol's parser (:func:`tcod_fast.envs.actions.parse_action` for
        ``<action></action>`` replies) with this prompt's config."""
        return self.action_protocol.parse(reply, admissible_actions, self.prompt_config)

    def expert_reply(self, action: str) -> str:
        """An expert action written as a well-formed reply."""
        if not self.prompt_config.think:
            return self.action_protocol.action_template.format(action=action)
        return self.expert_reply_template.format(action=action)

    def format_error_feedback(self, parsed) -> str:
        """Observation shown after a wasted turn."""
        return format_error_observation(parsed)


def action_protocol_of(prompter: Any) -> ActionProtocol:
    """The :class:`~tcod_fast.envs.actions.ActionProtocol` ``prompter`` reads replies with: its
    ``action_protocol``, else the ``<action></action>`` protocol every built-in env uses.

    Args:
        prompter: a :class:`Prompter`.
    """
    protocol = getattr(prompter, "action_protocol", None)
    return protocol if isinstance(protocol, ActionProtocol) else ACTION_TAGS


class PrompterByEnv:
    """One prompter per environment of a run with several: an episode is prompted and read
    by the prompter of the environment its task id names (``"<env name>::<task>"``,
    :mod:`tcod_fast.envs.mixture`). The environments must share one action protocol (the
    stop strings of a generation batch that mixes them)."""

    def __init__(self, prompters: dict[str, Any]):
        if not prompters:
            raise ValueError("PrompterByEnv needs at least one prompter")
        self.prompters = dict(prompters)
        protocols = {name: action_protocol_of(prompter) for name, prompter in self.prompters.items()}
        first_name, first = next(iter(protocols.items()))
        for name, protocol in protocols.items():
            if protocol != first:
                raise ValueError(
                    f"the environments of one run must share an action protocol; {first_name!r} and {name!r} differ"
                )
        self.action_protocol = first

    def for_task(self, task: Any) -> Any:
        """The prompter of ``task``'s environment."""
        from tcod_fast.envs.mixture import route_by_task

        return route_by_task(self.prompters, task, "prompter")


def prompter_for_task(prompter: Any, task: Any) -> Any:
    """The prompter that prompts ``task``: ``prompter.for_task(task)`` where the prompter
    routes by environment (:class:`PrompterByEnv`), else ``prompter`` itself."""
    route = getattr(prompter, "for_task", None)
    return route(task) if route is not None else prompter
