"""Topology updates at block granularity: block scores in, a new block mask out.

A block-sparse layer presents the shared topology update with a :class:`LayerState` over its *block grid*: the
"weight" is each block's mean |w|, the momentum each block's mean |momentum|, the gradient each block's mean |dense
gradient|. Every method then works on blocks unchanged (sparse momentum: block importance from momentum, block
magnitude for pruning, growth where the absent blocks' momentum is largest). Active blocks take their momentum from
the optimizer; absent blocks, which the optimizer does not hold, from the layer's dense-gradient average.
"""
from __future__ import annotations

import torch

from sparse_nlp.block_layers import BlockSparseLinear, pool_blocks
from sparse_nlp.methods import LayerState, TopologyMethod
from sparse_nlp.optimizer_state import optimizer_momentum


def _live_block_means(values: torch.Tensor) -> torch.Tensor:
    return values.detach().float().abs().mean(dim=(1, 2))


@torch.no_grad()
def block_layer_state(
    name: str,
    layer: BlockSparseLinear,
    optimizer: torch.optim.Optimizer,
    method: TopologyMethod,
    generator: torch.Generator,
    adam: str = "normalized",
) -> LayerState:
    grid = layer.block_mask.shape
    live = layer.block_mask.view(-1).nonzero().squeeze(1)
    magnitude = torch.zeros(layer.block_mask.numel(), device=live.device)
    magnitude[live] = _live_block_means(layer.values)
    momentum = gradient = None
    if method.needs_momentum or method.needs_gradient:
        average = layer.dense_grad_average()
        pooled = pool_blocks(average, layer.block_size).view(-1) if average is not None else torch.zeros_like(magnitude)
        if method.needs_gradient:
            if average is None:
                raise ValueError(
                    f"{name}: no dense gradient was collected before this update; with block_size > 1 call "
                    "controller.step() after every optimizer step so it can collect them."
                )
            gradient = pooled.view(grid)
        if method.needs_momentum:
            momentum = pooled.clone()
            live_momentum = optimizer_momentum(optimizer.state.get(layer.values, {}), adam)
            if live_momentum is not None:
                momentum[live] = _live_block_means(live_momentum)
            momentum = momentum.view(grid)
    return LayerState(
        name=name,
        weight=magnitude.view(grid),
        mask=layer.block_mask.clone(),
        momentum=momentum,
        gradient=gradient,
        target_nonzeros=layer.target_nonzeros,
        generator=generator,
    )
