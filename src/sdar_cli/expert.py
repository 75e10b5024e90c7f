"""The environment's expert playing tasks: the states it passes through, for `sdar warmup` (demonstrations)
and `sdar probe-teacher` (states to score the teacher on)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .envs.base import Environment, Observation, Task


class NoExpert(Exception):
    """The environment's expert_action() returned None at the start of the first episode: it has no expert."""

    def __init__(self, env_name: str):
        super().__init__(env_name)
        self.env_name = env_name


@dataclass
class ExpertTurn:
    """One turn of an expert episode: the state it saw, the action it took and what followed."""

    task: Task
    turn: int  # 0-based, within the episode
    history: list[tuple[str, str]]  # the episode's earlier (observation text, action) pairs
    observation: Observation
    action: str
    following: Observation  # the environment's answer to `action`


def expert_turns(make_env: Callable[[], Environment], task_ids: Sequence[str], max_turns: int) -> Iterator[ExpertTurn]:
    """Each task of `task_ids` played by the expert in a fresh environment (closed after its episode), for at
    most `max_turns` turns, until the episode is done or the expert has no action; every turn yielded.
    NoExpert when the expert has no action at the very first state."""
    played_any = False
    for task_id in task_ids:
        env = make_env()
        try:
            task, observation = env.reset(task_id)
            history: list[tuple[str, str]] = []
            for turn in range(max_turns):
                action = env.expert_action()
                if action is None:
                    if not played_any:
                        raise NoExpert(type(env).__name__)
                    break
                following = env.step(action)
                played_any = True
                yield ExpertTurn(task, turn, list(history), observation, action, following)
                history.append((observation.text, action))
                observation = following
                if following.done:
                    break
        finally:
            env.close()
