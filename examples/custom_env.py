"""A plug-in environment written from scratch: the smallest complete `Environment`.

The agent stands in a corridor of rooms, must walk to the room that holds a key, take it, walk to the
locked door at the far end and open it. Everything the trainer needs is here: a fixed list of task ids
per split, `reset`, `step`, the admissible actions of each state, a reward and `won` at the end, the
expert plan from the current state as the teacher's privileged context, and `expert_action` for
`sdar warmup`.

Train on it (the folder holding this file must be importable):

    PYTHONPATH=examples sdar train examples/custom_env.yaml

`env.name: custom_env:KeyCorridorEnv` names the module and the class; `env.kwargs` go to `__init__`.
"""

from __future__ import annotations

import random

from sdar_cli.envs.base import Environment, Observation, Task


class KeyCorridorEnv(Environment):
    """Rooms 0..length-1 in a row; the key lies in one room, the locked door is past the last room."""

    max_turns = 12
    resets_cheaply = True  # pure Python, no engine: `sdar train --dry-run` may reset a few tasks

    def __init__(self, length: int = 4, num_train_tasks: int = 200, num_test_tasks: int = 50, seed: int = 0):
        if length < 2:
            raise ValueError(f"length must be at least 2, got {length}")
        self.length = length
        self.splits = {"train": num_train_tasks, "test": num_test_tasks}
        self.seed = seed
        self._room = 0
        self._key_room = 0
        self._has_key = False
        self._done = False

    def task_ids(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(self.splits)}")
        return [f"{split}-{i}" for i in range(self.splits[split])]

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        split, _, index = task_id.rpartition("-")
        if split not in self.splits or not index.isdigit() or int(index) >= self.splits[split]:
            raise ValueError(f"unknown task id {task_id!r}")
        # the task id alone fixes the layout: the same task is the same puzzle in every episode
        layout = random.Random(f"{self.seed}/{task_id}")
        self._key_room = layout.randrange(self.length)
        self._room = layout.randrange(self.length)
        self._has_key = False
        self._done = False
        task = Task(
            task_id=task_id,
            task_type="corridor",
            description=f"Your task is to: find the key in one of {self.length} rooms and open the locked door "
            f"east of room {self.length - 1}.",
        )
        return task, self._observe("You wake up in a quiet corridor.")

    def step(self, action: str) -> Observation:
        if self._done:
            raise RuntimeError("the episode is over; call reset")
        if action not in self._admissible():
            return self._observe(f"Nothing happens: '{action}' is not possible here.")
        if action == "go east":
            self._room += 1
            return self._observe(f"You walk east into room {self._room}.")
        if action == "go west":
            self._room -= 1
            return self._observe(f"You walk west into room {self._room}.")
        if action == "take key":
            self._has_key = True
            return self._observe("You pick up the key.")
        self._done = True  # "open door"
        return Observation(text="The door swings open. You are free.", reward=1.0, done=True, won=True)

    def expert_action(self) -> str | None:
        plan = self._plan()
        return plan[0] if plan else None

    # -- helpers -------------------------------------------------------------------------------

    def _admissible(self) -> list[str]:
        actions = []
        if self._room > 0:
            actions.append("go west")
        if self._room < self.length - 1:
            actions.append("go east")
        if self._room == self._key_room and not self._has_key:
            actions.append("take key")
        if self._room == self.length - 1 and self._has_key:
            actions.append("open door")
        return actions

    def _plan(self) -> list[str]:
        """The shortest action sequence from the current state to the open door."""
        room, plan = self._room, []
        if not self._has_key:
            step = "go east" if self._key_room > room else "go west"
            plan += [step] * abs(self._key_room - room) + ["take key"]
            room = self._key_room
        return plan + ["go east"] * (self.length - 1 - room) + ["open door"]

    def _observe(self, text: str) -> Observation:
        here = "The key lies on the floor here. " if self._room == self._key_room and not self._has_key else ""
        door = "A locked door leads east. " if self._room == self.length - 1 else ""
        return Observation(
            text=f"{text} You are in room {self._room}. {here}{door}".strip(),
            admissible_actions=self._admissible(),
            privileged="Expert plan from here: " + ", ".join(self._plan()),
        )
