"""Shared fixtures: a tiny offline chat model (byte-level BPE + random Qwen2) saved once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread, here and in the `sdar` subprocesses some tests start: the tiny models are fastest so, and
# two threads crawl (10x slower, measured) whenever another process keeps the 2-core CI machine busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sdar_cli.envs.builtin import HouseholdEnv
    from sdar_cli.prompts import DEFAULT_PROMPT_TEMPLATE

    env = HouseholdEnv()
    corpus = [DEFAULT_PROMPT_TEMPLATE, "<think> I should </think> <action> go to kitchen </action>"]
    for task_id in env.task_ids("train")[:40]:
        task, observation = env.reset(task_id)
        corpus += [task.description, observation.text, " ".join(observation.admissible_actions), observation.privileged]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder that `model.name` can point at: a random 2-layer Qwen2 with a ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_OVERRIDES = [
    "rollout.tasks_per_step=2",
    "rollout.group_size=2",
    "rollout.max_turns=3",
    "rollout.max_new_tokens=8",
    "rollout.history_turns=1",
    "train.max_steps=2",
    "train.save_steps=1",
    "train.learning_rate=0.01",
    "model.lora.r=4",
    "model.lora.alpha=8",
]


def tiny_config(model_dir: Path, run_dir: Path, *overrides: str):
    from sdar_cli.config import load_config

    return load_config(None, [f"model.name={model_dir}", f"output.dir={run_dir}", *TINY_OVERRIDES, *overrides])


def build_trainer(config, run_dir: Path, callbacks=None, model=None, trainer_class=None):
    """An SDARTrainer (or `trainer_class`, a subclass) on the tiny model, built the way `sdar train` builds it."""
    import torch

    from sdar_cli.envs import environment_factory
    from sdar_cli.models import load_base_model, load_tokenizer
    from sdar_cli.trainer import SDARTrainer, grpo_args

    make_env = environment_factory(config.env.name, config.env.kwargs)
    model = model if model is not None else load_base_model(config.model, torch.device("cpu"))
    trainer = (trainer_class or SDARTrainer)(
        model=model,
        tokenizer=load_tokenizer(config.model),
        config=config,
        make_env=make_env,
        train_task_ids=make_env().task_ids("train"),
        args=grpo_args(config, run_dir, use_cpu=True, bf16=False),
        max_turns=config.rollout.max_turns,
        callbacks=callbacks,
    )
    return trainer, model


def task_inputs(config, task_ids=("train-00001", "train-00002")):
    """The rows TRL's sampler hands `_generate_and_score_completions`: each task repeated group_size times."""
    return [{"prompt": task_id} for task_id in task_ids for _ in range(config.rollout.group_size)]


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread: the tiny model is fastest so, and two threads crawl (over 10x slower,
    measured) when another process keeps the 2-core CI machine busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_threaded_torch():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run directory of one `sdar train` step on the tiny model: config.yaml, metrics, gates, checkpoint-1."""
    from typer.testing import CliRunner

    from sdar_cli.cli import app

    root = tmp_path_factory.mktemp("tiny-run")
    (root / "tiny.yaml").write_text("algorithm:\n  name: sdar\n")
    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "train.max_steps=1"]
    args = ["train", str(root / "tiny.yaml"), "--output-dir", str(root / "run")]
    with one_torch_thread():
        result = CliRunner().invoke(app, args + [part for o in overrides for part in ("--set", o)])
    assert result.exit_code == 0, result.output
    return root / "run"


def randomise_adapter(model, seed: int = 1) -> None:
    """Give the LoRA B matrices random values: a fresh adapter is the identity, which hides adapter switches."""
    import torch

    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)


def student_logps(trainer, batch):
    """The trainer's no-grad log-probs of a batch's responses (TRL's head, as the loss scores them)."""
    import torch

    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
            batch["completion_ids"].size(1),
        )
    return logps


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A config file with only `algorithm.name: sdar`: the tests set the rest with --set."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text("algorithm:\n  name: sdar\n")
    return path

