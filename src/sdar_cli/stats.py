"""A paired test of two agents played on the same held-out episodes: the counts and the exact McNemar
p-value. Pure functions, closed forms (no scipy for one formula). The success rate's Wilson interval is
evaluate.wilson_interval."""

from __future__ import annotations

import math
from dataclasses import dataclass


def exact_mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: of the episodes the two agents disagree on, is the split
    `only_first` : `only_second` more lopsided than fair coin flips would make it? (A binomial sign test on
    the discordant pairs; the episodes both won or both lost say nothing about the difference.) 1.0 when
    they never disagree."""
    if only_first < 0 or only_second < 0:
        raise ValueError("counts must be >= 0")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedCounts:
    """Two agents on the same episodes: how many each won that the other lost, and the rest."""

    both: int
    only_first: int
    only_second: int
    neither: int

    @property
    def p_value(self) -> float:
        return exact_mcnemar(self.only_first, self.only_second)

    def __add__(self, other: "PairedCounts") -> "PairedCounts":
        return PairedCounts(self.both + other.both, self.only_first + other.only_first,
                            self.only_second + other.only_second, self.neither + other.neither)


def paired_counts(first: list[dict], second: list[dict]) -> PairedCounts:
    """Episode-by-episode outcomes of two agents (each a list of {"task_id", "won"}, in the same order)."""
    if [e["task_id"] for e in first] != [e["task_id"] for e in second]:
        raise ValueError("the two agents did not play the same episodes in the same order")
    pairs = [(bool(a["won"]), bool(b["won"])) for a, b in zip(first, second)]
    return PairedCounts(
        both=sum(a and b for a, b in pairs),
        only_first=sum(a and not b for a, b in pairs),
        only_second=sum(b and not a for a, b in pairs),
        neither=sum(not a and not b for a, b in pairs),
    )
