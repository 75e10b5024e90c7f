"""Plugin environments for tests, loaded by import path like a user's own (env.name: tests_envs:Class)."""

from sdar_cli.envs.builtin import HouseholdEnv


class BrokenEnv(HouseholdEnv):
    """Every reset raises: the trainer must abort with a clear message."""

    def reset(self, task_id):
        raise RuntimeError("reset is broken")


class FlakyEnv(HouseholdEnv):
    """Task train-00001 always raises on reset: its episodes fail, the others train on."""

    def reset(self, task_id):
        if task_id == "train-00001":
            raise RuntimeError("flaky engine")
        return super().reset(task_id)


class NoSkillsEnv(HouseholdEnv):
    """An environment that ships no skill bank."""

    skill_bank = None


class TaggedEnv(HouseholdEnv):
    """Declares the rollout settings it needs, as a plugin with its own action format would."""

    rollout_defaults = {"history_turns": 4, "stop_strings": ["</go>"], "action_pattern": r"<go>(.*?)</go>"}


class NoExpertEnv(HouseholdEnv):
    """An environment without an expert: `sdar warmup` must refuse it."""

    def expert_action(self):
        return None


class MissingEngineEnv(HouseholdEnv):
    """Needs an engine that is not installed, as ALFWorld does without its extra."""

    def __init__(self, **kwargs):
        from sdar_cli.envs import require_module

        require_module("sdar_no_such_engine", "alfworld", "The test environment")
        super().__init__(**kwargs)


class ShortEpisodesEnv(HouseholdEnv):
    """Episodes end after a number of turns set by the task id (1, 2 or 3; won when even), whatever the
    agent says (any response is its action): the episodes of one step end at different turns, so several
    processes hold different numbers of turn-samples."""

    rollout_defaults = {"action_pattern": r"(?s)^(.*)$"}

    def reset(self, task_id):
        self._task_number = int(task_id.split("-")[1])
        self._turns_left = self._task_number % 3 + 1
        task, observation = super().reset(task_id)
        observation.admissible_actions = []
        return task, observation

    def step(self, action):
        observation = super().step(action)
        observation.admissible_actions = []
        self._turns_left -= 1
        if self._turns_left <= 0 and not observation.done:
            won = self._task_number % 2 == 0
            observation.done, observation.won, observation.reward = True, won, 10.0 if won else 0.0
        return observation


class FaultyEnv(HouseholdEnv):
    """Task `task` (train-00001; "all": every task) misbehaves as env.kwargs `fault` says, on reset ("reset_*")
    or on every step, a hang lasting `hang_s` seconds; the other tasks play normally. Any response is an action (the pattern takes the whole text after the prefix "go "), so
    a random model reaches `step`."""

    rollout_defaults = {"action_pattern": "(.+)", "response_prefix": "go "}
    BROKEN = {
        "text_reward": {"reward": "high"},
        "nan_reward": {"reward": float("nan")},
        "inf_reward": {"reward": float("inf")},
        "int_actions": {"admissible_actions": [1, 2]},
        "no_text": {"text": None},
    }

    def __init__(self, fault: str = "nan_reward", task: str = "train-00001", hang_s: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.fault, self.faulty_task, self.hang_s = fault, task, hang_s
        self.task_id = None

    def faulty(self) -> bool:
        return self.faulty_task in ("all", self.task_id)

    def hang(self) -> None:
        import sys
        import time

        print(f"{self.task_id}: hanging for {self.hang_s} s", file=sys.stderr, flush=True)
        time.sleep(self.hang_s)

    def reset(self, task_id):
        from sdar_cli.envs.base import Observation

        self.task_id = task_id
        task, observation = super().reset(task_id)
        if self.faulty() and self.fault == "reset_hang":
            self.hang()
        if self.faulty() and self.fault == "reset_nan_reward":
            return task, Observation(text=observation.text, admissible_actions=[], reward=float("nan"))
        return task, Observation(text=observation.text, admissible_actions=[])

    def expert_action(self):
        if self.faulty() and self.fault == "expert_raises":
            raise RuntimeError("the expert crashed")
        return super().expert_action()

    def step(self, action):
        from sdar_cli.envs.base import Observation

        fields = {"text": f"You {action}. Nothing happens.", "admissible_actions": [], "reward": 0.0}
        if self.faulty():
            if self.fault == "step_hang":
                self.hang()
            fields.update(self.BROKEN.get(self.fault, {}))
        return Observation(**fields)
