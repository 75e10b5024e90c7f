"""The exact McNemar test of two agents on the same held-out episodes."""

from __future__ import annotations

import math

import pytest

from sdar_cli.stats import PairedCounts, exact_mcnemar, paired_counts


@pytest.mark.parametrize(
    ("only_first", "only_second", "p"),
    [
        (5, 0, 2 / 32),  # 5 disagreements all one way: 2 x (1/2)^5
        (0, 5, 2 / 32),  # symmetric
        (7, 1, 2 * (1 + 8) / 256),  # 2 x P(X <= 1), X ~ Bin(8, 1/2)
        (1, 1, 1.0),  # even split: capped at 1
        (0, 0, 1.0),  # never disagree: no evidence either way
        (3, 2, 1.0),
    ],
)
def test_exact_mcnemar_is_twice_the_binomial_tail_of_the_discordant_pairs(only_first, only_second, p):
    assert exact_mcnemar(only_first, only_second) == pytest.approx(p)


def test_exact_mcnemar_agrees_with_a_direct_sum_over_all_splits():
    # the two-sided p-value as the probability of every split at most as likely as the one seen
    for b, c in ((9, 2), (12, 4), (0, 6), (10, 10)):
        n = b + c
        seen = math.comb(n, b)
        as_extreme = sum(math.comb(n, k) for k in range(n + 1) if math.comb(n, k) <= seen) / 2**n
        assert exact_mcnemar(b, c) == pytest.approx(min(1.0, as_extreme))


def test_paired_counts_count_each_outcome_pair_and_refuse_different_episodes():
    first = [{"task_id": f"t{i}", "won": w} for i, w in enumerate([1, 1, 0, 0, 1])]
    second = [{"task_id": f"t{i}", "won": w} for i, w in enumerate([1, 0, 1, 0, 0])]
    counts = paired_counts(first, second)
    assert counts == PairedCounts(both=1, only_first=2, only_second=1, neither=1)
    assert counts.p_value == exact_mcnemar(2, 1) == 1.0
    assert counts + counts == PairedCounts(2, 4, 2, 2)
    with pytest.raises(ValueError, match="same episodes"):
        paired_counts(first, second[::-1])
