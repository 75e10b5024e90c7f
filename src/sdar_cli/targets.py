"""What `sdar eval` and `sdar inspect-gates` point at, and loading it as an agent.

A target is one of:
    run directory   its latest checkpoint-N/, with the run's config.yaml
    checkpoint-N/   that adapter, with config.yaml of the run directory that holds it
    base model      a hub id, a local model folder or 'smollm2-135m-instruct': the untrained baseline
An explicit config file replaces the run's config.yaml; `--set` overrides apply last. A base model
with no config file takes `fallback` (the config of a run it is compared with), else the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import RunConfig, load_config
from .models import load_base_model, load_tokenizer, looks_like_path
from .resume import adapter_problem
from .run import checkpoint_step, latest_checkpoint
from .rundir import CONFIG_FILE

ADAPTER_FILE = "adapter_config.json"


class TargetError(ValueError):
    """A target that cannot be evaluated as given; the message says what to pass instead."""


@dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    kind: Literal["run", "checkpoint", "base"]
    config: RunConfig
    checkpoint: Path | None  # the adapter folder; None for a base model
    step: int | None  # the checkpoint's training step; None for a base model
    warning: str | None = None  # what the user should know about the choice (a damaged newer checkpoint)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / ADAPTER_FILE).is_file()


def resolve_target(
    target: str, config_path: Path | None, overrides: list[str], fallback: RunConfig | None = None
) -> Target:
    """Find the adapter and the config of `target` (see the module docstring)."""
    path = Path(target).expanduser()
    if path.is_dir() and (path / ADAPTER_FILE).is_file():
        config_file = config_path or path.parent / CONFIG_FILE
        if not config_file.is_file():
            raise TargetError(
                f"Checkpoint {target} is not inside a run directory (no {path.parent / CONFIG_FILE}). "
                "Pass the config it was trained with: --config CONFIG."
            )
        problem = adapter_problem(path)
        if problem:
            raise TargetError(f"Checkpoint {target} is damaged ({problem}). Evaluate another checkpoint-N of its run.")
        number = path.name.removeprefix("checkpoint-")
        step = int(number) if number.isdigit() and number != path.name else None
        return Target(target, "checkpoint", load_config(config_file, overrides), path, step)
    if is_run_dir(path):
        skipped: list[tuple[Path, str]] = []
        checkpoint = latest_checkpoint(path, skipped)
        damaged = "; ".join(f"{p.name} is damaged ({why})" for p, why in skipped)
        if checkpoint is None and damaged:
            raise TargetError(
                f"Run directory {target} has no whole checkpoint-N/ ({damaged}): resume the run with "
                "`sdar train CONFIG -o RUN --resume` once the damaged ones are deleted, or evaluate the base model."
            )
        if checkpoint is None:
            raise TargetError(
                f"Run directory {target} has no checkpoint-N/ yet: train at least train.save_steps steps, "
                "or evaluate the base model."
            )
        config = load_config(config_path or path / CONFIG_FILE, overrides)
        warning = f"{damaged}; evaluating {checkpoint.name}, the newest whole checkpoint." if damaged else None
        return Target(target, "run", config, checkpoint, checkpoint_step(checkpoint), warning)
    if looks_like_path(target) and not path.is_dir():
        state = "is a file" if path.exists() else "does not exist"
        raise TargetError(f"{target} {state}: pass a run directory, a checkpoint-N folder or a model folder.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise TargetError(
            f"{target} is neither a run directory (config.yaml + checkpoint-N/), a checkpoint ({ADAPTER_FILE}) "
            "nor a model folder (config.json)."
        )
    if config_path is not None or fallback is None:
        config = load_config(config_path, overrides)
    else:
        config = fallback.model_copy(deep=True)
    config.model.name = target
    return Target(target, "base", config, None, None)


def load_agent(target: Target, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The target's model in eval mode: the base weights, with the checkpoint's adapter when it has one."""
    settings = target.config.model
    tokenizer = load_tokenizer(settings)
    model = load_base_model(settings, device)
    if target.checkpoint is not None:
        try:
            model = PeftModel.from_pretrained(model, target.checkpoint)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise TargetError(
                f"Cannot load the adapter {target.checkpoint} onto model '{settings.name}': {err}\n"
                "model.name must be the base model the run trained (pass its --config or --set model.name=...)."
            ) from None
    model.eval()
    return model, tokenizer
