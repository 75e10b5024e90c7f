"""The environment protocol: what a multi-turn text environment must offer the trainer.

An environment object plays one episode at a time. The rollout creates one object per episode
slot (so episodes never share state) and drives it with `reset(task_id)` then `step(action)`
until `done`. Everything an environment returns is plain text, so any engine (a Python game,
ALFWorld, an HTTP server) fits behind it.

To plug in your own environment, subclass `Environment` and name it in the config:

    env:
      name: mypackage.myenv:MyEnv
      kwargs: {difficulty: 2}
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """One task instance: what the agent is asked to do."""

    task_id: str
    task_type: str
    description: str


@dataclass
class Observation:
    """What the environment says after a reset or a step.

    `privileged` is teacher-only context (for example the expert plan from the current state):
    the trainer shows it to the teacher pass and never to the student.
    """

    text: str
    admissible_actions: list[str] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    won: bool = False
    privileged: str = ""


class Environment(ABC):
    """A seeded multi-turn text environment. Subclasses implement the four methods below."""

    #: default episode length; the config's rollout.max_turns overrides it
    max_turns: int = 15

    @abstractmethod
    def task_ids(self, split: str) -> list[str]:
        """The task ids of a split ("train", "test", ...), in a fixed order. Unknown split: ValueError."""

    @abstractmethod
    def reset(self, task_id: str) -> tuple[Task, Observation]:
        """Start an episode of `task_id`; return the task and the first observation."""

    @abstractmethod
    def step(self, action: str) -> Observation:
        """Apply one admissible action text and return what follows."""

    def close(self) -> None:
        """Release engine resources; the default has none."""
