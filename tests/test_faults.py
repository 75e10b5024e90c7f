"""The fault catalogue: what a careless user, a broken environment or a full disk does to a run.

Each case runs `sdar` on the tiny model and checks four things: the exit code, a message fragment that says
what happened or what to do, no traceback, and what is on disk afterwards (steps once each, checkpoints
whole, config.yaml as expected). README "Interrupt, resume, faults" lists the guarantees proved here.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import TINY_OVERRIDES, one_torch_thread
from typer.testing import CliRunner

from sdar_cli.cli import app
from sdar_cli.resume import CONFIG_CHANGES_FILE, checkpoint_problem

runner = CliRunner()
TESTS = Path(__file__).parent


@dataclass
class Ctx:
    """Where a case runs: `root` is its working directory, `run` its run directory."""

    root: Path
    model: Path
    config: Path
    finished: Path  # a finished 2-step run (checkpoint-1 and checkpoint-2), copied by cases that change it
    held: list = field(default_factory=list)  # files a case keeps open (a lock) while the command runs

    @property
    def run(self) -> Path:
        return self.root / "run"

    def train(self, *sets: str, run: Path | None = None, resume: bool = False, config: Path | None = None) -> list[str]:
        args = ["train", str(config or self.config), "--output-dir", str(run or self.run), *(["--resume"] if resume else [])]
        return args + [part for s in (f"model.name={self.model}", *TINY_OVERRIDES, *sets) for part in ("--set", s)]

    def copy_finished(self) -> Path:
        shutil.copytree(self.finished, self.run)
        return self.run


@dataclass
class Case:
    id: str
    command: Callable[[Ctx], list[str]]  # prepares the disk, returns the arguments of `sdar`
    code: int
    says: str
    after: Callable[[Ctx], None] = field(default=lambda ctx: None)


# --------------------------------------------------------------------------------------- disk checks
def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))


def whole(run: Path, *numbers: int) -> None:
    for number in numbers:
        assert checkpoint_problem(run / f"checkpoint-{number}") is None, number
    assert not list(run.glob(".staging-*")) and not list(run.glob(".retired-*"))


def trained(expected_steps: list[int], expected_checkpoints: list[int]) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert steps(ctx.run) == expected_steps
        assert checkpoints(ctx.run) == expected_checkpoints
        whole(ctx.run, *expected_checkpoints)

    return check


def nothing_written(ctx: Ctx) -> None:
    assert not ctx.run.exists()


def metrics_unchanged(ctx: Ctx) -> None:
    assert steps(ctx.run) == [1, 2]


def truncated_prompts_per_step(ctx: Ctx) -> None:
    """Every prompt is cut at 16 tokens: 4 episodes x 3 turns = 12 in each step (not 12, then 24)."""
    rows = [json.loads(line) for line in (ctx.run / "metrics.jsonl").read_text().splitlines()]
    assert [row["truncated_prompts"] for row in rows] == [12.0, 12.0]


def first_row(ctx: Ctx) -> dict:
    return json.loads((ctx.run / "metrics.jsonl").read_text().splitlines()[0])


# ------------------------------------------------------------------------------------ case helpers
def cut(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def damaged_latest(damage: Callable[[Path], None]) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        damage(ctx.copy_finished() / "checkpoint-2")
        return ctx.train(resume=True)

    return command


def env_fault(fault: str, *sets: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.train("env.name=tests_envs:FaultyEnv", f"env.kwargs={{num_train_tasks: 2, fault: {fault}}}",
                                 "train.max_steps=1", *sets)


def failed_half_and_not_trained(ctx: Ctx) -> None:
    """2 tasks x 2 episodes, train-00001's 2 fail: counted, and their turns are not trained on (the other
    two episodes play 3 turns each: 6 turn-samples, and as many gate records)."""
    row = first_row(ctx)
    assert row["env_error_rate"] == 0.5
    assert row["turn_samples"] == 6
    assert len((ctx.run / "gates" / "step-1.jsonl").read_text().splitlines()) == 6
    whole(ctx.run, 1)


def with_lock_held(ctx: Ctx) -> list[str]:
    ctx.copy_finished()
    handle = (ctx.run / ".lock").open("a")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `sdar train` of this run holds it
    ctx.held.append(handle)
    return ctx.train("train.max_steps=3", resume=True)


def changed(*sets: str) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        ctx.copy_finished()
        return ctx.train(*sets, resume=True)

    return command


def written_by_older_sdar(*sets: str) -> Callable[[Ctx], list[str]]:
    """A run whose config.yaml predates teacher.placement (an sdar version without that key)."""
    def command(ctx: Ctx) -> list[str]:
        saved = yaml.safe_load((ctx.copy_finished() / "config.yaml").read_text())
        del saved["teacher"]["placement"]
        (ctx.run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        return ctx.train(*sets, resume=True)

    return command


def new_key_recorded(ctx: Ctx) -> None:
    trained([1, 2, 3], [1, 2, 3])(ctx)
    [line] = (ctx.run / CONFIG_CHANGES_FILE).read_text().splitlines()
    assert json.loads(line)["changes"]["teacher.placement"] == {"from": None, "to": "prefix"}


def safe_changes_recorded(ctx: Ctx) -> None:
    trained([1, 2, 3], [1, 2, 3])(ctx)
    saved = yaml.safe_load((ctx.run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["output"]["save_gates"] is False
    [line] = (ctx.run / CONFIG_CHANGES_FILE).read_text().splitlines()
    assert json.loads(line) == {
        "resumed_from_step": 2,
        "changes": {
            "output.dir": {"from": str(ctx.finished), "to": str(ctx.run)},  # the copied run moved
            "output.save_gates": {"from": True, "to": False},
            "train.max_steps": {"from": 2, "to": 3},
        },
    }


def refused_unchanged(ctx: Ctx) -> None:
    trained([1, 2], [1, 2])(ctx)
    assert yaml.safe_load((ctx.run / "config.yaml").read_text())["algorithm"]["name"] == "sdar"
    assert not (ctx.run / CONFIG_CHANGES_FILE).exists()


def full_disk() -> str:
    """/dev/full: every write fails with ENOSPC. Reached only through links, so nothing can replace it."""
    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("/dev/full is not the full device here")
    return "/dev/full"


def full_disk_at_step_2(ctx: Ctx) -> list[str]:
    run = ctx.copy_finished()
    shutil.rmtree(run / "checkpoint-2")
    (run / "gates" / "step-2.jsonl").unlink()
    (run / "gates" / "step-2.jsonl.tmp").symlink_to(full_disk())  # writing step 2's gates hits a full disk
    return ctx.train(resume=True)


def full_disk_in_checkpoint_write(ctx: Ctx) -> list[str]:
    """The optimizer state of checkpoint-2 is written to a full disk (/dev/full, behind a staging folder that is
    a link): torch.save fails part-way."""
    run = ctx.copy_finished()
    shutil.rmtree(run / "checkpoint-2")
    trap = ctx.root / "trap"
    (trap / "checkpoint-2").mkdir(parents=True)
    (trap / "checkpoint-2" / "optimizer.pt").symlink_to(full_disk())
    (run / ".staging-checkpoint-2").symlink_to(trap)
    return ctx.train(resume=True)


def checkpoint_1_only(ctx: Ctx) -> None:
    assert checkpoints(ctx.run) == [1] and checkpoint_problem(ctx.run / "checkpoint-1") is None


def torn_metrics(ctx: Ctx) -> list[str]:
    """Killed while writing step 2's metrics line, before checkpoint-2."""
    run = ctx.copy_finished()
    shutil.rmtree(run / "checkpoint-2")
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 40])
    return ctx.train(resume=True)


def no_checkpoint_yet(ctx: Ctx) -> list[str]:
    ctx.run.mkdir()
    shutil.copy(ctx.finished / "config.yaml", ctx.run / "config.yaml")
    return ctx.train("train.max_steps=1", resume=True)


def plugin(source: str) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        (ctx.root / "broken_plugin.py").write_text(source)
        sys.modules.pop("broken_plugin", None)
        return ctx.train("env.name=broken_plugin:Env")

    return command


def truncated_model(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.model, ctx.root / "model")
    cut(ctx.root / "model" / "model.safetensors", 0.3)
    return [*ctx.train(), "--set", f"model.name={ctx.root / 'model'}"]


def eval_run(*extra: str, damage: tuple[int, ...] = (2,)) -> Callable[[Ctx], list[str]]:
    def command(ctx: Ctx) -> list[str]:
        run = ctx.copy_finished()
        for number in damage:
            cut(run / f"checkpoint-{number}" / "adapter_model.safetensors")
        return ["eval", str(run), "--episodes", "2", "--set", "rollout.max_turns=2", *extra]

    return command


def gates_with_damaged_other_step(ctx: Ctx) -> list[str]:
    run = ctx.copy_finished()
    cut(run / "gates" / "step-2.jsonl", 0.6)
    return ["inspect-gates", str(run), "--step", "1", "--limit", "1"]


def under_a_file(ctx: Ctx) -> Path:
    (ctx.root / "afile").write_text("")
    return ctx.root / "afile" / "sub"


CASES = [
    # 1. --resume never trains past train.max_steps
    Case("resume-finished-run", lambda ctx: (ctx.copy_finished(), ctx.train(resume=True))[1], 0,
         "Nothing to train", trained([1, 2], [1, 2])),
    Case("resume-below-max-steps", lambda ctx: (ctx.copy_finished(), ctx.train("train.max_steps=1", resume=True))[1],
         0, "already at step 2 and train.max_steps is 1", trained([1, 2], [1, 2])),
    # 2. an environment's bad reward, text or action list fails its episode, counted, not trained on
    Case("env-text-reward", env_fault("text_reward"), 0, "reward must be a finite number, got 'high'",
         failed_half_and_not_trained),
    Case("env-nan-reward", env_fault("nan_reward"), 0, "reward must be a finite number, got nan", failed_half_and_not_trained),
    Case("env-inf-reward", env_fault("inf_reward"), 0, "reward must be a finite number, got inf", failed_half_and_not_trained),
    Case("env-reset-nan-reward", env_fault("reset_nan_reward"), 0, "reward must be a finite number",
         failed_half_and_not_trained),
    Case("env-int-actions", env_fault("int_actions"), 0, "admissible_actions must be a list of strings",
         failed_half_and_not_trained),
    Case("env-no-text", env_fault("no_text"), 0, "observation text is a NoneType", failed_half_and_not_trained),
    Case("env-expert-raises", env_fault("expert_raises", "teacher.context=next_action"), 0,
         "failed in the environment (counted in env_error_rate): the expert crashed", failed_half_and_not_trained),
    # 7. a hanging environment call fails its episode after its timeout
    Case("env-step-hangs", env_fault("step_hang", "env.step_timeout_s=0.3"), 0, "took longer than 0.3 s (env.step_timeout_s)",
         failed_half_and_not_trained),
    Case("env-reset-hangs", env_fault("reset_hang", "env.reset_timeout_s=0.3"), 0,
         "took longer than 0.3 s (env.reset_timeout_s)", failed_half_and_not_trained),
    # 3. a damaged latest checkpoint: resume from the newest whole one
    Case("cut-adapter", damaged_latest(lambda c: cut(c / "adapter_model.safetensors")), 0,
         "resuming from checkpoint-1", trained([1, 2], [1, 2])),
    Case("missing-adapter", damaged_latest(lambda c: (c / "adapter_model.safetensors").unlink()), 0,
         "adapter_model.safetensors is missing", trained([1, 2], [1, 2])),
    Case("cut-optimizer", damaged_latest(lambda c: cut(c / "optimizer.pt")), 0, "optimizer.pt is cut off",
         trained([1, 2], [1, 2])),
    Case("cut-trainer-state", damaged_latest(lambda c: cut(c / "trainer_state.json")), 0,
         "trainer_state.json is not valid JSON", trained([1, 2], [1, 2])),
    Case("no-whole-checkpoint",
         damaged_latest(lambda c: [cut(c.parent / f"checkpoint-{n}" / "optimizer.pt") for n in (1, 2)]), 2,
         "Delete the damaged checkpoint-N folders", metrics_unchanged),
    Case("torn-metrics-line", torn_metrics, 0, "Resuming from", trained([1, 2], [1, 2])),
    Case("empty-config-yaml", lambda ctx: ((ctx.copy_finished() / "config.yaml").write_text(""), ctx.train(resume=True))[1],
         2, "delete it to resume with the config you pass now", trained([1, 2], [1, 2])),
    # 4. one process per run directory
    Case("run-locked", with_lock_held, 2, "in use by another sdar process", trained([1, 2], [1, 2])),
    # 5. values that cannot work are refused before anything is written
    Case("negative-seed", lambda ctx: ctx.train("train.seed=-1"), 2, "train.seed", nothing_written),
    Case("context-template-placeholder", lambda ctx: ctx.train("teacher.context_template='{context} {skills}'"), 2,
         "teacher.context_template: {context} is its only placeholder", nothing_written),
    Case("prompt-template-braces", lambda ctx: ctx.train("rollout.prompt_template='{task} {} {observation}'"), 2,
         "rollout.prompt_template cannot be filled in", nothing_written),
    Case("lora-target-missing", lambda ctx: ctx.train("model.lora.target_modules=[q_proj, c_attn]"), 2,
         "does not have: c_attn", nothing_written),
    Case("chat-template-broken", lambda ctx: ctx.train("model.chat_template='{% if %}'"), 2,
         "model.chat_template cannot render a conversation", nothing_written),
    Case("infinite-learning-rate", lambda ctx: ctx.train("train.learning_rate=.inf"), 2, "train.learning_rate",
         nothing_written),
    # 6. resume refuses changes that alter what was trained, records the safe ones
    Case("resume-changed-algorithm", changed("algorithm.name=grpo"), 2, "algorithm.name ('sdar' -> 'grpo')",
         refused_unchanged),
    Case("resume-changed-group-size", changed("rollout.group_size=4", "train.max_steps=3"), 2, "rollout.group_size (2 -> 4)",
         refused_unchanged),
    Case("resume-safe-changes", changed("train.max_steps=3", "output.save_gates=false"), 0, "Done: 3 steps",
         safe_changes_recorded),
    Case("resume-older-run-new-key-at-default", written_by_older_sdar("train.max_steps=3"), 0, "Done: 3 steps",
         new_key_recorded),
    Case("resume-older-run-new-key-changed", written_by_older_sdar("teacher.placement=user_end", "train.max_steps=3"), 2,
         "teacher.placement (None -> 'user_end')", trained([1, 2], [1, 2])),
    # 8. I/O errors: exit 2, what happened, what to do
    Case("output-under-a-file", lambda ctx: ctx.train(run=under_a_file(ctx)), 2, "choose another --output-dir"),
    Case("disk-full-mid-run", full_disk_at_step_2, 2, "No space left on device", trained([1], [1])),
    Case("disk-full-in-checkpoint", full_disk_in_checkpoint_write, 2, "writing checkpoint-2 into", checkpoint_1_only),
    Case("binary-config", lambda ctx: ((ctx.root / "c.yaml").write_bytes(b"\x89PNG\r\n\x00\xff\xfe"), ctx.train(config=ctx.root / "c.yaml"))[1],
         2, "is not a text file", nothing_written),
    Case("plugin-raises-at-import", plugin("raise RuntimeError('needs a licence key')\n"), 2,
         "RuntimeError: needs a licence key", nothing_written),
    Case("plugin-syntax-error", plugin("class Env(:\n"), 2, "SyntaxError", nothing_written),
    Case("truncated-model", truncated_model, 2, "damaged or cut off. Copy or download the model again", nothing_written),
    Case("eval-json-under-a-file", lambda ctx: ["eval", "nowhere", "--json", str(under_a_file(ctx) / "r.json")], 2,
         "checked before playing"),
    # 3. (eval) the newest whole checkpoint, or a clear error
    Case("eval-damaged-latest", eval_run(), 0, "evaluating checkpoint-1, the newest whole checkpoint"),
    Case("eval-no-whole-checkpoint", eval_run(damage=(1, 2)), 2, "has no whole checkpoint-N/"),
    # 9. inspect-gates reads only the step asked for
    Case("gates-other-step-damaged", gates_with_damaged_other_step, 0, "step 1"),
    # 10. smaller ones
    Case("config-is-a-directory", lambda ctx: ctx.train(config=ctx.root), 2, "is a directory, not a config file"),
    Case("misspelled-eval-target", lambda ctx: ((ctx.root / "runs").mkdir(), ["eval", "runs/quickstrat"])[1], 2,
         "runs/quickstrat does not exist"),
    Case("missing-model-folder", lambda ctx: [*ctx.train(), "--set", "model.name=./no-such-model"], 2,
         "Model folder ./no-such-model does not exist", nothing_written),
    Case("resume-without-checkpoint", no_checkpoint_yet, 0, "has no checkpoint yet, so training starts from step 0",
         trained([1], [1])),
    Case("truncated-prompts-per-step", lambda ctx: ctx.train("rollout.max_prompt_tokens=16"), 0, "Done: 2 steps",
         truncated_prompts_per_step),
    # save_total_limit applies to the run directory
    Case("save-total-limit", lambda ctx: ctx.train("output.save_total_limit=1"), 0, "Done: 2 steps", trained([1, 2], [2])),
]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, config_file, tmp_path_factory) -> Path:
    ctx = Ctx(tmp_path_factory.mktemp("finished"), tiny_model_dir, config_file, Path())
    with one_torch_thread():
        result = runner.invoke(app, ctx.train())
    assert result.exit_code == 0, result.output
    return ctx.run


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_fault(case, tiny_model_dir, config_file, finished, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = Ctx(tmp_path, tiny_model_dir, config_file, finished)
    args = case.command(ctx)
    try:
        with one_torch_thread():
            result = runner.invoke(app, args)
    finally:
        for handle in ctx.held:
            handle.close()
    assert result.exit_code == case.code, result.output
    shown = result.output + caplog.text  # warnings of the rollout reach the terminal through logging
    assert case.says in " ".join(shown.split()), shown
    assert "Traceback" not in shown
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    case.after(ctx)


# ------------------------------------------------------------------------ faults that need a second process
def sdar_process(ctx: Ctx, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdar_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])})


def wait_for(condition: Callable[[], bool], seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_a_second_process_is_refused_while_the_first_trains_and_a_killed_one_leaves_no_stale_lock(
    tiny_model_dir, config_file, finished, tmp_path
):
    ctx = Ctx(tmp_path, tiny_model_dir, config_file, finished)
    ctx.copy_finished()
    first = sdar_process(ctx, *ctx.train("train.max_steps=40", "train.save_steps=1", resume=True))
    try:
        wait_for(lambda: (ctx.run / "checkpoint-3").is_dir())
        with one_torch_thread():
            second = runner.invoke(app, ctx.train("train.max_steps=40", resume=True))
        assert second.exit_code == 2, second.output
        assert "in use by another sdar process" in " ".join(second.output.split())
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    done = checkpoints(ctx.run)[-1]
    with one_torch_thread():
        resumed = runner.invoke(app, ctx.train(f"train.max_steps={done + 1}", resume=True))
    assert resumed.exit_code == 0, resumed.output
    assert steps(ctx.run) == list(range(1, done + 2))  # every step once, none from both processes
    whole(ctx.run, done + 1)


def test_sigterm_while_an_environment_call_hangs_says_what_it_waits_for(tiny_model_dir, config_file, tmp_path):
    ctx = Ctx(tmp_path, tiny_model_dir, config_file, Path())
    process = sdar_process(ctx, *ctx.train("env.name=tests_envs:FaultyEnv", "env.kwargs={num_train_tasks: 2, fault: reset_hang}",
                                           "env.reset_timeout_s=1", "train.max_steps=20"))
    lines: list[str] = []
    try:
        while not any(line.startswith("step ") for line in lines):  # step 1 done; the next resets hang
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        started = time.time()
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    output = "".join(lines) + output
    assert process.returncode == 130, output
    assert "SIGTERM received: finishing this step (environment calls time out after env.step_timeout_s=300 s, " \
           "env.reset_timeout_s=1 s)" in " ".join(output.split())
    assert time.time() - started < 60
    assert "Traceback" not in output
    last = checkpoints(ctx.run)[-1]
    assert steps(ctx.run) == list(range(1, last + 1)) and last < 20
    whole(ctx.run, last)


def test_ctrl_c_in_eval_says_what_it_waits_for_and_a_second_exits_at_once(tiny_model_dir, config_file, finished, tmp_path):
    ctx = Ctx(tmp_path, tiny_model_dir, config_file, finished)
    process = sdar_process(ctx, "eval", str(finished), "--episodes", "2", "--set", "env.name=tests_envs:FaultyEnv",
                           "--set", "env.kwargs={fault: reset_hang, task: all, hang_s: 120}")
    lines: list[str] = []
    try:
        for expected in ("hanging for 120", "SIGINT received: stopping the evaluation"):
            while not any(expected in line for line in lines):
                line = process.stdout.readline()
                assert line, "".join(lines)
                lines.append(line)
                if expected.startswith("hanging") and expected in line:
                    process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)  # the reset still hangs: only the second Ctrl-C ends it
    finally:
        process.kill()
    output = "".join(lines) + output
    assert process.returncode == 130, output
    assert "once the environment calls in progress return (each waits at most env.step_timeout_s)" in " ".join(output.split())
    assert "Traceback" not in output
