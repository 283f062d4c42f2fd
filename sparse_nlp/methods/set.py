"""SET (Mocanu et al., 2018): prune by |w|, regrow the same number at random absent positions."""
from __future__ import annotations

import torch

from sparse_nlp.methods.base import LayerState, TopologyMethod


class SET(TopologyMethod):
    name = "set"

    def grow_scores(self, layer: LayerState) -> torch.Tensor:
        scores = torch.rand(layer.mask.shape, generator=layer.generator)  # CPU draw: identical on every rank
        return scores.to(layer.mask.device)
