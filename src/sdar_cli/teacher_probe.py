"""`sdar probe-teacher`: is the teacher informative? Measured on expert states, before any training.

The environment's expert plays train tasks (env.train_split, drawn with train.seed) and every state it
passes through is a probe state. At each state the student prompt and the configured teacher prompt are
rendered exactly as the rollout renders them (TurnRenderer: teacher.context, teacher.placement,
context_template), and two candidate responses are scored, each rendered as the rollout would parse it
(warmup.response_template, e.g. `<action>X</action>`, minus rollout.response_prefix):
    expert   the expert's next action
    other    a random other admissible action (seeded)
Per response y, with TRL's fused log-prob head at rollout.temperature (the head SDARTrainer's passes use):
    S_t = log pi(y_t | student prompt, y_<t)          adapter on
    T_t = log pi(y_t | teacher prompt, y_<t)          adapter on (teacher.weights live) or off (base)
    gap(y)  = mean_t (T_t - S_t)                      per-token gap
    gate(y) = mean_t sigmoid(beta * (T_t - S_t))      the gate training would give its tokens
Reported: the mean gap and the share of states with gap > 0 for expert and other responses, their mean
gates, AUC = P(gap(expert) > gap(other)) over all (expert, other) pairs (ties count 1/2), the teacher
prompt's extra tokens over the student's, and a verdict (see `verdict`).

An environment without an expert (its expert_action() is None) gives no expert/other split: the agent
then plays its own episodes (train split, rollout sampling) and the gap and gate of its sampled
responses are reported, with no AUC and no verdict.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import RunConfig
from .envs import environment_split
from .envs.base import Observation, Task
from .expert import NoExpert, expert_turns
from .logprobs import score_responses
from .models import adapter_switched_off, pick_device
from .rollout import HFPolicy, RecordedExpert, TurnRenderer, play_episodes
from .targets import Target, load_agent
from .warmup import demonstration_response

#: a teacher is "informative" when its gap ranks the expert's action above another this often (AUC) ...
INFORMATIVE_AUC = 0.75
#: ... and the expert's mean gate exceeds the other action's by at least this much (the gate must separate them)
INFORMATIVE_GATE_MARGIN = 0.10
#: at or below this AUC the teacher prefers other actions to the expert's: "misleading" ...
MISLEADING_AUC = 0.40
#: ... when the other action's mean gate also exceeds the expert's by at least this much
MISLEADING_GATE_MARGIN = 0.05
#: states `sdar train --dry-run --probe-teacher` measures
DRY_RUN_STATES = 8


class ProbeError(ValueError):
    """The probe cannot run as asked; the message says what to change."""


@dataclass
class ProbeState:
    """One state the expert passed through, rendered for the student and the teacher."""

    task_id: str
    turn: int
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    expert_action: str
    other_action: str



# ------------------------------------------------------------------------------------------ statistics
def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(positive > negative) over all pairs, ties counting 1/2 (the Mann-Whitney AUC); nan without pairs."""
    if not positives or not negatives:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def response_gap_and_gate(teacher_logps: Sequence[float], student_logps: Sequence[float], beta: float) -> tuple[float, float]:
    """(mean_t (T_t - S_t), mean_t sigmoid(beta * (T_t - S_t))) of one response."""
    gaps = [t - s for t, s in zip(teacher_logps, student_logps)]
    gates = [1.0 / (1.0 + math.exp(-beta * gap)) for gap in gaps]
    return sum(gaps) / len(gaps), sum(gates) / len(gates)


def verdict(auc_value: float, expert_gate: float, other_gate: float) -> tuple[str, str]:
    """(label, why): "informative" when AUC >= INFORMATIVE_AUC and the expert's mean gate beats the other
    action's by INFORMATIVE_GATE_MARGIN; "misleading" when AUC <= MISLEADING_AUC and the other action's mean
    gate beats the expert's by MISLEADING_GATE_MARGIN; else "barely informative"."""
    margin = expert_gate - other_gate
    if auc_value <= MISLEADING_AUC and -margin >= MISLEADING_GATE_MARGIN:
        return "misleading", (
            f"AUC {auc_value:.2f} <= {MISLEADING_AUC} and the other action's gate exceeds the expert's by "
            f"{-margin:.2f} >= {MISLEADING_GATE_MARGIN}: the teacher favours other actions over the expert's"
        )
    if auc_value >= INFORMATIVE_AUC and margin >= INFORMATIVE_GATE_MARGIN:
        return "informative", (
            f"AUC {auc_value:.2f} >= {INFORMATIVE_AUC} and the expert's gate exceeds the other action's by "
            f"{margin:.2f} >= {INFORMATIVE_GATE_MARGIN}"
        )
    return "barely informative", (
        f"AUC {auc_value:.2f} and expert-minus-other gate {margin:+.2f}; informative needs AUC >= {INFORMATIVE_AUC} "
        f"and a gate margin >= {INFORMATIVE_GATE_MARGIN}"
    )


def _summary(gaps: list[float], gates: list[float]) -> dict[str, float]:
    return {
        "gap_mean": sum(gaps) / len(gaps),
        "gap_positive_share": sum(g > 0 for g in gaps) / len(gaps),
        "gate_mean": sum(gates) / len(gates),
    }


# ------------------------------------------------------------------------------------------ states
def probe_task_ids(config: RunConfig, split_ids: Sequence[str]) -> list[str]:
    """The train split's tasks (`split_ids`) in the order the probe plays them (shuffled with train.seed)."""
    task_ids = list(split_ids)
    if not task_ids:
        raise ProbeError(f"The environment has no tasks in split '{config.env.train_split}'.")
    random.Random(config.train.seed).shuffle(task_ids)
    return task_ids


def expert_states(
    renderer: TurnRenderer, make_env, task_ids: Sequence[str], count: int, max_turns: int, seed: int
) -> list[ProbeState] | None:
    """Up to `count` states of expert episodes of `task_ids` (every turn of each, task after task), rendered;
    None when the environment has no expert. A state with no other admissible action is skipped."""
    rng = random.Random(seed)
    recorded: list[tuple[Task, list[tuple[str, str]], Observation, str, str, int]] = []
    if count > 0:
        try:
            with contextlib.closing(expert_turns(make_env, task_ids, max_turns)) as turns:
                for turn in turns:
                    action, observation = turn.action, turn.observation
                    others = [a for a in observation.admissible_actions if a.lower() != action.lower()]
                    if others:
                        recorded.append((turn.task, turn.history, observation, action, rng.choice(others), turn.turn))
                        if len(recorded) >= count:
                            break
        except NoExpert:
            return None
    # `shuffled` draws from other tasks' contexts: let every state's context into the pool first
    renderer.remember_contexts((task, obs.privileged, RecordedExpert(action)) for task, _, obs, action, _, _ in recorded)
    states = []
    for task, history, observation, action, other, turn in recorded:
        privileged = renderer.privileged_context(task, observation.privileged, RecordedExpert(action))
        student, teacher = renderer.turn_prompt_ids(
            task, history, observation.text, observation.admissible_actions, privileged
        )
        states.append(ProbeState(task.task_id, turn, student, teacher, action, other))
    return states


# ------------------------------------------------------------------------------------------ the probe
def _score(model, config: RunConfig, tokenizer, prompts_and_responses: list[tuple[list[int], list[int], list[int]]]):
    """Student and teacher log-probs of (student prompt, teacher prompt, response) triples, scored as training
    scores them (logprobs.score_responses: TRL's fused head at rollout.temperature)."""
    batch_size, temperature = config.train.logprob_batch_size, config.rollout.temperature
    pad = tokenizer.pad_token_id
    responses = [response for _, _, response in prompts_and_responses]
    student_prompts = [s for s, _, _ in prompts_and_responses]
    teacher_prompts = [t for _, t, _ in prompts_and_responses]
    student = score_responses(model, student_prompts, responses, pad, batch_size, temperature)
    with adapter_switched_off(model, off=config.teacher.weights == "base"):
        teacher = score_responses(model, teacher_prompts, responses, pad, batch_size, temperature)
    return student, teacher


def probe_teacher(target: Target, states: int, model=None, tokenizer=None) -> dict[str, Any]:
    """Measure the configured teacher on `states` expert states of the target (see the module docstring);
    `model` / `tokenizer` reuse an already loaded agent. Returns the JSON-able report."""
    if states < 1:
        raise ProbeError(f"--states must be at least 1, got {states}.")
    started = time.perf_counter()
    config = target.config
    try:
        make_env, split_ids, env_max_turns = environment_split(config.env.name, config.env.kwargs, config.env.train_split)
    except ValueError as err:
        raise ProbeError(f"env.train_split '{config.env.train_split}': {err}") from None
    task_ids = probe_task_ids(config, split_ids)
    max_turns = config.rollout.max_turns or env_max_turns
    if model is None:
        model, tokenizer = load_agent(target, pick_device(config.train.device))
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
    beta = config.effective_gate_beta
    report: dict[str, Any] = {
        "target": target.name,
        "step": target.step,
        "teacher": {
            "context": config.teacher.context,
            "placement": config.teacher.placement,
            "weights": config.teacher.weights,
        },
        "beta": beta,
        "temperature": config.rollout.temperature,
    }
    probed = expert_states(renderer, make_env, task_ids, states, max_turns, config.train.seed)
    if probed is None:
        report.update(_own_samples_report(model, tokenizer, config, renderer, make_env, task_ids, states, max_turns, beta))
    elif not probed:
        raise ProbeError("The expert passed through no state with a second admissible action: nothing to compare.")
    else:
        report.update(_expert_report(model, tokenizer, config, probed, beta))
    report["shuffled_fallbacks"] = renderer.shuffled_fallbacks
    report["seconds"] = time.perf_counter() - started
    return report


def _expert_report(model, tokenizer, config: RunConfig, probed: list[ProbeState], beta: float) -> dict[str, Any]:
    def response_ids(action: str) -> list[int]:
        return tokenizer(demonstration_response(config, action), add_special_tokens=False)["input_ids"]

    triples = [(s.student_prompt_ids, s.teacher_prompt_ids, response_ids(s.expert_action)) for s in probed]
    triples += [(s.student_prompt_ids, s.teacher_prompt_ids, response_ids(s.other_action)) for s in probed]
    student, teacher = _score(model, config, tokenizer, triples)
    measured = [response_gap_and_gate(t, s, beta) for t, s in zip(teacher, student)]
    expert, other = measured[: len(probed)], measured[len(probed) :]
    expert_gaps, other_gaps = [gap for gap, _ in expert], [gap for gap, _ in other]
    auc_value = auc(expert_gaps, other_gaps)
    expert_summary = _summary(expert_gaps, [gate for _, gate in expert])
    other_summary = _summary(other_gaps, [gate for _, gate in other])
    label, why = verdict(auc_value, expert_summary["gate_mean"], other_summary["gate_mean"])
    extra = [len(s.teacher_prompt_ids) - len(s.student_prompt_ids) for s in probed]
    return {
        "mode": "expert",
        "states": len(probed),
        "tasks": len({s.task_id for s in probed}),
        "expert": expert_summary,
        "other": other_summary,
        "auc": auc_value,
        "extra_prompt_tokens": {"mean": sum(extra) / len(extra), "max": max(extra)},
        "verdict": label,
        "verdict_reason": why,
        "per_state": [
            {
                "task_id": s.task_id,
                "turn": s.turn,
                "expert_action": s.expert_action,
                "other_action": s.other_action,
                "expert_gap": e[0],
                "other_gap": o[0],
                "expert_gate": e[1],
                "other_gate": o[1],
            }
            for s, e, o in zip(probed, expert, other)
        ],
    }


def _own_samples_report(
    model, tokenizer, config: RunConfig, renderer, make_env, task_ids, states: int, max_turns: int, beta: float
) -> dict[str, Any]:
    """No expert: the agent's own sampled turns on train tasks, scored; no expert/other split, no verdict."""
    policy = HFPolicy(model, tokenizer, config.rollout)
    samples = []
    for task_id in task_ids:
        if len(samples) >= states:
            break
        played, _ = play_episodes([task_id], [0], make_env, policy, renderer, max_turns)
        samples += [s for s in played if s.response_ids]
    samples = samples[:states]
    if not samples:
        raise ProbeError("The agent produced no response on the train tasks: nothing to score.")
    student, teacher = _score(model, config, tokenizer, [(s.prompt_ids, s.teacher_prompt_ids, s.response_ids) for s in samples])
    measured = [response_gap_and_gate(t, s, beta) for t, s in zip(teacher, student)]
    extra = [len(s.teacher_prompt_ids) - len(s.prompt_ids) for s in samples]
    report = {
        "mode": "own_samples",
        "states": len(samples),
        "tasks": len({s.task_id for s in samples}),
        "own": _summary([gap for gap, _ in measured], [gate for _, gate in measured]),
        "auc": None,
        "extra_prompt_tokens": {"mean": sum(extra) / len(extra), "max": max(extra)},
        "verdict": None,
        "verdict_reason": "the environment has no expert, so there is no expert/other split, AUC or verdict: "
        "these are the gaps and gates of the agent's own sampled responses",
    }
    valid = [m for m, s in zip(measured, samples) if s.valid]
    invalid = [m for m, s in zip(measured, samples) if not s.valid]
    for name, group in (("valid", valid), ("invalid", invalid)):
        if group:
            report[f"own_{name}"] = {**_summary([g for g, _ in group], [g for _, g in group]), "responses": len(group)}
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """The terminal report: what was measured, the numbers, the verdict line last."""
    teacher = report["teacher"]
    head = (
        f"Teacher probe of {report['target']}: context {teacher['context']}, placement {teacher['placement']}, "
        f"weights {teacher['weights']}; beta {report['beta']}, temperature {report['temperature']}; "
        f"{report['states']} states of {report['tasks']} train tasks ({report['seconds']:.0f} s)."
    )
    extra = report["extra_prompt_tokens"]
    tokens = f"Teacher prompt: {extra['mean']:.0f} extra tokens on average (max {extra['max']})."
    if report["mode"] == "own_samples":
        own = report["own"]
        return [
            head,
            f"Agent's own responses: gap T-S {own['gap_mean']:+.3f}, share > 0 {own['gap_positive_share']:.2f}, "
            f"gate {own['gate_mean']:.2f}.",
            tokens,
            f"No verdict: {report['verdict_reason']}.",
        ]
    lines = [head]
    for name in ("expert", "other"):
        part = report[name]
        lines.append(
            f"{name:>6} action: gap T-S {part['gap_mean']:+.3f}, share > 0 {part['gap_positive_share']:.2f}, "
            f"gate {part['gate_mean']:.2f}"
        )
    lines.append(f"AUC (gap separates the expert's action from another): {report['auc']:.2f}. {tokens}")
    if report["shuffled_fallbacks"]:
        lines.append(f"{report['shuffled_fallbacks']} state(s) found no other task's context and showed the header only.")
    lines.append(f"Verdict: {report['verdict']} ({report['verdict_reason']}).")
    return lines
