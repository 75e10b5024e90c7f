"""Multi-turn episodes -> turn-samples, with a scripted policy (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_tokenizer
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

from sdar_cli.batching import collate_turn_samples
from sdar_cli.config import RolloutSettings, TeacherSettings
from sdar_cli.envs.builtin import HouseholdEnv
from sdar_cli.rollout import (
    INVALID_ACTION_NOTE,
    TurnRenderer,
    play_episodes,
    sampled_response,
    stop_string_end_ids,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


class RecordingEnv(HouseholdEnv):
    """The built-in environment, remembering its last observation so a scripted policy can follow it."""

    created: list[RecordingEnv] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last = None
        RecordingEnv.created.append(self)

    def reset(self, task_id):
        task, self.last = super().reset(task_id)
        return task, self.last

    def step(self, action):
        self.last = super().step(action)
        return self.last


def char_by_char(tokenizer, text: str) -> list[int]:
    """Ids of `text` one character per token: valid ids that re-tokenising the text would never give."""
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ch)[0]) for ch in text]


def expert_policy(tokenizer, envs, garbage_turns=()):
    calls = {"n": 0}

    def policy(prompts):
        active = [env for env in envs if not env.last.done][: len(prompts)]
        turn = calls["n"]
        calls["n"] += 1
        responses = []
        for env in active:
            if turn in garbage_turns:
                text = "<think>hmm</think> I will dance"
            else:
                text = f"<think>follow the plan</think><action>{env.expert_plan()[0]}</action>"
            responses.append(char_by_char(tokenizer, text) + [tokenizer.eos_token_id])
        return responses

    return policy


def run(tokenizer, policy_factory, task_ids, groups, max_turns=15, **rollout):
    RecordingEnv.created = []
    renderer = TurnRenderer(tokenizer, RolloutSettings(**rollout), TeacherSettings())
    envs = RecordingEnv.created
    return play_episodes(task_ids, groups, RecordingEnv, policy_factory(envs), renderer, max_turns), renderer


def test_expert_play_wins_and_every_turn_gets_the_episode_reward(tokenizer):
    (samples, episodes), _ = run(tokenizer, lambda envs: expert_policy(tokenizer, envs), ["train-00000"] * 2, [0, 0])
    assert all(e.won and e.outcome_reward == 10.0 and e.env_error is None for e in episodes)
    plan_length = episodes[0].turns
    assert 3 <= plan_length <= 15
    assert len(samples) == 2 * plan_length
    assert [s.turn for s in samples if s.episode == 0] == list(range(plan_length))
    assert all(s.reward == 10.0 and s.valid for s in samples)


def test_response_ids_are_the_sampled_ids_never_retokenised(tokenizer):
    (samples, episodes), _ = run(tokenizer, lambda envs: expert_policy(tokenizer, envs), ["train-00003"], [0])
    sample = samples[0]
    text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    retokenised = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sample.response_ids != retokenised  # the scripted ids do not round-trip through text
    assert sample.response_ids == char_by_char(tokenizer, text) + [tokenizer.eos_token_id]
    batch = collate_turn_samples(samples, torch.zeros(len(samples)), tokenizer.pad_token_id, 1, with_teacher=True)
    for row, s in enumerate(samples):
        n = len(s.response_ids)
        assert batch["completion_ids"][row, :n].tolist() == s.response_ids
        assert batch["completion_mask"][row].sum() == n


def test_invalid_action_costs_a_penalty_and_the_episode_goes_on(tokenizer):
    (samples, episodes), _ = run(
        tokenizer, lambda envs: expert_policy(tokenizer, envs, garbage_turns={0}), ["train-00001"], [0]
    )
    first, second = samples[0], samples[1]
    assert not first.valid and first.action is None
    assert first.reward == pytest.approx(10.0 - 0.1)
    assert all(s.reward == 10.0 for s in samples[1:])
    assert episodes[0].won and episodes[0].invalid_actions == 1
    assert INVALID_ACTION_NOTE in tokenizer.decode(second.prompt_ids)


def test_episodes_stop_at_max_turns_without_winning(tokenizer):
    (samples, episodes), _ = run(
        tokenizer, lambda envs: expert_policy(tokenizer, envs, garbage_turns=set(range(99))), ["train-00002"] * 3,
        [0, 0, 0], max_turns=4,
    )
    assert [e.turns for e in episodes] == [4, 4, 4]
    assert not any(e.won for e in episodes)
    assert all(s.reward == pytest.approx(-0.1) for s in samples)


def test_teacher_prompt_is_the_privileged_prefix_then_the_student_prompt(tokenizer):
    (samples, _), renderer = run(tokenizer, lambda envs: expert_policy(tokenizer, envs), ["train-00004"], [0])
    sample = samples[0]
    prefix = sample.teacher_prompt_ids[: len(sample.teacher_prompt_ids) - len(sample.prompt_ids)]
    assert sample.teacher_prompt_ids[len(prefix) :] == sample.prompt_ids
    prefix_text = tokenizer.decode(prefix)
    assert prefix_text.startswith("[Privileged Skill Information]\n")
    assert "Expert plan" in prefix_text
    assert "Expert plan" not in tokenizer.decode(sample.prompt_ids)  # never shown to the student


class ExplodingEnv(RecordingEnv):
    def step(self, action):
        if self.last and "00005" in self._task_id:
            self.last = dataclasses.replace(self.last, done=True)  # so the scripted policy skips it too
            raise RuntimeError("engine crashed")
        return super().step(action)

    def reset(self, task_id):
        self._task_id = task_id
        return super().reset(task_id)


def test_an_environment_exception_fails_only_its_episode(tokenizer):
    RecordingEnv.created = []
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings())
    samples, episodes = play_episodes(
        ["train-00005", "train-00006"], [0, 1], ExplodingEnv, expert_policy(tokenizer, RecordingEnv.created),
        renderer, 15,
    )
    crashed, healthy = episodes
    assert crashed.env_error == "RuntimeError: engine crashed" and not crashed.won and crashed.turns == 1
    assert healthy.env_error is None and healthy.won


def test_padding_keeps_every_sample_through_trls_shuffle_and_split(tokenizer):
    (samples, _), _ = run(tokenizer, lambda envs: expert_policy(tokenizer, envs), ["train-00000", "train-00007"], [0, 1])
    assert len(samples) % 4 != 0, "pick tasks whose sample count does not divide evenly"
    batch = collate_turn_samples(samples, torch.arange(len(samples)).float(), tokenizer.pad_token_id, 4, False)
    assert batch["prompt_ids"].shape[0] % 4 == 0
    chunks = split_tensor_dict(shuffle_sequence_dict(batch), 4)
    seen = sorted(i for chunk in chunks for i in chunk["sample_index"].tolist() if i >= 0)
    assert seen == list(range(len(samples)))
    for chunk in chunks:
        padding = chunk["sample_index"] < 0
        assert chunk["completion_mask"][padding].sum() == 0
        assert chunk["num_items_in_batch"] == sum(len(s.response_ids) for s in samples)


def test_sampled_response_ends_at_eos_or_stop_string_not_at_padding(tokenizer):
    eos = tokenizer.eos_token_id
    assert sampled_response([5, 6, eos, eos, eos], eos, [], tokenizer.decode) == [5, 6, eos]
    assert sampled_response([5, 6, 7], eos, [], tokenizer.decode) == [5, 6, 7]
    assert sampled_response([5, 9, 6], [9, eos], [], tokenizer.decode) == [5, 9]
    # stopped by "</action>": generate pads the row with pad ids, which must not count as sampled
    action = char_by_char(tokenizer, "look</action>")
    padded = action + [tokenizer.pad_token_id] * 3
    ends = stop_string_end_ids(tokenizer, ["</action>"])
    assert sampled_response(padded, eos, ["</action>"], tokenizer.decode, ends) == action
    # an eos pad after a stop string is not a sampled eos either
    assert sampled_response(action + [eos, eos], eos, ["</action>"], tokenizer.decode, ends) == action


def test_stop_strings_are_checked_by_token_and_decoded_once_per_row(tokenizer):
    ends = stop_string_end_ids(tokenizer, ["</action>"])
    assert ends == {i for i in range(len(tokenizer)) if ">" in tokenizer.decode([i])}
    assert stop_string_end_ids(tokenizer, ["</action>"]) is ends  # decoded once per tokenizer
    decoded = []

    def counting_decode(ids):
        decoded.append(list(ids))
        return tokenizer.decode(ids)

    action = char_by_char(tokenizer, "go to kitchen</action>")
    row = action + [tokenizer.pad_token_id] * 5
    assert sampled_response(row, tokenizer.eos_token_id, ["</action>"], counting_decode, ends) == action
    assert decoded == [action]  # one decode, at the token that closes the stop string


def test_response_prefix_is_prompt_side_and_parsed_as_part_of_the_response(tokenizer):
    def policy_factory(envs):
        def policy(prompts):
            return [char_by_char(tokenizer, f"{env.expert_plan()[0]}</action>") for env in envs if not env.last.done]

        return policy

    (samples, episodes), _ = run(tokenizer, policy_factory, ["train-00000"], [0], response_prefix="<action>")
    assert episodes[0].won and all(s.valid for s in samples)
    assert tokenizer.decode(samples[0].prompt_ids).endswith("<|im_start|>assistant\n<action>")
    assert not tokenizer.decode(samples[0].response_ids).startswith("<action>")


class ScoredEnv(RecordingEnv):
    """Reports an episode metric on the winning step only; an episode cut short gets the default."""

    metric_defaults = {"plan_steps_left": -1.0}

    def step(self, action):
        observation = super().step(action)
        if observation.done:
            observation.metrics = {"plan_steps_left": 0.0, "score": 0.5}
        self.last = observation
        return observation


def test_episode_metrics_come_from_the_last_observation_and_default_when_cut_short(tokenizer):
    RecordingEnv.created = []
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings())
    _, full = play_episodes(["train-00000"], [0], ScoredEnv, expert_policy(tokenizer, RecordingEnv.created), renderer, 15)
    RecordingEnv.created = []
    _, cut = play_episodes(["train-00000"], [0], ScoredEnv, expert_policy(tokenizer, RecordingEnv.created), renderer, 1)
    assert full[0].won and full[0].metrics == {"plan_steps_left": 0.0, "score": 0.5}
    assert not cut[0].won and cut[0].metrics == {"plan_steps_left": -1.0}
    _, plain = play_episodes(["train-00000"], [0], RecordingEnv, expert_policy(tokenizer, RecordingEnv.created), renderer, 15)
    assert plain[0].metrics == {}


class NaNScoredEnv(ScoredEnv):
    def step(self, action):
        observation = super().step(action)
        observation.metrics = {"score": float("nan")}
        return observation


def test_a_bad_metric_fails_its_episode_and_a_failed_start_still_gets_the_defaults(tokenizer):
    RecordingEnv.created = []
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings())
    _, (bad,) = play_episodes(["train-00000"], [0], NaNScoredEnv, expert_policy(tokenizer, RecordingEnv.created), renderer, 15)
    assert bad.env_error is not None and "non-finite metric 'score'" in bad.env_error and not bad.won

    calls = {"n": 0}

    def second_fails_to_build():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("no engine")
        return ScoredEnv()

    RecordingEnv.created = []
    _, (ok, broken) = play_episodes(["train-00000", "train-00001"], [0, 1], second_fails_to_build,
                                    expert_policy(tokenizer, RecordingEnv.created), renderer, 15)
    assert ok.won and ok.metrics["plan_steps_left"] == 0.0
    assert broken.env_error == "RuntimeError: no engine" and broken.metrics == {"plan_steps_left": -1.0}


class ActionLogEnv(RecordingEnv):
    def step(self, action):
        self.actions = [*getattr(self, "actions", []), action]
        return super().step(action)


def inadmissible_first_policy(tokenizer, envs):
    calls = {"n": 0}

    def policy(prompts):
        active = [env for env in envs if not env.last.done][: len(prompts)]
        turn, calls["n"] = calls["n"], calls["n"] + 1
        action = "fly to the moon" if turn == 0 else env_plan(active)
        return [char_by_char(tokenizer, f"<think>x</think><action>{action}</action>") + [tokenizer.eos_token_id]
                for _ in active]

    def env_plan(active):
        return active[0].expert_plan()[0]

    return policy


@pytest.mark.parametrize("mode", ["admissible", "format"])
def test_invalid_action_mode_decides_the_penalty_and_what_reaches_the_environment(tokenizer, mode):
    RecordingEnv.created = []
    renderer = TurnRenderer(tokenizer, RolloutSettings(invalid_action=mode), TeacherSettings())
    samples, episodes = play_episodes(
        ["train-00001"], [0], ActionLogEnv, inadmissible_first_policy(tokenizer, RecordingEnv.created), renderer, 15
    )
    env, first, second = RecordingEnv.created[0], samples[0], samples[1]
    assert episodes[0].won
    if mode == "admissible":
        assert not first.valid and first.reward == pytest.approx(10.0 - 0.1)
        assert "fly to the moon" not in env.actions  # never sent
        assert INVALID_ACTION_NOTE in tokenizer.decode(second.prompt_ids)
    else:
        assert first.valid and first.reward == 10.0 and episodes[0].invalid_actions == 0
        assert env.actions[0] == "fly to the moon"  # sent; the environment answers for itself
        assert "Nothing happens." in tokenizer.decode(second.prompt_ids)


def test_a_long_prompt_drops_the_oldest_history_first_for_student_and_teacher_alike(tokenizer):
    env = HouseholdEnv()
    task, observation = env.reset("train-00003")
    history = [(f"observation number {i} " * 3, f"action {i}") for i in range(4)]
    args = (task, history, observation.text, observation.admissible_actions)

    def lengths(renderer, prefix=()):
        return [len(list(prefix) + renderer.encode(renderer.student_prompt_text(*args, window=w))) for w in (2, 1, 0)]

    full, one, none = lengths(TurnRenderer(tokenizer, RolloutSettings(history_turns=2), TeacherSettings()))
    renderer = TurnRenderer(tokenizer, RolloutSettings(history_turns=2, max_prompt_tokens=one), TeacherSettings())
    privileged = "use the fridge " * 4
    prefix = renderer.teacher_prefix_ids(privileged)
    student, teacher = renderer.turn_prompt_ids(*args, privileged)
    # the student keeps the newest pair (window 1): the template head and the task are whole
    assert student == renderer.encode(renderer.student_prompt_text(*args, window=1))
    assert tokenizer.decode(student).startswith("<|im_start|>user\n") and task.description in tokenizer.decode(student)
    assert "action 3" in tokenizer.decode(student) and "action 2" not in tokenizer.decode(student)
    # the teacher, longer by its prefix, drops history by the same rule until it fits too
    assert teacher[: len(prefix)] == prefix and len(teacher) <= one
    fitting = [w for w in (2, 1, 0) if lengths(renderer, prefix)[(2, 1, 0).index(w)] <= one][0]
    assert teacher == prefix + renderer.encode(renderer.student_prompt_text(*args, window=fitting))
    assert renderer.truncated_prompts == 1  # one turn shortened

    # too long even without history: head and tail are kept, the middle is cut
    tight = TurnRenderer(tokenizer, RolloutSettings(history_turns=2, max_prompt_tokens=none - 10), TeacherSettings())
    cut, _ = tight.turn_prompt_ids(*args)
    whole = tight.encode(tight.student_prompt_text(*args, window=0))
    head = (none - 10) // 2
    assert len(cut) == none - 10 and cut[:head] == whole[:head] and cut[head:] == whole[-(none - 10 - head):]
    assert full > one > none
