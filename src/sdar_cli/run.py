"""One training run: the run directory, the trainer, and what the user sees while it trains.

Run directory:
    config.yaml            the resolved config
    metrics.jsonl          one JSON object per step
    gates/step-N.jsonl     per-token gate records (sdar, grpo_opsd, opsd)
    checkpoint-N/          a PEFT adapter (plain `PeftModel.from_pretrained` loads it) + resume state
    config-changes.jsonl   the settings each resume changed (see resume.py)
    .lock                  held (flock) by the process training the run
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from transformers import TrainerCallback

from . import distributed
from .atomic import write_text
from .config import EnvSettings, RunConfig
from .envs import environment_factory, environment_split
from .models import check_lora_targets, load_base_model, load_model_config, load_tokenizer, pick_device, pick_dtype
from .progress import progress_bar
from .resume import (
    LOCK_FILE,
    RunInUse,
    changed_settings,
    checkpoint_problem,
    flat_settings,
    is_safe_change,
    record_changes,
    run_lock,
)
from .rundir import CONFIG_FILE, GATES_DIR, METRICS_FILE
from .trainer import SDARTrainer, TrainingAborted, grpo_args

#: always present in every metrics.jsonl row, null where the algorithm has no such quantity
METRIC_KEYS = (
    "step",
    "reward_mean",
    "success_rate",
    "episode_turns_mean",
    "invalid_action_rate",
    "env_error_rate",
    "loss",
    "kl",
    "gate_mean",
    "gate_active_ratio",
    "teacher_gap_mean",
    "step_seconds",
    "tokens_per_second",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to do."""


@dataclass
class TrainOutcome:
    exit_code: int
    message: str
    last_step: int


def latest_checkpoint(run_dir: Path, skipped: list[tuple[Path, str]] | None = None) -> Path | None:
    """The whole checkpoint with the highest step (staging folders never match the name); each newer one
    that is damaged is appended to `skipped` with what is wrong with it."""
    found = sorted(((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(_CHECKPOINT.match(checkpoint.name).group(1))


def prepare_run_dir(run_dir: Path, resume: bool, console: Console | None = None) -> Path | None:
    """Check the run directory, changing nothing; return the checkpoint to resume from (None: a fresh start).
    Damaged checkpoints newer than it are named on `console`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"Run directory {run_dir} exists and is a file. Choose another --output-dir.")
    in_use = run_dir.is_dir() and any(path.name != LOCK_FILE for path in run_dir.iterdir())
    if in_use and not resume:
        raise RunDirError(
            f"Run directory {run_dir} already holds a run. Pass --resume to continue it, or choose another "
            "--output-dir (nothing was changed)."
        )
    if not (resume and in_use):
        return None
    skipped: list[tuple[Path, str]] = []
    checkpoint = latest_checkpoint(run_dir, skipped)
    if checkpoint is None and skipped:
        raise RunDirError(
            f"No whole checkpoint in {run_dir} to resume from ({'; '.join(f'{p.name}: {why}' for p, why in skipped)}). "
            "Delete the damaged checkpoint-N folders to start the run over, or choose another --output-dir."
        )
    if console is not None:
        for path, problem in skipped:
            console.print(f"[yellow]Warning:[/yellow] {escape(str(path))} is damaged ({problem}); resuming from "
                          f"{checkpoint.name}, the newest whole checkpoint.", highlight=False, soft_wrap=True)
        if checkpoint is None:
            console.print(f"[yellow]Warning:[/yellow] --resume: {escape(str(run_dir))} has no checkpoint yet, so training starts "
                          "from step 0.", highlight=False, soft_wrap=True)
    return checkpoint


def forget_steps_after(run_dir: Path, step: int) -> None:
    """Drop metrics rows and gate files of steps after `step`: they are re-done on resume, never duplicated."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        lines = metrics.read_text(errors="replace").splitlines()
        kept = [line for line in lines if (number := _metrics_step(line)) is not None and number <= step]
        write_text(metrics, "".join(line + "\n" for line in kept))  # whole: a kill here loses no row
    gates = run_dir / GATES_DIR
    if gates.is_dir():
        for path in gates.glob("step-*.jsonl"):
            if int(path.stem.split("-")[1]) > step:
                path.unlink()


def _metrics_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut off by a kill (that step is re-done)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def check_resumable(config: RunConfig, saved_config: Path) -> dict[str, tuple[Any, Any]]:
    """The settings that differ from the run's config.yaml ({key: (old, new)}), all of them safe to change
    on resume (resume.SAFE_TO_CHANGE); RunDirError naming the others, which would change what the steps
    already trained mean (the model, the algorithm, the rollout, the environment's tasks)."""
    if not saved_config.is_file():
        return {}
    saved = read_saved_config(saved_config)
    changes = changed_settings(saved, config.model_dump(mode="json"))
    if refused := refused_changes(saved, changes):
        listed = describe_changes(refused)
        raise RunDirError(
            f"Cannot resume with changed settings that alter what the checkpoint was trained with: {listed}. Use the "
            f"values in {saved_config}, or train with these settings in a new --output-dir. (Settings a resume may change: "
            "train.max_steps, save_steps, report_to, device, logprob_batch_size, max_nonfinite_updates; output.*, eval.*, "
            "warmup.*, env.workers, env timeouts.)"
        )
    return changes


def read_saved_config(saved_config: Path) -> dict[str, Any]:
    """A run's config.yaml as written; RunDirError when it is empty or damaged."""
    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or not saved:
        raise RunDirError(
            f"{saved_config} is empty or damaged, so the settings this run was trained with are unknown. Restore it "
            "(e.g. from your config file and --set overrides), or delete it to resume with the config you pass now."
        )
    return saved


def refused_changes(saved: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """Of `changes` to a run's saved settings, those a resume must refuse: outside resume.SAFE_TO_CHANGE, and
    not a key the run's sdar version did not know yet left at its default (what a newer sdar adds keeps the
    earlier behaviour by default; set to anything else, it is a change like any other)."""
    written = flat_settings(saved)
    defaults = flat_settings(RunConfig().model_dump(mode="json"))
    return {
        key: (old, new) for key, (old, new) in changes.items()
        if not is_safe_change(key) and (key in written or key not in defaults or new != defaults[key])
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({old!r} -> {new!r})" for key, (old, new) in changes.items())


def _open_run_dir(
    config: RunConfig, run_dir: Path, resume: bool, console: Console, held: contextlib.ExitStack
) -> tuple[Path | None, dict[str, tuple[Any, Any]]]:
    """Lock the run directory (until `held` closes) and check it, changing nothing: the checkpoint to resume
    from (None: a fresh start) and the settings changed since it (all of them safe to change)."""
    prepare_run_dir(run_dir, resume)  # refused before the lock creates the directory
    try:
        held.enter_context(run_lock(run_dir))
    except RunInUse as err:
        raise RunDirError(
            f"Run directory {run_dir} is in use by another sdar process ({err}). Wait for it to finish or stop it "
            "(Ctrl-C), then run this again: two processes training one run would mix their steps."
        ) from None
    checkpoint = prepare_run_dir(run_dir, resume, console)
    return checkpoint, (check_resumable(config, run_dir / CONFIG_FILE) if checkpoint else {})


def _open_run_dir_on_main(
    config: RunConfig, run_dir: Path, resume: bool, console: Console, held: contextlib.ExitStack
) -> tuple[Path | None, dict[str, tuple[Any, Any]]]:
    """Several processes: only the main one locks and checks the run directory (the others would see the
    files it writes as an existing run); the others wait and take its answer, or the same error."""
    answer: tuple[str, Any] = ("opened", (None, {}))
    failure: Exception | None = None
    if distributed.is_main():
        try:
            answer = ("opened", _open_run_dir(config, run_dir, resume, console, held))
        except (RunDirError, OSError) as err:
            failure, answer = err, ("error", str(err))
    kind, value = distributed.broadcast_from_main(answer)
    if failure is not None:
        raise failure
    if kind == "error":
        raise RunDirError(value)
    return value


def train(config: RunConfig, run_dir: Path, resume: bool = False, console: Console | None = None) -> TrainOutcome:
    """Train (or resume) the run in `run_dir`. The main process holds the run's lock throughout; everything
    that can be checked is checked before the run directory changes, so a refused or failed start leaves it
    as it was."""
    console = console or Console()
    device = pick_device(config.train.device)
    from .vllm_policy import check_engine

    check_engine(config)
    rollout = config.rollout
    distributed.check_world_fits(
        rollout.tasks_per_step, rollout.group_size, config.train.micro_batches, config.train.updates_per_rollout
    )
    distributed.start(cpu=device.type == "cpu")
    with contextlib.ExitStack() as held:
        checkpoint, changes = _open_run_dir_on_main(config, run_dir, resume, console, held)
        return _train_opened(config, run_dir, device, console, checkpoint, changes)


def _train_opened(
    config: RunConfig,
    run_dir: Path,
    device: torch.device,
    console: Console,
    checkpoint: Path | None,
    changes: dict[str, tuple[Any, Any]],
) -> TrainOutcome:
    done = checkpoint_step(checkpoint) if checkpoint else 0
    if done >= config.train.max_steps:
        return TrainOutcome(
            0,
            f"Nothing to train: {run_dir} is already at step {done} and train.max_steps is {config.train.max_steps}. "
            f"To train further, resume with a larger one: --set train.max_steps={done + config.train.save_steps}",
            done,
        )
    make_env, train_task_ids, env_max_turns = environment_split(config.env.name, config.env.kwargs, config.env.train_split)
    max_turns = config.rollout.max_turns or env_max_turns
    if not train_task_ids:
        raise RunDirError(f"The environment has no tasks in split '{config.env.train_split}'.")

    tokenizer = load_tokenizer(config.model)
    model = load_base_model(config.model, device)
    check_lora_targets(model, config.model)

    interrupt = InterruptWatcher(console, config.env, every=config.updates_per_rollout_batch)
    progress = ProgressDisplay(console, config.train.max_steps)
    writer = MetricsWriter(run_dir / METRICS_FILE, progress.summary)
    # only the main process writes metrics.jsonl and shows progress (the metrics are already over all ranks)
    shown = [writer, progress] if distributed.is_main() else []
    args = grpo_args(config, run_dir, use_cpu=device.type == "cpu", bf16=model.dtype == torch.bfloat16)
    trainer = SDARTrainer(
        model=model,
        tokenizer=tokenizer,
        config=config,
        make_env=make_env,
        train_task_ids=train_task_ids,
        args=args,
        max_turns=max_turns,
        callbacks=[*shown, interrupt, FinalSave()],
    )
    # the run starts here: the directory changes only now that everything above has been checked
    if distributed.is_main():
        forget_steps_after(run_dir, done)
        if changes:
            record_changes(run_dir, done, changes)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
    if checkpoint:
        console.print(f"Resuming from {checkpoint} (step {checkpoint_step(checkpoint)}).")
        if checkpoint_step(checkpoint) % config.updates_per_rollout_batch:
            # only a run that ended at a max_steps inside a rollout batch leaves such a checkpoint
            console.print(
                f"[yellow]Warning:[/yellow] step {checkpoint_step(checkpoint)} is inside a rollout batch of "
                f"{config.updates_per_rollout_batch} updates; its remaining updates are not kept in a checkpoint, so "
                "training goes on with a fresh rollout. Make train.max_steps a multiple of updates_per_rollout x "
                "epochs_per_rollout to avoid this.",
                highlight=False,
                soft_wrap=True,
            )
    with interrupt.installed():
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except TrainingAborted as err:
            return TrainOutcome(1, f"Training aborted: {err}", trainer.state.global_step)
        except KeyboardInterrupt:
            last = latest_checkpoint(run_dir)
            kept = f"the last checkpoint is {last.name}" if last else "no checkpoint was written yet"
            return TrainOutcome(130, f"Stopped at once by a second interrupt; {kept}.", trainer.state.global_step)
        finally:
            progress.stop()
    step = trainer.state.global_step
    if interrupt.requested:
        return TrainOutcome(
            130,
            f"Interrupted: checkpoint written at step {step}. Continue with: sdar train CONFIG --output-dir {run_dir} --resume",
            step,
        )
    if trainer.stop_reason:
        return TrainOutcome(1, f"Stopped: {trainer.stop_reason}", step)
    return TrainOutcome(0, f"Done: {step} steps. Run directory: {run_dir}", step)


#: how many train tasks the dry run reads to measure the teacher's privileged prefix
PRIVILEGED_SAMPLE_TASKS = 8


def measured_privileged_tokens(config: RunConfig, tasks: int = PRIVILEGED_SAMPLE_TASKS) -> int | None:
    """The longest teacher prefix (teacher.context_template around the skills and/or plan) over the first
    turns of `tasks` train tasks spread evenly over the split, in tokens; 0 without a teacher; None when it
    is not measured: the environment does not declare `resets_cheaply` (building it may start games,
    servers or downloads), or the tokenizer or environment cannot be loaded here."""
    from .envs import environment_class
    from .rollout import TurnRenderer

    if not config.uses_teacher:
        return 0
    try:
        if not getattr(environment_class(config.env.name), "resets_cheaply", False):
            return None
        tokenizer = load_tokenizer(config.model)
        renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
        env = environment_factory(config.env.name, config.env.kwargs)()
        try:
            longest = 0
            split = env.task_ids(config.env.train_split)
            for task_id in [split[i * len(split) // tasks] for i in range(min(tasks, len(split)))]:
                task, observation = env.reset(task_id)
                privileged = renderer.privileged_context(task, observation.privileged, env)
                longest = max(longest, len(renderer.teacher_block_ids(privileged)))
            return longest
        finally:
            env.close()
    except Exception:  # noqa: BLE001 - any failure only means the estimate falls back to the assumption
        return None


def dry_run(config: RunConfig, console: Console | None = None) -> list[str]:
    """Print the estimated peak memory of the configured run without loading weights or touching the run
    directory; return the warnings (it will not fit the visible GPU or this machine's memory)."""
    from rich.table import Table

    from .perf.memory import (
        ModelShape,
        advice_to_fit,
        estimate_peak_memory,
        setup_for_run,
        workload_for_run,
    )

    console = console or Console()
    model_config = load_model_config(config.model)
    cuda_visible = torch.cuda.is_available()
    device = "cuda" if config.train.device == "cuda" or (config.train.device == "auto" and cuda_visible) else "cpu"
    dtype = pick_dtype(config.model.dtype, torch.device(device))
    max_turns = config.rollout.max_turns or environment_factory(config.env.name, config.env.kwargs)().max_turns
    measured = measured_privileged_tokens(config)
    if measured is None:
        workload = workload_for_run(config, max_turns)
        privileged_note = f"{workload.privileged_tokens} privileged tokens (assumed: not measured for this environment)"
    elif measured == 0:
        workload = workload_for_run(config, max_turns, privileged_tokens=0)
        privileged_note = "no teacher pass"
    else:
        workload = workload_for_run(config, max_turns, privileged_tokens=measured)
        privileged_note = (f"{measured} privileged tokens (the longest first-turn prefix of {PRIVILEGED_SAMPLE_TASKS} "
                           "train tasks; later turns can differ)")
    if device == "cuda" and cuda_visible:
        capacity = torch.cuda.get_device_properties(0).total_memory
        where = f"the visible GPU ({torch.cuda.get_device_name(0)}, {_gib(capacity)} GiB)"
    elif device == "cuda":
        capacity, where = None, None
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = f"this machine's memory ({_gib(capacity)} GiB)"
    setup = setup_for_run(config, device, torch.finfo(dtype).bits // 8, gpu_bytes=capacity if device == "cuda" else None)
    shape = ModelShape.from_config(model_config)
    estimate = estimate_peak_memory(shape, workload, setup)

    weights = "4-bit NF4" if setup.load_in_4bit else str(dtype).removeprefix("torch.")
    console.print(
        f"Estimated memory of {config.model.name} on {device} ({weights}, LoRA r={setup.lora_r}, "
        f"gradient checkpointing {'on' if setup.gradient_checkpointing else 'off'}):",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, value in estimate.components.items():
        table.add_row(name.replace("_", " "), _gib(value))
    for name, value in estimate.phases.items():
        table.add_row(f"[bold]peak during {name}[/bold]", f"[bold]{_gib(value)}[/bold]")
    console.print(table)
    console.print(
        f"Worst case assumed: {workload.rows} turn-samples per step ({workload.rows // max_turns} episodes x "
        f"{max_turns} turns) in {workload.micro_batches} micro-batch(es), {workload.prompt_tokens}-token prompts, "
        f"{workload.response_tokens}-token responses, {privileged_note}.",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"Estimated peak: {_gib(estimate.peak)} GiB (during {estimate.peak_phase}).", highlight=False)
    if device == "cpu":
        console.print(
            "On a CPU the process's peak RSS also holds memory glibc keeps after frees (measured: about a third "
            "more than this estimate); MALLOC_MMAP_THRESHOLD_=131072 returns it. See docs/performance.md.",
            highlight=False,
            soft_wrap=True,
        )

    if config.rollout.engine == "vllm" and setup.engine_bytes is not None:
        console.print(
            f"Generation: vLLM takes rollout.vllm.gpu_memory_utilization={config.rollout.vllm.gpu_memory_utilization} "
            "of the GPU (its weights and KV cache) and sleeps during the other phases.",
            highlight=False,
            soft_wrap=True,
        )
    elif config.rollout.engine == "vllm":
        console.print(
            "Not in this estimate: vLLM's own memory (its copy of the weights and its KV cache: "
            + ("rollout.vllm.gpu_memory_utilization of the GPU, which is not visible here)."
               if device == "cuda" else "VLLM_CPU_KVCACHE_SPACE on a CPU)."),
            highlight=False,
            soft_wrap=True,
        )

    warnings = []
    if setup.load_in_4bit and device != "cuda":
        warnings.append("model.load_in_4bit needs a CUDA GPU; the run would stop with an error on this machine.")
    if device == "cuda" and not cuda_visible:
        warnings.append("train.device is cuda but no CUDA GPU is visible here: the fit could not be checked.")
    if capacity is not None:
        # the CUDA context, the allocator's fragmentation and other processes need room as well
        budget = FIT_FRACTION * capacity
        rest, rest_setup = estimate, setup
        fit_warnings = len(warnings)
        if setup.engine_bytes is not None:
            # vLLM's share is fixed by one setting: checked on its own, the other phases without it
            warning = _vllm_share_warning(config, shape, setup, estimate, capacity, budget, where)
            if warning:
                warnings.append(warning)
            rest_setup = replace(setup, engine_bytes=0)
            rest = estimate_peak_memory(shape, workload, rest_setup)
        if rest.peak > budget:
            episodes = config.rollout.tasks_per_step * config.rollout.group_size
            advice = advice_to_fit(shape, workload, rest_setup, budget, episodes)
            others = [
                *([] if advice else ["raise train.micro_batches"]),
                *([] if setup.gradient_checkpointing else ["turn on train.gradient_checkpointing"]),
                "shorten rollout.max_prompt_tokens",
                *([] if setup.load_in_4bit else ["load the model in 4-bit"]),
            ]
            which = "the estimated peak" if setup.engine_bytes is None else f"the training phases' peak ({rest.peak_phase})"
            warnings.append(
                f"{which} {_gib(rest.peak)} GiB will not fit {where}. "
                + (_fit_advice_text(advice, rest.peak) + " Otherwise " if advice else "To fit, ")
                + (", ".join(others[:-1]) + " or " + others[-1] if len(others) > 1 else others[0])
                + "."
            )
        if len(warnings) == fit_warnings and estimate.peak <= budget:
            console.print(f"Fits {where} with {_gib(capacity - estimate.peak)} GiB to spare.", highlight=False)
    return warnings


#: the share of a device's memory a run may plan to use
FIT_FRACTION = 0.9


def _vllm_share_warning(config: RunConfig, shape, setup, estimate, capacity: int, budget: float, where: str) -> str | None:
    """What is wrong with rollout.vllm.gpu_memory_utilization on this GPU, with the shares that would do;
    None when it is fine. vLLM needs its weights and one longest sequence's KV cache inside its share; beside
    the training model (weights, LoRA, AdamW) it must stay within the budget."""
    from .perf.memory import kv_cache_bytes, weight_bytes

    share = config.rollout.vllm.gpu_memory_utilization
    resident = estimate.components["weights"] + estimate.components["lora_and_adamw"]
    longest = config.rollout.max_prompt_tokens + config.rollout.max_new_tokens
    vllm_needs = weight_bytes(shape, setup.dtype_bytes, setup.load_in_4bit) + kv_cache_bytes(shape, 1, longest, setup.dtype_bytes)
    lowest = math.ceil(vllm_needs / capacity * 100) / 100
    highest = math.floor((budget - resident) / capacity * 100) / 100
    if setup.engine_bytes < vllm_needs:
        problem = (f"vLLM's share ({share} of the GPU: {_gib(setup.engine_bytes)} GiB) is smaller than its weights and "
                   f"one {longest}-token sequence's KV cache ({_gib(vllm_needs)} GiB): the engine would not start.")
    elif estimate.phases["generation"] > budget:
        problem = (f"while generating, vLLM's share ({share} of the GPU: {_gib(setup.engine_bytes)} GiB) beside the "
                   f"training model's {_gib(resident)} GiB will not fit {where}.")
    else:
        return None
    if lowest <= highest:
        return f"{problem} To fit, set rollout.vllm.gpu_memory_utilization between {lowest:.2f} and {highest:.2f}."
    options = [*([] if setup.load_in_4bit else ["load the model in 4-bit"]), "use rollout.engine: hf"]
    return (f"{problem} No share fits beside the training model's {_gib(resident)} GiB on this GPU: "
            + " or ".join(options) + ".")


def _fit_advice_text(advice, peak: int) -> str:
    """'To fit, set train.micro_batches=16 (estimated peak ... GiB, ... GiB less) or ....'"""
    options = [
        "set " + " and ".join(f"{key}={value}" for key, value in choice.settings.items())
        + f" (estimated peak {_gib(choice.peak)} GiB, {_gib(peak - choice.peak)} GiB less)"
        for choice in advice
    ]
    return "To fit, " + " or ".join(options) + "."


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


class MetricsWriter(TrainerCallback):
    """Appends one JSON object per step to metrics.jsonl and hands it to the progress display."""

    def __init__(self, path: Path, on_record=None):
        self.path = path
        self.on_record = on_record
        self._step_started = time.perf_counter()
        self._step_seconds = 0.0
        self._batch_seconds = 0.0  # the rollout batch's time so far: its rollout and the updates made on it

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_seconds = time.perf_counter() - self._step_started

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not logs or "reward_mean" not in logs:  # the end-of-training summary carries no step metrics
            return
        record: dict[str, Any] = {key: None for key in METRIC_KEYS}
        record.update({key: _json_number(value) for key, value in logs.items() if isinstance(value, (int, float))})
        record["step"] = state.global_step
        record["step_seconds"] = self._step_seconds
        # throughput of the rollout batch so far: every prompt and response token of its turn-samples, per second
        # of its rollout and the updates made on it up to this one (the update that played the rollout logs
        # generation_seconds; later updates on the same batch log the batch's tokens again, so the time adds up)
        if logs.get("generation_seconds") is not None:
            self._batch_seconds = 0.0
        self._batch_seconds += self._step_seconds
        tokens = (logs.get("prompt_tokens") or 0.0) + (logs.get("response_tokens") or 0.0)
        record["tokens_per_second"] = tokens / self._batch_seconds if self._batch_seconds > 0 else None
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.on_record:
            self.on_record(record)


def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinity: such values are written as null."""
    return value if math.isfinite(value) else None


#: the share of a step's responses that hit rollout.max_new_tokens above which training warns (once)
TRUNCATION_WARNING = 0.2


class ProgressDisplay(TrainerCallback):
    """A rich progress bar with ETA, and one summary line per step."""

    def __init__(self, console: Console, total_steps: int):
        self.console = console
        self.progress = progress_bar(console, "training")
        self.task = self.progress.add_task("train", total=total_steps)
        self._started = False
        self._warned_truncation = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)
        self.progress.start()
        self._started = True

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def summary(self, record: dict[str, Any]) -> None:
        def show(key: str, fmt: str) -> str:
            value = record.get(key)
            return "-" if value is None else format(value, fmt)

        self.console.print(
            f"step {record['step']:>4}  reward {show('reward_mean', '.2f')}  success {show('success_rate', '.0%')}  "
            f"turns {show('episode_turns_mean', '.1f')}  invalid {show('invalid_action_rate', '.0%')}  "
            f"gate {show('gate_mean', '.3f')}  kl {show('kl', '.4f')}  loss {show('loss', '.4f')}  "
            f"{show('step_seconds', '.1f')}s",
            highlight=False,
            soft_wrap=True,
        )
        truncated = record.get("truncated_response_rate")
        if truncated is not None and truncated >= TRUNCATION_WARNING and not self._warned_truncation:
            self._warned_truncation = True
            self.console.print(
                f"[yellow]Warning:[/yellow] {truncated:.0%} of step {record['step']}'s responses used up "
                "rollout.max_new_tokens without an end-of-sequence token. If actions are being cut short (they "
                "are then invalid), raise rollout.max_new_tokens so the longest action and its closing tag fit.",
                highlight=False,
                soft_wrap=True,
            )

    def stop(self) -> None:
        if self._started:
            self.progress.stop()
            self._started = False


class FinalSave(TrainerCallback):
    """Always checkpoint the last step, whatever save_steps is."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control


class InterruptWatcher(TrainerCallback):
    """First Ctrl-C or SIGTERM: finish the step, checkpoint, stop. A second Ctrl-C: stop at once.

    Several processes stop together: a signal to any one rank stops all after the same step. A terminal's
    Ctrl-C reaches every rank and torchrun, which forwards it at once: there, a second signal within
    SAME_INTERRUPT_SECONDS counts as the same interrupt.
    """

    SAME_INTERRUPT_SECONDS = 2.0

    def __init__(self, console: Console, env: EnvSettings | None = None, every: int = 1):
        self.console = console
        self.env = env
        #: optimizer updates per rollout batch: the run stops (and checkpoints) only between batches
        self.every = every
        self.requested = False
        self._requested_at = 0.0

    @contextlib.contextmanager
    def installed(self):
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            if distributed.is_distributed() and time.monotonic() - self._requested_at < self.SAME_INTERRUPT_SECONDS:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._requested_at = time.monotonic()
        bound = (f" (environment calls time out after env.step_timeout_s={self.env.step_timeout_s:g} s, "
                 f"env.reset_timeout_s={self.env.reset_timeout_s:g} s)") if self.env else ""
        self.console.print(
            f"[yellow]{signal.Signals(signum).name} received: finishing this step{bound} and writing a checkpoint "
            "(press Ctrl-C again to stop at once).[/yellow]"
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.requested = distributed.any_rank(self.requested)
        if self.requested and state.global_step % self.every == 0:
            control.should_save = True
            control.should_training_stop = True
        return control
