"""examples/custom_env.py: a plug-in environment written from scratch plays, and trains one step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_OVERRIDES, one_torch_thread

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def corridor(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from custom_env import KeyCorridorEnv

    return KeyCorridorEnv


def test_the_expert_plan_wins_every_task_in_its_length(corridor):
    env = corridor(length=5, num_train_tasks=30)
    for task_id in env.task_ids("train"):
        task, observation = env.reset(task_id)
        planned = len(observation.privileged.removeprefix("Expert plan from here: ").split(", "))
        for turn in range(planned):
            action = env.expert_action()
            assert action in observation.admissible_actions
            observation = env.step(action)
        assert (observation.done, observation.won, observation.reward) == (True, True, 1.0), task_id
        assert task.task_type == "corridor"


def test_same_task_same_puzzle_and_bad_input_is_refused(corridor):
    first, second = corridor(), corridor()
    assert first.reset("train-7")[1] == second.reset("train-7")[1]
    layouts = {corridor().reset(f"train-{i}")[1].privileged for i in range(20)}
    assert len(layouts) > 3
    with pytest.raises(ValueError, match="unknown task id"):
        first.reset("train-999")
    with pytest.raises(ValueError, match="unknown split"):
        first.task_ids("dev")
    first.reset("train-0")
    assert first.step("dance").text.startswith("Nothing happens")


def test_one_training_step_on_the_plugin(corridor, tiny_model_dir, tmp_path):
    from sdar_cli.cli import app

    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "train.max_steps=1", "rollout.max_turns=4"]
    args = ["train", str(EXAMPLES / "custom_env.yaml"), "--output-dir", str(tmp_path / "run")]
    with one_torch_thread():
        result = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    assert rows[0]["env_error_rate"] == 0.0
    assert 1.0 <= rows[0]["episode_turns_mean"] <= 4.0
    records = [json.loads(line) for line in (run / "gates" / "step-1.jsonl").read_text().splitlines()]
    assert {record["task_type"] for record in records} == {"corridor"}
    assert (run / "checkpoint-1" / "adapter_model.safetensors").is_file()
