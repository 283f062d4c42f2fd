"""What a layer needs from the run to read its state for a topology update and to write the new topology back."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from sparse_nlp.config import SparsityConfig
    from sparse_nlp.methods.base import TopologyMethod
    from sparse_nlp.parallel.ddp import Replicas
    from sparse_nlp.topology.optimizer_state import LayerMomentum


@dataclass(frozen=True)
class UpdateContext:
    optimizer: torch.optim.Optimizer
    method: "TopologyMethod"
    config: "SparsityConfig"  # adam_momentum, block_scores, regrown_state
    generator: torch.Generator  # growth draws (the same seed on every rank)
    replicas: "Replicas"  # how ranks agree on a new mask (nothing to do in one process)
    momentum: Optional["LayerMomentum"] = None  # this layer's momentum and optimizer slots (set by ``for_layer``)

    def for_layer(self, momentum: "LayerMomentum") -> "UpdateContext":
        return replace(self, momentum=momentum)

    @property
    def reset_regrown(self) -> bool:
        """Whether regrown positions' optimizer slots restart (``reset`` and ``fresh``; ``keep`` leaves them)."""
        return self.config.regrown_state != "keep"

    @property
    def keep_scale(self) -> bool:
        """``fresh``: regrown positions keep (or get) their gradient-scale slots."""
        return self.config.regrown_state == "fresh"
