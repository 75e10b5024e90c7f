"""The environment protocol: what a multi-turn text environment must offer the trainer.

An environment object plays one episode at a time. The rollout creates one object per episode
slot (so episodes never share state) and drives it with `reset(task_id)` then `step(action)`
until `done`. Everything an environment returns is plain text, so any engine (a Python game,
ALFWorld, an HTTP server) fits behind it.

To plug in your own environment, subclass `Environment` and name it in the config:

    env:
      name: mypackage.myenv:MyEnv
      kwargs: {difficulty: 2}

What the trainer reads from an environment:

    task_ids(split)          the tasks of a split, in a fixed order
    reset(task_id)           -> Task (id, type, description) and the first Observation
    step(action_text)        -> Observation: text, admissible actions, reward, done, won, privileged
    max_turns                the episode length unless rollout.max_turns says otherwise
    rollout_defaults         rollout settings this environment needs (its action tags, prompt, history
                             window); a value the user sets in the config wins
    skill_bank               the shipped skill bank for the teacher ("alfworld", ...), or None
    expert_action()          optional: the expert's next action, for `sdar warmup` demonstrations,
                             `sdar probe-teacher` and teacher.context next_action

Environments whose engine is an optional extra import it inside `__init__` with `require_module`,
so a missing extra is reported with the pip command that installs it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar


class EnvironmentConfigError(ValueError):
    """The configured environment cannot be created; the message says how to fix it."""


def require_module(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` or raise EnvironmentConfigError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise EnvironmentConfigError(
            f"{purpose} needs the Python package '{module.split('.')[0]}', which is not installed ({err}). "
            f"Install it with: pip install 'sdar-cli[{extra}]'"
        ) from None


#: the rollout settings of the official verl-agent text games (ALFWorld; TextWorld plays the same way)
TEXT_GAME_ROLLOUT_DEFAULTS: dict[str, Any] = {
    "history_turns": 2,
    "max_new_tokens": 512,
    "max_prompt_tokens": 2048,
    "invalid_action_penalty": 0.1,
    "action_pattern": r"<action>(.*?)</action>",
    "stop_strings": ["</action>"],
}


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer environment argument within [low, high] (no bound when high is None); else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def numbered_task_ids(split: str, counts: dict[str, int]) -> list[str]:
    """Ids 'split-00000' .. of a split with `counts[split]` tasks; an unknown split is a ValueError."""
    _check_split(split, counts)
    return [f"{split}-{i:05d}" for i in range(counts[split])]


def parse_numbered_task_id(task_id: str, counts: dict[str, int]) -> tuple[str, int]:
    """(split, index) of an id from `numbered_task_ids`; anything else is a ValueError saying what is valid."""
    if not isinstance(task_id, str):
        raise ValueError(f"task id must be a string like 'train-00017', got {task_id!r}")
    split, _, index = task_id.rpartition("-")
    _check_split(split, counts)
    if (not (index.isascii() and index.isdigit()) or int(index) >= counts[split]
            or task_id != f"{split}-{int(index):05d}"):
        raise ValueError(f"unknown task id {task_id!r}; {split} ids run {split}-00000 .. "
                         f"{split}-{counts[split] - 1:05d}")
    return split, int(index)


def _check_split(split: str, counts: dict[str, int]) -> None:
    if split not in counts:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(counts)}")


@dataclass(frozen=True)
class Task:
    """One task instance: what the agent is asked to do.

    `task_type` selects the task's skills in rule retrieval (ALFWorld: "pick_and_place", ...;
    Search-QA: the data source, "hotpotqa", ...).
    """

    task_id: str
    task_type: str
    description: str


@dataclass
class Observation:
    """What the environment says after a reset or a step.

    `privileged` is teacher-only context (for example the expert plan from the current state):
    the trainer shows it to the teacher pass and never to the student. `metrics` are episode-level
    measurements beside the reward (Search-QA: exact match, F1); an episode keeps the latest value
    of each, and `sdar eval` averages them.
    """

    text: str
    admissible_actions: list[str] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    won: bool = False
    privileged: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


class Environment(ABC):
    """A seeded multi-turn text environment. Subclasses implement the four methods below."""

    #: default episode length; the config's rollout.max_turns overrides it
    max_turns: int = 15
    #: rollout settings (field name -> value) this environment needs, e.g. its action pattern and
    #: stop strings; applied where the config leaves the field unset
    rollout_defaults: ClassVar[dict[str, Any]] = {}
    #: True when building the environment and resetting a few train tasks takes well under a second and
    #: touches no server, data download or cache, so `sdar train --dry-run` may do it to measure the
    #: teacher's privileged prefix (otherwise the estimate assumes a length)
    resets_cheaply: ClassVar[bool] = False
    #: the value of each episode metric for an episode that ends without reporting it (cut off by
    #: rollout.max_turns, or failed), so averages count it: e.g. {"f1": 0.0}
    metric_defaults: ClassVar[dict[str, float]] = {}
    #: name of the shipped skill bank (src/sdar_cli/skills/<name>/) used when teacher.skills.bank is unset
    skill_bank: ClassVar[str | None] = None

    @abstractmethod
    def task_ids(self, split: str) -> list[str]:
        """The task ids of a split ("train", "test", ...), in a fixed order. Unknown split: ValueError."""

    @abstractmethod
    def reset(self, task_id: str) -> tuple[Task, Observation]:
        """Start an episode of `task_id`; return the task and the first observation."""

    @abstractmethod
    def step(self, action: str) -> Observation:
        """Apply one admissible action text and return what follows."""

    def expert_action(self) -> str | None:
        """The expert's next action from the current state, for `sdar warmup`'s demonstrations, the states
        `sdar probe-teacher` probes and teacher.context next_action; None when this environment has no expert
        (the default). Called once per turn of a rollout with that context: keep it cheap."""
        return None

    def close(self) -> None:
        """Release engine resources; the default has none."""
