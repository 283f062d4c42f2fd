"""What every sparse layer is: the linear layers it can replace, and the one interface the controller uses.

Linear layers come in two layouts: ``nn.Linear`` stores its weight [out, in]; transformers' ``Conv1D`` (GPT-2)
stores it [in, out]. ``stores_in_out`` is the one place that tells them apart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from sparse_nlp.methods.base import LayerState
    from sparse_nlp.topology.context import UpdateContext

try:  # transformers is a dependency, but keep the module importable for plain torch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def stores_in_out(module: nn.Module) -> bool:
    """True for a layer whose weight is stored [in, out] (transformers' Conv1D), False for nn.Linear's [out, in]."""
    return not isinstance(module, nn.Linear)


def out_in_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D, whatever its stored layout."""
    rows, cols = module.weight.shape
    return (cols, rows) if stores_in_out(module) else (rows, cols)


def weight_out_in(module: nn.Module):
    """The weight of an nn.Linear or a Conv1D as [out, in] (a transposed view for Conv1D)."""
    return module.weight.t() if stores_in_out(module) else module.weight


class SparseLayer(nn.Module):
    """A linear layer whose weights are partly absent. Both kinds (``SparseLinear``: a mask over single weights;
    ``BlockSparseLinear``: live blocks only) implement this, and the controller, the trainer and the parallel code
    use nothing else, so none of them asks which kind it holds.

    The *unit* is what a topology update moves: one weight, or one ``block_size`` x ``block_size`` block
    (``unit_size`` weights). Budgets are in units: ``target_units`` (the planned number of active units) and
    ``initial_units`` (where gradual pruning starts; None: all units), both given to the constructor.
    """

    # Parameters whose size changes at a topology update (block layers' live blocks): DDP must skip them, FSDP
    # cannot shard them, and a checkpoint may hold another size of them. A layer that has them stores only its live
    # units, so the momentum of absent ones comes from a dense-gradient window (``collect_dense_gradients``), not
    # from the optimizer or the momentum tracker.
    resizable_parameters: tuple[str, ...] = ()
    unit_size: int = 1  # weights per unit
    target_units: int
    initial_units: Optional[int]

    # ---- what everything reads ---------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """(out_features, in_features), whatever the stored layout."""
        raise NotImplementedError

    @property
    def nonzeros(self) -> int:
        """Active weights (not units)."""
        return self.active_units * self.unit_size

    @property
    def active_units(self) -> int:
        raise NotImplementedError

    @property
    def density(self) -> float:
        out_features, in_features = self.weight_shape
        return self.nonzeros / (out_features * in_features)

    def compute_path(self) -> str:
        """How this layer computes now, for reports: "masked dense", or the kernel backend of a block layer."""
        raise NotImplementedError

    # ---- every optimizer step ----------------------------------------------------------------------------------
    def apply_mask(self) -> None:
        """Make absent weights exactly 0 (after every optimizer step)."""

    def mark_weights_changed(self) -> None:
        """The weights may have changed without moving their version counter (a fused optimizer's step; the
        controller says so after each step of its optimizer): drop what is derived from them. Nothing by default."""

    def collect_dense_gradients(self, collect: bool) -> None:
        """Whether the next backward also collects the dense weight gradient (for the momentum of absent units).
        Layers whose weight gradient is dense already have nothing to do."""

    def dense_gradient_step(self) -> Optional[torch.Tensor]:
        """This optimizer step's collected dense gradient (to average over ranks before ``end_step``), or None."""
        return None

    def end_step(self, ema_beta: Optional[float], squares: bool) -> None:
        """Fold this optimizer step's collected dense gradient into its moments (nothing collected: nothing)."""

    def clear_dense_gradients(self) -> None:
        """Start the next collection window afresh."""

    def dense_gradient_state(self) -> Optional[dict]:
        """The collected gradient moments, for a checkpoint taken inside a window; None when there are none."""
        return None

    def load_dense_gradient_state(self, state: Optional[dict]) -> None:
        """Restore what ``dense_gradient_state`` returned."""

    # ---- topology updates --------------------------------------------------------------------------------------
    def whole_mask(self) -> torch.Tensor:
        """The mask over units of the whole layer (under FSDP2 a gathered copy: call on every rank)."""
        raise NotImplementedError

    def layer_state(self, name: str, context: "UpdateContext") -> "LayerState":
        """What the method sees of this layer: magnitude, mask, momentum, gradient over units, and the budgets."""
        raise NotImplementedError

    def apply_update(self, state: "LayerState", grown: torch.Tensor, context: "UpdateContext") -> None:
        """Make ``state.mask`` (the whole new mask over units) this layer's topology; ``grown``: the flat unit
        positions the update grew. Moves weights and optimizer state with it, the same on every rank."""
        raise NotImplementedError

    def recount(self) -> None:
        """After masks were loaded from a checkpoint: refresh whatever the layer counts (FSDP2's shard counts)."""


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLayer]]:
    """The model's sparse layers (name, module), in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseLayer)]


def overall_density(layers: list[tuple[str, SparseLayer]]) -> float:
    """Active weights over all weights of these sparse layers (1.0 for none)."""
    if not layers:
        return 1.0
    return sum(layer.nonzeros for _, layer in layers) / sum(l.weight_shape[0] * l.weight_shape[1] for _, l in layers)
