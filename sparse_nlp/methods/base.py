"""The one topology update every method shares, and the strategy interface methods fill in.

A topology update, per layer: prune the ``plan.prune`` active weights with the lowest prune score, then grow
``plan.grow`` weights at the absent positions (just-pruned ones included) with the highest grow score. The layer
then writes the new mask (``SparseLayer.apply_update``): pruned weights become exactly 0, and a grown weight starts
at 0. Methods differ only in their scores and in how
many weights each layer prunes and grows (their ``plan``), as in RigL's ``generic_mask_update``.

Selection is by index over the candidate set, so the counts are always exact and a NaN or infinite score can
change *which* weights are picked but never how many, nor pick a position outside the candidates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
Lazy = Union[Tensor, Callable[[], Optional[Tensor]], None]


class LayerState:
    """What a method may look at for one layer (or one q/k/v unit of a fused layer), over its topology units: single
    weights in the layer's stored layout ([out, in] or [in, out]), or blocks over its [out/b, in/b] grid.

    - ``magnitude``: |w| per unit (a block's mean |w|); ``mask`` (bool): which units are active, updated in place;
    - ``momentum`` / ``gradient``: per unit, set when the method ``needs_momentum`` / ``needs_gradient``;
    - ``target_units``: the planned final number of active units; ``initial_units``: where gradual pruning starts
      (None: every unit); ``generator``: a CPU generator for random choices (the same seed on every rank).

    ``magnitude``, ``momentum`` and ``gradient`` may be given as functions, called at the first read (FSDP2 gathers
    a sharded layer's tensors then, and only those the method reads); ``release()`` drops what was read.
    """

    def __init__(self, name: str, magnitude: Lazy, mask: Tensor, target_units: int, generator: torch.Generator, *,
                 momentum: Lazy = None, gradient: Lazy = None, initial_units: Optional[int] = None):
        self.name, self.mask, self.generator = name, mask, generator
        self.target_units, self.initial_units = target_units, initial_units
        self._sources = {"magnitude": magnitude, "momentum": momentum, "gradient": gradient}
        self._read: dict[str, Optional[Tensor]] = {}

    def _get(self, field: str) -> Optional[Tensor]:
        if field not in self._read:
            source = self._sources[field]
            self._read[field] = source() if callable(source) else source
        return self._read[field]

    @property
    def magnitude(self) -> Tensor:
        return self._get("magnitude")

    @property
    def momentum(self) -> Optional[Tensor]:
        return self._get("momentum")

    @property
    def gradient(self) -> Optional[Tensor]:
        return self._get("gradient")

    def release(self) -> None:
        """Drop the tensors read so far (the mask stays): the layer's update is written."""
        self._read.clear()
        self._sources = {field: None for field in self._sources}

    @property
    def nonzeros(self) -> int:
        """Active units."""
        return int(self.mask.sum())

    @property
    def numel(self) -> int:
        return self.mask.numel()


@dataclass(frozen=True)
class LayerPlan:
    prune: int
    grow: int


def prune_count(prune_rate: float, nonzeros: int) -> int:
    """``ceil(prune_rate * nonzeros)`` as the reference, without float noise turning 3.0000001 into 4."""
    return min(nonzeros, math.ceil(prune_rate * nonzeros - 1e-9))


class TopologyMethod:
    """A sparsity method: scores and a plan over the shared update. Subclass and register to add your own."""

    name: ClassVar[str] = ""
    needs_momentum: ClassVar[bool] = False  # controller supplies LayerState.momentum
    needs_gradient: ClassVar[bool] = False  # controller supplies LayerState.gradient (dense)
    updates_topology: ClassVar[bool] = True  # False: the mask never changes after sparsify
    starts_dense: ClassVar[bool] = False  # True: sparsify starts from all-ones masks (gradual pruning)
    # True: each update prunes by the schedule's rate (the default plan), so one at rate 0 is a no-op and the
    # schedule leaves it out (cosine decay's last update). False: the plan ignores the rate (gradual pruning).
    prunes_by_rate: ClassVar[bool] = True

    def plan(self, layers: Sequence[LayerState], prune_rate: float, progress: float) -> list[LayerPlan]:
        """How many weights each layer prunes and grows. Default: regrow in place what was pruned."""
        plans = []
        for layer in layers:
            n = prune_count(prune_rate, layer.nonzeros)
            plans.append(LayerPlan(prune=n, grow=n))
        return plans

    def prune_scores(self, layer: LayerState) -> torch.Tensor:
        """Lowest scores are pruned first. Default: weight magnitude."""
        return layer.magnitude

    def grow_scores(self, layer: LayerState) -> torch.Tensor:
        """Highest scores among absent positions are grown first."""
        raise NotImplementedError(f"{type(self).__name__} must define grow_scores")


def _lowest(candidates: torch.Tensor, scores: torch.Tensor, count: int, descending: bool) -> torch.Tensor:
    """The ``count`` candidate indices ordered first by score (stable: lower index wins ties)."""
    if count == 0 or candidates.numel() == 0:
        return candidates[:0]
    picked = torch.nan_to_num(scores.reshape(-1)[candidates].float(), nan=-math.inf)
    order = torch.sort(picked, descending=descending, stable=True).indices
    return candidates[order[:count]]


@torch.no_grad()
def update_layer_topology(
    layer: LayerState, plan: LayerPlan, prune_scores: torch.Tensor, grow_scores: Optional[torch.Tensor]
) -> torch.Tensor:
    """Prune then grow in place (the mask). Returns the flat indices of the grown positions."""
    mask = layer.mask.view(-1)
    active = mask.nonzero().squeeze(1)
    if plan.prune > active.numel():
        raise ValueError(f"{layer.name}: cannot prune {plan.prune} of {active.numel()} active weights.")
    # NaN prune scores rank lowest: a NaN weight is the first to go.
    pruned = _lowest(active, prune_scores, plan.prune, descending=False)
    mask[pruned] = False
    absent = (~mask).nonzero().squeeze(1)
    if plan.grow > absent.numel():
        raise ValueError(f"{layer.name}: cannot grow {plan.grow} weights into {absent.numel()} free positions.")
    if plan.grow and grow_scores is None:
        raise ValueError(f"{layer.name}: the plan grows weights but the method gave no grow scores.")
    # NaN grow scores rank lowest: they are grown only when nothing else is left.
    grown = _lowest(absent, grow_scores, plan.grow, descending=True) if plan.grow else absent[:0]
    mask[grown] = True
    return grown
