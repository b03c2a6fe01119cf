"""Agent prompts as in the TCOD and ATOD papers.

The papers' ALFWorld prompt (ATOD appendix B.4, TCOD figure 10) shows the task, how many
steps were taken, the last ``k`` (observation, action) pairs, the current observation and
the admissible actions, and asks for reasoning in ``<think></think>`` and one action in
``<action></action>``. :func:`build_step_prompt` renders it (the *windowed history*
packing mode: each turn is its own prompt); :func:`build_followup_message` renders the
short per-turn message of the *append-only* mode, where the chat grows turn by turn.
``PromptConfig(style="compact")`` renders the same facts without the papers' boilerplate
(task, observation, admissible actions, a one-line instruction): about half the tokens,
for tiny CPU models.

Replies are read by the family's action protocol (:func:`tcod_fast.envs.actions.parse_action`
for the papers' tags), which never raises on model output: a reply with no usable action gives
``action=None`` and a ``format_error``; the rollout then plays a wasted turn whose
observation is :func:`format_error_observation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tcod_fast.envs.actions import DEFAULT_MAX_ACTION_CHARS, ParsedAction
from tcod_fast.envs.registry import env_names, find_env_family

PROMPT_STYLES = ("paper", "compact")

#: The opening sentence of the papers' ALFWorld prompt, :class:`PromptConfig`'s default. Each
#: environment family has its own (``EnvFamily.prompt``, :func:`prompt_config_for`); the rest
#: of the template is shared.
PAPER_ENV_DESCRIPTION = "You are an expert agent operating in the ALFRED Embodied Environment."


@dataclass
class PromptConfig:
    """What the agent prompt shows and asks for.

    Attributes:
        env_description: the opening sentence naming the environment.
        history_length: how many of the latest (observation, action) pairs are shown (k).
        show_admissible_actions: list the admissible actions in the prompt.
        max_admissible_actions: show at most this many (ScienceWorld has hundreds);
            None shows all.
        max_observation_chars: cut observations longer than this (None: never cut).
        think: ask for reasoning in ``<think></think>`` before the action; a reply
            without it then carries a format error (its action is still played).
        max_action_chars: a longer action text is treated as unparsable.
        style: ``"paper"`` (the papers' template) or ``"compact"`` (the same facts in four
            short lines: task, observation, actions, instruction; history as
            ``Earlier: observation -> action`` lines).
    """

    env_description: str = PAPER_ENV_DESCRIPTION
    history_length: int = 2
    show_admissible_actions: bool = True
    max_admissible_actions: int | None = None
    max_observation_chars: int | None = None
    think: bool = True
    max_action_chars: int = DEFAULT_MAX_ACTION_CHARS
    style: str = "paper"

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {self.style!r}")


def prompt_config_for(env_name: str, **overrides) -> PromptConfig:
    """The default :class:`PromptConfig` for an env name from :func:`~tcod_fast.envs.registry.make_env`.

    The env's family (:class:`~tcod_fast.envs.family.EnvFamily`) gives the opening sentence
    and its preset options (ScienceWorld shows at most 50 admissible actions).

    Args:
        env_name: an env name of a registered family (``toy``, ``twx-coin``...).
        **overrides: ``PromptConfig`` fields replacing the preset's.
    """
    family = find_env_family(env_name)
    if family is None:
        raise ValueError(f"no prompt preset for env {env_name!r}; known: {', '.join(env_names())}")
    config = PromptConfig(env_description=family.prompt.description, **family.prompt.overrides)
    return replace(config, **overrides)


@dataclass
class HistoryStep:
    """One past step as the prompt shows it: what the agent saw, then what it did."""

    observation: str
    action: str


def _clip(text: str, limit: int | None) -> str:
    text = text.strip()
    if limit is not None and len(text) > limit:
        return text[:limit].rstrip() + " ..."
    return text


def _shown_admissible(config: PromptConfig, admissible_actions: Sequence[str]) -> list[str]:
    shown = list(admissible_actions)
    if config.max_admissible_actions is not None and len(shown) > config.max_admissible_actions:
        hidden = len(shown) - config.max_admissible_actions
        shown = shown[: config.max_admissible_actions] + [f"... and {hidden} more"]
    return shown


def _format_admissible(config: PromptConfig, admissible_actions: Sequence[str]) -> str:
    return ", ".join(f"'{action}'" for action in _shown_admissible(config, admissible_actions))


def _instruction(config: PromptConfig) -> str:
    if config.style == "compact":
        if config.think:
            return "Reason in <think></think>, then reply with one action in <action></action>."
        return "Reply with one action in <action></action>."
    if config.think:
        return (
            "Now it's your turn to take an action. You should first reason step-by-step about the "
            "current situation. This reasoning process MUST be enclosed within <think></think> tags. "
            "Once you've finished your reasoning, you should choose an admissible action for the "
            "current step and present it within <action></action> tags."
        )
    return (
        "Now it's your turn to take an action. Choose an admissible action for the current step "
        "and present it within <action></action> tags."
    )


def build_step_prompt(
    config: PromptConfig,
    task_text: str,
    step_count: int,
    history: Sequence[HistoryStep],
    current_observation: str,
    admissible_actions: Sequence[str],
) -> str:
    """The full prompt for one turn in the papers' windowed-history format.

    Args:
        config: what to show.
        task_text: the goal (``EnvObservation.task_text``).
        step_count: steps already taken in this episode (0 at the first turn).
        history: every past step so far, oldest first; the last ``config.history_length``
            are shown.
        current_observation: the latest observation.
        admissible_actions: the actions the env accepts now.
    """
    task = task_text.strip().rstrip(".")
    shown = list(history)[-config.history_length :] if config.history_length > 0 else []
    if config.style == "compact":
        lines = [f"Task: {task}."]
        lines += [
            f"Earlier: {_clip(past.observation, config.max_observation_chars)} -> {past.action}" for past in shown
        ]
        return "\n".join(lines + _compact_current_lines(config, current_observation, admissible_actions))
    parts = [f"{config.env_description} Your task is to: {task}."]
    if step_count > 0:
        parts.append(f"Prior to this step, you have already taken {step_count} step(s).")
    if shown:
        first_step = step_count - len(shown) + 1
        lines = []
        for offset, past in enumerate(shown):
            number = first_step + offset
            lines.append(f"[Observation {number}: {_clip(past.observation, config.max_observation_chars)}]")
            lines.append(f"[Action {number}: {past.action}]")
        parts.append(
            f"Below are the most recent {len(shown)} observations and the corresponding actions you took:\n"
            + "\n".join(lines)
        )
    return "\n".join(parts + _current_step_parts(config, step_count, current_observation, admissible_actions))


def build_followup_message(
    config: PromptConfig, step_count: int, observation: str, admissible_actions: Sequence[str]
) -> str:
    """The user message after a turn in the append-only mode (the chat keeps all turns).

    The first message of such a chat is :func:`build_step_prompt` with no history.
    """
    if config.style == "compact":
        return "\n".join(_compact_current_lines(config, observation, admissible_actions))
    return "\n".join(_current_step_parts(config, step_count, observation, admissible_actions))


def _compact_current_lines(config: PromptConfig, observation: str, admissible_actions: Sequence[str]) -> list[str]:
    """The compact style's closing lines: the observation, the admissible actions, the instruction."""
    lines = [f"Observation: {_clip(observation, config.max_observation_chars)}"]
    if config.show_admissible_actions:
        lines.append(f"Actions: {', '.join(_shown_admissible(config, admissible_actions))}.")
    lines.append(_instruction(config))
    return lines


def _current_step_parts(
    config: PromptConfig, step_count: int, observation: str, admissible_actions: Sequence[str]
) -> list[str]:
    """The verbose style's closing parts: the current step and observation, the admissible actions, the instruction."""
    parts = [
        f"You are now at step {step_count + 1} and your current observation is: "
        f"{_clip(observation, config.max_observation_chars)}"
    ]
    if config.show_admissible_actions:
        parts.append(
            f"Your admissible actions of the current situation are: [{_format_admissible(config, admissible_actions)}]."
        )
    parts.append(_instruction(config))
    return parts


def format_error_observation(parsed: ParsedAction) -> str:
    """The observation of a wasted turn, telling the agent what was wrong with its reply."""
    return (
        f"Your reply could not be used ({parsed.format_error}). Nothing happened. "
        "Reply with your reasoning in <think></think> and one admissible action in <action></action>."
    )
