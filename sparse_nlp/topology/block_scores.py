"""Topology updates at block granularity: block scores in, a new block mask out.

A block-sparse layer presents the shared topology update with a :class:`LayerState` over its *block grid*: the
"weight" is each block's mean |w|, the momentum each block's mean |momentum|, the gradient each block's mean |dense
gradient|. Every method then works on blocks unchanged (sparse momentum: block importance from momentum, block
magnitude for pruning, growth where the absent blocks' momentum is largest). The optimizer holds no state for
absent blocks; their momentum comes from the dense gradients the layer collected before the update.

``block_scores`` chooses how the two meet:
- ``optimizer`` (default): live blocks take the optimizer's momentum (Adam: exp_avg / sqrt(exp_avg_sq)), absent
  blocks the collected mean gradient. The two are on different scales (the normalised momentum is orders of
  magnitude larger), so a just-pruned block outranks every absent block: pruned blocks grow back in place with
  their values (to ``set_block_mask`` they are survivors), and blocks move only where redistribution gives a layer
  more than it pruned (into the absent blocks of largest mean gradient) or less.
- ``collected``: every block, live and absent, from the collected gradients on one scale (mean / sqrt(mean
  square) per weight, Adam-like; the mean with ``adam_momentum="raw"``), so pruned blocks compete with absent ones
  as fine-grained weights do. Measured worse in the study at this budget (docs/study.md): far more blocks move,
  each new one starting from 0; with ``regrown_state="fresh"`` (new blocks' AdamW scale from the window, see
  ``BlockSparseLinear.set_block_mask``) it trains as well as static blocks and no better.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparse_nlp.layers.block import pool_blocks
from sparse_nlp.methods.base import LayerState
from sparse_nlp.topology.context import UpdateContext
from sparse_nlp.topology.optimizer_state import optimizer_momentum

if TYPE_CHECKING:
    from sparse_nlp.layers.block import BlockSparseLinear


def _live_block_means(values: torch.Tensor) -> torch.Tensor:
    return values.detach().float().abs().mean(dim=(1, 2))


@torch.no_grad()
def block_layer_state(name: str, layer: "BlockSparseLinear", context: UpdateContext) -> LayerState:
    """The layer's state over its block grid: a copy (the controller's update moves the blocks afterwards)."""
    method, adam, scores = context.method, context.config.adam_momentum, context.config.block_scores
    grid = layer.block_mask.shape
    live = layer.block_mask.view(-1).nonzero().squeeze(1)
    magnitude = torch.zeros(layer.block_mask.numel(), device=live.device)
    magnitude[live] = _live_block_means(layer.values)
    momentum = gradient = None
    if method.needs_gradient:
        average = layer.dense_grads.average()
        if average is None:
            raise ValueError(
                f"{name}: no dense gradient was collected before this update; with block_size > 1 call "
                "controller.step() after every optimizer step so it can collect them."
            )
        gradient = pool_blocks(average, layer.block_size)
    if method.needs_momentum:
        collected = layer.dense_grads.momentum(adam) if scores == "collected" else None
        if collected is not None:  # every block on one scale, live and absent
            momentum = pool_blocks(collected, layer.block_size)
        else:  # live blocks from the optimizer, absent ones from the collected mean gradient (0 if none)
            average = layer.dense_grads.average()
            momentum = (pool_blocks(average, layer.block_size).view(-1) if average is not None
                        else torch.zeros_like(magnitude))
            live_momentum = optimizer_momentum(context.optimizer.state.get(layer.values, {}), adam)
            if live_momentum is not None:
                momentum[live] = _live_block_means(live_momentum)
            momentum = momentum.view(grid)
    return LayerState(name, magnitude.view(grid), layer.block_mask.clone(), layer.target_units, context.generator,
                      momentum=momentum, gradient=gradient, initial_units=layer.initial_units)
