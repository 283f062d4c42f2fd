"""Integer allocation of weights to layers: exact totals, never beyond a layer's capacity.

Both the initial per-layer densities (uniform, ERK) and sparse momentum's redistribution of pruned weights hand
out an integer number of weights in proportion to real-valued shares. Rounding each share on its own drifts (the
reference implementation's total slowly changes over training); here the total is always met exactly.
"""
from __future__ import annotations

import math
from typing import Sequence


def apportion(total: int, shares: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split ``total`` into integers proportional to ``shares``, each at most its capacity, summing to ``total``.

    A layer whose proportional part exceeds its capacity is filled and its overflow handed on to the others in
    proportion to their shares. Non-finite or negative shares count as zero; if every share is zero the split
    is proportional to free capacity. Remainders go to the largest fractional parts (ties: lower index first).
    """
    if total < 0:
        raise ValueError(f"cannot apportion a negative total ({total}).")
    if total > sum(capacities):
        raise ValueError(f"cannot place {total} weights in layers with room for {sum(capacities)}.")
    clean = [s if math.isfinite(s) and s > 0 else 0.0 for s in shares]
    counts = [0] * len(clean)
    open_layers = [i for i, cap in enumerate(capacities) if cap > 0]
    remaining = total
    while remaining > 0:
        weights = {i: clean[i] for i in open_layers}
        if sum(weights.values()) <= 0:  # no usable shares left: split by free room
            weights = {i: float(capacities[i] - counts[i]) for i in open_layers}
        weight_sum = sum(weights.values())
        ideal = {i: remaining * w / weight_sum for i, w in weights.items()}
        full = [i for i in open_layers if counts[i] + ideal[i] >= capacities[i]]
        if full:  # fill these, hand their overflow on in the next round
            for i in full:
                remaining -= capacities[i] - counts[i]
                counts[i] = capacities[i]
            open_layers = [i for i in open_layers if i not in full]
            continue
        floors = {i: math.floor(v) for i, v in ideal.items()}
        leftover = remaining - sum(floors.values())
        by_fraction = sorted(open_layers, key=lambda i: (-(ideal[i] - floors[i]), i))
        for i in open_layers:
            counts[i] += floors[i]
        for i in by_fraction[:leftover]:
            counts[i] += 1
        remaining = 0
    return counts


def layer_shares(shapes: Sequence[tuple[int, ...]], distribution: str) -> list[float]:
    """Each layer's share of the active weights, before any layer is capped at dense: its size (``uniform``) or
    ``sum(shape)`` (``erk``: density eps * sum(shape) / prod(shape), times prod(shape) weights)."""
    if distribution == "uniform":
        return [float(math.prod(s)) for s in shapes]
    if distribution == "erk":
        return [float(sum(s)) for s in shapes]
    raise ValueError(f"unknown distribution {distribution!r}; choose uniform or erk.")


def plan_nonzeros(shapes: Sequence[tuple[int, ...]], density: float, distribution: str) -> list[int]:
    """Number of active weights per layer so that the total is exactly ``round(density * all weights)``.

    ``uniform``: every layer at ``density`` (within one weight). ``erk``: RigL's Erdős–Rényi-kernel, layer
    density proportional to ``sum(shape) / prod(shape)``, so wide square layers get sparser than thin ones;
    layers it would make denser than 1 are kept dense and the rest rescaled.
    """
    numels = [math.prod(s) for s in shapes]
    shares = layer_shares(shapes, distribution)  # apportion caps dense layers
    return apportion(round(density * sum(numels)), shares, numels)
