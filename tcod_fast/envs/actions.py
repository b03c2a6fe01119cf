"""How an agent's reply carries its action: :class:`ActionProtocol`, and the one every built-in
environment family speaks, :data:`ACTION_TAGS` (reasoning in ``<think></think>``, one action
in ``<action></action>``), with its parser :func:`parse_action`.

A family's record (:class:`~tcod_fast.envs.family.EnvFamily`) names its protocol; the prompt
(:mod:`tcod_fast.rollout.prompts`), the rollout and supervised fine-tuning ask it for stop
strings and for the action of a reply. Light to import: the standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ACTION_TAGS", "DEFAULT_MAX_ACTION_CHARS", "ActionProtocol", "ParsedAction", "parse_action"]

#: The longest action text read from a reply (``PromptConfig.max_action_chars``).
DEFAULT_MAX_ACTION_CHARS = 200


@dataclass
class ParsedAction:
    """What :func:`parse_action` made of a reply.

    Attributes:
        action: the action to play, or None when the reply had none (a wasted turn).
        think: the reasoning text, when present.
        format_error: what was wrong with the reply's format, or None. A reply can carry
            an error and still an action (e.g. a missing ``<think>`` block).
        is_admissible: whether ``action`` is among the admissible actions given to the
            parser (None when none were given or there is no action).
    """

    action: str | None
    think: str | None = None
    format_error: str | None = None
    is_admissible: bool | None = None

    @property
    def wasted_turn(self) -> bool:
        """True when there is nothing to play."""
        return self.action is None


_THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
_ACTION_BLOCK = re.compile(r"<action>(.*?)</action>", re.DOTALL | re.IGNORECASE)
_ACTION_OPEN = re.compile(r"<action>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_QUOTES = "'\"`"


def parse_action(reply: str, admissible_actions: Sequence[str] | None = None, config: Any = None) -> ParsedAction:
    """Pull the action out of a model reply, tolerating malformed output.

    Rules: reasoning is the first ``<think>...</think>`` block (or the text before a lone
    ``</think>``, when the chat template opened the block); the action is the last
    ``<action>...</action>`` after the reasoning, or the text after a final unclosed
    ``<action>`` (generation stopped at the ``</action>`` stop string). The action is
    stripped of quotes, its spaces collapsed, and matched case-insensitively to an
    admissible action when one is equal, returning the admissible spelling.

    ``config`` (a :class:`~tcod_fast.rollout.prompts.PromptConfig`, or anything with
    ``think`` and ``max_action_chars``; ``None``: reasoning required, the default length cap)
    says whether a ``<think>`` block is asked for and how long an action may be.

    Never raises on the reply's content.
    """
    think_asked = getattr(config, "think", True)
    max_chars = getattr(config, "max_action_chars", DEFAULT_MAX_ACTION_CHARS)
    text = reply if isinstance(reply, str) else ""
    think = None
    think_match = _THINK_BLOCK.search(text)
    closes = list(_THINK_CLOSE.finditer(text))
    if think_match:
        think = think_match.group(1).strip()
    elif closes:
        think = text[: closes[0].start()].strip()
    # Actions mentioned while reasoning are not the answer.
    after_think = text[closes[-1].end() :] if closes else text

    errors = []
    if think_asked and think is None:
        errors.append("missing <think></think> block")
    candidates = _ACTION_BLOCK.findall(after_think)
    if candidates:
        raw_action = candidates[-1]
        if len(candidates) > 1:
            errors.append(f"{len(candidates)} <action> blocks, the last was used")
    else:
        opens = list(_ACTION_OPEN.finditer(after_think))
        # Only the first line: anything after it is chatter, not the action.
        raw_action = after_think[opens[-1].end() :].strip().split("\n")[0] if opens else None
    if raw_action is None:
        errors.append("no <action></action> block")
        return ParsedAction(None, think, "; ".join(errors))

    action = " ".join(raw_action.strip().strip(_QUOTES).split())
    if not action:
        errors.append("empty <action></action> block")
        return ParsedAction(None, think, "; ".join(errors))
    if len(action) > max_chars:
        errors.append(f"action is {len(action)} characters, more than {max_chars}")
        return ParsedAction(None, think, "; ".join(errors))

    is_admissible = None
    if admissible_actions is not None:
        by_lower = {candidate.lower(): candidate for candidate in admissible_actions}
        canonical = by_lower.get(action.lower())
        is_admissible = canonical is not None
        action = canonical or action
    return ParsedAction(action, think, "; ".join(errors) or None, is_admissible)


@dataclass(frozen=True)
class ActionProtocol:
    """How an agent's reply carries its action.

    Attributes:
        name: a short name for messages and docs.
        stop_strings: generation of a reply stops at any of these (the action is complete).
        parse: ``(reply, admissible_actions, prompt_config) -> ParsedAction`` (an object with
            ``action``, ``think``, ``format_error`` and ``is_admissible``, as
            :class:`ParsedAction`); never raises on the reply.
        action_template: how an action alone is written as a reply (``{action}`` is replaced).
        malformed_replies: replies with no usable action, one per kind of format error; a
            tokenizer is learnt from the feedback the prompt shows for them.
    """

    name: str
    stop_strings: tuple[str, ...]
    parse: Callable[..., Any]
    action_template: str = "{action}"
    malformed_replies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not callable(self.parse):
            raise TypeError(f"ActionProtocol {self.name!r}: parse must be callable, got {self.parse!r}")
        if "{action}" not in self.action_template:
            raise ValueError(f"ActionProtocol {self.name!r}: action_template must hold {{action}}, got {self.action_template!r}")


#: Reasoning in ``<think></think>``, then one action in ``<action></action>``; generation stops
#: at ``</action>``. Every built-in family speaks it.
ACTION_TAGS = ActionProtocol(
    name="action-tags",
    stop_strings=("</action>",),
    parse=parse_action,
    action_template="<action>{action}</action>",
    malformed_replies=("no tags", "<action></action>", "<think>x</think>"),
)
