"""`sdar warmup`: expert demonstrations rendered as the rollout renders turns, then SFT, merge and save."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_OVERRIDES, one_torch_thread, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.envs import environment_factory
from sdar_cli.envs.builtin import HouseholdEnv
from sdar_cli.models import load_tokenizer
from sdar_cli.rollout import TurnRenderer
from sdar_cli.warmup import WarmupError, collect_demonstrations, demonstration_response


def test_demonstrations_are_the_rollouts_prompts_with_the_experts_actions(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, "rollout.response_prefix=<action>", "rollout.max_turns=15")
    tokenizer = load_tokenizer(config.model)
    make_env = environment_factory("household", {})
    rows, counts = collect_demonstrations(config, tokenizer, make_env, ["train-00000", "train-00001"], 15)
    env = HouseholdEnv()
    task, observation = env.reset("train-00000")
    plan = env.expert_plan()
    assert counts == {"episodes": 2, "turns": len(rows), "expert_won": 2}
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
    first_prompt = renderer.encode(renderer.student_prompt_text(task, [], observation.text, observation.admissible_actions))
    first = rows[0]
    assert first["input_ids"][: len(first_prompt)] == first_prompt
    response = [t for t, m in zip(first["input_ids"], first["completion_mask"]) if m]
    assert len(response) == len(first["input_ids"]) - len(first_prompt)
    assert tokenizer.decode(response) == f"{plan[0]}</action>{tokenizer.eos_token}"
    assert demonstration_response(config, "look") == "look</action>"
    # the second turn's prompt shows the first turn in its history, as the rollout would
    second_prompt = tokenizer.decode(rows[1]["input_ids"])
    assert f"Action 1: '{plan[0]}'" in second_prompt


def mean_response_nll(model, rows):
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])]])
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_warmup_writes_a_merged_model_that_fits_the_demonstrations_better(tiny_model_dir, tmp_path):
    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "rollout.max_turns=15", "warmup.episodes=6",
                 "warmup.epochs=4", "warmup.learning_rate=0.01", "warmup.batch_size=8"]
    (tmp_path / "run.yaml").write_text("{}\n")
    args = ["warmup", str(tmp_path / "run.yaml"), "-o", str(tmp_path / "warm")]
    with one_torch_thread():
        result = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert result.exit_code == 0, result.output
    assert "Warmed-up model written to" in result.output
    summary = json.loads((tmp_path / "warm" / "warmup.json").read_text())
    assert summary["episodes"] == 6 and summary["expert_won"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert summary["gradient_checkpointing"] is False  # follows train.gradient_checkpointing, not TRL's default (on)
    assert f"warm-up step {summary['optimizer_steps']}/{summary['optimizer_steps']}" in result.output
    assert not (tmp_path / "warm.partial").exists()

    config = tiny_config(tiny_model_dir, tmp_path, "rollout.max_turns=15")
    rows, _ = collect_demonstrations(config, load_tokenizer(config.model), environment_factory("household", {}), ["train-00500"], 15)
    before = mean_response_nll(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rows)
    warmed = AutoModelForCausalLM.from_pretrained(tmp_path / "warm")
    assert not any("lora" in name for name, _ in warmed.named_parameters())  # merged: a plain model
    assert mean_response_nll(warmed, rows) < before - 0.3  # nats per token, on a task it never saw

    again = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_an_environment_without_an_expert_is_refused(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path, "env.name=tests_envs:NoExpertEnv")
    with pytest.raises(WarmupError, match="no expert demonstrations"):
        collect_demonstrations(config, load_tokenizer(config.model), environment_factory(config.env.name, {}), ["train-00000"], 5)
