import pytest

from sdar_cli.config import ConfigError, RunConfig, load_config


def test_defaults_follow_the_paper():
    config = RunConfig()
    assert config.algorithm.sdar_coef == 0.01
    assert config.algorithm.gate_beta == 5.0
    assert config.algorithm.kl_coef == 0.01
    assert config.rollout.group_size == 8
    assert config.teacher.weights == "live"
    assert config.teacher.context_template.startswith("[Privileged Skill Information]\n")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 7\nrollout:\n  group_size: 4\n")
    config = load_config(path, ["train.seed=3", "model.lora.target_modules=[q_proj, v_proj]", "algorithm.name=grpo"])
    assert (config.train.max_steps, config.rollout.group_size, config.train.seed) == (7, 4, 3)
    assert config.model.lora.target_modules == ["q_proj", "v_proj"]
    assert config.algorithm.name == "grpo"
    assert not config.uses_teacher


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_step: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'. Did you mean 'train.max_steps'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match="Did you mean 'rollout.group_size'"):
        load_config(None, ["rollout.groupsize=4"])


def test_wrong_type_or_value_names_the_key_path():
    with pytest.raises(ConfigError, match=r"train.max_steps: .*integer.*'ten'"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"algorithm.name: .*'sdar', 'grpo', 'grpo_opsd', 'opsd', 'rlsd', 'skill_sd' or 'skill_grpo'"):
        load_config(None, ["algorithm.name=ppo"])
    with pytest.raises(ConfigError, match=r"rollout.group_size: .*greater than or equal to 2"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(ConfigError, match=r"rollout.action_pattern: .*capturing group"):
        load_config(None, ["rollout.action_pattern=<a>.*</a>"])


def test_micro_batches_must_divide_the_episodes_of_a_step():
    with pytest.raises(ConfigError, match=r"train.micro_batches \(3\) must divide .* \(8\)"):
        load_config(None, ["rollout.tasks_per_step=2", "rollout.group_size=4", "train.micro_batches=3"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.max_steps=5", "env.kwargs={difficulty: 2}"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb not installed: pip install wandb"):
        load_config(None, ["train.report_to=[wandb]"])
