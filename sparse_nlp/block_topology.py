"""Topology updates at block granularity: block scores in, a new block mask out.

A block-sparse layer presents the shared topology update with a :class:`LayerState` over its *block grid*: the
"weight" is each block's mean |w|, the momentum each block's mean |momentum|, the gradient each block's mean |dense
gradient|. Every method then works on blocks unchanged (sparse momentum: block importance from momentum, block
magnitude for pruning, growth where the absent blocks' momentum is largest). The optimizer holds no state for
absent blocks, so every block's momentum comes from the dense gradients the layer collected before the update
(``BlockSparseLinear.dense_grad_momentum``: Adam-normalised, mean / sqrt(mean square), unless ``adam_momentum`` is
raw): live and absent blocks on one scale. Mixing the optimizer's normalised momentum for live blocks with raw
gradients for absent ones made every just-pruned block outrank every absent one, so pruned blocks grew back in
place and the topology barely moved.
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
    if method.needs_gradient:
        average = layer.dense_grad_average()
        if average is None:
            raise ValueError(
                f"{name}: no dense gradient was collected before this update; with block_size > 1 call "
                "controller.step() after every optimizer step so it can collect them."
            )
        gradient = pool_blocks(average, layer.block_size)
    if method.needs_momentum:
        collected = layer.dense_grad_momentum(adam)
        if collected is not None:  # every block on one scale, live and absent (just-pruned ones compete fairly)
            momentum = pool_blocks(collected, layer.block_size)
        else:  # nothing collected (e.g. resumed inside a window): live blocks from the optimizer, absent ones 0
            momentum = torch.zeros_like(magnitude)
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
