"""Gradual magnitude pruning (Zhu & Gupta, 2017): from dense to the target density, nothing regrown.

At training progress p in [0, 1] (1 at the last topology update) a layer keeps
``target + (start - target) * (1 - p)^3`` weights: the cubic schedule prunes fast early and gently at the end.
``start`` is the layer's size (dense), or its count at ``initial_density`` when the run starts sparser.
"""
from __future__ import annotations

from typing import Sequence

from sparse_nlp.methods.base import LayerPlan, LayerState, TopologyMethod


def scheduled_nonzeros(layer: LayerState, progress: float) -> int:
    p = min(max(progress, 0.0), 1.0)
    start = layer.numel if layer.initial_units is None else layer.initial_units
    return round(layer.target_units + (start - layer.target_units) * (1.0 - p) ** 3)


class GradualMagnitude(TopologyMethod):
    name = "magnitude"
    starts_dense = True
    prunes_by_rate = False  # its last update, at rate 0, is where it reaches the target density

    def plan(self, layers: Sequence[LayerState], prune_rate: float, progress: float) -> list[LayerPlan]:
        return [LayerPlan(prune=max(0, layer.nonzeros - scheduled_nonzeros(layer, progress)), grow=0) for layer in layers]
