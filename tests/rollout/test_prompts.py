"""Prompt rendering in the papers' format and tolerant action parsing."""

import pytest

from tcod_fast.envs import actions
from tcod_fast.rollout import prompts

ADMISSIBLE = ["go to cabinet 1", "open drawer 2", "take mug 1 from countertop 1"]


def test_first_step_prompt_has_task_observation_actions_and_tags():
    prompt = prompts.build_step_prompt(
        prompts.PromptConfig(), "put a clean mug in coffeemachine.", 0, [], "You are in the middle of a room.", ADMISSIBLE
    )
    assert prompt.startswith("You are an expert agent operating in the ALFRED Embodied Environment.")
    assert "Your task is to: put a clean mug in coffeemachine." in prompt
    assert "Prior to this step" not in prompt
    assert "You are now at step 1 and your current observation is: You are in the middle of a room." in prompt
    assert "['go to cabinet 1', 'open drawer 2', 'take mug 1 from countertop 1']" in prompt
    assert "<think></think>" in prompt and "<action></action>" in prompt


def test_history_window_shows_only_the_last_k_steps_numbered():
    history = [prompts.HistoryStep(f"obs {i}", f"act {i}") for i in range(1, 6)]
    prompt = prompts.build_step_prompt(prompts.PromptConfig(history_length=2), "find the coin", 5, history, "obs 6", ["look"])
    assert "Prior to this step, you have already taken 5 step(s)." in prompt
    assert "most recent 2 observations" in prompt
    assert "[Observation 4: obs 4]\n[Action 4: act 4]\n[Observation 5: obs 5]\n[Action 5: act 5]" in prompt
    assert "obs 3" not in prompt and "act 3" not in prompt
    assert "You are now at step 6" in prompt
    no_history = prompts.build_step_prompt(prompts.PromptConfig(history_length=0), "find the coin", 5, history, "obs 6", ["look"])
    assert "obs 5" not in no_history and "most recent" not in no_history


def test_long_lists_and_observations_are_clipped_when_configured():
    config = prompts.prompt_config_for("scienceworld", max_observation_chars=10)
    actions = [f"action {i}" for i in range(120)]
    prompt = prompts.build_step_prompt(config, "boil water", 0, [], "x" * 50, actions)
    assert "'action 49'" in prompt and "'action 50'" not in prompt
    assert "... and 70 more" in prompt
    assert "x" * 10 + " ..." in prompt and "x" * 11 not in prompt
    assert prompt.startswith("You are an expert agent operating in ScienceWorld")


def test_presets_and_no_think_variant():
    assert "TextWorld-Express" in prompts.prompt_config_for("twx-coin").env_description
    with pytest.raises(ValueError, match="no prompt preset"):
        prompts.prompt_config_for("nethack")
    message = prompts.build_followup_message(prompts.PromptConfig(think=False, show_admissible_actions=False), 2, "A room.", ADMISSIBLE)
    assert message.startswith("You are now at step 3 and your current observation is: A room.")
    assert "<think>" not in message and "admissible actions of" not in message


def test_well_formed_reply_parses_to_the_admissible_spelling():
    parsed = actions.parse_action("<think>The mug may be in a drawer.</think>\n<action> Open  Drawer 2 </action>", ADMISSIBLE)
    assert parsed.action == "open drawer 2"
    assert parsed.think == "The mug may be in a drawer."
    assert parsed.format_error is None and parsed.is_admissible and not parsed.wasted_turn


@pytest.mark.parametrize(
    "reply, expected_error",
    [
        ("I will go to the cabinet.", "no <action></action> block"),
        ("<think>hmm</think><action>   </action>", "empty <action></action> block"),
        ("<think>hmm</think><action>" + "go " * 200 + "</action>", "more than 200"),
        ("", "no <action></action> block"),
        ("<think>I should <action>go to cabinet 1</action></think> done", "no <action></action> block"),
    ],
)
def test_unparsable_replies_are_wasted_turns_not_crashes(reply, expected_error):
    parsed = actions.parse_action(reply, ADMISSIBLE)
    assert parsed.action is None and parsed.wasted_turn
    assert expected_error in parsed.format_error
    assert parsed.format_error in prompts.format_error_observation(parsed)


def test_tolerated_malformations_keep_the_action_and_record_what_was_wrong():
    missing_think = actions.parse_action("<action>go to cabinet 1</action>", ADMISSIBLE)
    assert missing_think.action == "go to cabinet 1"
    assert "missing <think>" in missing_think.format_error
    assert actions.parse_action("<action>go to cabinet 1</action>", config=prompts.PromptConfig(think=False)).format_error is None

    two_actions = actions.parse_action(
        "<think>x</think><action>look</action> or <action>'go to cabinet 1'</action>", ADMISSIBLE
    )
    assert two_actions.action == "go to cabinet 1" and "2 <action> blocks" in two_actions.format_error

    # Generation stopped at the "</action>" stop string, or the chat template opened <think>.
    stopped = actions.parse_action("reasoning here</think>\n<action>take mug 1 from countertop 1\nextra", ADMISSIBLE)
    assert stopped.action == "take mug 1 from countertop 1"
    assert stopped.think == "reasoning here" and stopped.format_error is None


def test_inadmissible_action_is_kept_for_the_env_to_judge():
    parsed = actions.parse_action("<think>t</think><action>fly to the moon</action>", ADMISSIBLE)
    assert parsed.action == "fly to the moon" and parsed.is_admissible is False
    assert actions.parse_action("<think>t</think><action>look</action>").is_admissible is None


def test_non_string_reply_does_not_crash():
    assert actions.parse_action(None).wasted_turn  # type: ignore[arg-type]
