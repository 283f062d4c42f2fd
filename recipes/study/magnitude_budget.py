"""Gradual magnitude pruning at the sparse runs' weight budget: the study's ``magnitude_average`` reference.

    schedule = TopologySchedule(total_steps=1600, update_interval=100, prune_rate=0.5)
    initial, final = equal_average_magnitude(0.1, schedule)    # (0.2825, 0.0282)
    average_density(schedule, initial, final)                  # 0.1: as many weights over training as a 0.1 run

Gradual pruning (``magnitude``) starts dense and reaches its target only at the last update, so at a target of
0.2 / 0.1 / 0.05 the study's runs hold 2.1x / 3.5x / 6.4x the target's linear weights averaged over training; the
methods that train sparse from the start hold the target throughout. No run that prunes and ends at the target can
hold the target on average, and one that starts dense cannot either (its first 100 of 1,600 steps alone cost 6% of
the dense weights, more than a 0.05 run holds), so an equal-budget variant starts sparser *and* ends sparser.

The rule: the same schedule, scaled. Zhu & Gupta's run, as the study trains it, prunes from density 1 to ``d`` on the
cubic schedule; the equal-budget run prunes from ``k`` to ``k * d`` on the same steps (every point of its density
curve is ``k`` times the original's), ``k`` chosen so that its linear weights averaged over training equal ``d`` x
the full model's: ``k = d / average_density(schedule, 1, d)``. It keeps the schedule's shape and its ratio of final
to initial weights (it prunes away the same 1 - d of what it starts with) and changes only the scale, the one
thing the budget fixes. Its initial mask is the run's ``init`` (random, as the sparse runs'). At the study's 1,600
steps, updates every 100: k = 0.470 / 0.282 / 0.157 at d = 0.2 / 0.1 / 0.05, so it ends at density 0.094 / 0.028 /
0.0079 (fewer final weights than the sparse runs: the price of the budget, shown in the tables' linear nonzeros).

The average counts what the controller holds: each update's density from its step to the next update's, the
initial density before the first, as ``study.grid.average_linear_nonzeros`` integrates a run's history.
Per-layer rounding moves it by a few weights per layer.
"""
from __future__ import annotations

from sparse_nlp.topology.schedule import TopologySchedule


def cubic_fraction(progress: float) -> float:
    """The share of (initial - final) weights gradual pruning still holds at ``progress``: (1 - p)^3, as
    ``sparse_nlp.methods.magnitude``."""
    p = min(max(progress, 0.0), 1.0)
    return (1.0 - p) ** 3


def average_density(schedule: TopologySchedule, initial: float, final: float) -> float:
    """Linear-layer density of gradual pruning from ``initial`` to ``final``, averaged over the run's steps."""
    if not 0 < final <= initial <= 1:
        raise ValueError(f"need 0 < final <= initial <= 1, got initial {initial!r}, final {final!r}.")
    updates = [step for step in range(1, schedule.total_steps + 1) if schedule.is_update_step(step)]
    area, held, since = 0.0, initial, 0
    for step in updates:
        area += held * (step - since)
        held, since = final + (initial - final) * cubic_fraction(schedule.progress(step)), step
    area += held * (schedule.total_steps - since)
    return area / schedule.total_steps


def equal_average_magnitude(density: float, schedule: TopologySchedule) -> tuple[float, float]:
    """(initial, final) density of the gradual-pruning run whose average linear density over ``schedule`` equals
    ``density``: the scaled schedule (module docstring). ``schedule``: the magnitude run's own (no zero-rate skip)."""
    if not 0 < density < 1:
        raise ValueError(f"density must be in (0, 1), got {density!r}.")
    if schedule.skip_zero_rate:
        raise ValueError("give gradual pruning's own schedule (skip_zero_rate=False): its last update is the one "
                         "that reaches the target.")
    scale = density / average_density(schedule, 1.0, density)
    return scale, scale * density
