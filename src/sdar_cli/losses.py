"""The math of SDAR as small pure functions over tensors (no project imports).

Notation, per response token y_t of one turn (docs/method.md has the whole method):
    S_t = log pi_theta(y_t | s, y_<t)          student log-prob, carries the gradient
    T_t = log pi_teacher(y_t | s+, y_<t)       teacher log-prob under the privileged prompt s+, no gradient
    D_t = T_t - sg(S_t)                        teacher-student gap
    g_t = sg(sigmoid(beta * D_t))              gate
    l_t = g_t * (sg(T_t) - S_t)                per-token SDAR term;  d l_t = -g_t * d S_t
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages over the turn-samples of each group.

        A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)

    `std` is the unbiased sample standard deviation (torch.std), as in the official code. A group
    with a single sample, or whose rewards are all equal, carries no signal and gets advantage 0
    (exactly: computed in float64, so rounding in the mean is not blown up by 1 / eps).
    """
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        members = group_ids == group
        advantages[members] = _standardise(rewards[members], rewards[members], eps)
    return advantages.float()


def _standardise(values: torch.Tensor, population: torch.Tensor, eps: float) -> torch.Tensor:
    """(values - mean(population)) / (std(population) + eps); 0 where the population has no spread."""
    if population.numel() < 2 or bool((population == population[0]).all()):
        return torch.zeros_like(values)
    return (values - population.mean()) / (population.std() + eps)


def episode_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    episode_ids: torch.Tensor,
    episode_returns: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages whose baseline counts each episode once, however many turns it had.

        A_i = (r_i - mean_e R_e) / (std_e R_e + eps),  e over the episodes of i's group

    `episode_returns[i]` is the outcome reward of sample i's episode; `rewards[i]` is sample i's
    own reward (the outcome plus its turn's invalid-action penalty).
    """
    rewards = rewards.double()
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        members = group_ids == group
        _, first = _first_occurrences(episode_ids[members])
        returns = episode_returns[members][first].double()
        advantages[members] = _standardise(rewards[members], returns, eps)
    return advantages.float()


def _first_occurrences(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((unique.numel(),), values.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(values.numel()), reduce="amin")
    return unique, first


def sdar_gate(teacher_logps: torch.Tensor, student_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """g_t = sg(sigmoid(beta * (T_t - sg(S_t)))). beta = 0 gives the constant gate 0.5 (naive OPSD)."""
    with torch.no_grad():
        return torch.sigmoid(beta * (teacher_logps.detach() - student_logps.detach()))


def sdar_token_loss(teacher_logps: torch.Tensor, student_logps: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """l_t = g_t * (sg(T_t) - S_t): a gated log-likelihood boost of the agent's own tokens.

    Its gradient is -g_t * dS_t, so tokens the teacher endorses (g near 1) are pushed up and tokens it
    rejects (g near 0) are left alone; nothing is pushed down.
    """
    return gate.detach() * (teacher_logps.detach() - student_logps)


def sdar_objective(
    student_logps: torch.Tensor,
    teacher_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    coef: float,
    aggregation: str,
    normalizer: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SDAR term of the loss and its gate, from per-token log-probs [B, T] and the response mask [B, T]:

        D_t    = T_t - sg(S_t)                      teacher-student gap
        g_t    = sg(sigmoid(beta * D_t))            gate
        l_t    = g_t * (sg(T_t) - S_t)              per-token term; d l_t = -g_t * d S_t
        L_SDAR = lambda * aggregate(l, mask) / Z    lambda = `coef`, Z = `normalizer`

    `aggregation` (see `aggregate_tokens`): "token_sum" (the token-mean when Z counts the tokens) or
    "sequence_mean_sum" (the mean over each response's tokens, summed over responses: a sample-mean when Z
    counts the samples). Returns (L_SDAR, g); the gate carries no gradient.
    """
    gate = sdar_gate(teacher_logps, student_logps, beta)
    token_loss = sdar_token_loss(teacher_logps, student_logps, gate)
    return coef * aggregate_tokens(token_loss, mask, aggregation, normalizer), gate


def aggregate_tokens(
    values: torch.Tensor, mask: torch.Tensor, aggregation: str, normalizer: float | torch.Tensor
) -> torch.Tensor:
    """A per-token term [B, T] reduced to a scalar over the masked tokens:

        token_sum:          sum_{b,t} m_bt v_bt / Z
        sequence_mean_sum:  sum_b (sum_t m_bt v_bt / max(1, sum_t m_bt)) / Z
    """
    if aggregation == "token_sum":
        return masked_token_sum(values, mask) / normalizer
    if aggregation == "sequence_mean_sum":
        return masked_sequence_means(values, mask).sum() / normalizer
    raise ValueError(f"unknown aggregation {aggregation!r}")


def masked_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of values over the masked tokens (the numerator of a token-mean)."""
    return (values * mask).sum()


def masked_sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over masked tokens; rows with no tokens give 0."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def clamped_k3_kl(reference_logps: torch.Tensor, logps: torch.Tensor, bound: float = 10.0) -> torch.Tensor:
    """The official KL penalty per token (verl's "low_var_kl"), with its plain gradient:

        x_t = clamp(R_t - S_t, -20, 20),   kl_t = clamp(exp(x_t) - x_t - 1, -bound, bound)

    R = reference log-prob (no gradient), S = current log-prob. Where kl_t is not clamped its gradient is
    (1 - exp(x_t)) dS_t; TRL's default instead multiplies kl_t by the ratio exp(S - S_old) (bias correction),
    which adds kl_t * dS_t.
    """
    log_ratio = (reference_logps.detach() - logps).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-bound, bound)


def rlsd_lambda(step: int, initial: float = 0.5, decay_steps: int = 100) -> float:
    """RLSD's mixing weight at rollout step `step` (1-based): l = initial * (1 - step / decay_steps), 0 from
    decay_steps on (the official linear warm-down)."""
    return initial * max(0.0, 1.0 - step / decay_steps)


def rlsd_token_advantages(
    advantages: torch.Tensor, teacher_logps: torch.Tensor, student_logps: torch.Tensor, lam: float, clip: float = 0.2
) -> torch.Tensor:
    """RLSD: the group advantage reweighted per token by the teacher-student gap of the rollout policy.

        w_t = clip(exp(sign(A) * (T_t - S_t)), 1 - clip, 1 + clip)
        A_t = A * ((1 - l) + l * w_t)

    advantages [B] (one per sample), log-probs [B, T] from rollout time (no gradient); returns [B, T].
    """
    advantages = advantages.unsqueeze(1)
    with torch.no_grad():
        weight = torch.exp(torch.sign(advantages) * (teacher_logps - student_logps)).clamp(1 - clip, 1 + clip)
        return advantages * ((1 - lam) + lam * weight)


def skill_sd_token_loss(teacher_logps: torch.Tensor, student_logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """Skill-SD's per-token distillation term, importance-weighted to the rollout policy:

        k3_t  = exp(T_t - S_t) - 1 - (T_t - S_t)          (T_t - S_t capped at 20)
        rho_t = exp(min(S_t - S_old_t, 10))
        l_t   = rho_t * k3_t

    S carries the gradient (through rho and k3); T and S_old do not.
    """
    gap = (teacher_logps.detach() - student_logps).clamp(max=20.0)
    k3 = torch.exp(gap) - 1 - gap
    rho = torch.exp((student_logps - old_logps.detach()).clamp(max=10.0))
    return rho * k3


def sampler_importance_ratio(
    train_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> torch.Tensor:
    """Truncated importance sampling for a sampler (vLLM) whose log-probs differ from the trainer's.

        token_*:     w_t = exp(sg(S_t) - S^samp_t)                 per token   [B, T]
        sequence_*:  w   = exp(sum_t mask_t (sg(S_t) - S^samp_t))  per response [B, 1]
        *_truncate:  min(w, cap)          *_mask:  w if w <= cap else 0

    The policy-gradient term of each token is multiplied by w (TRL's `vllm_importance_sampling_*`),
    so the update estimates the gradient of the trainer's policy from the sampler's samples. Positions
    outside `mask` get a difference of 0.
    """
    difference = (train_logps.detach() - sampler_logps) * mask
    if mode.startswith("sequence"):
        difference = difference.sum(-1, keepdim=True)
    ratio = torch.exp(difference)
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap)
    if mode.endswith("mask"):
        return ratio.masked_fill(ratio > cap, 0.0)
    raise ValueError(f"unknown importance sampling mode {mode!r}")


def sampler_logp_mismatch(train_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over real tokens of |S_t - S^samp_t|: how far the sampler's log-probs are from the trainer's."""
    mask = mask.to(train_logps.dtype)
    return ((train_logps.detach() - sampler_logps).abs() * mask).sum() / mask.sum().clamp(min=1)
