"""Gates on fresh rollouts of a checkpoint (or a base model), without training.

The episodes are the ones `sdar eval` would play (eval split, tasks and sampling from eval.seed);
each turn is then scored like a training step scores it (the same head at rollout.temperature):
    S_t = log pi(y_t | student prompt)                      adapter on
    T_t = log pi(y_t | privileged prefix + student prompt)  adapter on (teacher.weights live) or off (base)
    g_t = sigmoid(beta * (T_t - S_t))
and the advantage is the group advantage over each task's eval.samples_per_task episodes (0 when 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from .batching import left_pad, right_pad
from .evaluate import evaluation_tasks, play_evaluation
from .gates import GateRecord, GateView, read_metrics, select_or_explain
from .logprobs import install_scoring_head, labelled_logps
from .losses import group_advantages, sdar_gate
from .models import adapter_switched_off, pick_device
from .rollout import TurnSample
from .targets import Target, load_agent


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    temperature: float = 1.0,
) -> list[list[float]]:
    """log pi(response token | prompt, earlier response tokens) for each (prompt, response) pair, through the
    head training uses (TRL's fused head at `temperature`, the rollout temperature: see logprobs.py).

    Rows are laid out as in training: prompt left-padded, response right-padded.
    """
    install_scoring_head(model, temperature)
    device = next(model.parameters()).device
    logps: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        prompt_ids, prompt_mask = left_pad(prompts[start : start + batch_size], pad_id)
        response_rows = responses[start : start + batch_size]
        response_ids, response_mask = right_pad(response_rows, pad_id)
        token_logps = labelled_logps(
            model,
            torch.cat([prompt_ids, response_ids], 1).to(device),
            torch.cat([prompt_mask, response_mask], 1).to(device),
            response_ids.size(1),
        ).float()
        logps += [row[: len(response)].cpu().tolist() for row, response in zip(token_logps, response_rows)]
    return logps


def score_samples(
    model: PreTrainedModel, samples: Sequence[TurnSample], tokenizer, target: Target, step: int
) -> list[GateRecord]:
    """Student and teacher log-probs, gates and advantages of the turn-samples, as gate records."""
    config = target.config
    batch_size = config.train.logprob_batch_size
    pad = tokenizer.pad_token_id
    responses = [s.response_ids for s in samples]
    temperature = config.rollout.temperature
    student = response_logps(model, [s.prompt_ids for s in samples], responses, pad, batch_size, temperature)
    with adapter_switched_off(model, off=config.teacher.weights == "base"):
        teacher = response_logps(model, [s.teacher_prompt_ids for s in samples], responses, pad, batch_size, temperature)
    advantages = group_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group for s in samples]))
    beta = config.effective_gate_beta
    records = []
    for sample, s_logps, t_logps, advantage in zip(samples, student, teacher, advantages.tolist()):
        gate = sdar_gate(torch.tensor(t_logps), torch.tensor(s_logps), beta).tolist()
        records.append(
            GateRecord(
                step=step,
                task_id=sample.task_id,
                task_type=sample.task_type,
                episode=sample.episode,
                turn=sample.turn,
                tokens=[tokenizer.decode([token]) for token in sample.response_ids],
                student_logp=s_logps,
                teacher_logp=t_logps,
                gate=gate,
                advantage=advantage,
                reward=sample.reward,
                beta=beta,
                action=sample.action,
                valid=sample.valid,
                token_ids=list(sample.response_ids),
            )
        )
    return records


def probe_view(target: Target, task: str | None = None, episode: int | None = None, turn: int | None = None) -> GateView:
    """Play eval.episodes fresh episodes with the target and score their gates (step: the checkpoint's, or 0);
    keep the records of `task`, `episode` and `turn` (None: all)."""
    make_env, task_ids, env_max_turns = evaluation_tasks(target.config)
    model, tokenizer = load_agent(target, pick_device(target.config.train.device))
    samples, _ = play_evaluation(
        model, tokenizer, target.config, task_ids, make_env, target.config.rollout.max_turns or env_max_turns
    )
    step = target.step or 0
    records = select_or_explain(score_samples(model, samples, tokenizer, target, step), step, task, episode, turn)
    metrics = read_metrics(target.checkpoint.parent) if target.checkpoint else []
    return GateView(target.name, step, records, {step: records}, metrics, fresh=True)
