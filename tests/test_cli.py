"""`sdar train` as a user runs it: run directory, errors with exit code 2, interrupt and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.run import METRIC_KEYS, forget_steps_after, latest_checkpoint

runner = CliRunner()


def tiny_args(model_dir: Path, *extra: str) -> list[str]:
    args = [f"model.name={model_dir}", *TINY_OVERRIDES, *extra]
    return [part for arg in args for part in ("--set", arg)]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, config_file, tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(run_dir), *tiny_args(tiny_model_dir)])
    return run_dir, result


def test_train_writes_a_complete_run_directory(finished_run):
    run_dir, result = finished_run
    assert result.exit_code == 0, result.output
    assert "Done: 2 steps" in result.output
    assert "step    1  reward" in result.output  # the one-line summary per step
    assert (run_dir / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        for key in ("reward_mean", "success_rate", "loss", "kl", "gate_mean", "gate_active_ratio", "step_seconds"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert 0.0 <= row["gate_mean"] <= 1.0 and 0.0 <= row["success_rate"] <= 1.0
    assert (run_dir / "checkpoint-1").is_dir() and (run_dir / "checkpoint-2").is_dir()
    assert not list(run_dir.glob(".staging-*"))


GATE_FILE_KEYS = [
    "step", "task_id", "task_type", "episode", "turn", "token_ids", "tokens", "student_logp", "teacher_logp", "gate",
    "mask", "advantage", "reward", "beta", "action", "valid", "teacher_placement", "teacher_context",
]


def test_every_recorded_gate_is_the_sigmoid_of_the_recorded_gap(finished_run):
    run_dir, _ = finished_run
    rows = {json.loads(line)["step"]: json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    for step in (1, 2):
        records = [json.loads(line) for line in (run_dir / "gates" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(records) == rows[step]["turn_samples"]
        all_gates = []
        for record in records:
            n = len(record["token_ids"])
            assert n == len(record["tokens"]) == len(record["gate"]) == len(record["student_logp"]) == len(record["mask"])
            assert record["step"] == step and record["beta"] == 5.0
            assert list(record) == GATE_FILE_KEYS  # the gates file format, key for key, as every version wrote it
            for t, s, g in zip(record["teacher_logp"], record["student_logp"], record["gate"]):
                assert g == pytest.approx(1 / (1 + math.exp(-5.0 * (t - s))), abs=1e-6)
            all_gates += record["gate"]
        assert sum(all_gates) / len(all_gates) == pytest.approx(rows[step]["gate_mean"], abs=1e-6)


def test_checkpoint_loads_with_plain_peft(finished_run, tiny_model_dir):
    run_dir, _ = finished_run
    checkpoint = run_dir / "checkpoint-2"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # the updates are in the adapter


def test_existing_run_directory_is_refused_without_resume(finished_run, config_file, tiny_model_dir):
    run_dir, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(run_dir), *tiny_args(tiny_model_dir)])
    assert result.exit_code == 2
    assert "already holds a run. Pass --resume" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.max_step=3"], "Did you mean 'train.max_steps'?"),
        (["--set", "rollout.temperature=hot"], "rollout.temperature: Input should be a valid number"),
        (["--set", "model.name=/no/such/model"], "Model folder /no/such/model does not exist"),
        (["--set", "model.load_in_4bit=true"], "needs a CUDA GPU"),
        (["--set", "env.name=nowhere.module:Env"], "cannot import module 'nowhere.module'"),
        (["--set", "env.name=tests_envs:MissingEngineEnv"], "Install it with: pip install 'sdar-cli[alfworld]'"),
        (["--set", "env.name=alfworld", "--set", "env.kwargs={data_path: /no/such/data}"], "alfworld-download"),
        (["--set", "teacher.skills.bank=/no/such/skills"], "neither a shipped bank"),
    ],
)
def test_user_mistakes_exit_2_without_a_traceback(tiny_model_dir, config_file, tmp_path, args, message):
    base = ["--set", f"model.name={tiny_model_dir}"]
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path / "r"), *base, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_missing_config_file_exits_2(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "Config file not found" in result.output


def test_env_errors_are_counted_and_training_goes_on(tiny_model_dir, config_file, tmp_path):
    # 4 train tasks, 4 tasks per step: every step plays each task once, and 1 of the 4 always fails
    run_dir = tmp_path / "flaky"
    result = runner.invoke(
        app,
        ["train", str(config_file), "--output-dir", str(run_dir),
         *tiny_args(tiny_model_dir, "env.name=tests_envs:FlakyEnv", "env.kwargs={num_train_tasks: 4}",
                    "train.max_steps=1", "rollout.tasks_per_step=4")],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["env_error_rate"] == 0.25


def test_resume_with_another_model_section_is_refused(finished_run, config_file, tiny_model_dir):
    run_dir, _ = finished_run
    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(run_dir), "--resume",
                                 *tiny_args(tiny_model_dir, "model.lora.r=8")])
    assert result.exit_code == 2
    assert "Cannot resume with changed settings that alter what the checkpoint was trained with: model.lora.r (4 -> 8)" in " ".join(result.output.split())


def test_forget_steps_after_drops_unsaved_steps(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    (tmp_path / "gates").mkdir()
    for s in (1, 2, 3, 4):
        (tmp_path / "gates" / f"step-{s}.jsonl").write_text("{}\n")
    forget_steps_after(tmp_path, 2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "gates").iterdir()) == ["step-1.jsonl", "step-2.jsonl"]


def test_ctrl_c_while_the_model_loads_exits_130_with_a_message(config_file, tiny_model_dir, tmp_path, monkeypatch):
    import sdar_cli.run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "load_base_model", interrupted)
    result = CliRunner().invoke(app, ["train", str(config_file), "--output-dir", str(tmp_path / "run"),
                                      "--set", f"model.name={tiny_model_dir}"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "Interrupted while starting (loading the model and environment): nothing was trained." in " ".join(result.output.split())
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_interrupt_checkpoints_and_resume_continues_without_gaps_or_repeats(tiny_model_dir, config_file, tmp_path):
    run_dir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "sdar_cli", "train", str(config_file), "--output-dir", str(run_dir),
               *tiny_args(tiny_model_dir, "train.max_steps=4", "train.save_steps=10")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 130, output
    assert "checkpoint written at step" in output and "--resume" in output
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 4
    assert latest_checkpoint(run_dir).name == f"checkpoint-{done}"  # save_steps=10: written by the interrupt

    result = runner.invoke(app, ["train", str(config_file), "--output-dir", str(run_dir), "--resume",
                                 *tiny_args(tiny_model_dir, "train.max_steps=4", "train.save_steps=10")])
    assert result.exit_code == 0, result.output
    assert f"(step {done})" in result.output and "Resuming from" in result.output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert latest_checkpoint(run_dir).name == "checkpoint-4"
    assert sorted(int(p.stem.split("-")[1]) for p in (run_dir / "gates").glob("step-*.jsonl")) == [1, 2, 3, 4]


def test_training_warns_once_when_responses_run_out_of_new_tokens():
    from rich.console import Console

    from sdar_cli.run import ProgressDisplay

    console = Console(record=True, width=200)
    display = ProgressDisplay(console, total_steps=3)
    display.summary({"step": 1, "truncated_response_rate": 0.1})
    assert "max_new_tokens" not in console.export_text(clear=False)
    display.summary({"step": 2, "truncated_response_rate": 0.45})
    display.summary({"step": 3, "truncated_response_rate": 0.9})
    text = console.export_text()
    assert text.count("raise rollout.max_new_tokens") == 1 and "45% of step 2's responses" in text
