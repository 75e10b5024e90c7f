"""SDARTrainer: TRL's GRPOTrainer plus what SDAR adds, and nothing else.

What is TRL's, reused as is: the optimiser and scheduler, accelerate, PEFT wrapping, gradient
checkpointing, the fused log-prob head, the PPO-clip loss with its loss types (dual-clip as `delta`),
the update schedule (steps_per_generation, num_iterations), its bias-corrected k3 KL (an option), the
entropy bonus, report_to logging and checkpoint/resume.

What SDAR adds, overriding these methods:
- `_generate_and_score_completions`: multi-turn episodes instead of single completions, in named steps:
  `_rollout` (each turn is one sample; rewards from the environment), `_advantages` (group advantages),
  `_training_batch` (padded to TRL's chunks), `_no_grad_passes`: one `_score_responses` each for the
  reference (adapter off), the teacher (privileged prompt, adapter on or off) and, when a rollout batch
  feeds several updates (or for rlsd), the rollout policy (old log-probs).
- `_compute_loss`: TRL's GRPO loss + the official clamped k3 KL + lambda * L_SDAR (`losses.sdar_objective`,
  or skill_sd's term), with the gate computed from the very student log-probs TRL's loss used (captured in
  our `_get_per_token_logps_and_entropies`); the gates are recorded.
- `training_step`: once per update, gate statistics, gates/step-N.jsonl and the non-finite guard.
- `_save_checkpoint`: written to a staging folder and renamed, so a checkpoint is whole or absent.

The rollout itself is `_play_episodes`, so `sdar bench` can swap in a fixed synthetic batch and time
the rest of the real step.

The batch `_generate_and_score_completions` hands TRL ([B] per row, [B, T] per response token; T is the
longest response; padding rows have completion_mask 0 and sample_index -1):

| key | shape | read by | what |
|---|---|---|---|
| prompt_ids, prompt_mask | [B, P] | TRL's forward | student prompt, left-padded |
| completion_ids, completion_mask | [B, T] | TRL's forward and loss | the sampled response ids, right-padded |
| advantages | [B] ([B, T] for rlsd) | TRL's loss | GRPO advantage (0 for opsd) |
| num_items_in_batch | scalar | TRL's loss (dapo), `_normalizer` | real response tokens, all processes |
| num_samples_in_batch | scalar | `_sdar_normalizer` | real turn-samples, all processes |
| sample_index | [B] | `_record_gates` | index into the step's turn-samples |
| ref_per_token_logps | [B, T] | TRL's KL / `_official_kl` | R_t, when kl_coef != 0 |
| teacher_per_token_logps | [B, T] | `_compute_loss` | T_t, when the algorithm has a teacher |
| old_per_token_logps | [B, T] | TRL's ratio, rlsd, skill_sd | S_old_t, when the batch feeds several updates or rlsd |
| sampling_per_token_logps | [B, T] | `_correct_for_the_sampler` | vLLM's own log-probs (rollout.engine: vllm) |
| importance_sampling_ratio | [B, T] or [B, 1] | TRL's loss | set during the loss from the above (vLLM) |
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import rotate_checkpoints
from trl import GRPOConfig, GRPOTrainer

from . import distributed
from .batching import collate_turn_samples
from .config import RunConfig
from .cpu_scoring import score_only_labelled_positions_on_cpu
from .envs.base import Environment
from .gates.record import GateRecord
from .losses import (
    aggregate_tokens,
    clamped_k3_kl,
    episode_advantages,
    group_advantages,
    masked_token_sum,
    rlsd_lambda,
    rlsd_token_advantages,
    sampler_importance_ratio,
    sampler_logp_mismatch,
    sdar_objective,
    skill_sd_token_loss,
)
from .models import adapter_switched_off, adapter_weights_to_fp32, checkpointing_paused, lora_config
from .rollout import EnvTimeouts, EpisodeResult, HFPolicy, TurnRenderer, TurnSample, play_episodes
from .rundir import GATES_DIR

SDAR_STATE_FILE = "sdar_state.json"


class TrainingAborted(RuntimeError):
    """Training cannot go on (most episodes fail, repeated non-finite losses); the message says why."""


def environment_reward(**_: Any) -> list[float]:
    """Placeholder for TRL's `reward_funcs` slot, which must not be empty.

    SDARTrainer takes rewards from the environment inside its own rollout, so TRL's reward path is
    never reached; reaching it would mean the rollout override was bypassed.
    """
    raise RuntimeError("SDARTrainer scores episodes in the environment; TRL's reward functions are not used.")


def grpo_args(config: RunConfig, run_dir: Path, use_cpu: bool, bf16: bool) -> GRPOConfig:
    """Translate the run config into TRL's GRPOConfig.

    One rollout batch is split into `updates_per_rollout` optimizer updates of `micro_batches`
    accumulation micro-steps each (TRL: steps_per_generation = updates x micro-batches), and passed
    over `epochs_per_rollout` times (num_iterations). Dual-clip is TRL's `delta`: capping the ratio at
    c before PPO's min gives, for A < 0, min(max(-r A, -clip(r) A), -c A) (the dual-clip loss, value and
    gradient), and for A > 0 changes nothing as long as c > 1 + eps, which the config checks.

    Under several processes TRL's generation batch is per_device_train_batch_size x steps_per_generation
    x processes, so each process takes its share: the step still plays tasks_per_step x group_size episodes.
    """
    rollout, algorithm, train = config.rollout, config.algorithm, config.train
    episodes_per_step = rollout.tasks_per_step * rollout.group_size // distributed.world_size()
    chunks_per_rollout = train.micro_batches * train.updates_per_rollout
    return GRPOConfig(
        output_dir=str(run_dir),
        seed=train.seed,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        per_device_train_batch_size=episodes_per_step // chunks_per_rollout,
        gradient_accumulation_steps=train.micro_batches,
        steps_per_generation=chunks_per_rollout,
        num_iterations=train.epochs_per_rollout,
        num_generations=rollout.group_size,
        max_completion_length=rollout.max_new_tokens,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        beta=algorithm.kl_coef,
        use_bias_correction_kl=algorithm.kl_estimator == "k3_bias_corrected",
        epsilon=algorithm.clip_eps,
        delta=algorithm.dual_clip,
        loss_type=algorithm.loss_type,
        entropy_coef=algorithm.entropy_coef,
        gradient_checkpointing=train.gradient_checkpointing,
        use_cpu=use_cpu,
        bf16=bf16,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=config.output.save_total_limit,
        logging_steps=1,
        report_to=list(train.report_to) or "none",
        disable_tqdm=True,
        disable_dropout=True,
        remove_unused_columns=False,
        shuffle_dataset=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


class SDARTrainer(GRPOTrainer):
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: RunConfig,
        make_env: Callable[[], Environment],
        train_task_ids: Sequence[str],
        args: GRPOConfig,
        max_turns: int,
        callbacks: list[TrainerCallback] | None = None,
    ):
        super().__init__(
            model=model,
            reward_funcs=[environment_reward],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": list(train_task_ids)}),
            processing_class=tokenizer,
            peft_config=lora_config(config.model),
            callbacks=[*(callbacks or []), _NonFiniteGuard(self), _SaveBetweenRolloutBatches(config.updates_per_rollout_batch)],
        )
        score_only_labelled_positions_on_cpu()
        adapter_weights_to_fp32(self.model)
        # sdar shows its own progress and per-step summary
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        self.config = config
        self.make_env = make_env
        self.max_turns = max_turns
        self.renderer = TurnRenderer(tokenizer, config.rollout, config.teacher, config.skills_in_student_prompt)
        algorithm = config.algorithm.name
        self.with_teacher = config.uses_teacher
        self.sdar_term = config.uses_sdar_term
        self.sdar_coef = config.algorithm.sdar_coef if self.sdar_term else 0.0
        self.gate_beta = config.effective_gate_beta
        self.rl_term = algorithm != "opsd"
        self.gates_dir = Path(args.output_dir) / GATES_DIR
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_reason: str | None = None
        self._nonfinite_this_step = False
        self._capture_student = False
        self._captured_student_logps: torch.Tensor | None = None
        self._step_samples: list[TurnSample] = []
        self._step_advantages: torch.Tensor | None = None
        self._gate_records: dict[int, dict[str, list[float]]] = {}
        self._rollout_metrics: dict[str, float] = {}
        #: episodes played by all processes together (global ids: rank r's follow those of ranks < r)
        self._episodes_played = 0
        self._first_episode = 0
        self._vllm_policy = None
        self._loss_inputs: dict[str, torch.Tensor] | None = None
        vllm = config.rollout.vllm
        if config.rollout.engine == "vllm" and vllm.importance_sampling != "none":
            # TRL's loss multiplies each token's policy term by inputs["importance_sampling_ratio"] under
            # these two flags; the ratio is computed from the training forward's own log-probs in
            # _get_per_token_logps_and_entropies (TRL's vLLM generation itself is never used)
            self.use_vllm = self.vllm_importance_sampling_correction = True

    # ----------------------------------------------------------------------------------- rollout
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """One rollout batch, in the keys TRL's loss reads (see the class docstring's table):
        rollout -> advantages -> padded batch -> no-grad passes (reference, teacher, rollout policy)."""
        task_ids = [row["prompt"] for row in inputs]
        # 1-based, as the official (episodes_played counts every process's episodes)
        rollout_step = self._episodes_played // max(1, len(task_ids) * self.accelerator.num_processes) + 1
        samples, episodes, generation_seconds = self._rollout(task_ids)
        advantages = self._advantages(samples, episodes)
        # opsd trains the gated term alone: no policy-gradient signal
        batch = self._training_batch(samples, advantages if self.rl_term else torch.zeros_like(advantages))
        reference_seconds, teacher_seconds, old_seconds = self._no_grad_passes(batch)
        if self.config.algorithm.name == "rlsd":
            settings = self.config.algorithm
            lam = rlsd_lambda(rollout_step, settings.rlsd_lambda, settings.rlsd_decay_steps)
            batch["advantages"] = rlsd_token_advantages(
                batch["advantages"], batch["teacher_per_token_logps"], batch["old_per_token_logps"], lam, settings.rlsd_clip
            ) * batch["completion_mask"]
            self._metrics["train"]["rlsd_lambda"].append(lam)

        self._step_samples = samples
        self._step_advantages = advantages
        self._gate_records = {}
        self._log_rollout_metrics(samples, episodes, generation_seconds, reference_seconds, teacher_seconds, old_seconds)
        return batch

    def _rollout(self, task_ids: list[str]) -> tuple[list[TurnSample], list[EpisodeResult], float]:
        """Play the step's episodes (no gradient, eval mode); the turn-samples of the episodes that did not fail in
        the environment, every episode, and the seconds it took."""
        generation_started = time.perf_counter()
        group_size = self.num_generations
        # TRL's sampler hands rank r the r-th slice of the step's tasks (whole groups: see distributed.py)
        self._first_episode = self._episodes_played + self.accelerator.process_index * len(task_ids)
        groups = [(self._first_episode + i) // group_size for i in range(len(task_ids))]
        model = self.accelerator.unwrap_model(self.model)
        self.renderer.truncated_prompts = 0  # counted per rollout

        with torch.no_grad(), checkpointing_paused(self.model, self.args.gradient_checkpointing_kwargs):
            was_training = model.training
            model.eval()
            try:
                samples, episodes = self._play_episodes(model, task_ids, groups)
            finally:
                model.train(was_training)
        generation_seconds = self._seconds_since(generation_started)
        self._episodes_played += len(task_ids) * self.accelerator.num_processes
        self._check_env_errors(episodes)
        # an episode that failed in the environment has no outcome to learn from: its turns are not trained on
        # (dropped before the advantages, so they neither score 0 nor shift their group's mean)
        failed = {e.episode for e in episodes if e.env_error}
        return [s for s in samples if s.episode not in failed], episodes, generation_seconds

    def _advantages(self, samples: list[TurnSample], episodes: list[EpisodeResult]) -> torch.Tensor:
        """GRPO advantages of the turn-samples [N]: over each group's samples, or (advantage_norm: episode) with each
        episode counted once in the baseline."""
        rewards = torch.tensor([s.reward for s in samples])
        group_ids = torch.tensor([s.group for s in samples])
        if self.config.algorithm.advantage_norm == "group":
            return group_advantages(rewards, group_ids)
        outcome = {e.episode: e.outcome_reward for e in episodes}
        return episode_advantages(
            rewards,
            group_ids,
            torch.tensor([s.episode for s in samples]),
            torch.tensor([outcome[s.episode] for s in samples]),
        )

    def _training_batch(self, samples: list[TurnSample], advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """The turn-samples padded into TRL's batch on the device, its normalisers counted over all processes."""
        # every process needs the same row count (and so micro-batch size), or TRL's gathers in the loss
        # mismatch: pad to the largest count over the processes
        multiple = self.args.steps_per_generation
        rows = int(distributed.max_over_ranks([len(samples) + (-len(samples)) % multiple])[0])
        batch = collate_turn_samples(
            samples, advantages, self.processing_class.pad_token_id, multiple, self.with_teacher, min_rows=rows
        )
        # the normalisers count every process's tokens and samples, as TRL gathers num_items_in_batch: the
        # loss divides by them / num_processes and DDP averages the gradients, so they equal one process's
        items, samples_in_batch = distributed.sum_over_ranks([batch["num_items_in_batch"], batch["num_samples_in_batch"]])
        batch["num_items_in_batch"] = torch.tensor(int(items))
        batch["num_samples_in_batch"] = torch.tensor(int(samples_in_batch))
        device = self.accelerator.device
        return {key: value.to(device) for key, value in batch.items()}

    def _no_grad_passes(self, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """Add the no-grad log-probs to `batch`: R_t (reference: adapter off) when kl_coef != 0, T_t (teacher:
        privileged prompt) when the algorithm has a teacher, S_old_t (the rollout policy) when the batch feeds
        several updates or for rlsd. Returns the seconds of each pass (0 when skipped)."""
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        reference_seconds = teacher_seconds = old_seconds = 0.0
        with checkpointing_paused(self.model, self.args.gradient_checkpointing_kwargs):
            if self.beta != 0.0:
                started = time.perf_counter()
                batch["ref_per_token_logps"] = self._score_responses(
                    prompt_ids, prompt_mask, completion_ids, completion_mask, adapter_off=True
                )
                reference_seconds = self._seconds_since(started)
            if self.with_teacher:
                started = time.perf_counter()
                # the teacher scores the student's own response under the privileged prompt s+
                teacher_ids, teacher_mask = batch.pop("teacher_prompt_ids"), batch.pop("teacher_prompt_mask")
                batch["teacher_per_token_logps"] = self._score_responses(
                    teacher_ids, teacher_mask, completion_ids, completion_mask,
                    adapter_off=self.config.teacher.weights == "base",
                )
                teacher_seconds = self._seconds_since(started)
            if self._reuses_rollout_batch or self.config.algorithm.name == "rlsd":
                started = time.perf_counter()
                # the policy that sampled, scored once: the PPO ratio of every later update is against it
                batch["old_per_token_logps"] = self._score_responses(
                    prompt_ids, prompt_mask, completion_ids, completion_mask, adapter_off=False
                )
                old_seconds = self._seconds_since(started)
        return reference_seconds, teacher_seconds, old_seconds

    @torch.no_grad()
    def _score_responses(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        adapter_off: bool,
    ) -> torch.Tensor:
        """log pi(y_t | prompt, y_<t) [B, T] of the completions, no gradient: the reference, teacher and old-policy
        passes. Through TRL's `_get_per_token_logps_and_entropies`, the forward and fused head (at the rollout
        temperature) its loss scores the student with, so all four log-probs are comparable; outside a trainer
        `logprobs.score_responses` makes the same call. `adapter_off`: the base weights (LoRA switched off)."""
        with adapter_switched_off(self.accelerator.unwrap_model(self.model), off=adapter_off):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
                batch_size=self.config.train.logprob_batch_size,
            )
        return logps

    @property
    def _reuses_rollout_batch(self) -> bool:
        """True when one rollout batch feeds several optimizer updates (updates_per_rollout or epochs_per_rollout
        > 1): then the weights move between updates and the ratio needs the rollout-time log-probs (TRL's rule)."""
        return self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) != 0

    def _play_episodes(
        self, model: PreTrainedModel, task_ids: list[str], groups: list[int]
    ) -> tuple[list[TurnSample], list[EpisodeResult]]:
        """The rollout of one step (no gradient, eval mode): each task id played once, batched."""
        if self.config.rollout.engine == "vllm":
            from .vllm_policy import VLLMPolicy

            if self._vllm_policy is None:
                self._vllm_policy = VLLMPolicy(self.processing_class, self.config, self.accelerator.device)
            policy = self._vllm_policy
            policy.load_adapter(model)  # this step's adapter, as a LoRARequest
        else:
            policy = HFPolicy(model, self.processing_class, self.config.rollout)
        try:
            return play_episodes(
                task_ids,
                groups,
                self.make_env,
                policy,
                self.renderer,
                self.max_turns,
                self._first_episode,
                env_workers=self.config.env.workers,
                timeouts=EnvTimeouts(self.config.env.reset_timeout_s, self.config.env.step_timeout_s),
            )
        finally:
            if policy is self._vllm_policy:
                policy.sleep()  # the device memory goes back to the training phases

    def _seconds_since(self, started: float) -> float:
        """Wall seconds since `started`, after the GPU has finished the work queued so far."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter() - started

    def _check_env_errors(self, episodes: list[EpisodeResult]) -> None:
        """Abort when most of the step's episodes (over all processes: every rank decides the same) failed."""
        failed = [e for e in episodes if e.env_error]
        failed_count, total = (int(n) for n in distributed.sum_over_ranks([len(failed), len(episodes)]))
        if failed_count * 2 > total:
            example = next(e for e in distributed.gather_to_all(failed[0] if failed else None) if e is not None)
            raise TrainingAborted(
                f"{failed_count} of {total} episodes failed inside the environment, e.g. task "
                f"{example.task_id}: {example.env_error}. Fix the environment (env.name / env.kwargs) and resume."
            )

    def _log_rollout_metrics(
        self,
        samples: list[TurnSample],
        episodes: list[EpisodeResult],
        generation_seconds: float,
        reference_seconds: float,
        teacher_seconds: float,
        old_seconds: float,
    ) -> None:
        """Timings go to the log of the rollout's first update; the rollout's other metrics are repeated in
        the log of every update trained on it (`_finish_step`), so each metrics line says what it learned from."""
        metrics = self._metrics["train"]
        # sums and counts over all processes (the step's episodes are split among them); seconds: the slowest
        (reward, won, turns, episode_count, env_errors, invalid, truncated, sample_count, response_tokens,
         prompt_tokens, truncated_prompts) = distributed.sum_over_ranks([
            sum(e.outcome_reward for e in episodes), sum(e.won for e in episodes), sum(e.turns for e in episodes),
            len(episodes), sum(bool(e.env_error) for e in episodes), sum(not s.valid for s in samples),
            sum(s.truncated for s in samples), len(samples), sum(len(s.response_ids) for s in samples),
            sum(len(s.prompt_ids) for s in samples), self.renderer.truncated_prompts,
        ])
        generation_seconds, reference_seconds, teacher_seconds, old_seconds = distributed.max_over_ranks(
            [generation_seconds, reference_seconds, teacher_seconds, old_seconds]
        )
        self._rollout_metrics = {
            "reward_mean": reward / episode_count,
            "success_rate": won / episode_count,
            "episode_turns_mean": turns / episode_count,
            "invalid_action_rate": invalid / max(1, sample_count),
            "env_error_rate": env_errors / episode_count,
            "truncated_response_rate": truncated / max(1, sample_count),
            "turn_samples": sample_count,
            "response_tokens": response_tokens,
            "prompt_tokens": prompt_tokens,
            "truncated_prompts": truncated_prompts,
        }
        metrics["generation_seconds"].append(generation_seconds)
        metrics["reference_pass_seconds"].append(reference_seconds)
        metrics["teacher_pass_seconds"].append(teacher_seconds)
        metrics["old_logprob_pass_seconds"].append(old_seconds)
        metrics["logprob_pass_seconds"].append(reference_seconds + teacher_seconds + old_seconds)

    # -------------------------------------------------------------------------------------- loss
    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._capture_student:
            self._captured_student_logps = result[0]
            if self._loss_inputs is not None and "sampling_per_token_logps" in self._loss_inputs:
                self._correct_for_the_sampler(self._loss_inputs, result[0])
            elif self._loss_inputs is not None and self.use_vllm:
                # no sampled row here (a process whose episodes all failed): nothing to correct
                self._loss_inputs["importance_sampling_ratio"] = torch.ones_like(result[0])
        return result

    def _correct_for_the_sampler(self, inputs, student_logps: torch.Tensor) -> None:
        """vLLM rollouts: the truncated importance ratio TRL's loss applies, and the log-prob mismatch."""
        sampler_logps, mask = inputs["sampling_per_token_logps"], inputs["completion_mask"]
        # the trainer's log-probs at rollout time: the current ones, unless updates already moved the policy
        train_logps = inputs.get("old_per_token_logps", student_logps)
        vllm = self.config.rollout.vllm
        if vllm.importance_sampling != "none":
            inputs["importance_sampling_ratio"] = sampler_importance_ratio(
                train_logps, sampler_logps, mask, vllm.importance_sampling, vllm.importance_sampling_cap
            )
        mismatch = sampler_logp_mismatch(train_logps, sampler_logps, mask)
        self._metrics["train"]["sampler_logp_mismatch"].append(mismatch.item())

    def _compute_loss(self, model, inputs):
        """L = L_PPO-clip(A) - entropy_coef * H  [TRL's loss]  + kl_coef * KL  + lambda * L_SDAR  [+ skill_sd's term].

        S_t (the student log-probs, with gradient) come from TRL's own forward inside its loss: our override of
        `_get_per_token_logps_and_entropies` keeps them (`_capture_student`), so the gate and the SDAR term use
        exactly the log-probs the policy term used, at no extra forward.
        """
        official_kl = self.beta != 0.0 and self.config.algorithm.kl_estimator == "k3"
        kl_coef = self.beta
        # TRL's own KL is switched off when the official clamped k3 (plain gradient) replaces it below
        self.beta = 0.0 if official_kl else kl_coef
        self._capture_student, self._loss_inputs = True, inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._capture_student, self._loss_inputs = False, None
            self.beta = kl_coef
        student_logps, self._captured_student_logps = self._captured_student_logps, None
        mask = inputs["completion_mask"].to(student_logps.dtype)
        if official_kl:
            loss = loss + kl_coef * self._official_kl(inputs, student_logps, mask)
        if self.sdar_term:
            # lambda * L_SDAR with the gate g_t = sg(sigmoid(beta * (T_t - S_t))), T_t from the no-grad teacher pass
            teacher_logps = inputs["teacher_per_token_logps"]
            aggregation, normalizer = self._sdar_normalizer(mask, inputs)
            sdar_loss, gate = sdar_objective(
                student_logps, teacher_logps, mask, self.gate_beta, self.sdar_coef, aggregation, normalizer
            )
            loss = loss + sdar_loss
            self._record_gates(inputs, student_logps, teacher_logps, gate)
        if self.config.algorithm.name == "skill_sd" and self.with_teacher:
            loss = loss + self.config.algorithm.skill_sd_coef * self._skill_sd_term(inputs, student_logps, mask)
        if not torch.isfinite(loss):
            self._nonfinite_this_step = True
            # zero gradient, NaN value: the Trainer logs it as skipped and _NonFiniteGuard drops the update
            trainable = [p for p in model.parameters() if p.requires_grad]
            loss = sum(p.sum() for p in trainable) * 0.0 + loss.detach()
        return loss

    def _official_kl(self, inputs, student_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The official clamped k3 KL to the reference, aggregated as the policy loss; logs its token-mean."""
        per_token_kl = clamped_k3_kl(inputs["ref_per_token_logps"], student_logps)
        mode = "train" if self.model.training else "eval"
        totals = self.accelerator.reduce(torch.stack([masked_token_sum(per_token_kl.detach(), mask), mask.sum()]))
        self._metrics[mode]["kl"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return self._aggregate(per_token_kl, mask, inputs, self.loss_type)

    def _skill_sd_term(self, inputs, student_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Skill-SD's importance-weighted k3 to the teacher (a baseline), token-mean; logs its token-mean."""
        old_logps = inputs.get("old_per_token_logps")
        old_logps = student_logps.detach() if old_logps is None else old_logps  # on-policy: rho = 1, with gradient
        token_loss = skill_sd_token_loss(inputs["teacher_per_token_logps"], student_logps, old_logps)
        mode = "train" if self.model.training else "eval"
        # logged over every process's tokens, as the KL is
        totals = self.accelerator.reduce(torch.stack([masked_token_sum(token_loss.detach(), mask), mask.sum()]))
        self._metrics[mode]["skill_sd_loss"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        return self._aggregate(token_loss, mask, inputs, self._token_mean_scope)

    def _aggregate(self, values: torch.Tensor, mask: torch.Tensor, inputs, loss_type: str) -> torch.Tensor:
        """A per-token term reduced the way TRL's `loss_type` reduces the policy loss (see `_normalizer`)."""
        return aggregate_tokens(values, mask, *self._normalizer(mask, inputs, loss_type))

    def _normalizer(self, mask: torch.Tensor, inputs, loss_type: str) -> tuple[str, float | torch.Tensor]:
        """(aggregation, Z) for `aggregate_tokens` that reduce a per-token term as TRL's `loss_type` reduces the
        policy loss, gradient accumulation included: dapo/cispo token-mean over the update, bnpo token-mean per
        micro-batch, grpo/sapo sequence-mean, dr_grpo token-sum over rows x max_completion_length."""
        accumulation = self.current_gradient_accumulation_steps if self.model.training else 1.0
        if loss_type in ("dapo", "cispo"):
            # the update's real tokens over all processes, scaled to one process (DDP averages the gradients)
            items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            return "token_sum", items * self._update_share
        if loss_type == "bnpo":
            return "token_sum", mask.sum().clamp(min=1.0) * accumulation
        if loss_type in ("grpo", "sapo"):
            return "sequence_mean_sum", mask.size(0) * accumulation
        if loss_type == "dr_grpo":
            return "token_sum", mask.size(0) * self.max_completion_length * accumulation
        raise ValueError(f"no aggregation rule for loss_type {loss_type!r}")

    def _sdar_normalizer(self, mask: torch.Tensor, inputs) -> tuple[str, float | torch.Tensor]:
        """(aggregation, Z) of L_SDAR: algorithm.sdar_aggregation token_mean follows the policy loss's token-mean
        scope; seq_mean averages each response's tokens, then the update's responses over all processes."""
        if self.config.algorithm.sdar_aggregation == "token_mean":
            return self._normalizer(mask, inputs, self._token_mean_scope)
        samples = inputs["num_samples_in_batch"].clamp(min=1) / self.accelerator.num_processes
        return "sequence_mean_sum", samples * self._update_share

    @property
    def _token_mean_scope(self) -> str:
        """The token-mean the policy loss uses: per micro-batch (bnpo) or over the update (otherwise)."""
        return "bnpo" if self.loss_type == "bnpo" else "dapo"

    @property
    def _update_share(self) -> float:
        """The share of the rollout batch one optimizer update trains on: 1 / updates_per_rollout in training
        (the batch-wide counts num_items_in_batch / num_samples_in_batch are scaled by it, as TRL's dapo is)."""
        if not self.model.training:
            return 1.0
        return self.current_gradient_accumulation_steps / self.args.steps_per_generation

    def _record_gates(self, inputs, student_logps, teacher_logps, gate) -> None:
        """Keep each real row's per-token values; one host copy for the whole micro-batch."""
        values = torch.stack([student_logps.detach(), teacher_logps, gate]).float().cpu()
        lengths = inputs["completion_mask"].sum(-1).tolist()
        for row, sample_index in enumerate(inputs["sample_index"].tolist()):
            if sample_index < 0:
                continue
            student, teacher, row_gate = values[:, row, : int(lengths[row])].tolist()
            self._gate_records[sample_index] = {"student_logp": student, "teacher_logp": teacher, "gate": row_gate}

    # ------------------------------------------------------------------------------ step bookkeeping
    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._finish_step()
        return loss

    def _finish_step(self) -> None:
        """Once per update: gate statistics, the gates file, and the non-finite counters.

        Under several processes the non-finite decision is taken by all together (one rank's NaN skips every
        rank's update, so the adapters stay equal), the gate statistics cover every rank's tokens, and the main
        process writes every rank's gate records.
        """
        metrics = self._metrics["train"]
        for name, value in self._rollout_metrics.items():
            metrics[name].append(value)
        step = self.state.global_step + 1
        self._nonfinite_this_step = distributed.any_rank(self._nonfinite_this_step)
        if self._nonfinite_this_step:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_a_row = 0
        metrics["nonfinite_updates_skipped"].append(float(self.nonfinite_total))
        if not self.with_teacher:
            return
        gates = [g for record in self._gate_records.values() for g in record["gate"]]
        gaps = [
            t - s for record in self._gate_records.values() for t, s in zip(record["teacher_logp"], record["student_logp"])
        ]
        gate_sum, active, gap_sum, count = distributed.sum_over_ranks(
            [sum(gates), sum(g > 0.5 for g in gates), sum(gaps), len(gates)]
        )
        if count:
            metrics["gate_mean"].append(gate_sum / count)
            metrics["gate_active_ratio"].append(active / count)
            metrics["teacher_gap_mean"].append(gap_sum / count)
        if self.config.output.save_gates:
            rows = distributed.gather_to_main(self._gate_rows(step))
            if self.accelerator.is_main_process and count:
                self._write_gates(step, [row for rank_rows in rows for row in rank_rows])
        self._gate_records = {}  # each update records (and writes) the gates of the samples it trained on

    def _gate_rows(self, step: int) -> list[GateRecord]:
        """This process's gate records of the step, one per trained turn-sample."""
        tokenizer = self.processing_class
        rows = []
        for index, sample in enumerate(self._step_samples):
            record = self._gate_records.get(index)
            if record is None:
                continue
            rows.append(
                GateRecord.of_turn(
                    sample, step, tokenizer.decode,
                    **record,
                    mask=[1] * len(sample.response_ids),
                    advantage=float(self._step_advantages[index]),
                    beta=self.gate_beta,
                    teacher_placement=self.config.teacher.placement,
                    teacher_context=self.config.teacher.context,
                )
            )
        return rows

    def _write_gates(self, step: int, rows: list[GateRecord]) -> None:
        self.gates_dir.mkdir(parents=True, exist_ok=True)
        path = self.gates_dir / f"step-{step}.jsonl"
        staging = path.with_suffix(".jsonl.tmp")
        with staging.open("w") as handle:
            handle.writelines(row.to_json_line() for row in rows)
        os.replace(staging, path)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N into a staging folder, then rename it into place (atomic on POSIX)."""
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / f".staging-{name}"
        # Several processes: every rank writes into the staging folder (the main one the adapter, optimizer
        # and trainer state; each its rng_state_{rank}.pth), and only the main one renames it once all wrote.
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        original_output_dir = self.args.output_dir
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError of its own
            shutil.rmtree(staging_root, ignore_errors=True)  # a partial checkpoint is never left, nor its space taken
            raise OSError(f"writing {name} into {run_dir} failed ({err})") from err
        finally:
            self.args.output_dir = original_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish_checkpoint(run_dir, staging_root, name)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, run_dir: Path, staging_root: Path, name: str) -> None:
        """Main process only: add the SDAR state to the staged checkpoint and rename it into place."""
        staged = staging_root / name
        (staged / SDAR_STATE_FILE).write_text(
            json.dumps({"episodes_played": self._episodes_played, "nonfinite_total": self.nonfinite_total})
        )
        final = run_dir / name
        if final.exists():
            retired = run_dir / f".retired-{name}"
            shutil.rmtree(retired, ignore_errors=True)
            final.rename(retired)
            staged.rename(final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staged.rename(final)
        shutil.rmtree(staging_root, ignore_errors=True)
        if self.args.save_total_limit:  # counted in the run directory, never in the staging folder
            rotate_checkpoints(str(run_dir), self.args.save_total_limit)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            state_file = Path(checkpoint) / SDAR_STATE_FILE
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                self._episodes_played = state["episodes_played"]
                self.nonfinite_total = state["nonfinite_total"]


class _NonFiniteGuard(TrainerCallback):
    """Drops the optimizer update of a step whose loss was not finite; stops after too many in a row."""

    def __init__(self, trainer: SDARTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._nonfinite_this_step:
            for parameter in trainer.model.parameters():
                parameter.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer._nonfinite_this_step:
            trainer._nonfinite_this_step = False
            if trainer.nonfinite_in_a_row >= trainer.config.train.max_nonfinite_updates and not trainer.stop_reason:
                trainer.stop_reason = (
                    f"the loss was not finite in {trainer.nonfinite_in_a_row} steps in a row (up to step "
                    f"{state.global_step}); the updates were skipped and a checkpoint was written. Lower "
                    "train.learning_rate or check the model's dtype, then resume."
                )
        # stop between rollout batches only: a checkpoint inside one could not resume it
        if trainer.stop_reason and state.global_step % trainer.config.updates_per_rollout_batch == 0:
            control.should_save = True
            control.should_training_stop = True
        return control


class _SaveBetweenRolloutBatches(TrainerCallback):
    """A checkpoint that save_steps puts inside a rollout batch moves to the batch's end: TRL keeps the rest of
    the batch in memory only, so a checkpoint inside it could not be resumed exactly. Runs after every other
    callback (interrupts, the non-finite guard and the final save already wait for a batch's end)."""

    def __init__(self, updates_per_batch: int):
        self.updates_per_batch = updates_per_batch
        self.pending = False

    def on_step_end(self, args, state, control, **kwargs):
        # the run's last update always counts as a batch end: its checkpoint is the run's result
        at_batch_end = state.global_step % self.updates_per_batch == 0 or state.global_step >= state.max_steps
        if control.should_save and not at_batch_end:
            control.should_save, self.pending = False, True
        elif self.pending and at_batch_end:
            control.should_save, self.pending = True, False
        return control

