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
