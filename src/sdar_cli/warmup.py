"""`sdar warmup`: teach a model the task format by supervised fine-tuning on expert demonstrations.

RL needs some successful episodes to have a signal: a small model that never wins gets equal
rewards in every group and learns nothing. A brief warm-up fixes that.

Demonstrations: the environment's expert (`Environment.expert_action`) plays `warmup.episodes`
train tasks. Every turn is rendered exactly as the rollout renders it (the same prompt template,
history window, prompt truncation and response prefix), and the response is the expert action in
the action format (`warmup.response_template`, minus the response prefix the prompt already
holds), followed by the end-of-sequence token.

Training: TRL's SFTTrainer fits a LoRA (the config's model.lora) on the response tokens only. The
adapter is then merged into the base weights and the model saved as a plain Hugging Face folder
(written to a staging folder and renamed), which `model.name` can point at: RL starts from it, and
its reference and teacher are this warmed-up model.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from .atomic import staged_dir
from .config import RunConfig
from .envs import environment_split
from .envs.base import Environment
from .expert import NoExpert, expert_turns
from .models import load_base_model, load_tokenizer, lora_config, pick_device
from .rollout import TurnRenderer

SUMMARY_FILE = "warmup.json"


class WarmupError(ValueError):
    """The warm-up cannot run as configured; the message says why."""


def demonstration_response(config: RunConfig, action: str) -> str:
    """The response text taught for `action`: the template filled in, minus the prompt's response prefix."""
    text = config.warmup.response_template.format(action=action)
    prefix = config.rollout.response_prefix
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def collect_demonstrations(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    make_env: Callable[[], Environment],
    task_ids: Sequence[str],
    max_turns: int,
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Expert episodes of `task_ids` as token rows: input_ids = prompt + response, completion_mask marks the
    response. Returns the rows and counts (episodes, turns, episodes the expert won)."""
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
    eos = tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    rows: list[dict[str, list[int]]] = []
    won = 0
    try:
        for turn in expert_turns(make_env, task_ids, max_turns):
            observation = turn.observation
            prompt, _ = renderer.turn_prompt_ids(turn.task, turn.history, observation.text, observation.admissible_actions)
            response = tokenizer(demonstration_response(config, turn.action), add_special_tokens=False)["input_ids"]
            response = response + [eos]
            rows.append({"input_ids": prompt + response, "completion_mask": [0] * len(prompt) + [1] * len(response)})
            won += bool(turn.following.done and turn.following.won)
    except NoExpert as err:
        raise WarmupError(
            f"{err.env_name} offers no expert demonstrations (its expert_action() returned "
            "None at the start of an episode); `sdar warmup` needs an environment with an expert."
        ) from None
    return rows, {"episodes": len(task_ids), "turns": len(rows), "expert_won": won}


class _ProgressLines(TrainerCallback):
    """Prints `step k/N, loss, elapsed` about ten times per run."""

    def __init__(self, console, turns: int) -> None:
        self.console, self.turns, self.started = console, turns, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        every = max(1, state.max_steps // 10)
        if logs and "loss" in logs and (state.global_step % every == 0 or state.global_step == state.max_steps):
            self.console.print(
                f"warm-up step {state.global_step}/{state.max_steps} ({self.turns} demonstration turns): "
                f"loss {float(logs['loss']):.3f}, {time.perf_counter() - self.started:.0f} s",
                highlight=False,
            )


def warmup(config: RunConfig, output_dir: Path, console=None) -> dict[str, Any]:
    """Collect demonstrations, fine-tune, merge and save the model to `output_dir`; return the summary."""
    import datasets
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if output_dir.exists() and any(output_dir.iterdir()):
        raise WarmupError(f"{output_dir} already exists and is not empty: choose a new --output-dir.")
    started = time.perf_counter()
    settings = config.warmup
    make_env, split_ids, env_max_turns = environment_split(config.env.name, config.env.kwargs, config.env.train_split)
    if settings.episodes > len(split_ids):
        raise WarmupError(f"warmup.episodes is {settings.episodes} but split '{config.env.train_split}' has {len(split_ids)} tasks.")
    task_ids = random.Random(settings.seed).sample(list(split_ids), settings.episodes)
    tokenizer = load_tokenizer(config.model)
    max_turns = config.rollout.max_turns or env_max_turns
    rows, counts = collect_demonstrations(config, tokenizer, make_env, task_ids, max_turns)

    device = pick_device(config.train.device)
    model = load_base_model(config.model, device)
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    args = SFTConfig(
        output_dir=str(staging / "trainer"),
        seed=settings.seed,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=settings.batch_size,
        completion_only_loss=True,
        max_length=None,
        gradient_checkpointing=config.train.gradient_checkpointing,  # TRL's default is on; follow the config
        use_cpu=device.type == "cpu",
        bf16=model.dtype == torch.bfloat16,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    datasets.disable_progress_bars()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(config.model),
    )
    trainer.remove_callback(PrinterCallback)  # the CLI prints a progress line per tenth and one summary line
    if console is not None:
        trainer.add_callback(_ProgressLines(console, counts["turns"]))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    merged = trainer.model.merge_and_unload()
    summary = {
        **counts,
        "model": config.model.name,
        "env": config.env.name,
        "optimizer_steps": trainer.state.global_step,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - started,
        "settings": settings.model_dump(),
    }
    with staged_dir(output_dir) as model_dir:  # replaces output_dir, new or empty (checked above)
        merged.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        (model_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    return summary
