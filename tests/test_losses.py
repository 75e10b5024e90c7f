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
