"""`sdar compare`: several methods x several seeds, same tasks, same budget, one results file.

A comparison spec names one training config and, per method, the `--set` overrides that make it
that method; every (method, seed) pair trains in its own run directory with `train.seed` set, then
the model the runs start from, any reference models and every final checkpoint play the same held-out
tasks (`sdar eval`'s code).

    config: ../household_compare.yaml      # relative to the spec file
    methods:
      grpo: [algorithm.name=grpo]
      grpo_opsd: [algorithm.name=grpo_opsd]
      sdar: [algorithm.name=sdar]
    seeds: [0, 1, 2]
    output: runs/compare/household

A method may train with some of the seeds only (a sweep on one seed beside the main comparison):

      sdar_lambda_1: {set: [algorithm.name=sdar, algorithm.sdar_coef=1.0], seeds: [0]}

Finished runs are kept and skipped, an interrupted one resumes, so the command can be re-run
until it completes. The results file holds, per run, the held-out success of its final checkpoint
and its training curve (success on the training batch of every step, from metrics.jsonl); per
method, the mean and sample standard deviation over seeds; and every run's final checkpoint paired episode by
episode with the same seed's run of `paired_against` (the first method by default), with an exact McNemar test.

Runs recorded in another comparison's results.json (`--merge`, e.g. seeds trained on another machine) join the
report as they were evaluated there, once the spec's methods and the held-out evaluation are shown to match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .atomic import staged_file
from .config import ConfigError, RunConfig, load_config
from .evaluate import evaluate_targets
from .models import ModelLoadError, load_model_config
from .resume import RunInUse, changed_settings, run_lock
from .run import (
    RunDirError,
    checkpoint_step,
    describe_changes,
    latest_checkpoint,
    read_saved_config,
    refused_changes,
    train,
)
from .rundir import CONFIG_FILE, METRICS_FILE, read_metrics
from .stats import PairedCounts, paired_counts
from .targets import TargetError, resolve_target


#: what each run's training curve keeps from metrics.jsonl, per step
CURVE_KEYS = ("step", "success_rate", "reward_mean", "invalid_action_rate", "gate_mean", "gate_active_ratio",
              "teacher_gap_mean", "kl", "grad_norm")
#: the teacher statistics averaged over every step of every seed, per method (None for methods without a teacher)
GATE_KEYS = ("gate_mean", "gate_active_ratio", "teacher_gap_mean")

#: evaluations already played, by evaluation key (see evaluate.evaluation_key)
EVAL_CACHE = "eval-cache"
#: the label of the row for the model the runs start from
BASELINE_LABEL = "before RL"


class CompareError(ValueError):
    """The comparison cannot go on; the message says why."""


class CompareInterrupted(Exception):
    """A run was stopped by Ctrl-C or SIGTERM (checkpointed); re-running the comparison resumes it."""


class MethodSpec(BaseModel):
    """A method that trains with some of the spec's seeds only."""

    model_config = ConfigDict(extra="forbid")

    set: list[str] = Field(description="the --set overrides that make the method")
    seeds: list[int] = Field(min_length=1, description="the spec's seeds this method trains with")


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="the training config every run shares, relative to the spec file")
    methods: dict[str, list[str] | MethodSpec] = Field(
        description="method name -> the --set overrides that make it, or {set: [...], seeds: [...]} for a method "
        "that trains with some of the seeds only"
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="--set overrides for every run")
    eval_overrides: list[str] = Field(default_factory=list, description="--set overrides for the evaluation")
    baseline: bool = Field(True, description="also evaluate the untrained model on the same tasks")
    references: dict[str, str] = Field(
        default_factory=dict,
        description="label -> another model (a name or path `sdar eval` takes) played on the same tasks as a "
        "reference row, e.g. the model before a warm-up",
    )
    best: bool = Field(
        False,
        description="also evaluate each run's best checkpoint: the saved step with the highest training success "
        "(measured by the next step's rollouts, which it played; never the held-out tasks; the latest on ties)",
    )
    paired_against: str | None = Field(
        None, description="the method every other method is paired with, episode by episode (default: the first)"
    )
    output: str = "runs/compare"

    def overrides_of(self, method: str) -> list[str]:
        entry = self.methods[method]
        return entry.set if isinstance(entry, MethodSpec) else entry

    def seeds_of(self, method: str) -> list[int]:
        """The spec's seeds the method trains with."""
        return [seed for seed in self.seeds if self.trains_with(method, seed)]

    def trains_with(self, method: str, seed: int) -> bool:
        """A method trains with any seed asked for (--seeds may name others than the spec's), unless it
        names its own seeds."""
        entry = self.methods[method]
        return seed in entry.seeds if isinstance(entry, MethodSpec) else True

    @property
    def pairing_method(self) -> str:
        return self.paired_against or next(iter(self.methods))

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seed(s) {repeated} listed twice; each seed trains one run per method")
        return seeds

    @model_validator(mode="after")
    def _distinct_labels(self) -> "CompareSpec":
        if not self.methods:
            raise ValueError("methods: name at least one method, e.g. `grpo: [algorithm.name=grpo]`")
        for label, model in self.references.items():
            if not label.strip():
                raise ValueError("references: a label is empty; write `label: model`, e.g. `before warm-up: MODEL`")
            if label in self.methods or label == BASELINE_LABEL:
                raise ValueError(
                    f"references: the label '{label}' is also a method or the '{BASELINE_LABEL}' row; choose another"
                )
            if not model.strip():
                raise ValueError(f"references: '{label}' names no model; write `{label}: MODEL`")
        for method, entry in self.methods.items():
            if isinstance(entry, MethodSpec):
                unknown = [seed for seed in entry.seeds if seed not in self.seeds]
                if unknown or len(set(entry.seeds)) != len(entry.seeds):
                    raise ValueError(
                        f"methods: {method}: seeds {entry.seeds} must be distinct and among the spec's seeds "
                        f"{self.seeds}; add {unknown or 'nothing'} to `seeds` or drop it from the method"
                    )
        if self.paired_against is not None and self.paired_against not in self.methods:
            raise ValueError(
                f"paired_against: '{self.paired_against}' is not a method; name one of {', '.join(self.methods)}"
            )
        return self


def load_spec(path: Path) -> CompareSpec:
    if not path.is_file():
        raise ConfigError(f"Comparison spec not found: {path}.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return CompareSpec.model_validate(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except ValidationError as err:
        problems = "; ".join(
            ": ".join(part for part in (".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) if part)
            for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def best_checkpoint(run_dir: Path, metrics: list[dict[str, Any]]) -> Path | None:
    """The saved checkpoint whose weights played the most successful training batch (the latest on ties).

    Step N's rollouts are played before step N's update, so they measure checkpoint-(N-1): checkpoint-N is
    ranked by step N+1's success, and the last checkpoint, never measured, is not a candidate. None if none.
    With several updates per rollout batch (train.updates_per_rollout) only the update that played a batch
    measures the checkpoint before it: its line is the one with `generation_seconds`.
    """
    if any("generation_seconds" in r for r in metrics):
        metrics = [r for r in metrics if r.get("generation_seconds") is not None]
    success = {r["step"]: r["success_rate"] for r in metrics if r.get("success_rate") is not None}
    candidates = {
        step: run_dir / f"checkpoint-{step}"
        for step in success
        if step - 1 >= 1 and (run_dir / f"checkpoint-{step - 1}" / "trainer_state.json").is_file()
    }
    if not candidates:
        return None
    best = max(candidates, key=lambda step: (success[step], step))
    return run_dir / f"checkpoint-{best - 1}"


def check_existing_run(config: RunConfig, run_dir: Path, name: str) -> None:
    """A run already in the comparison's folder is kept (or resumed) only if it was trained with what the spec
    gives it now, and not past the spec's train.max_steps: a spec edited after the run would otherwise be
    reported with the old run's results under the new settings."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (run_dir / CONFIG_FILE).is_file():
        return  # nothing trained yet: it starts (or starts again) with the spec's settings
    try:
        saved = read_saved_config(run_dir / CONFIG_FILE)
    except RunDirError as err:
        raise CompareError(f"{name}: {err}") from None
    if refused := refused_changes(saved, changed_settings(saved, config.model_dump(mode="json"))):
        raise CompareError(
            f"{name} was trained with other settings than the spec gives it now: {describe_changes(refused)}. "
            f"Restore the spec, or move {run_dir} away to train it again."
        )
    done = max((r["step"] for r in read_metrics(run_dir)), default=0)
    if done > config.train.max_steps:
        raise CompareError(
            f"{name} was trained for {done} steps and the spec now asks for train.max_steps={config.train.max_steps}. "
            f"Restore the spec, or move {run_dir} away to train it again."
        )


def finite_or_none(value: Any) -> Any:
    """The value, or None for NaN and infinities (which JSON cannot hold)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def check_references(spec: CompareSpec, config_path: Path) -> None:
    """Fail before any training when a reference model cannot be found (a mistyped path would otherwise
    surface after the first seed's training, hours in)."""
    for label, model in spec.references.items():
        try:
            # as the evaluation will resolve it: a run or checkpoint with its own config
            target = resolve_target(model, None, [*spec.overrides, *spec.eval_overrides])
            if target.kind == "base":
                load_model_config(target.config.model)
        except (TargetError, ModelLoadError) as err:
            raise CompareError(f"references: '{label}': {err}") from None


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no spread for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def finished(run_dir: Path, config: RunConfig) -> bool:
    """Has the run in `run_dir` trained all of config's train.max_steps, with its final checkpoint whole?"""
    done_steps = [r["step"] for r in read_metrics(run_dir)]  # a torn last line: resumed and repaired by train
    last = latest_checkpoint(run_dir)
    return (bool(done_steps) and max(done_steps) >= config.train.max_steps and last is not None
            and checkpoint_step(last) >= config.train.max_steps)


def unfinished_state(run_dir: Path, config: RunConfig) -> str:
    """Where an unfinished run stands, in words: 'not started', 'stopped at step 12 of 20 (...)'."""
    if not (run_dir / CONFIG_FILE).is_file():
        return "not started"
    steps = [r["step"] for r in read_metrics(run_dir)]
    last = latest_checkpoint(run_dir)
    saved = f"last whole checkpoint: {last.name}" if last else "no whole checkpoint"
    if not steps:
        return f"started, no step logged or {METRICS_FILE} unreadable ({saved})"
    return f"stopped at step {max(steps)} of {config.train.max_steps} ({saved})"


@contextlib.contextmanager
def comparison_lock(output_dir: Path) -> Iterator[None]:
    """Hold OUTPUT for one `sdar compare` at a time (CompareError naming the holder otherwise): two on the same
    folder would overwrite each other's results and evaluation cache."""
    with contextlib.ExitStack() as stack:
        try:  # only taking the lock: a RunInUse from inside the comparison is not about OUTPUT
            stack.enter_context(run_lock(output_dir))
        except RunInUse as err:
            raise CompareError(f"{output_dir} is in use by another sdar compare ({err}); wait for it to end or stop "
                               "it (Ctrl-C), then run this command again.") from None
        yield


@dataclasses.dataclass
class RecordedResults:
    """Another comparison's results.json, given to --merge: its runs join this report as recorded there."""

    path: Path
    results: dict[str, Any]


def read_recorded(path: Path, spec: CompareSpec) -> RecordedResults:
    """Read a results.json to merge; CompareError unless it is one, and unless every method it shares with `spec`
    was made by the same overrides (a different method under the same name would be reported as this one)."""
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompareError(f"--merge {path}: no such file; name the results.json of another sdar compare.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"--merge {path}: not readable as JSON ({err}).") from None
    if not isinstance(results, dict) or not all(key in results for key in ("spec", "runs", "evaluation")):
        raise CompareError(f"--merge {path}: not the results.json of an sdar compare (no spec, runs and evaluation).")
    run_keys = ("method", "seed", "train_seconds", "curve", "final", "final_episodes")
    if not isinstance(results["runs"], list) or not all(
        isinstance(run, dict) and all(key in run for key in run_keys) for run in results["runs"]
    ):
        raise CompareError(f"--merge {path}: a run lacks one of {', '.join(run_keys)}; merge the results.json that "
                           "sdar compare wrote, unedited.")
    theirs = results["spec"]
    if theirs.get("overrides", []) != spec.overrides:
        raise CompareError(f"--merge {path}: its runs were trained with overrides {theirs.get('overrides', [])}, this "
                           f"spec gives {spec.overrides}; only runs of the same comparison can be merged.")
    for method in sorted({run["method"] for run in results["runs"]} & set(spec.methods)):
        entry = theirs["methods"].get(method)
        overrides = entry["set"] if isinstance(entry, dict) else entry
        if overrides != spec.overrides_of(method):
            raise CompareError(f"--merge {path}: its '{method}' was {overrides}, this spec's is "
                               f"{spec.overrides_of(method)}; rename one of them, or merge only the same method.")
    if spec.best and any("best" not in run for run in results["runs"]):
        raise CompareError(f"--merge {path}: its runs have no best checkpoint evaluated and this spec asks for "
                           "`best: true`; evaluate them there with the same spec, or drop `best` here.")
    return RecordedResults(path, results)


def recorded_runs(sources: list[RecordedResults], chosen: list[tuple[int, str]]) -> dict[tuple[int, str], dict[str, Any]]:
    """The chosen (seed, method) runs the merged files recorded, each marked with its file; CompareError when
    two files record the same run (which one to report is the user's choice)."""
    recorded: dict[tuple[int, str], dict[str, Any]] = {}
    for source in sources:
        for run in source.results["runs"]:
            key = (run["seed"], run["method"])
            if key not in chosen:
                continue
            if key in recorded:
                raise CompareError(f"{run_name(run['method'], run['seed'])} is recorded in both "
                                   f"{recorded[key]['merged_from']} and {source.path}; merge one of them.")
            recorded[key] = {**run, "merged_from": str(source.path)}
    return recorded


def check_recorded(source: RecordedResults, settings: dict[str, Any], baseline: dict[str, Any] | None,
                   console: Console) -> dict[str, Any]:
    """CompareError unless the merged file's held-out evaluation is this one (same tasks, episodes, decoding):
    otherwise its runs' numbers and this report's would not be comparable. A model before RL that scores
    differently there is warned about (another start model, or other hardware's sampling). What the report keeps
    of the file."""
    theirs = source.results["evaluation"]
    differ = sorted(key for key in {*settings, *theirs} if settings.get(key) != theirs.get(key))
    if differ:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} there, {settings.get(key)!r} here"
                          for key in differ if key != "task_ids")
        raise CompareError(f"--merge {source.path}: its held-out evaluation differs from this one in "
                           f"{', '.join(differ)}" + (f" ({shown})" if shown else "")
                           + "; merge only results evaluated with the same spec and evaluation settings.")
    recorded_baseline = source.results.get("baseline")
    if baseline and recorded_baseline and any(
        recorded_baseline.get(key) != baseline.get(key) for key in ("model", "successes", "turns_mean", "invalid_action_rate")
    ):
        console.print(
            f"[yellow]Warning:[/yellow] the model before RL scores {baseline['successes']}/{baseline['episodes']} "
            f"here ({escape(str(baseline['model']))}) and {recorded_baseline.get('successes')}/"
            f"{recorded_baseline.get('episodes')} in {escape(str(source.path))} "
            f"({escape(str(recorded_baseline.get('model')))}): its runs may have started from another model.",
            highlight=False, soft_wrap=True,
        )
    return {
        "file": str(source.path),
        "baseline": recorded_baseline,
        "eval_seconds": (source.results.get("compute") or {}).get("eval_seconds", 0.0),
    }


def compare(
    spec_path: Path,
    output_dir: Path | None = None,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    console: Console | None = None,
    reevaluate: bool = False,
    on_seed_done: Callable[[dict[str, Any]], None] | None = None,
    train_missing: bool = True,
    merge: list[Path] | None = None,
) -> dict[str, Any]:
    """Train what is missing, evaluate everything on the same tasks, return the results (JSON-ready).

    With `train_missing=False` nothing trains: the runs that finished are evaluated and reported, the
    others are named and left out (a report part-way through a comparison that spans several sessions).

    Seed by seed: every method trains with the seed, then the runs finished so far are evaluated and, when
    more seeds follow, `on_seed_done` receives the results so far (a comparison stopped part-way has
    held-out numbers for its finished seeds). Evaluations are kept in OUTPUT/eval-cache and reused while
    the checkpoint, model and settings are unchanged; `reevaluate` plays every target again once (and
    refreshes the cache).

    `merge` names results.json files of other comparisons of the same spec: their runs are reported as recorded
    there (not trained or evaluated here) unless this folder has the run finished, and the evaluation here
    must match theirs (same tasks and settings)."""
    console = console or Console()
    spec = load_spec(spec_path)
    config_path = (spec_path.parent / spec.config).resolve()
    output_dir = output_dir or Path(spec.output)
    unknown = sorted(set(methods or []) - set(spec.methods))
    if unknown:
        raise CompareError(f"unknown method(s) {unknown}; the spec has {sorted(spec.methods)}.")
    chosen_methods = methods or list(spec.methods)
    chosen_seeds = seeds if seeds is not None else spec.seeds
    for chosen, what in ((chosen_methods, "methods"), (chosen_seeds, "seeds")):
        if len(set(chosen)) != len(chosen):
            raise CompareError(f"--{what} names one twice: {','.join(map(str, chosen))}; name each once.")
    chosen_runs = [(seed, method) for seed in chosen_seeds for method in chosen_methods if spec.trains_with(method, seed)]
    if not chosen_runs:
        raise CompareError(
            "no run to train: " + "; ".join(f"{m} trains with seeds {spec.seeds_of(m)}" for m in chosen_methods)
            + f", not with --seeds {','.join(map(str, chosen_seeds))}."
        )
    check_references(spec, config_path)
    sources = [read_recorded(path, spec) for path in merge or []]
    with comparison_lock(output_dir):
        configs = {}
        for seed, method in chosen_runs:  # every run already on disk is checked before anything trains
            run_dir = output_dir / run_name(method, seed)
            overrides = [*spec.overrides, *spec.overrides_of(method), f"train.seed={seed}", f"output.dir={run_dir}"]
            configs[seed, method] = load_config(config_path, overrides)
            check_existing_run(configs[seed, method], run_dir, run_name(method, seed))
        recorded = recorded_runs(sources, chosen_runs)
        for seed, method in list(recorded):
            if finished(output_dir / run_name(method, seed), configs[seed, method]):
                console.print(f"{run_name(method, seed)}: finished here; this run is reported, not the one recorded in "
                              f"{recorded[seed, method]['merged_from']}.", highlight=False, soft_wrap=True)
                del recorded[seed, method]
        chosen_runs = [run for run in chosen_runs if run not in recorded]
        if recorded:
            console.print(f"Merged, as recorded: {', '.join(run_name(m, s) for s, m in recorded)}.", highlight=False,
                          soft_wrap=True)
        if not train_missing and chosen_runs:
            unfinished = [(seed, method) for seed, method in chosen_runs
                          if not finished(output_dir / run_name(method, seed), configs[seed, method])]
            for seed, method in unfinished:
                state = unfinished_state(output_dir / run_name(method, seed), configs[seed, method])
                console.print(f"{run_name(method, seed)}: {state}; left out (--no-train).", highlight=False,
                              soft_wrap=True)
            chosen_runs = [run for run in chosen_runs if run not in unfinished]
            if not chosen_runs and not recorded:
                raise CompareError(f"--no-train: no finished run to report in {output_dir}. Run the same command "
                                   "without --no-train to train them.")
        if spec.pairing_method not in chosen_methods:
            console.print(f"Not paired with {spec.pairing_method}: it is not among --methods. Add it to pair the runs "
                          "episode by episode; its finished runs are kept, not trained again.",
                          highlight=False, soft_wrap=True)

        runs: list[dict[str, Any]] = []
        played: set[str] = set()  # targets evaluated (or, with reevaluate, played again) by this command
        results: dict[str, Any] = {}
        seeds_with_runs = list(dict.fromkeys(seed for seed, _ in chosen_runs))
        # seed by seed, every method once per seed: a comparison stopped part-way has the same seeds for all methods
        for seed in seeds_with_runs:
            for method in [m for s, m in chosen_runs if s == seed]:
                run_dir = output_dir / run_name(method, seed)
                config = configs[seed, method]
                if finished(run_dir, config):
                    done_steps = max(r["step"] for r in read_metrics(run_dir))
                    console.print(f"{run_name(method, seed)}: already trained ({done_steps} steps), kept.")
                else:
                    console.print(f"[bold]{run_name(method, seed)}[/bold]: training {config.train.max_steps} steps.")
                    outcome = train(config, run_dir, resume=(run_dir / CONFIG_FILE).is_file(), console=console)
                    if outcome.exit_code == 130:
                        name = run_name(method, seed)
                        if finished(run_dir, config):  # the signal came during the last step
                            raise CompareInterrupted(
                                f"{name} finished ({config.train.max_steps} steps), then the comparison was interrupted "
                                "before evaluating. Re-run the same sdar compare command to evaluate and go on; finished "
                                "runs and evaluations are kept."
                            )
                        raise CompareInterrupted(
                            f"{name} interrupted: {unfinished_state(run_dir, config)}. Re-run the same sdar "
                            "compare command to resume it; finished runs and evaluations are kept."
                        )
                    if outcome.exit_code != 0:
                        raise CompareError(f"{run_name(method, seed)} did not finish: {outcome.message}")
                metrics = read_metrics(run_dir, strict=True)
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "run_dir": str(run_dir),
                        "train_seconds": sum(r.get("step_seconds") or 0.0 for r in metrics),
                        "curve": [{key: finite_or_none(r.get(key)) for key in CURVE_KEYS} for r in metrics],
                    }
                )
            results = _evaluate(spec, spec_path, config_path, output_dir, runs, chosen_methods, chosen_seeds, console,
                                reevaluate, played, recorded, sources)
            if on_seed_done is not None and seed != seeds_with_runs[-1]:
                on_seed_done(results)
        if not seeds_with_runs:  # every chosen run was merged: only the models before RL play here
            results = _evaluate(spec, spec_path, config_path, output_dir, [], chosen_methods, chosen_seeds, console,
                                reevaluate, played, recorded, sources)
        return results


def _evaluate(
    spec: CompareSpec,
    spec_path: Path,
    config_path: Path,
    output_dir: Path,
    trained: list[dict[str, Any]],
    chosen_methods: list[str],
    chosen_seeds: list[int],
    console: Console,
    reevaluate: bool,
    played: set[str],
    recorded: dict[tuple[int, str], dict[str, Any]] | None = None,
    sources: list["RecordedResults"] | None = None,
) -> dict[str, Any]:
    """Evaluate the trained runs (and the models before RL) on the held-out tasks; the results so far.

    `played` holds the targets this command evaluated already; they are read back from the cache and the
    new ones are added to it. `recorded` runs (merged from `sources`) join as they were evaluated there."""
    recorded, sources = recorded or {}, sources or []
    runs = [dict(run) for run in trained]
    targets = [run["run_dir"] for run in runs]
    if spec.best:
        for run in runs:
            best = best_checkpoint(Path(run["run_dir"]), read_metrics(Path(run["run_dir"]), strict=True))
            if best is not None and best != latest_checkpoint(Path(run["run_dir"])):
                run["best_target"] = str(best)
                targets.append(str(best))
    base_model = load_config(config_path, spec.overrides).model.name
    if spec.baseline:
        targets = [base_model, *targets]
    # references last: the first run decides the shared tasks and settings (and a base model's prompt format)
    targets += [model for model in dict.fromkeys(spec.references.values()) if model not in targets]
    eval_seconds: dict[str, float] = {}
    if targets:
        report = evaluate_targets(
            targets, None, [*spec.overrides, *spec.eval_overrides], console,
            cache_dir=output_dir / EVAL_CACHE, reuse=not reevaluate, seconds=eval_seconds, reuse_names=played,
        )
    else:  # nothing plays here (every run merged, no model before RL): the merged evaluation is the one reported
        report = {"settings": sources[0].results["evaluation"], "targets": []}
    played.update(targets)
    by_target = {t["target"]: t for t in report["targets"]}
    for run in runs:
        result = by_target[run["run_dir"]]
        run["checkpoint"] = result["checkpoint"]
        run["final"] = result["overall"]
        # per held-out episode (same order for every target), so runs can be compared episode by episode
        run["final_episodes"] = [
            {key: episode[key] for key in ("task_id", "won", "turns", "invalid_actions")} for episode in result["episodes"]
        ]
        if spec.best:
            best = by_target[run.pop("best_target")] if "best_target" in run else result
            run["best"] = {"step": best["step"], "checkpoint": best["checkpoint"], **best["overall"]}
    baseline = {"model": base_model, **by_target[base_model]["overall"]} if spec.baseline else None
    merged = [check_recorded(source, report["settings"], baseline, console) for source in sources]
    for run in recorded.values():
        copy = dict(run)
        copy.pop("paired", None)  # paired again below, with the runs of this report
        runs.append(copy)
    runs.sort(key=lambda run: (chosen_methods.index(run["method"]), chosen_seeds.index(run["seed"])))
    pair_runs(runs, spec.pairing_method)
    summary = {}
    for method in [m for m in chosen_methods if any(run["method"] == m for run in runs)]:
        rates = [run["final"]["success_rate"] for run in runs if run["method"] == method]
        mean, std = mean_and_std(rates)
        summary[method] = {"seeds": len(rates), "success_mean": mean, "success_std": std, "per_seed": rates}
        points = [point for run in runs if run["method"] == method for point in run["curve"]]
        summary[method]["teacher"] = {
            key: (sum(values) / len(values) if (values := [p[key] for p in points if p.get(key) is not None]) else None)
            for key in GATE_KEYS
        }
        if spec.best:
            best_rates = [run["best"]["success_rate"] for run in runs if run["method"] == method]
            best_mean, best_std = mean_and_std(best_rates)
            summary[method].update(best_mean=best_mean, best_std=best_std, best_per_seed=best_rates)
        pairs = [PairedCounts(**{k: run["paired"][k] for k in PAIR_KEYS}) for run in runs
                 if run["method"] == method and "paired" in run]
        if pairs:  # counts summed over the seeds; no pooled p-value: every seed plays the same tasks, so the
            # pooled episodes are not independent, and seeds are too few to test over
            pooled = sum(pairs[1:], pairs[0])
            summary[method]["paired"] = {"against": spec.pairing_method, "seeds": len(pairs), **vars(pooled)}
    trained = {(run["method"], run["seed"]) for run in runs}
    # a seed is done when every chosen method that trains with all seeds has its run (--no-train can leave
    # one out); a sweep on named seeds only is not waited for (the note lists the methods missing)
    every_seed = [m for m in chosen_methods if not isinstance(spec.methods[m], MethodSpec)]
    seeds_done = [seed for seed in dict.fromkeys([*spec.seeds, *chosen_seeds])
                  if any(s == seed for _, s in trained) and all((m, seed) in trained for m in every_seed)]
    planned = {(method, seed) for method in spec.methods for seed in spec.seeds_of(method)}
    return {
        "spec": spec.model_dump(),
        "spec_file": str(spec_path),
        # complete: every method and seed of the spec (a narrower --seeds or --methods gives partial results)
        "seeds": spec.seeds,
        "seeds_done": seeds_done,
        "methods_done": [method for method in chosen_methods if method in summary],
        "complete": trained >= planned,
        "evaluation": report["settings"],
        "baseline": baseline,
        "references": {
            label: {"model": model, **by_target[model]["overall"]} for label, model in spec.references.items()
        },
        "methods": summary,
        "runs": runs,
        "merged": merged,
        "compute": {
            "train_seconds": sum(run["train_seconds"] for run in runs),  # merged runs too
            # as played, also for evaluations reused from the cache, plus the merged files' own
            "eval_seconds": sum(eval_seconds.values()) + sum(m["eval_seconds"] for m in merged),
        },
    }


#: a pairing's counts, as PairedCounts names them
PAIR_KEYS = ("both", "only_first", "only_second", "neither")


def pair_runs(runs: list[dict[str, Any]], against: str) -> None:
    """Add to every run of another method the episode-by-episode pairing of its final checkpoint with the run
    of `against` with the same seed (when there is one): counts and the exact McNemar p-value. `only_first`
    counts the episodes this run won and `against` lost."""
    by_seed = {run["seed"]: run for run in runs if run["method"] == against}
    for run in runs:
        other = by_seed.get(run["seed"])
        if run["method"] == against or other is None:
            continue
        counts = paired_counts(run["final_episodes"], other["final_episodes"])
        run["paired"] = {"against": against, **vars(counts), "p_value": counts.p_value}


def write_results(results: dict[str, Any], destination: Path) -> list[Path]:
    """results.json, results.md and success.png in `destination`, each replaced whole (written beside, then
    renamed), so an interrupted write never leaves a half file; the paths written."""
    destination.mkdir(parents=True, exist_ok=True)
    paths = [destination / "results.json", destination / "results.md", destination / "success.png"]
    with staged_file(paths[0]) as data, staged_file(paths[1]) as table, staged_file(paths[2], ".png") as plot:
        data.write_text(json.dumps(results, indent=2) + "\n")
        table.write_text(results_markdown(results))
        plot_curves(results, plot)
    return paths


def fixed_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, model, result) of the rows that are not methods: the references, then the model before RL."""
    rows = [(label, row["model"], row) for label, row in (results.get("references") or {}).items()]
    if results.get("baseline"):
        rows.append((BASELINE_LABEL, results["baseline"]["model"], results["baseline"]))
    return rows


def partial_note(results: dict[str, Any]) -> str | None:
    """A line saying which seeds the results cover, while some are still to train; None when complete."""
    if results.get("complete", True):
        return None
    done, planned = results["seeds_done"], results["seeds"]
    if done:
        note = f"Partial: seeds {', '.join(map(str, done))} done of {', '.join(map(str, planned))}"
    else:
        note = f"Partial: no seed done for every method yet (seeds {', '.join(map(str, planned))})"
    methods = results["spec"]["methods"]
    if len(results.get("methods_done", methods)) < len(methods):
        note += f"; methods {', '.join(results['methods_done'])} of {', '.join(methods)}"
    return note + "."


def rate(mean: float, std: float | None) -> str:
    """A success rate as a percentage, with its std over seeds when there is one."""
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")


def results_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"held-out success ({results['evaluation']['episodes']} episodes per agent)",
                  caption=partial_note(results))
    with_best = results["spec"].get("best", False)
    columns = ["method", "seeds", "success mean ± std", "per seed"] + (["best ckpt mean ± std"] if with_best else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")

    for label, model, row in fixed_rows(results):
        table.add_row(escape(f"{label} ({model})"), "-", f"{100 * row['success_rate']:.1f}%", "-", *(["-"] if with_best else []))
    for method, row in results["methods"].items():
        cells = [escape(method), str(row["seeds"]), rate(row["success_mean"], row["success_std"]),
                 ", ".join(f"{100 * r:.0f}%" for r in row["per_seed"])]
        if with_best:
            cells.append(rate(row["best_mean"], row["best_std"]))
        table.add_row(*cells)
    return table


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table (for a README), with the settings and compute beneath it."""

    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    evaluation = results["evaluation"]
    with_best = results["spec"].get("best", False)
    best_header, best_rule = (" best checkpoint, mean ± std | best per seed (checkpoint) |", "---|---|") if with_best else ("", "")
    lines = [
        f"| method | seeds | held-out success, mean ± std | per seed |{best_header} gate mean | gate active | teacher gap |",
        f"|---|---|---|---|{best_rule}---|---|---|",
    ]
    for label, model, row in fixed_rows(results):
        lines.append(f"| {label} (`{model}`) | - | {rate(row['success_rate'], None)} | - |" + (" - | - |" if with_best else "")
                     + " - | - | - |")
    for method, row in results["methods"].items():
        teacher = row.get("teacher") or {}
        best = ""
        if with_best:
            per_seed = [run["best"] for run in results["runs"] if run["method"] == method]
            best = (f" {rate(row['best_mean'], row['best_std'])} | "
                    + ", ".join(f"{100 * b['success_rate']:.0f}% ({b['step']})" for b in per_seed) + " |")
        lines.append(
            f"| {method} | {row['seeds']} | {rate(row['success_mean'], row['success_std'])} | "
            + ", ".join(f"{100 * r:.0f}%" for r in row["per_seed"])
            + f" |{best} {number(teacher.get('gate_mean'), '.3f')} | {number(teacher.get('gate_active_ratio'), '.2f')} | "
            f"{number(teacher.get('teacher_gap_mean'), '+.3f')} |"
        )
    compute = results["compute"]
    lines += [
        "",
        f"{evaluation['episodes']} held-out episodes per agent ({evaluation['env']}, split {evaluation['split']}, "
        f"{evaluation['decoding']}" + (f" at T={evaluation['temperature']}" if evaluation.get("temperature") else "")
        + f", eval seed {evaluation['seed']}); std is the sample standard deviation over seeds. Compute: "
        f"{compute['train_seconds'] / 3600:.2f} h training, {compute['eval_seconds'] / 3600:.2f} h evaluation.",
    ]
    for source in results.get("merged") or []:
        names = [run_name(run["method"], run["seed"]) for run in results["runs"] if run.get("merged_from") == source["file"]]
        if names:
            lines += ["", f"Merged from `{source['file']}` as recorded there (trained and evaluated there): "
                      f"{', '.join(names)}."]
    lines += paired_markdown(results)
    if (note := partial_note(results)) is not None:
        lines += ["", f"**{note}**"]
    return "\n".join(lines) + "\n"


def paired_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], str, str]]:
    """(method, seed or "all", pairing, this run's success, the other's) for every paired run, then each
    method's counts summed over its seeds; success as "53% (36-69)" with the 95% Wilson interval."""

    def success(run: dict[str, Any]) -> str:
        low, high = run["final"]["success_ci95"]
        return f"{100 * run['final']['success_rate']:.0f}% ({100 * low:.0f}-{100 * high:.0f})"

    runs = results["runs"]
    rows = []
    for method, row in results["methods"].items():
        paired = [run for run in runs if run["method"] == method and "paired" in run]
        for run in paired:
            other = next(r for r in runs if r["method"] == run["paired"]["against"] and r["seed"] == run["seed"])
            rows.append((method, str(run["seed"]), run["paired"], success(run), success(other)))
        if len(paired) > 1:
            rows.append((method, "all", row["paired"], "", ""))
    return rows


def p_value(pair: dict[str, Any]) -> str:
    """A pairing's McNemar p-value for a table ("-" for counts summed over seeds, which have none)."""
    return f"{pair['p_value']:.3g}" if "p_value" in pair else "-"


def paired_table(results: dict[str, Any]) -> Table | None:
    """The episode-by-episode pairing for the terminal (None when nothing was paired)."""
    rows = paired_rows(results)
    if not rows:
        return None
    against = rows[0][2]["against"]
    table = Table(title=f"paired with {escape(against)} on the same held-out episodes (final checkpoints)")
    for column in ("method", "seed", "success (95%)", escape(against), "both", "only method", f"only {escape(against)}",
                   "neither", "McNemar p"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, seed, pair, mine, theirs in rows:
        table.add_row(escape(method), seed, mine or "-", theirs or "-", *(str(pair[k]) for k in PAIR_KEYS),
                      p_value(pair))
    return table


def paired_markdown(results: dict[str, Any]) -> list[str]:
    """The episode-by-episode table under the results (none when nothing was paired)."""
    rows = paired_rows(results)
    if not rows:
        return []
    against = rows[0][2]["against"]
    lines = [
        "",
        f"Paired with `{against}` on the same held-out episodes (final checkpoints, same seed; 95% Wilson intervals):",
        "",
        f"| method | seed | success | {against} | both won | only method | only {against} | neither | exact McNemar p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, seed, pair, mine, theirs in rows:
        lines.append(f"| {method} | {seed} | {mine or '-'} | {theirs or '-'} | {pair['both']} | {pair['only_first']} | "
                     f"{pair['only_second']} | {pair['neither']} | {p_value(pair)} |")
    lines += ["", "Per seed, the p-value tests whether the episodes the two checkpoints disagree on split more unevenly "
              "than chance would: it compares two checkpoints, not two methods (that takes the spread over seeds). "
              "The `all` rows sum the counts over seeds, with no p-value: every seed plays the same tasks."]
    return lines


def curve_bands(results: dict[str, Any], key: str = "success_rate") -> dict[str, dict[str, list[float]]]:
    """Per method and training step, the mean, min and max of `key` over the seeds that logged it."""
    bands: dict[str, dict[str, list[float]]] = {}
    for method in results["methods"]:
        curves = [run["curve"] for run in results["runs"] if run["method"] == method]
        band: dict[str, list[float]] = {"step": [], "mean": [], "low": [], "high": []}
        for step in sorted({point["step"] for curve in curves for point in curve}):
            values = [p[key] for c in curves for p in c if p["step"] == step and p.get(key) is not None]
            if values:
                band["step"].append(step)
                band["mean"].append(sum(values) / len(values))
                band["low"].append(min(values))
                band["high"].append(max(values))
        bands[method] = band
    return bands


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Left: training success per step, mean over seeds with a min-max band, one line per method (drawn
    slightly apart, so methods with equal values stay visible). Right: held-out success of every seed's
    final checkpoint, the mean and std over seeds, each seed's best checkpoint (hollow) when evaluated, and the
    models before RL and any references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (axis, held_out) = plt.subplots(
        1, 2, figsize=(9, 4), dpi=120, gridspec_kw={"width_ratios": [3, 1]}, sharey=True
    )
    methods = list(results["methods"])
    markers, styles = "osD^v<>", ["-", "--", ":", "-."]
    bands = curve_bands(results)
    for index, method in enumerate(methods):
        band = bands[method]
        shift = 0.08 * (index - (len(methods) - 1) / 2)
        steps = [step + shift for step in band["step"]]
        seeds = results["methods"][method]["seeds"]
        (line,) = axis.plot(steps, band["mean"], marker=markers[index % len(markers)],
                            linestyle=styles[index % len(styles)], label=f"{method} ({seeds} seed{'s' if seeds != 1 else ''})")
        axis.fill_between(steps, band["low"], band["high"], color=line.get_color(), alpha=0.12)
        row = results["methods"][method]
        spread = [index + 0.12 * (k - (len(row["per_seed"]) - 1) / 2) for k in range(len(row["per_seed"]))]
        held_out.scatter(spread, row["per_seed"], color=line.get_color(), alpha=0.5, s=18)
        held_out.errorbar([index], [row["success_mean"]], yerr=[[row["success_std"] or 0.0]] * 2,
                          color=line.get_color(), marker=markers[index % len(markers)], markersize=8, capsize=4)
        if "best_per_seed" in row:  # each seed's best checkpoint: hollow, right of the final ones
            held_out.scatter([x + 0.3 for x in spread], row["best_per_seed"], facecolors="none",
                             edgecolors=line.get_color(), marker=markers[index % len(markers)], s=22,
                             label="best checkpoint, per seed" if index == 0 else None)
    # thin grey lines with their own dash patterns, unlike any method's line
    dashes = [(0, (6, 2, 1, 2)), (0, (1, 3)), (0, (8, 4)), (0, (3, 1, 1, 1, 1, 1))]
    for number, (label, _, row) in enumerate(reversed(fixed_rows(results))):
        for target in (axis, held_out):
            target.axhline(row["success_rate"], color="grey", linewidth=1.0, linestyle=dashes[number % len(dashes)],
                           label=f"{label}, held-out" if target is axis else None)
    axis.set_xlabel("training step")
    axis.set_ylabel("success rate")
    axis.set_title("training batches", fontsize=9)
    axis.set_ylim(-0.02, 1.02)
    axis.legend(loc="best", fontsize=7)
    axis.grid(alpha=0.3)
    held_out.set_title(f"held-out ({results['evaluation']['episodes']} episodes)", fontsize=9)
    held_out.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
    held_out.set_xlim(-0.6, len(methods) - 0.2)
    if held_out.get_legend_handles_labels()[0]:
        held_out.legend(loc="lower right", fontsize=7)
    held_out.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
