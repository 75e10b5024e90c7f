"""The one typed run configuration: YAML in, validated, with `--set a.b=value` overrides.

Every key is declared here with its default, so this file is also the reference of what can be
configured. Validation is pydantic's; this module turns its errors into messages that name the
key path, what was expected and, for an unknown key, the closest valid one.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .prompts import check_template


class ConfigError(ValueError):
    """A user mistake in a config file or override: the message says what is wrong and how to fix it."""


class _Section(BaseModel):
    # NaN or infinity is never a meaningful setting (an infinite learning rate trains non-finite weights)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraSettings(_Section):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names LoRA wraps, or 'all-linear'",
    )


class ModelSettings(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="a local model folder, a Hugging Face hub id, or the embedded default 'smollm2-135m-instruct'",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on GPU"
    )
    load_in_4bit: bool = Field(False, description="4-bit NF4 base weights via bitsandbytes (CUDA only)")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    chat_template: str | None = Field(None, description="a Jinja chat template (text or file path) replacing the model's")


class EnvSettings(_Section):
    name: str = Field("household", description="'household' (built-in) or a plugin 'module.path:ClassName'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the environment class")
    train_split: str = "train"
    eval_split: str = "test"
    workers: int = Field(
        1,
        ge=1,
        description="threads that reset and step the episodes' environments in parallel; engines that wait on a "
        "server gain (webshop, searchqa with a retrieval server); the engine must be thread-safe",
    )
    step_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="seconds one environment step may take; a slower step fails its episode (env_error_rate)",
    )
    reset_timeout_s: float = Field(
        600.0, gt=0.0, description="seconds one environment reset may take; a slower reset fails its episode"
    )


class VLLMSettings(_Section):
    """rollout.engine: vllm only."""

    importance_sampling: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"] = Field(
        "token_truncate",
        description="correction for vLLM's log-probs differing from the training forward's (TRL's "
        "vllm_importance_sampling_mode): ratios capped at importance_sampling_cap, or masked above it; none: off",
    )
    importance_sampling_cap: float = Field(3.0, gt=0.0, description="largest importance ratio kept")
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, lt=1.0, description="share of the GPU vLLM may take for weights and KV cache (CUDA only)"
    )


class RolloutSettings(_Section):
    group_size: int = Field(8, ge=2, description="G: episodes per task; advantages are normalised within a group")
    tasks_per_step: int = Field(4, ge=1, description="tasks per rollout batch (each played group_size times)")
    max_turns: int | None = Field(None, ge=1, description="turn limit per episode; default: the environment's")
    history_turns: int = Field(2, ge=0, description="H: past (observation, action) pairs shown in each prompt")
    max_new_tokens: int = Field(128, ge=1, description="response tokens per turn")
    max_prompt_tokens: int = Field(
        2048,
        ge=16,
        description="student and teacher prompts; a longer one drops its oldest history pairs first (then its middle)",
    )
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    invalid_action_penalty: float = Field(0.1, ge=0.0, description="subtracted from an invalid turn's reward")
    invalid_action: Literal["admissible", "format"] = Field(
        "admissible",
        description="admissible: an action is invalid unless it parses and is admissible, and an invalid one is not "
        "sent to the environment; format (official ALFWorld/WebShop): invalid only by format (no action parsed, or a "
        "string of format_requires missing), and every parsed action is sent to the environment",
    )
    format_requires: list[str] = Field(
        default_factory=list,
        description="with invalid_action: format, strings a valid response must contain, e.g. ['<think>', '</think>'] "
        "(the official ALFWorld/WebShop check)",
    )
    action_pattern: str = Field(r"<action>(.*?)</action>", description="regex whose group 1 is the action")
    stop_strings: list[str] = Field(
        default_factory=lambda: ["</action>"], description="generation of a turn stops after any of these"
    )
    response_prefix: str = Field(
        "",
        description="text put after the generation prompt (prompt side, never trained), e.g. '<action>' to "
        "steer a small model into the action format; it counts as the start of the response when parsing",
    )
    system_prompt: str | None = Field(None, description="system message; None keeps the chat template's default")
    prompt_template: str | None = Field(
        None,
        description="user-message template with {task}, {history}, {step}, {observation}, {actions}; None: the default",
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="generation: transformers' generate (hf) or an in-process vLLM engine (pip install 'sdar-cli[vllm]')"
    )
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)

    @field_validator("prompt_template")
    @classmethod
    def _known_placeholders(cls, template: str | None) -> str | None:
        if template is not None:
            check_template(template)
        return template

    @field_validator("action_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        if compiled.groups < 1:
            raise ValueError("needs a capturing group around the action, e.g. <action>(.*?)</action>")
        return pattern


class AlgorithmSettings(_Section):
    name: Literal["sdar", "grpo", "grpo_opsd", "opsd", "rlsd", "skill_sd", "skill_grpo"] = Field(
        "sdar",
        description="sdar: GRPO + gated self-distillation; grpo: no distillation; "
        "grpo_opsd: constant gate (beta 0); opsd: distillation only, no RL term; rlsd: GRPO with advantages "
        "reweighted per token by the teacher-student gap; skill_sd: GRPO + skill_sd_coef * IS-weighted k3(T, S); "
        "skill_grpo: GRPO with the skills in the student's own prompt (no teacher)",
    )
    sdar_coef: float = Field(0.01, ge=0.0, description="lambda: weight of the SDAR term")
    gate_beta: float = Field(5.0, ge=0.0, description="beta: sharpness of the sigmoid gate")
    kl_coef: float = Field(0.01, ge=0.0, description="weight of KL(actor || reference), k3 estimator")
    kl_estimator: Literal["k3", "k3_bias_corrected"] = Field(
        "k3",
        description="k3: the official k3 clamped to +-10 with its plain gradient; k3_bias_corrected: TRL's "
        "default, k3 times the ratio pi/pi_old (unbiased reverse-KL gradient)",
    )
    entropy_coef: float = Field(0.001, ge=0.0, description="entropy bonus weight")
    clip_eps: float = Field(0.2, gt=0.0, description="PPO clip range")
    dual_clip: float | None = Field(
        3.0,
        description="c of dual-clip PPO: for A < 0 the ratio term is capped at c * |A| (official 3.0); None disables; "
        "must exceed 1 + clip_eps",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"] = Field(
        "dapo",
        description="TRL loss aggregation, also used by the KL and SDAR terms; dapo: token-mean over each update's "
        "tokens (a token's weight does not depend on train.micro_batches); bnpo: token-mean per micro-batch, "
        "averaged over the micro-batches (the official verl token-mean)",
    )
    advantage_norm: Literal["group", "episode"] = Field(
        "group", description="group: over all turn-samples of the group (official); episode: over episode rewards"
    )
    sdar_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    rlsd_lambda: float = Field(0.5, ge=0.0, le=1.0, description="rlsd: initial mixing weight l")
    rlsd_decay_steps: int = Field(100, ge=1, description="rlsd: rollout steps over which l decays linearly to 0")
    rlsd_clip: float = Field(0.2, gt=0.0, lt=1.0, description="rlsd: token weights are clipped to 1 +- this")
    skill_sd_coef: float = Field(0.001, ge=0.0, description="skill_sd: weight of the IS-weighted k3 distillation term")


class SkillSettings(_Section):
    bank: str | None = Field(
        None, description="a shipped skill bank ('alfworld', ...) or a folder of markdown skills; None: the environment's"
    )
    retrieval: Literal["rule", "bm25", "all", "none"] = Field(
        "rule", description="rule: general + task-type skills (the paper's); bm25: top_k by the task text; all; none"
    )
    top_k: int = Field(3, ge=1, description="skills bm25 retrieval keeps")


class TeacherSettings(_Section):
    weights: Literal["live", "base"] = Field(
        "live", description="live: adapter on (current policy, official); base: adapter off (frozen base)"
    )
    context: Literal["both", "skills", "plan", "next_action", "shuffled", "none"] = Field(
        "both",
        description="privileged context the teacher sees: the task's skills, the environment's expert plan from "
        "the current state, or both (the paper: skills); next_action: the plan, then 'The expert's next action "
        "is: X'; controls: shuffled (another task's next_action context of the nearest length) and none (the "
        "context_template's header only)",
    )
    placement: Literal["prefix", "user_start", "user_end"] = Field(
        "prefix",
        description="where the privileged block goes: prefix (before the templated student prompt, official), "
        "user_start (at the start of the user message) or user_end (at its end, right before the reply)",
    )
    skills: SkillSettings = Field(default_factory=SkillSettings)
    context_template: str = Field(
        "[Privileged Skill Information]\n{context}\n\n",
        description="text put before the student prompt for the teacher; {context} is the privileged context",
    )

    @field_validator("context_template")
    @classmethod
    def _has_context(cls, template: str) -> str:
        if "{context}" not in template:
            raise ValueError("must contain the placeholder {context}")
        try:
            template.format(context="")
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{{context}} is its only placeholder; write other braces doubled ({{{{ and }}}}) ({type(err).__name__}: {err})"
            ) from None
        return template


class TrainSettings(_Section):
    max_steps: int = Field(150, ge=1, description="optimizer updates (rollout batches x updates_per_rollout x epochs_per_rollout)")
    save_steps: int = Field(25, ge=1, description="write a checkpoint every N steps (and at the end)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds torch, numpy and the task order")
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    micro_batches: int = Field(
        1, ge=1, description="gradient-accumulation micro-steps per update (bounds activation memory)"
    )
    updates_per_rollout: int = Field(
        1,
        ge=1,
        description="optimizer updates one rollout batch is split into (PPO mini-batches); each update is "
        "micro_batches micro-steps; max_steps and save_steps count updates",
    )
    epochs_per_rollout: int = Field(1, ge=1, description="passes over one rollout batch (TRL's num_iterations)")
    logprob_batch_size: int = Field(16, ge=1, description="rows per forward pass in no-grad log-prob passes")
    gradient_checkpointing: bool = False
    max_nonfinite_updates: int = Field(3, ge=1, description="stop (with a checkpoint) after this many in a row")
    report_to: list[Literal["tensorboard", "trackio", "wandb"]] = Field(
        default_factory=list, description="experiment trackers TRL logs to (each must be installed)"
    )

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, trackers: list[str]) -> list[str]:
        missing = [name for name in trackers if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed: pip install {' '.join(missing)}")
        return trackers
    device: Literal["auto", "cpu", "cuda"] = "auto"


class OutputSettings(_Section):
    dir: str = Field("runs/sdar", description="run directory")
    save_gates: bool = Field(True, description="write gates/step-N.jsonl with per-token gate records")
    save_total_limit: int | None = Field(None, ge=1, description="keep only the newest N checkpoints")


class EvalSettings(_Section):
    episodes: int = Field(64, ge=1, description="episodes `sdar eval` plays per target (tasks x samples_per_task)")
    decoding: Literal["sample", "greedy"] = Field(
        "sample", description="sample at eval.temperature (the paper's validation decoding) or greedy"
    )
    temperature: float = Field(0.4, gt=0.0, description="sampling temperature of evaluation episodes")
    samples_per_task: int = Field(1, ge=1, description="k: episodes per task; pass@k counts a task won once any wins")
    seed: int = Field(0, description="picks the tasks and seeds sampling: same seed, same tasks, same numbers")
    batch_size: int = Field(32, ge=1, description="episodes played together (one progress-bar tick each batch)")

    @model_validator(mode="after")
    def _samples_divide_episodes(self) -> EvalSettings:
        if self.episodes % self.samples_per_task:
            raise ValueError(
                f"eval.samples_per_task ({self.samples_per_task}) must divide eval.episodes ({self.episodes})"
            )
        return self


class WarmupSettings(_Section):
    episodes: int = Field(64, ge=1, description="expert demonstrations (episodes on env.train_split) `sdar warmup` trains on")
    epochs: float = Field(1.0, gt=0.0, description="passes over the demonstrations")
    learning_rate: float = Field(2e-4, gt=0.0)
    batch_size: int = Field(8, ge=1, description="turns per optimizer step")
    response_template: str = Field(
        "<action>{action}</action>",
        description="the response taught for an expert action; rollout.response_prefix is taken off its front",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="picks the demonstration tasks and seeds training")

    @field_validator("response_template")
    @classmethod
    def _has_action(cls, template: str) -> str:
        if "{action}" not in template:
            raise ValueError("must contain the placeholder {action}")
        return template


class RunConfig(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    env: EnvSettings = Field(default_factory=EnvSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    warmup: WarmupSettings = Field(default_factory=WarmupSettings)

    @model_validator(mode="after")
    def _micro_batches_divide_episodes(self) -> RunConfig:
        episodes = self.rollout.tasks_per_step * self.rollout.group_size
        if episodes % self.train.micro_batches:
            raise ValueError(
                f"train.micro_batches ({self.train.micro_batches}) must divide rollout.tasks_per_step x "
                f"rollout.group_size ({episodes})"
            )
        chunks = self.train.micro_batches * self.train.updates_per_rollout
        if episodes % chunks:
            raise ValueError(
                f"train.updates_per_rollout x train.micro_batches ({chunks}) must divide rollout.tasks_per_step x "
                f"rollout.group_size ({episodes})"
            )
        return self

    @property
    def updates_per_rollout_batch(self) -> int:
        """Optimizer updates one rollout batch gives (updates_per_rollout x epochs_per_rollout)."""
        return self.train.updates_per_rollout * self.train.epochs_per_rollout

    @model_validator(mode="after")
    def _dual_clip_above_the_clip_range(self) -> RunConfig:
        algorithm = self.algorithm
        if algorithm.dual_clip is not None and algorithm.dual_clip <= 1 + algorithm.clip_eps:
            raise ValueError(
                f"algorithm.dual_clip ({algorithm.dual_clip}) must exceed 1 + algorithm.clip_eps "
                f"({1 + algorithm.clip_eps}); set it to null to disable dual-clip"
            )
        return self

    @property
    def uses_sdar_term(self) -> bool:
        """The gated SDAR loss term is on (sdar, grpo_opsd, opsd with sdar_coef > 0)."""
        return self.algorithm.name in ("sdar", "grpo_opsd", "opsd") and self.algorithm.sdar_coef > 0

    @property
    def uses_teacher(self) -> bool:
        """A no-grad teacher pass on the privileged prompt is needed (the SDAR term, rlsd, skill_sd)."""
        if self.algorithm.name == "skill_sd":
            return self.algorithm.skill_sd_coef > 0
        return self.uses_sdar_term or self.algorithm.name == "rlsd"

    @property
    def skills_in_student_prompt(self) -> bool:
        """skill_grpo: the student's prompt (generation and training) carries the privileged prefix."""
        return self.algorithm.name == "skill_grpo"

    @property
    def effective_gate_beta(self) -> float:
        """The beta the gate uses: 0 for grpo_opsd (the constant gate 0.5), else algorithm.gate_beta."""
        return 0.0 if self.algorithm.name == "grpo_opsd" else self.algorithm.gate_beta

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: all defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a config file. Pass the path of a YAML file, e.g. examples/quickstart.yaml.")
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}. Pass the path of a YAML file, e.g. examples/quickstart.yaml.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file (not UTF-8). Pass a YAML config, e.g. examples/quickstart.yaml.") from None
        except OSError as err:
            raise ConfigError(f"Cannot read {path}: {err.strerror or err}. Check its permissions.") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, env:, ...), not {type(loaded).__name__}.")
        raw = loaded
    for override in overrides or []:
        apply_override(raw, override)
    return validate_config(raw)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (8 -> int, [a, b] -> list)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, e.g. --set train.max_steps=10; got {override!r}.")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validate, then fill what the config leaves to the environment: the rollout settings the environment
    class declares in `rollout_defaults` (a value set in the config wins) and its skill bank."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None
    return with_environment_defaults(config)


def with_environment_defaults(config: RunConfig) -> RunConfig:
    from .envs import environment_class
    from .skills import SkillBank, SkillBankError

    env_class = environment_class(config.env.name)
    rollout, teacher = config.rollout, config.teacher
    defaults = dict(env_class.rollout_defaults)
    unknown = sorted(set(defaults) - set(RolloutSettings.model_fields))
    if unknown:
        raise ConfigError(f"{env_class.__name__}.rollout_defaults names unknown rollout settings: {', '.join(unknown)}.")
    if defaults:
        unset = {key: value for key, value in defaults.items() if key not in rollout.model_fields_set}
        explicit = rollout.model_dump(include=rollout.model_fields_set)
        try:
            rollout = RolloutSettings.model_validate({**unset, **explicit})
        except ValidationError as err:
            raise ConfigError(_describe(err, RolloutSettings).replace("  - ", "  - rollout.")) from None
    bank = teacher.skills.bank or env_class.skill_bank
    if config.skills_in_student_prompt and (bank is None or teacher.context == "plan"):
        raise ConfigError(
            f"algorithm.name is 'skill_grpo' (skills in the student's prompt) but there are no skills: "
            f"{'teacher.context is plan' if bank is not None else env_class.__name__ + ' ships no skill bank'}. Set "
            "teacher.skills.bank to a folder of markdown skills and teacher.context to 'skills'."
        )
    if teacher.context == "skills" and bank is None:
        raise ConfigError(
            f"teacher.context is 'skills' but {env_class.__name__} ships no skill bank: set teacher.skills.bank to a "
            "folder of markdown skills, or teacher.context to 'plan' or 'both'."
        )
    if bank is not None and teacher.context in ("skills", "both"):
        try:
            SkillBank.load(bank)
        except SkillBankError as err:
            raise ConfigError(str(err)) from None
    skills = teacher.skills.model_copy(update={"bank": bank})
    return config.model_copy(update={"rollout": rollout, "teacher": teacher.model_copy(update={"skills": skills})})


def _describe(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """The errors of validating `root` (default: RunConfig), one line each, with the key path."""
    lines = ["Invalid configuration:"]
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        key = ".".join(loc)
        if not loc:
            lines.append(f"  - {problem['msg'].removeprefix('Value error, ')}.")
        elif problem["type"] == "extra_forbidden":
            valid = _fields_at(loc[:-1], root or RunConfig)
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            lines.append(f"  - unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}.")
        else:
            got = problem.get("input")
            lines.append(f"  - {key}: {problem['msg'].removeprefix('Value error, ')} (got {got!r}).")
    return "\n".join(lines)


def _fields_at(loc: list[str], model: type[BaseModel]) -> list[str]:
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
