"""RigL (Evci et al., 2020): prune by |w|, regrow the same number where the dense gradient is largest."""
from __future__ import annotations

import torch

from sparse_nlp.methods.base import LayerState, TopologyMethod


class RigL(TopologyMethod):
    name = "rigl"
    needs_gradient = True

    def grow_scores(self, layer: LayerState) -> torch.Tensor:
        return layer.gradient.abs()
