"""Skill banks, privileged-context selection, environment rollout defaults and parallel environments."""

from __future__ import annotations

import re

import pytest
from conftest import build_tiny_tokenizer

from sdar_cli.config import ConfigError, RolloutSettings, TeacherSettings, load_config
from sdar_cli.envs.builtin import HouseholdEnv
from sdar_cli.rollout import TurnRenderer, play_episodes
from sdar_cli.skills import SkillBank, SkillBankError, parse_skills, render_skills, shipped_banks

BANK_FILES = {
    "general.md": "# General\n\n## Look first\n1. Look around.\n\n## Be brief\n1. Act.\n",
    "multi_hop.md": "## Chain the searches\n1. Search the bridge entity, then the answer.\n",
    "direct.md": "## One search\n1. Search the question's entity.\n",
    "heat.md": "## Heat things\n1. Use the microwave to heat food.\n",
    "mapping.yaml": "hotpotqa: [multi_hop]\n2wiki: multi_hop\nnq: [direct]\n",
}


@pytest.fixture()
def bank_dir(tmp_path):
    for name, text in BANK_FILES.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def titles(skills):
    return [skill.title for skill in skills]


def test_parse_skills_splits_sections_and_ignores_the_file_title():
    skills = parse_skills(BANK_FILES["general.md"], "general")
    assert titles(skills) == ["Look first", "Be brief"]
    assert skills[0].body == "1. Look around." and skills[0].source == "general"
    assert render_skills(skills) == "## Look first\n1. Look around.\n\n## Be brief\n1. Act."


def test_rule_retrieval_is_general_plus_the_mapped_or_same_named_file(bank_dir):
    bank = SkillBank.load(str(bank_dir))
    assert titles(bank.retrieve("hotpotqa", "", "rule", 3)) == ["Look first", "Be brief", "Chain the searches"]
    assert titles(bank.retrieve("2wiki", "", "rule", 3)) == ["Look first", "Be brief", "Chain the searches"]
    assert titles(bank.retrieve("heat", "", "rule", 3)) == ["Look first", "Be brief", "Heat things"]
    assert titles(bank.retrieve("unknown_type", "", "rule", 3)) == ["Look first", "Be brief"]


def test_bm25_all_and_none(bank_dir):
    bank = SkillBank.load(str(bank_dir))
    assert titles(bank.retrieve("nq", "heat the soup in the microwave", "bm25", 1)) == ["Heat things"]
    assert titles(bank.retrieve("nq", "search the bridge entity", "bm25", 2))[0] == "Chain the searches"
    assert len(bank.retrieve("nq", "", "all", 1)) == 5
    assert bank.retrieve("nq", "anything", "none", 3) == []


def test_a_mapping_to_a_missing_file_is_an_error(bank_dir):
    (bank_dir / "mapping.yaml").write_text("nq: [nowhere]\n")
    with pytest.raises(SkillBankError, match="nowhere"):
        SkillBank.load(str(bank_dir))


def test_every_shipped_bank_loads_and_household_has_a_file_per_task_type():
    assert "household" in shipped_banks()
    for name in shipped_banks():
        assert SkillBank.load(name).all_skills, name
    bank = SkillBank.load("household")
    from sdar_cli.envs.builtin import TASK_TYPES

    for task_type in TASK_TYPES:
        assert bank.skills_by_file.get(task_type), task_type


def test_config_takes_the_environments_bank_and_rejects_a_missing_one(tmp_path):
    assert load_config(None).teacher.skills.bank == "household"
    with pytest.raises(ConfigError, match="neither a shipped bank"):
        load_config(None, [f"teacher.skills.bank={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="ships no skill bank"):
        load_config(None, ["env.name=tests_envs:NoSkillsEnv", "teacher.context=skills"])
    assert load_config(None, ["env.name=tests_envs:NoSkillsEnv"]).teacher.skills.bank is None


def test_environment_rollout_defaults_fill_only_unset_fields(tmp_path):
    config = load_config(None, ["env.name=tests_envs:TaggedEnv"])
    assert config.rollout.history_turns == 4 and config.rollout.stop_strings == ["</go>"]
    assert config.rollout.action_pattern == r"<go>(.*?)</go>"
    assert config.rollout.max_new_tokens == RolloutSettings().max_new_tokens  # not in the defaults
    overridden = load_config(None, ["env.name=tests_envs:TaggedEnv", "rollout.history_turns=1"])
    assert overridden.rollout.history_turns == 1 and overridden.rollout.stop_strings == ["</go>"]
    saved = tmp_path / "config.yaml"
    saved.write_text(overridden.to_yaml())
    assert load_config(saved) == overridden


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_privileged_context_is_skills_plan_or_both(tokenizer):
    env = HouseholdEnv()
    task, observation = env.reset(env.task_ids("train")[0])
    skills = render_skills(SkillBank.load("household").retrieve(task.task_type, "", "rule", 3))
    plan = observation.privileged
    assert plan.startswith("Expert plan from here:")

    def context(mode, retrieval="rule"):
        teacher = TeacherSettings(context=mode, skills={"bank": "household", "retrieval": retrieval})
        return TurnRenderer(tokenizer, RolloutSettings(), teacher).privileged_context(task, plan)

    assert context("plan") == plan
    assert context("skills") == skills
    assert context("both") == skills + "\n\n" + plan
    assert context("both", retrieval="none") == plan
    type_skill = SkillBank.load("household").skills_by_file[task.task_type][0]
    assert skills.startswith("## Find the object first") and type_skill.render() in skills


def prompt_driven_policy(tokenizer):
    """Picks an admissible action from the prompt text alone, so results cannot depend on thread order."""

    def policy(prompts):
        responses = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            actions = re.findall(r"'([^']+)'", text.rsplit("admissible actions", 1)[-1])
            action = actions[len(ids) % len(actions)]
            responses.append(tokenizer(f"<action>{action}</action>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        return responses

    return policy


def test_parallel_environment_workers_give_the_same_episodes(tokenizer):
    renderer = TurnRenderer(tokenizer, RolloutSettings(), TeacherSettings(skills={"bank": "household"}))
    task_ids = [f"train-{i:05d}" for i in range(6)]

    def play(workers):
        return play_episodes(task_ids, list(range(6)), HouseholdEnv, prompt_driven_policy(tokenizer), renderer, 6, env_workers=workers)

    (serial_samples, serial_episodes), (parallel_samples, parallel_episodes) = play(1), play(4)
    assert [(s.episode, s.turn, s.prompt_ids, s.teacher_prompt_ids, s.response_ids, s.reward) for s in serial_samples] == [
        (s.episode, s.turn, s.prompt_ids, s.teacher_prompt_ids, s.response_ids, s.reward) for s in parallel_samples
    ]
    assert serial_episodes == parallel_episodes
    assert len(serial_samples) > 6  # several turns were played
