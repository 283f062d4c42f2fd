"""Sparse momentum (Dettmers & Zettlemoyer, 2019).

- Importance of a layer: mean |momentum| over its active weights, normalised over layers.
- Prune: each layer drops ``ceil(prune_rate * active)`` weights with the smallest |w|.
- Redistribute: the freed weights go back to layers in proportion to importance, never beyond a layer's free
  room (overflow is handed on, see ``apportion``), the total exactly conserved.
- Grow: inside a layer, at the absent positions with the largest |momentum|; grown weights start at 0.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sparse_nlp.methods.base import LayerPlan, LayerState, TopologyMethod, prune_count
from sparse_nlp.topology.allocation import apportion


def layer_importance(layer: LayerState) -> float:
    """Mean |momentum| of the layer's active weights; 0 when undefined (no active weights, NaN, inf)."""
    active = layer.momentum[layer.mask]
    if active.numel() == 0:
        return 0.0
    value = active.float().abs().mean().item()
    return value if math.isfinite(value) else 0.0


class SparseMomentum(TopologyMethod):
    name = "momentum"
    needs_momentum = True

    def plan(self, layers: Sequence[LayerState], prune_rate: float, progress: float) -> list[LayerPlan]:
        pruned = [prune_count(prune_rate, layer.nonzeros) for layer in layers]
        importance = [layer_importance(layer) for layer in layers]
        total = sum(importance)
        shares = [i / total for i in importance] if total > 0 else [float(n) for n in pruned]
        room = [layer.numel - layer.nonzeros + n for layer, n in zip(layers, pruned)]
        grown = apportion(sum(pruned), shares, room)
        return [LayerPlan(prune=p, grow=g) for p, g in zip(pruned, grown)]

    def grow_scores(self, layer: LayerState) -> torch.Tensor:
        return layer.momentum.abs()
