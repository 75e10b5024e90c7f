"""`sdar bench`: one training step of grpo and of sdar on the same synthetic rollout batch, side by side.

The model is random-initialised from a shape (Qwen2.5-3B and -7B shapes need no download), saved
once under the cache folder, and loaded the way `sdar train` loads a model (so 4-bit goes through
bitsandbytes as in training). The rollout batch is fixed: `tasks` prompts of `prompt_tokens`
random ids, each with `group_size` responses of `response_tokens` random ids, and a privileged
prefix of `privileged_tokens` ids for the teacher. Both algorithms train on exactly these ids.

A step runs inside the real `SDARTrainer.train()` loop; only the rollout is replaced: generation
is timed on the batch's prompts with the same `HFPolicy` (forced to `response_tokens` new
tokens), then the fixed responses are trained on. Phases:

    generation       HFPolicy on the prompts (the trainer's `generation_seconds`)
    reference_pass   no-grad pass, adapter off          (the trainer's `reference_pass_seconds`)
    teacher_pass     no-grad pass on the privileged prompt (sdar only; `teacher_pass_seconds`)
    update           the rest of the step: loss forward/backward, optimizer, gate records

Each algorithm runs in its own fresh process so that its peak memory is its own:
`torch.cuda.max_memory_reserved` on a GPU (what PyTorch's caching allocator held at its peak, which is
what must fit; the CUDA context comes on top and is reported apart as `cuda_context_bytes`; the peak
of the tensors alone, `max_memory_allocated`, is kept as `allocated_peak_bytes`), peak RSS on a CPU
(VmHWM, counted from just before the model loads, so the imports' transient peak is not the run's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..atomic import staged_dir
from ..config import ConfigError, RunConfig, _describe, apply_override, validate_config

#: targets of issue 6, checked side by side in one run
TIME_RATIO_TARGET = 1.15
MEMORY_RATIO_TARGET = 1.05

#: model shapes as Qwen2Config fields; the 3B and 7B ones are the public Qwen2.5 configs
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
    ),
    # the embedded default's sizes (SmolLM2-135M), as a Qwen2-style model
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
}  # fmt: skip
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchSettings(_Section):
    tasks: int = Field(1, ge=1, description="distinct prompts (tasks) in the rollout batch")
    group_size: int = Field(8, ge=2, description="G: responses per prompt")
    prompt_tokens: int = Field(256, ge=1)
    response_tokens: int = Field(32, ge=1)
    privileged_tokens: int = Field(64, ge=0, description="teacher-only prefix before the prompt")


class StepSettings(_Section):
    warmup: int = Field(1, ge=0, description="untimed steps first (allocator, kernels, optimizer state)")
    measured: int = Field(1, ge=1, description="timed steps per process; phases report the median")
    rounds: int = Field(1, ge=1, description="processes per algorithm, in alternating order")


class BenchConfig(_Section):
    shape: str | dict[str, Any] = Field("tiny", description=f"one of {', '.join(SHAPES)}, or Qwen2Config fields")
    batch: BatchSettings = Field(default_factory=BatchSettings)
    steps: StepSettings = Field(default_factory=StepSettings)
    algorithms: list[Literal["grpo", "sdar", "grpo_opsd", "opsd"]] = Field(default_factory=lambda: ["grpo", "sdar"])
    seed: int = 0
    run: dict[str, Any] = Field(
        default_factory=dict,
        description="`sdar train` config keys (model.dtype, model.load_in_4bit, model.lora, train.*); "
        "the benchmark sets model.name, algorithm.name and the rollout sizes itself",
    )

    def shape_fields(self) -> dict[str, Any]:
        if isinstance(self.shape, dict):
            return dict(self.shape)
        if self.shape not in SHAPES:
            raise ConfigError(f"shape '{self.shape}' is not one of {', '.join(SHAPES)}; or give Qwen2Config fields.")
        return dict(SHAPES[self.shape])

    @property
    def shape_name(self) -> str:
        return self.shape if isinstance(self.shape, str) else "custom"


def load_bench_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    """Read a bench YAML, apply `a.b=value` overrides, validate (the run section as `sdar train` would)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Bench config not found: {path}. Pass a YAML file, e.g. bench/cpu_small.yaml.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping (shape:, batch:, steps:, run:).")
    for override in overrides or []:
        apply_override(raw, override)
    try:
        bench = BenchConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, BenchConfig).replace("configuration", "bench configuration")) from None
    bench.shape_fields()
    run_config(bench, bench.algorithms[0], Path("model"), Path("run"))  # validates the run section now
    return bench


def run_config(bench: BenchConfig, algorithm: str, model_dir: Path, run_dir: Path) -> RunConfig:
    """The `sdar train` config one measured process trains with."""
    raw = copy.deepcopy(bench.run)
    batch = bench.batch
    rollouts = bench.steps.warmup + bench.steps.measured
    for override in (
        f"model.name={model_dir}",
        f"algorithm.name={algorithm}",
        f"rollout.tasks_per_step={batch.tasks}",
        f"rollout.group_size={batch.group_size}",
        f"rollout.max_new_tokens={batch.response_tokens}",
        f"rollout.max_prompt_tokens={max(16, batch.privileged_tokens + batch.prompt_tokens)}",
        "rollout.stop_strings=[]",
        f"train.max_steps={rollouts}",
        f"train.save_steps={rollouts + 1}",
        f"train.seed={bench.seed}",
        f"output.dir={run_dir}",
    ):
        apply_override(raw, override)
    config = validate_config(raw)
    # a measured step is one rollout batch and every optimizer update trained on it
    updates = config.train.updates_per_rollout * config.train.epochs_per_rollout
    if updates > 1:
        apply_override(raw, f"train.max_steps={rollouts * updates}")
        apply_override(raw, f"train.save_steps={rollouts * updates + 1}")
        config = validate_config(raw)
    return config


# ------------------------------------------------------------------------------------- the parent
def run_benchmark(bench: BenchConfig, on_progress=None) -> dict[str, Any]:
    """Measure every algorithm in its own process (rounds alternate the order) and compare them."""
    _check_machine(run_config(bench, bench.algorithms[0], Path("model"), Path("run")))
    model_dir = random_model_dir(bench.shape_name, bench.shape_fields(), bench.seed)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in bench.algorithms}
    with tempfile.TemporaryDirectory(prefix="sdar-bench-") as work:
        for round_index in range(bench.steps.rounds):
            order = bench.algorithms if round_index % 2 == 0 else list(reversed(bench.algorithms))
            for algorithm in order:
                if on_progress:
                    on_progress(f"round {round_index + 1}/{bench.steps.rounds}: {algorithm}")
                work_dir = Path(work) / f"{algorithm}-{round_index}"
                results[algorithm].append(_run_worker(bench, algorithm, model_dir, work_dir))
    return build_report(bench, results)


def _check_machine(config: RunConfig) -> None:
    """Fail before writing a random checkpoint when this machine cannot run the configured step."""
    import importlib.util

    import torch

    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("this bench config needs a CUDA GPU (train.device: cuda) and none is visible.")
    if config.model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise BenchError(
            "model.load_in_4bit needs bitsandbytes: pip install 'sdar-cli[gpu]', or run bench/gpu_3b_bf16.yaml (bf16)."
        )


def _run_worker(bench: BenchConfig, algorithm: str, model_dir: Path, work_dir: Path) -> dict[str, Any]:
    work_dir.mkdir(parents=True)
    spec = work_dir / "spec.json"
    result = work_dir / "result.json"
    spec.write_text(
        json.dumps({"bench": bench.model_dump(mode="json"), "algorithm": algorithm, "model_dir": str(model_dir)})
    )
    completed = subprocess.run(
        [sys.executable, "-m", "sdar_cli.perf.bench", str(spec), str(result)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0 or not result.is_file():
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        raise BenchError(f"the {algorithm} measurement failed (exit {completed.returncode}):\n{tail}")
    return json.loads(result.read_text())


def build_report(bench: BenchConfig, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median phase times over all measured steps, the peak memory over all processes, and the ratios."""
    batch = bench.batch
    rows = batch.tasks * batch.group_size
    algorithms: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        steps = [step for run in runs for step in run["steps"]]
        seconds = {phase: statistics.median(step[phase] for step in steps) for phase in steps[0]}
        # on a shared machine other processes only ever add time: the fastest step is the least disturbed
        fastest = min(steps, key=lambda step: step["step"])
        memory = {key: max(run["memory"][key] or 0 for run in runs) or None for key in runs[0]["memory"]}
        algorithms[name] = {
            "seconds": seconds,
            "fastest_step": fastest,
            "steps": steps,
            "tokens_per_second": {  # step: prompt + response tokens, as in metrics.jsonl; generation: new tokens
                "step": rows * (batch.prompt_tokens + batch.response_tokens) / seconds["step"],
                "generation": rows * batch.response_tokens / seconds["generation"],
            },
            "memory": memory,
            "estimate": runs[0]["estimate"],
        }
    report: dict[str, Any] = {
        "config": bench.model_dump(mode="json"),
        "hardware": next(iter(results.values()))[0]["hardware"],
        "shape": next(iter(results.values()))[0]["shape"],
        "algorithms": algorithms,
    }
    if "grpo" in algorithms and "sdar" in algorithms:
        grpo, sdar = algorithms["grpo"], algorithms["sdar"]

        def without_generation(seconds: dict[str, float]) -> float:
            return seconds["step"] - seconds["generation"]

        time_ratio = sdar["seconds"]["step"] / grpo["seconds"]["step"]
        memory_ratio = sdar["memory"]["peak_bytes"] / grpo["memory"]["peak_bytes"]
        report.update(
            time_ratio=time_ratio,
            time_ratio_without_generation=without_generation(sdar["seconds"]) / without_generation(grpo["seconds"]),
            time_ratio_fastest_steps=sdar["fastest_step"]["step"] / grpo["fastest_step"]["step"],
            memory_ratio=memory_ratio,
            targets={
                "time_ratio_max": TIME_RATIO_TARGET,
                "memory_ratio_max": MEMORY_RATIO_TARGET,
                "time_met": time_ratio <= TIME_RATIO_TARGET,
                "memory_met": memory_ratio <= MEMORY_RATIO_TARGET,
            },
        )
    return report


def heading(report: dict[str, Any]) -> str:
    """One line: the shape, the hardware and the batch the table measured."""
    hardware, shape, batch = report["hardware"], report["shape"], report["config"]["batch"]
    name = report["config"]["shape"] if isinstance(report["config"]["shape"], str) else "custom shape"
    return (
        f"{name} ({shape['parameters'] / 1e6:,.1f}M parameters, LoRA {shape['lora_parameters'] / 1e6:,.2f}M) on "
        f"{hardware['device_name']}: {batch['tasks']} x {batch['group_size']} rows of {batch['prompt_tokens']} prompt + "
        f"{batch['response_tokens']} response tokens, {batch['privileged_tokens']} privileged tokens"
    )


def render_table(report: dict[str, Any]):
    """A rich table: one column per algorithm, one row per phase, memory and estimate; sdar/grpo last."""
    from rich.table import Table

    names = list(report["algorithms"])
    hardware = report["hardware"]
    table = Table()
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    compare = "grpo" in names and "sdar" in names
    if compare:
        table.add_column("sdar / grpo", justify="right")

    def add(label: str, value_of, fmt) -> None:
        """One row: `value_of(an algorithm's report)` per algorithm, formatted, then sdar / grpo."""
        values = {name: value_of(report["algorithms"][name]) for name in names}
        cells = ["-" if values[name] is None else fmt(values[name]) for name in names]
        if compare:
            cells.append(f"{values['sdar'] / values['grpo']:.3f}" if values["grpo"] else "-")
        table.add_row(label, *cells)

    def seconds(value: float) -> str:
        return f"{value:.3f} s"

    def rate(value: float) -> str:
        return f"{value:,.1f}"

    def gib(value: float) -> str:
        return f"{value / 2**30:.3f} GiB"

    for phase in ("generation", "reference_pass", "teacher_pass", "update"):
        add(phase.replace("_", " "), lambda a, phase=phase: a["seconds"][phase], seconds)
    add("step (total)", lambda a: a["seconds"]["step"], seconds)
    add("fastest step", lambda a: a["fastest_step"]["step"], seconds)
    add("step without generation", lambda a: a["seconds"]["step"] - a["seconds"]["generation"], seconds)
    add("step tokens / s", lambda a: a["tokens_per_second"]["step"], rate)
    add("generation tokens / s", lambda a: a["tokens_per_second"]["generation"], rate)
    add(f"peak memory ({hardware['memory_kind']})", lambda a: a["memory"]["peak_bytes"], gib)
    if hardware["device"] == "cpu":
        add("peak RSS over baseline", lambda a: a["memory"]["peak_over_baseline_bytes"], gib)
    else:
        add("peak allocated (tensors alone)", lambda a: a["memory"]["allocated_peak_bytes"], gib)
        add("CUDA context (not in reserved)", lambda a: a["memory"]["cuda_context_bytes"], gib)
    add("estimated peak (memory.py)", lambda a: a["estimate"]["peak_bytes"], gib)
    return table


def verdict_lines(report: dict[str, Any]) -> list[str]:
    if "time_ratio" not in report:
        return []
    targets = report["targets"]
    time_verdict = "met" if targets["time_met"] else "NOT met"
    memory_verdict = "met" if targets["memory_met"] else "NOT met"
    return [
        (
            f"time ratio sdar/grpo {report['time_ratio']:.3f} (target <= {targets['time_ratio_max']}): {time_verdict}; "
            f"without generation {report['time_ratio_without_generation']:.3f}; "
            f"fastest steps {report['time_ratio_fastest_steps']:.3f}"
        ),
        (
            f"memory ratio sdar/grpo {report['memory_ratio']:.3f} (target <= {targets['memory_ratio_max']}): "
            f"{memory_verdict}"
        ),
    ]


# ----------------------------------------------------------------------------- the random model
def random_model_dir(name: str, shape_fields: dict[str, Any], seed: int) -> Path:
    """A Qwen2 model of the given shape with random weights (bf16 on disk) and a minimal ChatML tokenizer.

    Built once per shape and seed under the cache folder, so `load_base_model` loads it like any model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import cache_dir

    key = hashlib.sha256(json.dumps([shape_fields, seed], sort_keys=True).encode()).hexdigest()[:10]
    target = cache_dir() / "bench-models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    tokenizer = _minimal_tokenizer()
    config = AutoConfig.for_model(
        "qwen2",
        **shape_fields,
        max_position_embeddings=32768,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    # drawing billions of random weights takes minutes on a CPU and seconds on a GPU
    on_cuda = torch.cuda.is_available()
    with torch.device("cuda" if on_cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with staged_dir(target, done=lambda folder: (folder / "config.json").is_file()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        if on_cuda:
            torch.cuda.empty_cache()
    return target


def _minimal_tokenizer():
    """A ChatML tokenizer with only its special tokens: the benchmark feeds token ids, never text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


# ------------------------------------------------------------------------------------- the worker
def synthetic_rows(batch: BatchSettings, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """The fixed rollout batch: per task a prompt and a privileged prefix, per row a response and a reward.

    Token ids avoid the special ids; rewards alternate 0 and 10 within a group, so advantages are non-zero.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    first_id = len(_SPECIAL_TOKENS)

    def ids(count: int) -> list[int]:
        return torch.randint(first_id, vocab_size, (count,), generator=generator).tolist()

    rows = []
    for task in range(batch.tasks):
        prompt, privileged = ids(batch.prompt_tokens), ids(batch.privileged_tokens)
        for member in range(batch.group_size):
            rows.append(
                {
                    "task_id": f"synthetic-{task}",
                    "prompt_ids": prompt,
                    "teacher_prompt_ids": privileged + prompt,
                    "response_ids": ids(batch.response_tokens),
                    "reward": 10.0 * (member % 2),
                }
            )
    return rows


def measure(bench: BenchConfig, algorithm: str, model_dir: Path, run_dir: Path) -> dict[str, Any]:
    """One process, one algorithm: warmup + measured steps of the real training loop on the fixed batch."""
    import torch
    from transformers import TrainerCallback

    from .memory import ModelShape, Workload, estimate_peak_memory, lora_parameter_count, setup_for_run
    from ..models import load_base_model, load_tokenizer, pick_device, pick_dtype
    from ..rollout import EpisodeResult, HFPolicy, TurnSample
    from ..trainer import SDARTrainer, grpo_args

    config = run_config(bench, algorithm, model_dir, run_dir)
    device = pick_device(config.train.device)
    # the peak counts from here: the imports' transient peak is not the run's (a tiny model never reaches it)
    _restart_peak_rss()
    baseline_bytes = _peak_rss_bytes()
    tokenizer = load_tokenizer(config.model)
    model = load_base_model(config.model, device)
    after_load_bytes = _current_rss_bytes()
    rows = synthetic_rows(bench.batch, model.config.vocab_size, bench.seed)
    on_cuda = device.type == "cuda"
    if on_cuda:  # the peak of training, not of loading (4-bit quantises while it loads)
        torch.cuda.reset_peak_memory_stats()

    class SyntheticRolloutTrainer(SDARTrainer):
        def _play_episodes(self, model, task_ids, groups):
            # every row generates exactly response_tokens tokens, so both algorithms generate the same amount
            policy = HFPolicy(model, self.processing_class, self.config.rollout)
            policy.generation_config.min_new_tokens = self.config.rollout.max_new_tokens
            chosen = [row for task_id in dict.fromkeys(task_ids) for row in rows if row["task_id"] == task_id]
            policy([row["prompt_ids"] for row in chosen])
            phase_peaks.mark("generation")
            samples, episodes = [], []
            for offset, (row, group) in enumerate(zip(chosen, groups)):
                episode = self._first_episode + offset
                samples.append(
                    TurnSample(
                        row["task_id"], "synthetic", group, episode, 0, row["prompt_ids"], row["teacher_prompt_ids"],
                        row["response_ids"], action=None, valid=True, truncated=False, privileged="", reward=row["reward"],
                    )
                )
                episodes.append(
                    EpisodeResult(row["task_id"], "synthetic", group, episode, 1, row["reward"] > 0, row["reward"])
                )
            return samples, episodes

        def _generate_and_score_completions(self, inputs):
            batch = super()._generate_and_score_completions(inputs)
            phase_peaks.mark("logprob_passes")
            return batch

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict[str, float]] = []
            self._started = 0.0
            self._seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize(on_cuda)
            phase_peaks.mark(None)
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(on_cuda)
            self._seconds = time.perf_counter() - self._started
            phase_peaks.mark("update")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward_mean" not in logs:  # the end-of-training summary
                return
            if "generation_seconds" not in logs:  # a later update on the same rollout batch: part of its step
                self.steps[-1]["update"] += self._seconds
                self.steps[-1]["step"] += self._seconds
                return
            phases = {
                "generation": logs["generation_seconds"],
                "reference_pass": logs["reference_pass_seconds"],
                "teacher_pass": logs["teacher_pass_seconds"],
            }
            phases["update"] = self._seconds - sum(phases.values())
            phases["step"] = self._seconds
            self.steps.append(phases)

    phase_peaks = _PhasePeaks(on_cuda)
    recorder = StepRecorder()
    trainer = SyntheticRolloutTrainer(
        model=model,
        tokenizer=tokenizer,
        config=config,
        make_env=_no_environment,
        train_task_ids=sorted({row["task_id"] for row in rows}),
        args=grpo_args(config, run_dir, use_cpu=not on_cuda, bf16=model.dtype == torch.bfloat16),
        max_turns=1,
        callbacks=[recorder],
    )
    trainer.train()

    shape = ModelShape.from_config(model.config)
    setup = setup_for_run(config, device.type, torch.finfo(pick_dtype(config.model.dtype, device)).bits // 8)
    batch = bench.batch
    workload = Workload(
        rows=batch.tasks * batch.group_size,
        micro_batches=config.train.micro_batches * config.train.updates_per_rollout,
        prompt_tokens=batch.prompt_tokens,
        response_tokens=batch.response_tokens,
        privileged_tokens=batch.privileged_tokens,
        generation_rows=batch.tasks * batch.group_size,
        logprob_batch_size=config.train.logprob_batch_size,
        with_reference=config.algorithm.kl_coef != 0,
        with_teacher=config.uses_teacher,
        padded=False,  # every row has the same length
    )
    estimate = estimate_peak_memory(shape, workload, setup)
    lora_parameters = lora_parameter_count(shape, setup.lora_r, setup.lora_modules)
    if on_cuda:
        peak = phase_peaks.overall
        memory = {
            "peak_bytes": peak,
            "baseline_bytes": None,
            "after_load_bytes": None,
            "peak_over_baseline_bytes": peak,
            "allocated_peak_bytes": phase_peaks.overall_allocated,
            "cuda_context_bytes": _cuda_context_bytes(device),
        }
    else:
        peak = _peak_rss_bytes()
        memory = {
            "peak_bytes": peak,
            "baseline_bytes": baseline_bytes,
            "after_load_bytes": after_load_bytes,
            "peak_over_baseline_bytes": peak - baseline_bytes,
        }
    memory.update({f"{phase}_peak_bytes": value for phase, value in phase_peaks.peaks.items()})
    return {
        "algorithm": algorithm,
        "steps": recorder.steps[bench.steps.warmup :],
        "memory": memory,
        "estimate": {
            "peak_bytes": estimate.peak,
            "peak_phase": estimate.peak_phase,
            **estimate.phases,
            "components": estimate.components,
        },
        "shape": {
            **shape.__dict__,
            "parameters": logical_parameter_count(model) - lora_parameters,
            "lora_parameters": lora_parameters,
        },
        "hardware": _hardware(device),
    }


def logical_parameter_count(model) -> int:
    """The model's parameters as its config defines them. A bitsandbytes 4-bit weight packs two values a
    byte, so its `numel()` is half its count; its `quant_state.shape` is the weight's real shape."""
    total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else parameter.numel()
    return total


def _cuda_context_bytes(device) -> int:
    """Device memory in use that PyTorch's allocator does not hold: mostly the CUDA context and kernels
    (other processes on the same GPU count too)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


class _PhasePeaks:
    """On CUDA, the peak reserved memory of each phase of the last step, and the overall peaks (reserved
    and allocated). Reserved is what decides fitting: freed blocks stay cached, fragmented, in the pool."""

    def __init__(self, on_cuda: bool):
        self.on_cuda = on_cuda
        self.peaks: dict[str, int] = {}
        self.overall = 0
        self.overall_allocated = 0

    def mark(self, phase: str | None) -> None:
        """Close the phase that ends now (None: just start counting) and start the next one."""
        if not self.on_cuda:
            return
        import torch

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_reserved()
        self.overall = max(self.overall, peak)
        self.overall_allocated = max(self.overall_allocated, torch.cuda.max_memory_allocated())
        if phase is not None:
            self.peaks[phase] = peak
        torch.cuda.reset_peak_memory_stats()


def _synchronize(on_cuda: bool) -> None:
    if on_cuda:
        import torch

        torch.cuda.synchronize()


def _no_environment():
    raise RuntimeError("the benchmark's rollout is synthetic; it never builds an environment")


def _restart_peak_rss() -> None:
    """Set the process's peak RSS (Linux VmHWM) to its current RSS; where that is not possible the peak keeps
    counting from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """VmHWM (which _restart_peak_rss resets), else ru_maxrss (the peak since the process started)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hardware(device) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    info: dict[str, Any] = {
        "device": device.type,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_name=properties.name, gpu_memory_bytes=properties.total_memory, memory_kind="max reserved")
    else:
        info.update(device_name=f"{info['cpu']} ({info['torch_threads']} threads)", memory_kind="peak RSS")
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    bench = BenchConfig.model_validate(spec["bench"])
    run_dir = Path(result_path).parent / "run"
    result = measure(bench, spec["algorithm"], Path(spec["model_dir"]), run_dir)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    _worker_main(sys.argv[1], sys.argv[2])
