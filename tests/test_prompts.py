import re

import pytest

from sdar_cli.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    canonical_action,
    check_template,
    is_valid_action,
    parse_action,
    render_history,
    render_user_message,
)

ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL)


def test_parse_action_takes_the_last_tag_and_normalises_spaces():
    text = "<think>maybe <action>look</action>?</think> <action>  go to\n kitchen </action>"
    assert parse_action(text, ACTION) == "go to kitchen"
    assert parse_action("no tags here", ACTION) is None
    assert parse_action("<action>   </action>", ACTION) is None


def test_validity_against_admissible_actions():
    admissible = ["go to kitchen", "look"]
    assert is_valid_action("Go to Kitchen", admissible)
    assert canonical_action("Go to Kitchen", admissible) == "go to kitchen"
    assert not is_valid_action("fly away", admissible)
    assert not is_valid_action(None, admissible)
    assert is_valid_action("anything", [])  # free-form environments list no admissible actions


def test_a_placeholder_entry_admits_the_agents_own_text():
    admissible = ["search[<your query>]", "click[buy now]", "click[b0c1 <new>]"]
    assert is_valid_action("search[red cotton t-shirt]", admissible)
    assert is_valid_action("Search[Red Shirt]", admissible)
    assert canonical_action("search[red cotton t-shirt]", admissible) == "search[red cotton t-shirt]"
    assert not is_valid_action("search[<your query>]", admissible)  # the placeholder itself is no query
    assert not is_valid_action("search[]", admissible)
    assert not is_valid_action("search red shirt", admissible)
    assert not is_valid_action("search[a] and more", admissible)
    assert is_valid_action("click[buy now]", admissible) and not is_valid_action("click[buy]", admissible)
    assert is_valid_action("click[b0c1 x]", admissible)


def test_history_window_keeps_the_last_pairs_with_their_step_numbers():
    history = [("obs1", "a1"), ("obs2", "a2"), ("obs3", "a3")]
    text = render_history(history, window=2, steps_taken=3)
    assert "already taken 3 step(s)" in text
    assert "[Observation 2: 'obs2', Action 2: 'a2']" in text
    assert "[Observation 3: 'obs3', Action 3: 'a3']" in text
    assert "obs1" not in text
    assert render_history(history, window=0, steps_taken=3) == ""


def test_user_message_holds_task_observation_and_actions():
    message = render_user_message(
        DEFAULT_PROMPT_TEMPLATE, "Your task is to: find the mug.", [("o1", "look")], 2, "You see a mug.", ["take mug 1"]
    )
    assert "Your task is to: find the mug." in message
    assert "You are now at step 2 and your current observation is: You see a mug." in message
    assert "['take mug 1']" in message


def test_unknown_template_placeholder_is_named():
    with pytest.raises(ValueError, match="obsrvation"):
        check_template("{task} {obsrvation}")
    check_template("{task} {history} {step} {observation} {actions} {{literal}}")


def test_judge_action_admissible_or_format_mode():
    from sdar_cli.prompts import judge_action

    admissible = ["go to kitchen", "open fridge"]
    text = "<think>hm</think><action>fly away</action>"
    # admissible: an inadmissible action is invalid and never reaches the environment
    assert judge_action("fly away", admissible, text, "admissible") == (False, False)
    assert judge_action("go to kitchen", admissible, text, "admissible") == (True, True)
    # format: the same inadmissible action is valid and sent; only a format fault is invalid
    assert judge_action("fly away", admissible, text, "format") == (True, True)
    assert judge_action(None, admissible, "no tags", "format") == (False, False)
    think = ["<think>", "</think>"]
    assert judge_action("fly away", admissible, text, "format", think) == (True, True)
    assert judge_action("fly away", admissible, "<action>fly away</action>", "format", think) == (False, True)
