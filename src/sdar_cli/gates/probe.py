"""Gates on fresh rollouts of a checkpoint (or a base model), without training.

The episodes are the ones `sdar eval` would play (eval split, tasks and sampling from eval.seed);
each turn is then scored like a training step scores it (logprobs.score_responses: the same head at
rollout.temperature):
    S_t = log pi(y_t | student prompt)                      adapter on
    T_t = log pi(y_t | privileged prefix + student prompt)  adapter on (teacher.weights live) or off (base)
    g_t = sigmoid(beta * (T_t - S_t))
and the advantage is the group advantage over each task's eval.samples_per_task episodes (0 when 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from ..evaluate import evaluation_tasks, play_evaluation
from .record import GateRecord
from . import GateView, read_metrics, select_or_explain
from ..logprobs import score_responses
from ..losses import group_advantages, sdar_gate
from ..models import adapter_switched_off, pick_device
from ..rollout import TurnSample
from ..targets import Target, load_agent


def score_samples(
    model: PreTrainedModel, samples: Sequence[TurnSample], tokenizer, target: Target, step: int
) -> list[GateRecord]:
    """Student and teacher log-probs, gates and advantages of the turn-samples, as gate records."""
    config = target.config
    batch_size = config.train.logprob_batch_size
    pad = tokenizer.pad_token_id
    responses = [s.response_ids for s in samples]
    temperature = config.rollout.temperature
    student = score_responses(model, [s.prompt_ids for s in samples], responses, pad, batch_size, temperature)
    with adapter_switched_off(model, off=config.teacher.weights == "base"):
        teacher = score_responses(model, [s.teacher_prompt_ids for s in samples], responses, pad, batch_size, temperature)
    advantages = group_advantages(torch.tensor([s.reward for s in samples]), torch.tensor([s.group for s in samples]))
    beta = config.effective_gate_beta
    records = []
    for sample, s_logps, t_logps, advantage in zip(samples, student, teacher, advantages.tolist()):
        gate = sdar_gate(torch.tensor(t_logps), torch.tensor(s_logps), beta).tolist()
        records.append(
            GateRecord.of_turn(
                sample, step, tokenizer.decode,
                student_logp=s_logps, teacher_logp=t_logps, gate=gate, advantage=advantage, beta=beta,
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
