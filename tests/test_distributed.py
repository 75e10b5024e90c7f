"""`sdar train` as several processes (torchrun, 2 CPU ranks over gloo) does the math of one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from typer.testing import CliRunner

from sdar_cli.cli import app

TESTS = Path(__file__).parent
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _environment() -> dict[str, str]:
    """The subprocesses import this checkout and the tests' plugin environments, on one torch thread each."""
    paths = [str(TESTS), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _worker(model_dir: Path, root: Path, launch: list[str], overrides: list[str]) -> dict:
    out = root / f"out-{len(launch)}.json"
    command = [*launch, str(TESTS / "distributed_worker.py"), str(model_dir), str(root), str(out)]
    result = subprocess.run(
        command + [part for o in overrides for part in ("--set", o)],
        env=_environment(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_give_the_loss_and_lora_gradient_of_one_process(tiny_model_dir, tmp_path):
    # 4 tasks x 2 episodes of 1-3 turns each (rank 0 gets 10 turn-samples, rank 1 gets 6), two micro-batches;
    # the entropy bonus is off: TRL takes it as a mean per micro-batch, so it depends on how rows are split
    overrides = ["rollout.tasks_per_step=4", "train.micro_batches=2", "algorithm.entropy_coef=0", "algorithm.sdar_coef=0.5"]
    one = _worker(tiny_model_dir, tmp_path, [sys.executable], overrides)
    two = _worker(tiny_model_dir, tmp_path, LAUNCH, overrides)

    # the step's tasks are split as whole groups, with the episode ids of the one-process run
    assert [tuple(e) for rank in two["played"] for e in rank] == [tuple(e) for e in one["played"][0]]
    assert [len(rank) for rank in two["played"]] == [4, 4]
    assert sum(e[2] for e in two["played"][0]) != sum(e[2] for e in two["played"][1])  # unequal sample counts

    # a NaN loss on rank 0 alone skips the update on both ranks, so their adapters stay equal
    assert two["nonfinite"] == [{"weights_unchanged": True, "nonfinite_total": 1}] * 2
    assert one["nonfinite"] == [{"weights_unchanged": True, "nonfinite_total": 1}]

    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["gradient"].keys() == two["gradient"].keys()
    largest = max(abs(g) for values in one["gradient"].values() for g in values)
    assert largest > 1e-3  # a real gradient, not zeros
    for name, values in one["gradient"].items():
        assert two["gradient"][name] == pytest.approx(values, abs=1e-5 * largest), name


def _train_args(model_dir: Path, run_dir: Path, max_steps: int, *extra: str) -> list[str]:
    overrides = [
        f"model.name={model_dir}", *TINY_OVERRIDES, "env.name=tests_envs:ShortEpisodesEnv", f"train.max_steps={max_steps}"
    ]
    return ["-m", "sdar_cli", "train", str(run_dir.parent / "run.yaml"), "--output-dir", str(run_dir),
            *[part for o in overrides for part in ("--set", o)], *extra]


def _rank_process(launcher: subprocess.Popen, rank: int):
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "sdar_cli" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_two_ranks_train_stop_on_one_ranks_signal_and_resume(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    (tmp_path / "run.yaml").write_text("algorithm:\n  name: sdar\n")
    first = subprocess.run(
        [*LAUNCH, *_train_args(tiny_model_dir, run_dir, 2)], env=_environment(), capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("step    1 ") == 1 and first.stdout.count("Done: 2 steps") == 1  # the main rank speaks

    # resume on 2 ranks with a higher max_steps; SIGTERM to rank 1 alone, once step 3 is logged, stops both
    launcher = subprocess.Popen(
        [*LAUNCH, *_train_args(tiny_model_dir, run_dir, 40, "--resume")],
        env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 240
    while 3 not in _metrics_steps(run_dir) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    rank_1 = _rank_process(launcher, 1)
    assert rank_1 is not None
    rank_1.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=240)
    assert "Resuming from" in output and "checkpoint-2" in output
    assert "Interrupted: checkpoint written at step" in output, output[-3000:]

    steps = _metrics_steps(run_dir)
    last = steps[-1]
    assert 3 <= last < 40
    assert steps == list(range(1, last + 1))  # one row per step, every step once
    episodes_per_step = 4
    for step in range(1, last + 1):
        gates = [json.loads(line) for line in (run_dir / "gates" / f"step-{step}.jsonl").read_text().splitlines()]
        # every episode of the step, with global ids, each with all of its turns (task n lasts n % 3 + 1 turns)
        assert sorted({g["episode"] for g in gates}) == list(range((step - 1) * episodes_per_step, step * episodes_per_step))
        for episode in {g["episode"] for g in gates}:
            turns = sorted(g["turn"] for g in gates if g["episode"] == episode)
            task = next(g["task_id"] for g in gates if g["episode"] == episode)
            assert turns == list(range(int(task.split("-")[1]) % 3 + 1))
        checkpoint = run_dir / f"checkpoint-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "optimizer.pt"} <= {
            p.name for p in checkpoint.iterdir()
        }
        assert json.loads((checkpoint / "sdar_state.json").read_text())["episodes_played"] == step * episodes_per_step
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
    assert not list(run_dir.glob(".staging-*")) and not list(run_dir.glob(".retired-*"))

    # the main process's verdict on the run directory is every process's: both exit 2, the message printed once
    again = subprocess.run(
        [*LAUNCH, *_train_args(tiny_model_dir, run_dir, 2)], env=_environment(), capture_output=True, text=True, timeout=300
    )
    assert (again.stdout + again.stderr).count("already holds a run") == 1
    assert "exitcode  : 2" in again.stderr and "Traceback (most recent call last)" not in again.stdout
    assert _metrics_steps(run_dir) == steps  # nothing was changed


def test_tasks_per_step_must_split_over_the_processes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    (tmp_path / "run.yaml").write_text("algorithm:\n  name: sdar\n")
    args = _train_args(tiny_model_dir, tmp_path / "run", 2)[2:]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "rollout.tasks_per_step (2) must be divisible by the number of processes (3)" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["eval", "runs/x"], ["inspect-gates", "runs/x"]])
def test_single_process_commands_refuse_several(command, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert f"sdar {command[0]} runs in one process" in result.output and "Traceback" not in result.output


def test_rows_are_padded_to_the_count_of_the_largest_process():
    import torch

    from sdar_cli.batching import collate_turn_samples
    from sdar_cli.rollout import TurnSample

    samples = [
        TurnSample("t", "x", 0, 0, turn, [5, 6, 7], [9, 5, 6, 7], [8] * (turn + 1), "a", True, False, "", 1.0)
        for turn in range(3)
    ]
    batch = collate_turn_samples(samples, torch.ones(3), 0, 2, True, min_rows=6)
    assert batch["completion_ids"].shape[0] == 6
    assert batch["sample_index"].tolist() == [0, 1, 2, -1, -1, -1]
    assert batch["completion_mask"][3:].sum() == 0 and int(batch["num_items_in_batch"]) == 6
    # a process whose episodes all failed: padding rows only, nothing counted, every row attends a token
    empty = collate_turn_samples([], torch.zeros(0), 0, 2, True, min_rows=4)
    assert empty["completion_ids"].shape[0] == 4 and empty["sample_index"].tolist() == [-1] * 4
    assert int(empty["num_items_in_batch"]) == 0 and int(empty["num_samples_in_batch"]) == 0
    assert bool((empty["prompt_mask"].sum(-1) > 0).all())
