"""The `sdar` command line: thin functions over the library."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__

app = typer.Typer(
    help=(
        "sdar trains multi-turn LLM agents with GRPO plus SDAR's gated self-distillation (arXiv 2605.15155) "
        "on one GPU or a laptop CPU: a LoRA actor whose teacher and reference are its own frozen base weights."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

USER_ERROR = 2


def _fail(message: str) -> NoReturn:
    """Print a user error (what is wrong and how to fix it) and exit with USER_ERROR, without a traceback."""
    err_console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(USER_ERROR) from None


@contextlib.contextmanager
def _user_errors(*types: type[BaseException], describe: Callable[[Any], str] = str):
    """Exceptions of `types` raised inside the block are user errors: `describe(err)` is printed, exit 2."""
    try:
        yield
    except types as err:
        _fail(describe(err))


def _version(value: bool) -> None:
    if value:
        console.print(f"sdar {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """sdar: Self-Distilled Agentic RL for multi-turn LLM agents."""


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config, e.g. examples/quickstart.yaml.")],
    output_dir: Annotated[
        Optional[Path], typer.Option("--output-dir", "-o", help="Run directory (default: the config's output.dir).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the run directory from its last checkpoint.")
    ] = False,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a config key, e.g. --set train.max_steps=10 (repeatable)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Load only the model's config.json, print the estimated peak memory of this run and whether it "
            "fits the visible GPU (or this machine), and exit; nothing is written.",
        ),
    ] = False,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe-teacher",
            help="With --dry-run: also load the model and print `sdar probe-teacher`'s verdict on a few expert states.",
        ),
    ] = False,
) -> None:
    """Train a LoRA agent with GRPO + gated self-distillation in a multi-turn environment.

    Each step plays rollout.tasks_per_step tasks rollout.group_size times, turns every turn into a
    training sample, scores the agent's own tokens with the teacher (the same weights shown the
    privileged context), and makes train.updates_per_rollout updates (train.max_steps counts updates).
    The run directory gets config.yaml, metrics.jsonl, gates/step-N.jsonl and checkpoint-N/ (a PEFT
    adapter). Ctrl-C writes a checkpoint and exits 130; --resume continues from it.

    Config sections: model (name, dtype, load_in_4bit, lora), env (name, kwargs, splits), rollout
    (group_size, tasks_per_step, max_turns, history_turns, max_new_tokens, temperature, prompt_template,
    invalid_action, ...), algorithm (name: sdar | grpo | grpo_opsd | opsd | rlsd | skill_sd | skill_grpo,
    sdar_coef, gate_beta, kl_coef, kl_estimator, dual_clip, ...), teacher (weights: live | base,
    context_template), train (max_steps, save_steps, seed, learning_rate, micro_batches,
    updates_per_rollout, report_to, ...), output (dir, save_gates). Every key, its default and its meaning:
    README "Configuration" and src/sdar_cli/config.py. Bad keys or values exit with code 2.
    """
    _quiet_libraries()
    from . import distributed
    from .config import ConfigError, load_config
    from .envs import EnvironmentConfigError
    from .models import ModelLoadError
    from .run import RunDirError
    from .run import train as run_training

    if not distributed.is_main():  # under torchrun / accelerate launch the main process speaks for all
        console.quiet = err_console.quiet = True

    run_config = None

    def disk_error(err: OSError) -> str:
        run_dir = str(run_config.output.dir)
        return (f"{_os_error(err)}. If this is the run directory ({run_dir}): free disk space or fix its permissions, "
                f"or choose another --output-dir; continue with: sdar train {config} --output-dir {run_dir} --resume "
                "(the checkpoints written are whole).")

    with _user_errors(OSError, describe=disk_error), \
            _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, RunDirError):
        run_config = load_config(config, overrides)
        if output_dir is not None:
            run_config.output.dir = str(output_dir)
        if dry_run:
            from .run import dry_run as estimate_memory

            for warning in estimate_memory(run_config, console):
                err_console.print(f"[yellow]Warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
            if probe:
                _dry_run_probe(run_config)
            raise typer.Exit(0)
        if probe:
            raise ConfigError("--probe-teacher goes with --dry-run (or run `sdar probe-teacher CONFIG`).")
        try:
            outcome = run_training(run_config, Path(run_config.output.dir), resume=resume, console=console)
        except KeyboardInterrupt:  # before the first step (from then on, training's own handler stops it)
            err_console.print("[yellow]Interrupted while starting (loading the model and environment): nothing was "
                              "trained.[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    style = "green" if outcome.exit_code == 0 else ("yellow" if outcome.exit_code == 130 else "red")
    (console if outcome.exit_code == 0 else err_console).print(f"[{style}]{escape(outcome.message)}[/{style}]", highlight=False, soft_wrap=True)
    raise typer.Exit(outcome.exit_code)


def _dry_run_probe(run_config) -> None:
    """The teacher probe's verdict on a few expert states (part of `sdar train --dry-run --probe-teacher`)."""
    from .targets import Target
    from .teacher_probe import DRY_RUN_STATES, ProbeError, probe_teacher, report_lines

    try:
        with console.status(f"probing the teacher on {DRY_RUN_STATES} expert states"):
            report = probe_teacher(Target(run_config.model.name, "base", run_config, None, None), DRY_RUN_STATES)
    except ProbeError as err:
        err_console.print(f"[yellow]Warning:[/yellow] the teacher probe could not run: {escape(str(err))}",
                          highlight=False, soft_wrap=True)
        return
    for line in report_lines(report):
        console.print(escape(line), highlight=False, soft_wrap=True)


@app.command("eval")
def evaluate(
    targets: Annotated[
        list[str],
        typer.Argument(
            help="Run directories (latest checkpoint), checkpoint-N folders, or base models (hub id, local "
            "folder, smollm2-135m-instruct). Several: a side-by-side comparison on the same tasks."
        ),
    ],
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the run's config.yaml).")
    ] = None,
    episodes: Annotated[Optional[int], typer.Option("--episodes", "-n", help="Episodes per target (eval.episodes).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Task split (env.eval_split, default 'test').")] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a config key, e.g. --set eval.decoding=greedy (repeatable)."),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report to this JSON file.")] = None,
    engine: Annotated[
        Optional[str], typer.Option("--engine", help="Generation engine: hf or vllm (rollout.engine; default: the config's).")
    ] = None,
) -> None:
    """Evaluate trained agents (or a base model) on held-out tasks.

    Plays eval.episodes episodes per target, sampled at temperature 0.4 (the paper's validation
    decoding; --set eval.decoding=greedy for greedy), and reports the success rate with its 95% Wilson
    interval, mean reward, mean turns and invalid-action rate, overall and per task type. Tasks are
    drawn with eval.seed: the same seed gives the same tasks and the same numbers. A base model with
    no --config borrows the config of the run it is compared with.
    """
    _single_process("eval")
    _quiet_libraries()
    import json

    from .config import ConfigError
    from .envs import EnvironmentConfigError
    from .evaluate import EvalError, evaluate_targets, print_report
    from .models import ModelLoadError
    from .targets import TargetError

    if json_path is not None:
        problem = _unwritable(json_path)
        if problem:
            _fail(f"--json {json_path}: {problem}. Pass a path in a writable folder (checked before playing any episode).")
    cli_overrides = [*(overrides or [])]
    if episodes is not None:
        cli_overrides.append(f"eval.episodes={episodes}")
    if split is not None:
        cli_overrides.append(f"env.eval_split={split}")
    if engine is not None:
        cli_overrides.append(f"rollout.engine={engine}")
    try:
        with _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, TargetError, EvalError), \
                _stop_on_interrupt("the evaluation"):
            report = evaluate_targets(targets, config, cli_overrides, console)
    except KeyboardInterrupt:
        err_console.print("[yellow]Evaluation interrupted: no report was written.[/yellow]", highlight=False)
        raise typer.Exit(130) from None
    print_report(console, report)
    if json_path is not None:
        with _user_errors(OSError, describe=lambda err: f"could not write the report to {json_path}: "
                          f"{_os_error(err)}. The results are printed above."):
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"Report written to {json_path}", highlight=False)


def _os_error(err: OSError) -> str:
    """An OSError as one line: what failed, on which path."""
    if err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return str(err)


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path` (None: it can); its folder is created, a probe file written
    and removed, so a full disk or a read-only folder shows now rather than after the work is done."""
    import tempfile

    if path.is_dir():
        return "is a directory"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe") as probe:
            probe.write(b"{}")
            probe.flush()
    except OSError as err:
        return _os_error(err)
    return None


@contextlib.contextmanager
def _stop_on_interrupt(what: str):
    """The first Ctrl-C or SIGTERM says at once what it waits for, then stops `what` (KeyboardInterrupt);
    a second one exits at once."""
    pressed = []

    def handle(signum, frame):
        if pressed:
            err_console.print(f"[yellow]Stopped {what} at once.[/yellow]", highlight=False)
            sys.stderr.flush()
            os._exit(130)
        pressed.append(signum)
        err_console.print(
            f"[yellow]{signal.Signals(signum).name} received: stopping {what} once the environment calls in progress "
            "return (each waits at most env.step_timeout_s); press Ctrl-C again to exit at once.[/yellow]",
            highlight=False,
            soft_wrap=True,
        )
        sys.stderr.flush()
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("inspect-gates")
def inspect_gates(
    target: Annotated[
        str,
        typer.Argument(
            help="A run directory (reads its gates/step-N.jsonl), or a checkpoint-N folder or base model "
            "(plays fresh episodes and computes their gates, without training)."
        ),
    ],
    step: Annotated[Optional[int], typer.Option("--step", help="Training step to show (default: the latest).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Only this task id or task type.")] = None,
    episode: Annotated[Optional[int], typer.Option("--episode", help="Only this episode number.")] = None,
    turn: Annotated[Optional[int], typer.Option("--turn", help="Only this turn index (0 = first).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Episodes printed in the terminal (all go to --html).")] = 4,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="Write summary plots (PNG) here.")] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="Config for a checkpoint or base model (default: the run's).")
    ] = None,
    episodes: Annotated[
        int, typer.Option("--episodes", "-n", help="Fresh episodes to play for a checkpoint or base model.")
    ] = 4,
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config key for fresh episodes (repeatable).")
    ] = None,
    engine: Annotated[
        Optional[str], typer.Option("--engine", help="Engine for fresh episodes: hf or vllm (rollout.engine).")
    ] = None,
) -> None:
    """Show where the teacher endorses (gate near 1) or rejects (near 0) the agent's own tokens.

    Prints the agent's tokens coloured by gate, per episode and turn, with each turn's action,
    reward and advantage (the observations are not stored in gate records, so they are not shown),
    then a gate histogram, the active ratio (gate > 0.5), the mean teacher-student gap, and the most
    endorsed and most rejected tokens. --html writes an interactive report (hover a token for its
    log-probs; a step selector); --png writes plots over training steps.
    """
    _single_process("inspect-gates")
    from .gates import GateDataError, is_training_run, load_run_view, print_gates

    path = Path(target).expanduser()
    with _user_errors(GateDataError, OSError):
        if is_training_run(path):
            view = load_run_view(path, step, task, episode, turn)
        else:
            engine_override = [f"rollout.engine={engine}"] if engine is not None else []
            view = _probe_gates(target, config, episodes, [*(overrides or []), *engine_override], task, episode, turn)
        print_gates(console, view, limit)
        if html is not None:
            from .gates.html_report import write_html

            write_html(html, view)
            console.print(f"HTML report written to {html}", highlight=False)
        if png is not None:
            from .gates.plots import write_png

            write_png(png, view)
            console.print(f"Plots written to {png}", highlight=False)


def _probe_gates(target: str, config: Optional[Path], episodes: int, overrides: list[str], *filters):
    """Fresh rollouts of a checkpoint or base model, scored by the teacher (user errors exit 2)."""
    _quiet_libraries()
    from .config import ConfigError
    from .envs import EnvironmentConfigError
    from .evaluate import EvalError
    from .gates.probe import probe_view
    from .models import ModelLoadError
    from .targets import TargetError, resolve_target

    with _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, TargetError, EvalError):
        return probe_view(resolve_target(target, config, [*overrides, f"eval.episodes={episodes}"]), *filters)


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Bench config, e.g. bench/cpu_small.yaml or bench/gpu_7b.yaml.")],
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a bench key, e.g. --set batch.prompt_tokens=512 (repeatable)."),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="JSON report path (default: runs/bench/<config name>.json).")
    ] = None,
) -> None:
    """Measure one training step of grpo and of sdar on the same synthetic rollout batch.

    The model is random-initialised from the config's shape (tiny, smollm2-135m, qwen2.5-3b,
    qwen2.5-7b: no download). Each algorithm runs in its own process; the report gives per-phase
    seconds (generation, reference pass, teacher pass, update), tokens per second, peak memory
    (max reserved on a GPU, plus the CUDA context apart; peak RSS on a CPU), the memory.py estimate, and the sdar/grpo time and
    memory ratios against the targets (1.15 and 1.05). Writes a JSON report and prints a table.
    """
    _single_process("bench")
    _quiet_libraries()
    import json

    from .perf.bench import BenchError, heading, load_bench_config, render_table, run_benchmark, verdict_lines
    from .config import ConfigError
    from .models import ModelLoadError

    with _user_errors(ConfigError, ModelLoadError, BenchError):
        bench_config = load_bench_config(config, overrides)
        with console.status("benchmarking") as status:
            report = run_benchmark(bench_config, on_progress=lambda text: status.update(f"benchmarking: {text}"))
    console.print(heading(report), highlight=False, soft_wrap=True)
    console.print(render_table(report))
    for line in verdict_lines(report):
        console.print(line, highlight=False)
    output = output or Path("runs") / "bench" / f"{config.stem}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"Report written to {output}", highlight=False)



@app.command()
def warmup(
    config: Annotated[Path, typer.Argument(help="Run config (its warmup section, model, env and rollout are used).")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for the warmed-up model (must be new).")],
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set warmup.episodes=32.")
    ] = None,
) -> None:
    """Supervised warm-up on expert demonstrations: writes a model folder that model.name can point at.

    The environment's expert plays warmup.episodes train tasks; every turn is rendered as the rollout
    renders it and the expert's action is the target response. A LoRA is fitted on the response tokens
    (TRL's SFTTrainer), merged into the base weights and saved with the tokenizer.
    """
    _single_process("warmup")
    _quiet_libraries()
    from .config import ConfigError, load_config
    from .envs import EnvironmentConfigError
    from .models import ModelLoadError
    from .warmup import WarmupError
    from .warmup import warmup as run_warmup

    with _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, WarmupError):
        run_config = load_config(config, overrides)
        with console.status("warm-up: demonstrations and fine-tuning"):
            summary = run_warmup(run_config, output_dir, console)
    console.print(
        f"Warmed-up model written to {output_dir}: {summary['episodes']} expert episodes ({summary['turns']} turns, "
        f"{summary['expert_won']} won), {summary['optimizer_steps']} optimizer steps, loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss']:.3f}, {summary['seconds']:.0f} s. Train from it with --set model.name={output_dir}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("compare")
def compare_methods(
    spec: Annotated[Path, typer.Argument(help="Comparison spec, e.g. examples/compare/household.yaml.")],
    output_dir: Annotated[
        Optional[Path], typer.Option("--output-dir", "-o", help="Where the runs and results go (default: the spec's output).")
    ] = None,
    seeds: Annotated[
        Optional[str], typer.Option("--seeds", help="Comma-separated seeds to run instead of the spec's, e.g. 0.")
    ] = None,
    methods: Annotated[
        Optional[str], typer.Option("--methods", help="Comma-separated methods to run instead of all, e.g. sdar,grpo.")
    ] = None,
    reevaluate: Annotated[
        bool, typer.Option("--reevaluate", help="Play every evaluation again (each target once per command) instead of reusing OUTPUT/eval-cache.")
    ] = False,
    no_train: Annotated[
        bool, typer.Option("--no-train", help="Train nothing: evaluate and report the runs that finished, name the others.")
    ] = False,
    merge: Annotated[
        Optional[list[Path]],
        typer.Option("--merge", help="Another comparison's results.json (same spec, e.g. seeds trained on another "
                     "machine): its runs are reported as recorded there, not trained again (repeatable)."),
    ] = None,
) -> None:
    """Train each method with each seed on the same tasks and budget, then evaluate them all.

    Every (method, seed) trains in OUTPUT/METHOD-seedN, seed by seed (finished runs are kept, an
    interrupted one resumes). After each seed, the model before RL, the spec's references and every final
    checkpoint so far (and, with `best: true` in the spec, each run's best checkpoint) play the same
    held-out tasks (each evaluation is kept in OUTPUT/eval-cache and reused while nothing it depends on
    changed), and the results so far are written: OUTPUT/results.json (per run: held-out success and the
    training curve; per method: mean and standard deviation over seeds, teacher statistics; each run paired
    episode by episode with the same seed's run of the spec's `paired_against`, the first method by default),
    OUTPUT/results.md (the tables in markdown) and OUTPUT/success.png (training and held-out success).
    With --no-train, the results cover the runs that finished so far (a comparison spread over sessions).
    With --merge, runs recorded in other results.json files of the same spec join the report (the held-out
    evaluation must match; a run finished in OUTPUT is reported instead of a recorded one).
    """
    _single_process("compare")
    _quiet_libraries()
    from .compare import CompareError, CompareInterrupted, compare, load_spec, paired_table, results_table, write_results
    from .config import ConfigError
    from .envs import EnvironmentConfigError
    from .evaluate import EvalError
    from .models import ModelLoadError
    from .run import RunDirError
    from .targets import TargetError

    with _user_errors(ValueError, describe=lambda _: f"--seeds expects integers separated by commas, got {seeds!r}."):
        chosen_seeds = [int(part) for part in seeds.split(",")] if seeds else None
    chosen_methods = [part.strip() for part in methods.split(",")] if methods else None
    with _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, RunDirError, TargetError, EvalError,
                      CompareError):
        destination = output_dir or Path(load_spec(spec).output)

        def show(results: dict) -> None:
            console.print(results_table(results))
            if (paired := paired_table(results)) is not None:
                console.print(paired)

        def so_far(results: dict) -> None:
            show(results)
            try:
                paths = write_results(results, destination)
            except OSError as err:  # the comparison goes on; the final write tries again
                err_console.print(f"[yellow]Warning:[/yellow] could not write the results so far: {escape(str(err))}",
                                  highlight=False, soft_wrap=True)
                return
            done = f" (seeds {', '.join(map(str, results['seeds_done']))})" if results["seeds_done"] else ""
            console.print(f"Results so far{done} written to {', '.join(map(str, paths))}",
                          highlight=False, soft_wrap=True)

        try:
            # Ctrl-C / SIGTERM: a run in training checkpoints and stops (its own handler); elsewhere (loading,
            # evaluating) the comparison stops once the environment calls in progress return
            with _stop_on_interrupt("the comparison"):
                results = compare(spec, destination, chosen_seeds, chosen_methods, console, reevaluate=reevaluate,
                                  on_seed_done=so_far, train_missing=not no_train, merge=merge)
        except CompareInterrupted as err:
            console.print(f"[yellow]{escape(str(err))}[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:  # outside training (loading, evaluating): the finished work is on disk
            console.print("[yellow]Interrupted. Finished runs and evaluations are kept; re-run the same sdar compare "
                          "command to continue.[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    show(results)
    with _user_errors(OSError, describe=lambda err: f"could not write the results to {destination}: {err}. Free space "
                      "or fix permissions there, then re-run the same command (nothing is trained again)."):
        paths = write_results(results, destination)
    console.print(f"Results written to {', '.join(map(str, paths))}", highlight=False, soft_wrap=True)


@app.command("probe-teacher")
def probe_teacher(
    config: Annotated[Path, typer.Argument(help="Run config (its teacher, rollout, env and model are used).")],
    checkpoint: Annotated[
        Optional[Path],
        typer.Option("--checkpoint", help="A run directory (latest checkpoint) or checkpoint-N folder (default: the base model)."),
    ] = None,
    states: Annotated[int, typer.Option("--states", "-n", help="Expert states to probe.")] = 32,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report to this JSON file.")] = None,
    overrides: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Override a config key, e.g. --set teacher.placement=user_end (repeatable)."),
    ] = None,
) -> None:
    """Is the teacher informative? Measure it on expert states before training.

    The environment's expert plays train tasks; at each state the student and teacher prompts are rendered
    as training renders them, and the expert's next action and a random other admissible action are scored
    by both (log-probs at the rollout temperature). Prints the mean per-token gap T - S and its share > 0
    for each, the gates they would get, the AUC of the gap separating the expert's action from the other,
    the teacher prompt's extra tokens, and a verdict: informative, barely informative or misleading
    (thresholds: src/sdar_cli/teacher_probe.py). Without an expert, the agent's own samples are scored.
    """
    _single_process("probe-teacher")
    _quiet_libraries()
    import json

    from .config import ConfigError, load_config
    from .envs import EnvironmentConfigError
    from .models import ModelLoadError
    from .targets import Target, TargetError, resolve_target
    from .teacher_probe import ProbeError, report_lines
    from .teacher_probe import probe_teacher as run_probe

    with _user_errors(ConfigError, EnvironmentConfigError, ModelLoadError, TargetError, ProbeError):
        if checkpoint is not None:
            target = resolve_target(str(checkpoint), config, overrides or [])
        else:
            run_config = load_config(config, overrides)
            target = Target(run_config.model.name, "base", run_config, None, None)
        with console.status(f"probing the teacher on {states} expert states"):
            report = run_probe(target, states)
    for line in report_lines(report):
        console.print(escape(line), highlight=False, soft_wrap=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"Report written to {json_path}", highlight=False)


def _single_process(command: str) -> None:
    """Only `sdar train` runs as several processes; the other commands say so and exit 2."""
    from .distributed import DistributedConfigError, is_main, refuse_several

    try:
        refuse_several(command)
    except DistributedConfigError as err:
        if not is_main():  # the main process speaks for all
            raise typer.Exit(USER_ERROR) from None
        _fail(str(err))


def _quiet_libraries() -> None:
    # library deprecation notices are for sdar's developers, not its users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()


if __name__ == "__main__":  # pragma: no cover
    app()
