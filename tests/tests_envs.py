"""Plugin environments for tests, loaded by import path like a user's own (env.name: tests_envs:Class)."""

from sdar_cli.envs.builtin import HouseholdEnv


class BrokenEnv(HouseholdEnv):
    """Every reset raises: the trainer must abort with a clear message."""

    def reset(self, task_id):
        raise RuntimeError("reset is broken")


class FlakyEnv(HouseholdEnv):
    """Steps of odd-numbered tasks raise: those episodes fail, training goes on."""

    def reset(self, task_id):
        self._flaky = int(task_id.split("-")[1]) % 2 == 1
        return super().reset(task_id)

    def step(self, action):
        if self._flaky:
            raise RuntimeError("flaky engine")
        return super().step(action)
