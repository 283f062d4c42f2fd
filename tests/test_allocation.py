"""Exact integer allocation: totals met, capacities respected, overflow handed on, bad shares ignored."""
from __future__ import annotations

import random

import pytest

from sparse_nlp.topology.allocation import apportion, plan_nonzeros


def test_proportional_with_largest_remainder():
    assert apportion(10, [1, 1, 1], [100, 100, 100]) == [4, 3, 3]
    assert apportion(10, [3, 1], [100, 100]) == [8, 2]  # 7.5 / 2.5: tie in fraction goes to the lower index


def test_capacity_overflow_goes_to_the_others():
    assert apportion(10, [10, 1, 1], [2, 100, 100]) == [2, 4, 4]


def test_non_finite_and_zero_shares():
    assert apportion(6, [float("nan"), float("inf"), 1.0], [10, 10, 10]) == [0, 0, 6]
    assert apportion(7, [0, 0], [3, 10]) == [2, 5]  # no signal: by free room


def test_impossible_totals_are_refused():
    with pytest.raises(ValueError, match="room for 5"):
        apportion(6, [1, 1], [2, 3])


def test_random_allocations_are_exact():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 6)
        capacities = [rng.randint(0, 50) for _ in range(n)]
        total = rng.randint(0, sum(capacities))
        shares = [rng.choice([0.0, rng.random(), 1e-12, float("nan")]) for _ in range(n)]
        counts = apportion(total, shares, capacities)
        assert sum(counts) == total
        assert all(0 <= c <= cap for c, cap in zip(counts, capacities))


def test_plans_meet_the_overall_density_exactly():
    shapes = [(768, 3072), (3072, 768), (768, 768), (10, 768)]
    total = sum(a * b for a, b in shapes)
    for distribution in ("uniform", "erk"):
        assert sum(plan_nonzeros(shapes, 0.2, distribution)) == round(0.2 * total)
    erk = plan_nonzeros(shapes, 0.2, "erk")
    assert erk[3] == 7680  # the thin layer would exceed density 1 under ERK: kept dense
