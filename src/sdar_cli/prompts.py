"""Turn prompts and action parsing: pure functions over text.

Each turn's user message = task + the last H (observation, action) pairs + the current observation
+ the admissible actions, rendered through the model's chat template. The teacher sees the same
templated prompt with the privileged context put in front of it (official SDAR), so the prompt
tokens after the prefix and the response tokens are the student's, unchanged; teacher.placement
user_start / user_end put it inside the user message instead (TurnRenderer.teacher_prompt_ids).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_PROMPT_TEMPLATE = (
    "You are an expert agent operating in a text-based environment.\n"
    "{task}\n"
    "{history}"
    "You are now at step {step} and your current observation is: {observation}\n"
    "Your admissible actions of the current situation are: [{actions}].\n\n"
    "Now it's your turn to take an action. You should first reason step-by-step about the current situation. "
    "This reasoning process MUST be enclosed within <think> </think> tags. Once you've finished your reasoning, "
    "you should choose an admissible action for current step and present it within <action> </action> tags."
)

TEMPLATE_FIELDS = ("task", "history", "step", "observation", "actions")


def check_template(template: str) -> None:
    """Raise ValueError naming any placeholder the template uses that is not one of TEMPLATE_FIELDS."""
    used = set(re.findall(r"(?<!\{)\{(\w+)\}(?!\})", template))
    unknown = sorted(used - set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError(
            f"rollout.prompt_template uses unknown placeholder(s) {unknown}; available: {', '.join(TEMPLATE_FIELDS)}."
        )
    try:
        template.format(**{name: "" for name in TEMPLATE_FIELDS})
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise ValueError(
            f"rollout.prompt_template cannot be filled in ({type(err).__name__}: {err}): its placeholders are "
            f"{', '.join('{' + name + '}' for name in TEMPLATE_FIELDS)}; write other braces doubled ({{{{ and }}}})."
        ) from None


def render_history(history: Sequence[tuple[str, str]], window: int, steps_taken: int) -> str:
    """The last `window` (observation, action) pairs, numbered by their step in the episode."""
    if window == 0 or not history:
        return ""
    recent = history[-window:]
    first_step = steps_taken - len(recent) + 1
    lines = [
        f"[Observation {first_step + i}: '{observation}', Action {first_step + i}: '{action}']"
        for i, (observation, action) in enumerate(recent)
    ]
    return (
        f"Prior to this step, you have already taken {steps_taken} step(s). Below are the most recent "
        f"{len(recent)} observations and the corresponding actions you took: " + " ".join(lines) + "\n"
    )


def render_user_message(
    template: str,
    task: str,
    history: Sequence[tuple[str, str]],
    window: int,
    observation: str,
    admissible_actions: Sequence[str],
) -> str:
    steps_taken = len(history)
    return template.format(
        task=task,
        history=render_history(history, window, steps_taken),
        step=steps_taken + 1,
        observation=observation,
        actions=", ".join(f"'{action}'" for action in admissible_actions),
    )


NEXT_ACTION_LINE = "The expert's next action is: {action}"


def next_action_context(plan: str, expert_action: str | None) -> str:
    """The plan, then a line stating the expert's next action (teacher.context next_action); the plan alone
    when there is no expert action (no expert, or the goal is met)."""
    if not expert_action:
        return plan
    line = NEXT_ACTION_LINE.format(action=expert_action)
    return f"{plan}\n{line}" if plan else line


def parse_action(response_text: str, pattern: re.Pattern[str]) -> str | None:
    """The text of the last match of `pattern` (group 1), stripped; None when there is none."""
    matches = pattern.findall(response_text)
    if not matches:
        return None
    last = matches[-1]
    if isinstance(last, tuple):
        last = last[0]
    action = " ".join(last.split())
    return action or None


def is_valid_action(action: str | None, admissible_actions: Sequence[str]) -> bool:
    """An action is valid when it parsed and, if the environment lists admissible actions, matches one of them
    (case-insensitively). An admissible entry with a `<placeholder>` in it, such as WebShop's
    'search[<your query>]', admits any action with the same text around non-empty text of the agent's
    own; the placeholder written out literally is not an action."""
    if action is None:
        return False
    if not admissible_actions:
        return True
    return any(_admits(candidate, action) for candidate in admissible_actions)


def judge_action(
    action: str | None,
    admissible_actions: Sequence[str],
    response_text: str,
    mode: str,
    format_requires: Sequence[str] = (),
) -> tuple[bool, bool]:
    """(valid, sent): whether the turn counts as valid (no penalty) and whether its action goes to the environment.

    mode "admissible": valid = parsed and admissible (`is_valid_action`); only valid actions are sent.
    mode "format" (official ALFWorld/WebShop): valid = parsed and every string of `format_requires` is in the
    response; every parsed action is sent, admissible or not (the environment answers e.g. "Nothing happens.").
    """
    if mode == "admissible":
        valid = is_valid_action(action, admissible_actions)
        return valid, valid
    sent = action is not None
    return sent and all(required in response_text for required in format_requires), sent


def _admits(candidate: str, action: str) -> bool:
    parts = re.split(r"<[^<>]+>", candidate)
    if len(parts) == 1:
        return candidate.lower() == action.lower()
    if candidate.lower() == action.lower():
        return False
    pattern = "(?:.+?)".join(re.escape(part) for part in parts)
    return re.fullmatch(pattern, action, re.IGNORECASE | re.DOTALL) is not None


def canonical_action(action: str, admissible_actions: Sequence[str]) -> str:
    """The admissible spelling of a case-insensitively matched action (the environment gets its own text)."""
    for candidate in admissible_actions:
        if candidate.lower() == action.lower():
            return candidate
    return action
