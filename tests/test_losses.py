"""The SDAR math against hand-computed values."""

import math

import pytest
import torch

from sdar_cli.losses import (
    episode_advantages,
    group_advantages,
    masked_sequence_means,
    masked_token_sum,
    sdar_gate,
    sdar_token_loss,
)


def test_group_advantages_match_hand_computed_values():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 1: one sample
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert group_advantages(rewards, groups).tolist() == pytest.approx([expected, -expected, -expected, expected, 0.0])


def test_group_with_equal_rewards_gets_exactly_zero_advantage():
    # -0.1 is not exact in binary: a float32 mean leaves ~1e-9 that 1/eps would blow up to ~1e-2
    rewards = torch.full((8,), -0.1)
    assert group_advantages(rewards, torch.zeros(8, dtype=torch.long)).tolist() == [0.0] * 8


def test_episode_advantages_count_each_episode_once():
    # episode 0 (won, 3 turns, one invalid), episode 1 (lost, 1 turn): returns 10 and 0
    rewards = torch.tensor([10.0, 9.9, 10.0, 0.0])
    groups = torch.zeros(4, dtype=torch.long)
    episodes = torch.tensor([0, 0, 0, 1])
    returns = torch.tensor([10.0, 10.0, 10.0, 0.0])
    std = math.sqrt(50.0)  # unbiased std of (10, 0)
    expected = [(r - 5.0) / (std + 1e-6) for r in (10.0, 9.9, 10.0, 0.0)]
    assert episode_advantages(rewards, groups, episodes, returns).tolist() == pytest.approx(expected, rel=1e-5)


def test_gate_is_sigmoid_of_beta_times_gap():
    teacher = torch.tensor([-1.0, -2.0, -3.0])
    student = torch.tensor([-2.0, -1.0, -3.0])
    gate = sdar_gate(teacher, student, beta=5.0)
    assert gate.tolist() == pytest.approx([1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5)), 0.5])
    assert sdar_gate(teacher, student, beta=0.0).tolist() == [0.5, 0.5, 0.5]


def test_gate_carries_no_gradient():
    student = torch.tensor([-2.0, -1.0], requires_grad=True)
    gate = sdar_gate(torch.tensor([-1.0, -1.5]), student, beta=5.0)
    assert not gate.requires_grad


def test_sdar_term_value_and_gradient():
    teacher = torch.tensor([-1.0, -2.0], requires_grad=True)
    student = torch.tensor([-2.0, -1.0], requires_grad=True)
    gate = sdar_gate(teacher, student, beta=5.0)
    loss = sdar_token_loss(teacher, student, gate)
    g_up, g_down = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    assert loss.tolist() == pytest.approx([g_up * 1.0, g_down * -1.0])
    loss.sum().backward()
    # d l_t / d S_t = -g_t: endorsed tokens pushed up, rejected ones barely touched, nothing pushed down
    assert student.grad.tolist() == pytest.approx([-g_up, -g_down])
    assert teacher.grad is None or teacher.grad.abs().sum() == 0


def test_masked_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_token_sum(values, mask).item() == 3.0
    assert masked_sequence_means(values, mask).tolist() == [1.5, 0.0]


def test_clamped_k3_kl_matches_hand_values_and_plain_gradient():
    from sdar_cli.losses import clamped_k3_kl

    reference = torch.tensor([0.0, 0.0, 0.0])
    logps = torch.tensor([-1.0, 0.0, -5.0], requires_grad=True)  # R - S = 1, 0, 5
    kl = clamped_k3_kl(reference, logps)
    assert kl.tolist() == pytest.approx([math.e - 2, 0.0, 10.0])  # e^5 - 6 = 142.4 is clamped to 10
    kl.sum().backward()
    # d/dS (e^(R-S) - (R-S) - 1) = 1 - e^(R-S); the clamped token gives no gradient
    assert logps.grad.tolist() == pytest.approx([1 - math.e, 0.0, 0.0])


def test_rlsd_lambda_decays_linearly_to_zero():
    from sdar_cli.losses import rlsd_lambda

    assert [rlsd_lambda(step) for step in (1, 50, 99, 100, 150)] == pytest.approx([0.495, 0.25, 0.005, 0.0, 0.0])


def test_rlsd_token_advantages_match_hand_computation():
    from sdar_cli.losses import rlsd_token_advantages

    advantages = torch.tensor([2.0, -1.0])
    teacher = torch.tensor([[-1.0, -3.0], [-1.0, -2.0]])
    student = torch.tensor([[-1.1, -2.0], [-2.0, -2.05]])
    # D = T - S: row 0 (A > 0): 0.1, -1.0; row 1 (A < 0, sign flips D): 1.0, 0.05
    # w = clip(exp(sign(A) D), 0.8, 1.2): row 0: e^0.1 = 1.10517, e^-1 -> 0.8; row 1: e^-1 -> 0.8, e^-0.05 = 0.95123
    lam = 0.25
    expected = [
        [2.0 * (0.75 + 0.25 * math.exp(0.1)), 2.0 * (0.75 + 0.25 * 0.8)],
        [-1.0 * (0.75 + 0.25 * 0.8), -1.0 * (0.75 + 0.25 * math.exp(-0.05))],
    ]
    result = rlsd_token_advantages(advantages, teacher, student, lam, clip=0.2)
    assert result.tolist() == [pytest.approx(row) for row in expected]
    assert rlsd_token_advantages(advantages, teacher, student, 0.0).tolist() == [[2.0, 2.0], [-1.0, -1.0]]  # = GRPO


def test_skill_sd_token_loss_and_gradient_match_hand_computation():
    from sdar_cli.losses import skill_sd_token_loss

    teacher = torch.tensor([-1.0, -2.0, 0.0])
    student = torch.tensor([-1.5, -1.0, -30.0], requires_grad=True)
    old = torch.tensor([-1.5, -1.2, -30.0])
    loss = skill_sd_token_loss(teacher, student, old)
    # gap T - S = 0.5, -1.0, 30 (capped at 20); rho = exp(S - S_old) = 1, e^0.2, 1
    k3 = [math.exp(0.5) - 1.5, math.exp(-1.0) - 1 + 1.0, math.exp(20.0) - 1 - 20.0]
    rho = [1.0, math.exp(0.2), 1.0]
    assert loss.tolist() == pytest.approx([r * k for r, k in zip(rho, k3)], rel=1e-5)
    loss[:2].sum().backward()
    # d/dS (rho k3) = rho * k3 + rho * (1 - exp(T - S))   (rho carries dS, and dk3/dS = 1 - e^(T-S))
    expected_grad = [r * k + r * (1 - math.exp(g)) for r, k, g in zip(rho[:2], k3[:2], (0.5, -1.0))]
    assert student.grad[:2].tolist() == pytest.approx(expected_grad, rel=1e-5)


def test_sdar_objective_matches_a_hand_computation():
    # two responses: row 0 has 2 real tokens, row 1 has 1 (its second position is padding)
    student = torch.tensor([[-2.0, -1.0], [-0.5, -9.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    beta, coef = 5.0, 0.1
    from sdar_cli.losses import sdar_objective

    g_up, g_down = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    # l = g * (T - S): row 0 -> (g_up * 1, g_down * -1), row 1 -> (0.5 * 0)
    token_sum, gate = sdar_objective(student, teacher, mask, beta, coef, "token_sum", 3.0)
    assert gate.tolist()[0] == pytest.approx([g_up, g_down])
    assert gate[1, 0].item() == 0.5 and not gate.requires_grad
    assert token_sum.item() == pytest.approx(coef * (g_up - g_down) / 3.0)
    token_sum.backward()
    # d L / d S_t = -coef * g_t * m_t / Z: padding gets no gradient
    expected_grad = [-coef * g_up / 3, -coef * g_down / 3, -coef * 0.5 / 3, 0.0]
    assert student.grad.flatten().tolist() == pytest.approx(expected_grad)
    sequence, _ = sdar_objective(student, teacher, mask, beta, coef, "sequence_mean_sum", 2.0)
    assert sequence.item() == pytest.approx(coef * ((g_up - g_down) / 2 + 0.0 / 1) / 2.0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        sdar_objective(student, teacher, mask, beta, coef, "mean", 1.0)
