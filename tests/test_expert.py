"""expert.py: the expert's episodes, turn by turn (what warm-up and the teacher probe read)."""

import pytest
from conftest import build_tiny_tokenizer, tiny_config
from tests_envs import NoExpertEnv

from sdar_cli.envs.builtin import HouseholdEnv
from sdar_cli.expert import NoExpert, expert_turns
from sdar_cli.warmup import WarmupError, collect_demonstrations


def test_expert_turns_walk_each_task_to_its_end_in_a_closed_environment():
    closed = []

    class Recorded(HouseholdEnv):
        def close(self):
            closed.append(True)
            super().close()

    turns = list(expert_turns(Recorded, ["train-00003", "train-00004"], 50))
    by_task = {}
    for turn in turns:
        by_task.setdefault(turn.task.task_id, []).append(turn)
    assert list(by_task) == ["train-00003", "train-00004"] and len(closed) == 2
    for episode in by_task.values():
        assert [t.turn for t in episode] == list(range(len(episode)))
        assert episode[-1].following.done and episode[-1].following.won  # the expert wins the household tasks
        assert not any(t.following.done for t in episode[:-1])
        # each turn sees the episode so far, and the observation its previous action led to
        for before, after in zip(episode, episode[1:]):
            assert after.history == [*before.history, (before.observation.text, before.action)]
            assert after.observation is before.following
    # replaying an episode's actions in a fresh environment gives the same observations
    env = HouseholdEnv()
    env.reset("train-00003")
    assert [env.step(t.action).text for t in by_task["train-00003"]] == [t.following.text for t in by_task["train-00003"]]
    # max_turns cuts every episode short
    assert len(by_task["train-00003"]) > 2
    assert [t.turn for t in expert_turns(HouseholdEnv, ["train-00003"], 2)] == [0, 1]


def test_an_environment_without_an_expert_says_so():
    with pytest.raises(NoExpert) as raised:
        next(expert_turns(NoExpertEnv, ["train-00001"], 10))
    assert raised.value.env_name == "NoExpertEnv"


def test_warmup_refuses_an_environment_without_an_expert(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "run")
    with pytest.raises(WarmupError, match="NoExpertEnv offers no expert demonstrations"):
        collect_demonstrations(config, build_tiny_tokenizer(), NoExpertEnv, ["train-00001"], 10)
