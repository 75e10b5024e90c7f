"""`sdar eval`: play the same held-out tasks with each target and report success with a 95% interval.

Tasks: `choose_tasks` draws episodes / samples_per_task distinct tasks of the split with
random.Random(eval.seed), and torch is seeded with eval.seed before each target plays, so every
target of one command, and every rerun with the same seed, plays the same tasks and gets the same
numbers. Each task is played samples_per_task (k) times; pass@k counts a task solved when any of
its k episodes won. Decoding is the paper's validation decoding by default: sampled at
temperature 0.4 (eval.decoding, eval.temperature).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import atomic
from .config import RunConfig
from .envs import environment_split
from .envs.base import Environment
from .models import pick_device
from .progress import progress_bar
from .rollout import EnvTimeouts, EpisodeResult, HFPolicy, TurnRenderer, TurnSample, play_episodes
from .targets import Target, load_agent, resolve_target

#: the 0.975 quantile of the standard normal distribution
Z95 = 1.959963984540054


class EvalError(ValueError):
    """The evaluation cannot run as asked (too few tasks, an unknown split); the message says why."""


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z).

        p = s / n
        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
        [centre - half, centre + half]

    Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at 0 or n successes.
    No trials: (0, 1).
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    # at 0 and n successes the bounds are exactly 0 and 1; computing them would leave rounding error
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def choose_tasks(task_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` distinct task ids drawn from `task_ids` with random.Random(seed), in draw order."""
    if count > len(task_ids):
        raise EvalError(
            f"{count} tasks were asked for but the split has only {len(task_ids)}. Lower --episodes or raise "
            "eval.samples_per_task (episodes = tasks x samples_per_task)."
        )
    return random.Random(seed).sample(list(task_ids), count)


def summarize(episodes: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success rate with its Wilson interval, mean reward and turns, invalid-action rate, and pass@k.

    The invalid-action rate is per turn, as in training's metrics. Episodes of one task share its
    `group`; pass@k is the share of tasks with at least one won episode.
    """
    n = len(episodes)
    wins = sum(e.won for e in episodes)
    turns = sum(e.turns for e in episodes)
    tasks: dict[int, bool] = {}
    for e in episodes:
        tasks[e.group] = tasks.get(e.group, False) or e.won
    solved = sum(tasks.values())
    summary = {
        "episodes": n,
        "successes": wins,
        "success_rate": wins / n if n else 0.0,
        "success_ci95": list(wilson_interval(wins, n)),
        "reward_mean": sum(e.outcome_reward for e in episodes) / n if n else 0.0,
        "turns_mean": turns / n if n else 0.0,
        "invalid_action_rate": sum(e.invalid_actions for e in episodes) / turns if turns else 0.0,
        "env_error_rate": sum(bool(e.env_error) for e in episodes) / n if n else 0.0,
        "tasks": len(tasks),
        "tasks_solved": solved,
        "pass_at_k": solved / len(tasks) if tasks else 0.0,
        "pass_at_k_ci95": list(wilson_interval(solved, len(tasks))),
    }
    names = sorted({name for e in episodes for name in e.metrics})
    if names:  # the environment's episode metrics, each averaged over the episodes that have it
        summary["metrics"] = {
            name: sum(values) / len(values) for name in names if (values := [e.metrics[name] for e in episodes if name in e.metrics])
        }
    return summary


def summarize_by_task_type(episodes: Sequence[EpisodeResult]) -> dict[str, dict[str, Any]]:
    by_type: dict[str, list[EpisodeResult]] = {}
    for e in episodes:
        by_type.setdefault(e.task_type, []).append(e)
    return {task_type: summarize(by_type[task_type]) for task_type in sorted(by_type)}


def play_evaluation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RunConfig,
    task_ids: Sequence[str],
    make_env: Callable[[], Environment],
    max_turns: int,
    on_batch: Callable[[int], None] = lambda episodes: None,
    skills_in_student_prompt: bool = False,
) -> tuple[list[TurnSample], list[EpisodeResult]]:
    """Play each task eval.samples_per_task times, eval.batch_size episodes at a time.

    Episode i of task j belongs to group j. torch is seeded with eval.seed first, so the sampled
    episodes depend only on the model, the tasks and the settings. `skills_in_student_prompt` shows the
    agent the task's skills (Skill-GRPO* of the paper); evaluation is otherwise without them.
    """
    settings = config.eval
    slots = [(task_id, group) for group, task_id in enumerate(task_ids) for _ in range(settings.samples_per_task)]
    torch.manual_seed(settings.seed)
    if config.rollout.engine == "vllm":
        from .vllm_policy import VLLMPolicy

        policy = VLLMPolicy(
            tokenizer,
            config,
            next(model.parameters()).device,
            do_sample=settings.decoding == "sample",
            temperature=settings.temperature,
        )
        policy.load_adapter(model)  # the target's adapter (none for a base model)
    else:
        policy = HFPolicy(
            model,
            tokenizer,
            config.rollout,
            max_batch_size=settings.batch_size,
            do_sample=settings.decoding == "sample",
            temperature=settings.temperature,
        )
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher, skills_in_student_prompt)
    samples: list[TurnSample] = []
    episodes: list[EpisodeResult] = []
    for start in range(0, len(slots), settings.batch_size):
        batch = slots[start : start + settings.batch_size]
        batch_samples, batch_episodes = play_episodes(
            [task_id for task_id, _ in batch],
            [group for _, group in batch],
            make_env,
            policy,
            renderer,
            max_turns,
            start,
            env_workers=config.env.workers,
            timeouts=EnvTimeouts(config.env.reset_timeout_s, config.env.step_timeout_s),
        )
        samples += batch_samples
        episodes += batch_episodes
        on_batch(len(batch))
    return samples, episodes


def target_report(
    name: str, kind: str, model_name: str, checkpoint: str | None, step: int | None, episodes: Sequence[EpisodeResult]
) -> dict[str, Any]:
    """One target's part of the JSON report: what was evaluated, overall, per task type, per episode."""
    return {
        "target": name,
        "kind": kind,
        "model": model_name,
        "checkpoint": checkpoint,
        "step": step,
        "overall": summarize(episodes),
        "by_task_type": summarize_by_task_type(episodes),
        "episodes": [
            {
                "task_id": e.task_id,
                "task_type": e.task_type,
                "won": e.won,
                "reward": e.outcome_reward,
                "turns": e.turns,
                "invalid_actions": e.invalid_actions,
                "env_error": e.env_error,
                **({"metrics": e.metrics} if e.metrics else {}),
            }
            for e in episodes
        ],
    }


def settings_report(config: RunConfig, task_ids: Sequence[str]) -> dict[str, Any]:
    """The settings every target of one command shares, and the tasks they all played."""
    settings = config.eval
    return {
        "env": config.env.name,
        "split": config.env.eval_split,
        "seed": settings.seed,
        "episodes": settings.episodes,
        "samples_per_task": settings.samples_per_task,
        "decoding": settings.decoding,
        "temperature": settings.temperature if settings.decoding == "sample" else None,
        "task_ids": list(task_ids),
    }


def resolve_targets(names: Sequence[str], config_path: Path | None, overrides: list[str]) -> list[Target]:
    """Resolve every target; all of them get the first one's env and eval settings (the same tasks).

    A base model with no --config borrows the config of the first run or checkpoint among the
    targets (its prompt format, turn limit and decoding), so it is that run's untrained baseline.
    """
    targets = [resolve_target(name, config_path, overrides) for name in names]
    fallback = next((t.config for t in targets if t.kind != "base"), None)
    if config_path is None and fallback is not None:
        targets = [resolve_target(t.name, None, overrides, fallback) if t.kind == "base" else t for t in targets]
    shared = targets[0].config
    return [
        dataclasses.replace(t, config=t.config.model_copy(update={"eval": shared.eval, "env": shared.env}))
        for t in targets
    ]


def evaluation_tasks(config: RunConfig) -> tuple[Callable[[], Environment], list[str], int]:
    """The environment factory, the chosen tasks of env.eval_split, and the environment's turn limit."""
    try:
        make_env, split_task_ids, max_turns = environment_split(config.env.name, config.env.kwargs, config.env.eval_split)
    except ValueError as err:
        raise EvalError(f"env.eval_split '{config.env.eval_split}': {err}") from None
    count = config.eval.episodes // config.eval.samples_per_task
    return make_env, choose_tasks(split_task_ids, count, config.eval.seed), max_turns


#: files of a model or adapter folder that decide what it generates
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".txt", ".model")
#: rollout settings that only shape training batches, never an evaluation episode
_TRAINING_ONLY_ROLLOUT = ("group_size", "tasks_per_step", "temperature", "invalid_action_penalty")


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(folder: Path, by_content: bool) -> list[Any]:
    """What identifies a model or adapter folder: its weight, config and tokenizer files, by content
    (adapters: a few MB) or by size and modification time (base models: hundreds of MB)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES)
    if by_content:
        return [[f.name, _digest(f)] for f in files]
    return [str(folder.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def evaluation_key(target: Target, settings: dict[str, Any], max_turns: int) -> str:
    """A hash of everything that decides a target's episodes: the tasks and decoding, the model and adapter
    files, the prompt and action format, the turn limit, the device and dtype it runs with, and the
    versions of this package, torch and transformers."""
    import transformers

    from . import __version__
    from .models import chat_template_text, pick_dtype

    config = target.config
    device = pick_device(config.train.device)
    model_dir = Path(config.model.name).expanduser()
    chat_template = config.model.chat_template
    if chat_template:
        chat_template = hashlib.sha256(chat_template_text(chat_template).encode()).hexdigest()
    identity = {
        "versions": [__version__, torch.__version__, transformers.__version__],
        "settings": settings,
        "max_turns": max_turns,
        "model": {**config.model.model_dump(mode="json", exclude={"lora"}), "chat_template": chat_template},
        "model_files": _fingerprint(model_dir, by_content=False) if model_dir.is_dir() else config.model.name,
        "adapter_files": _fingerprint(target.checkpoint, by_content=True) if target.checkpoint else None,
        "rollout": config.rollout.model_dump(mode="json", exclude=set(_TRAINING_ONLY_ROLLOUT)),
        "env": config.env.model_dump(mode="json", exclude={"workers"}),
        "eval": config.eval.model_dump(mode="json"),
        "device": [device.type, str(pick_dtype(config.model.dtype, device))],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A cached evaluation, or None when there is none or it cannot be read (then it is played again)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("report"), dict) or "overall" not in entry["report"]:
        return None
    return entry


def _write_cached(path: Path, entry: dict[str, Any]) -> None:
    """Write whole (atomic.write_text); a failure only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(entry, indent=1) + "\n")
    except OSError:
        pass


def evaluate_targets(
    names: Sequence[str],
    config_path: Path | None,
    overrides: list[str],
    console: Console,
    cache_dir: Path | None = None,
    reuse: bool = True,
    seconds: dict[str, float] | None = None,
    reuse_names: Collection[str] = (),
) -> dict[str, Any]:
    """Evaluate each target on the same tasks; the JSON-ready report (no timings, so reruns are identical).

    With `cache_dir`, a target's report is stored there under `evaluation_key` and (when `reuse`) reused
    while nothing that decides its episodes has changed, so a long comparison evaluates each checkpoint
    once. Targets named in `reuse_names` (played earlier by the same command) reuse their entry even when
    `reuse` is off. `seconds`, when given, receives each target's evaluation time (the time it took when played).
    A skill_grpo run (trained with the skills in its prompt) is evaluated twice: as every target, without
    skills, and as "NAME +skills" with them (the paper's Skill-GRPO*).
    """
    targets = resolve_targets(names, config_path, overrides)
    shared = targets[0].config
    make_env, task_ids, env_max_turns = evaluation_tasks(shared)
    report: dict[str, Any] = {"settings": settings_report(shared, task_ids), "targets": []}
    progress = progress_bar(console, "{task.description}", unit="episodes")
    for target in targets:
        if target.warning:
            console.print(f"[yellow]Warning:[/yellow] {escape(target.warning)}", highlight=False, soft_wrap=True)
    plays = [(t, False) for t in targets]
    plays += [(dataclasses.replace(t, name=f"{t.name} +skills"), True) for t in targets if t.config.skills_in_student_prompt]
    with progress:
        for target, with_skills in plays:
            max_turns = target.config.rollout.max_turns or env_max_turns
            cached = None
            if cache_dir is not None:
                settings = {**report["settings"], "skills_in_student_prompt": True} if with_skills else report["settings"]
                cached = cache_dir / f"{evaluation_key(target, settings, max_turns)}.json"
                entry = _read_cached(cached) if reuse or target.name in reuse_names else None
                if entry is not None:  # where the model and checkpoint are now (the folder may have moved)
                    checkpoint = str(target.checkpoint) if target.checkpoint else None
                    report["targets"].append(
                        {**entry["report"], "target": target.name, "model": target.config.model.name, "checkpoint": checkpoint}
                    )
                    if seconds is not None:
                        seconds[target.name] = float(entry.get("seconds") or 0.0)
                    progress.console.print(
                        f"{target.name}: evaluated before, reused ({cached})", highlight=False, markup=False, soft_wrap=True
                    )
                    continue
            bar = progress.add_task(f"eval {target.name}", total=shared.eval.episodes)
            started = time.perf_counter()
            model, tokenizer = load_agent(target, pick_device(target.config.train.device))
            _, episodes = play_evaluation(
                model,
                tokenizer,
                target.config,
                task_ids,
                make_env,
                max_turns,
                on_batch=lambda done, bar=bar: progress.advance(bar, done),
                skills_in_student_prompt=with_skills,
            )
            del model
            _free_memory()
            checkpoint = str(target.checkpoint) if target.checkpoint else None
            report["targets"].append(
                target_report(target.name, target.kind, target.config.model.name, checkpoint, target.step, episodes)
            )
            played_seconds = time.perf_counter() - started
            if seconds is not None:
                seconds[target.name] = played_seconds
            if cached is not None:
                _write_cached(cached, {"report": report["targets"][-1], "seconds": played_seconds})
            progress.console.print(
                f"{target.name}: {len(episodes)} episodes in {played_seconds:.1f}s", highlight=False, markup=False,
                soft_wrap=True,
            )
    return report


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _rate_with_interval(summary: dict[str, Any], rate: str = "success_rate", interval: str = "success_ci95") -> str:
    low, high = summary[interval]
    return f"{_percent(summary[rate])} [{_percent(low)}-{_percent(high)}]"


def overall_table(report: dict[str, Any]) -> Table:
    """One row per target (all played the same episodes): success with its 95% interval, pass@k, reward,
    turns, invalid."""
    settings = report["settings"]
    k = settings["samples_per_task"]
    decoding = f"sampled at T={settings['temperature']}" if settings["decoding"] == "sample" else "greedy"
    table = Table(
        title=f"{settings['episodes']} episodes on split '{settings['split']}', seed {settings['seed']}, {decoding}",
        title_justify="left",
    )
    table.add_column("target", overflow="fold", min_width=14)
    columns = ["success\n[95% CI]", *([f"pass@{k}\n[95% CI]"] if k > 1 else []), "reward", "turns", "invalid"]
    for column in columns:
        table.add_column(column, justify="right")
    for target in report["targets"]:
        overall = target["overall"]
        table.add_row(target["target"], *_metric_cells(overall, k)[1:])
    return table


def task_type_table(report: dict[str, Any]) -> Table:
    """Per task type: every metric for one target; success [95% CI] side by side for several."""
    targets = report["targets"]
    table = Table(title="by task type", title_justify="left")
    table.add_column("task type", no_wrap=True)
    table.add_column("episodes", justify="right", no_wrap=True)
    if len(targets) == 1:
        for column in ("success\n[95% CI]", "reward", "turns", "invalid"):
            table.add_column(column, justify="right", no_wrap=True)
    else:
        for target in targets:
            table.add_column(f"{target['target']}\nsuccess [95% CI]", justify="right", overflow="fold")
    for task_type in sorted({t for target in targets for t in target["by_task_type"]}):
        cells = [target["by_task_type"].get(task_type) for target in targets]
        episodes = next(cell["episodes"] for cell in cells if cell)
        if len(targets) == 1:
            table.add_row(task_type, *_metric_cells(cells[0], 1))
        else:
            table.add_row(task_type, str(episodes), *(_rate_with_interval(cell) if cell else "-" for cell in cells))
    return table


def _metric_cells(summary: dict[str, Any], k: int) -> list[str]:
    cells = [str(summary["episodes"]), _rate_with_interval(summary)]
    if k > 1:
        cells.append(_rate_with_interval(summary, "pass_at_k", "pass_at_k_ci95"))
    return cells + [f"{summary['reward_mean']:.2f}", f"{summary['turns_mean']:.1f}", _percent(summary["invalid_action_rate"])]


def print_report(console: Console, report: dict[str, Any]) -> None:
    console.print(overall_table(report))
    console.print(task_type_table(report))
    for target in report["targets"]:
        metrics = target["overall"].get("metrics")
        if metrics:
            shown = ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
            console.print(f"{target['target']} episode metrics (mean): {shown}", highlight=False, soft_wrap=True)
