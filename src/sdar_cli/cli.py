"""The `sdar` command line: thin functions over the library."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

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
) -> None:
    """Train a LoRA agent with GRPO + gated self-distillation in a multi-turn environment.

    Each step plays rollout.tasks_per_step tasks rollout.group_size times, turns every turn into a
    training sample, scores the agent's own tokens with the teacher (the same weights shown the
    privileged context), and makes one update. The run directory gets config.yaml, metrics.jsonl,
    gates/step-N.jsonl and checkpoint-N/ (a PEFT adapter). Ctrl-C writes a checkpoint and exits 130;
    --resume continues from it.
    """
    _quiet_libraries()
    from .config import ConfigError, load_config
    from .envs import EnvironmentConfigError
    from .models import ModelLoadError
    from .run import RunDirError
    from .run import train as run_training

    try:
        run_config = load_config(config, overrides)
        if output_dir is not None:
            run_config.output.dir = str(output_dir)
        outcome = run_training(run_config, Path(run_config.output.dir), resume=resume, console=console)
    except (ConfigError, EnvironmentConfigError, ModelLoadError, RunDirError) as err:
        err_console.print(f"[red]Error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR) from None
    style = "green" if outcome.exit_code == 0 else ("yellow" if outcome.exit_code == 130 else "red")
    (console if outcome.exit_code == 0 else err_console).print(f"[{style}]{outcome.message}[/{style}]", highlight=False, soft_wrap=True)
    raise typer.Exit(outcome.exit_code)


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
