"""Serving a trained sparse model: block-sparse layers rebuilt from the zeros of a plain checkpoint.

After training, ``unsparsify(model).save_pretrained(path)`` writes a plain model that vanilla transformers loads,
with the pruned weights stored as zeros. For inference the zeros can do work again:

    model = AutoModelForCausalLM.from_pretrained(path)
    block_sparse_for_serving(model, block_size=64)     # linear layers keep only their nonzero blocks
    model.generate(...)

A block is live when any of its weights is nonzero, so the outputs are those of the loaded model (up to float
summation order). Layers whose live blocks exceed ``max_density`` stay dense: there the dense GEMM is as fast.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from sparse_nlp.layers.base import out_in_shape, weight_out_in
from sparse_nlp.layers.block import BlockSparseLinear, pool_blocks
from sparse_nlp.model import FilterFn, check_divisible, find_target_layers, replace_module, sparse_layers

SERVING_MAX_DENSITY = 0.5  # above this share of live blocks a layer stays dense (kernels' break-even is ~0.6-0.75)


def nonzero_block_mask(layer: nn.Module, block_size: int) -> torch.Tensor:
    """[out/b, in/b] bool: which b x b blocks of the layer's [out, in] weight hold any nonzero."""
    return pool_blocks(weight_out_in(layer), block_size) > 0


@torch.no_grad()
def block_sparse_for_serving(
    model: nn.Module,
    block_size: int = 64,
    max_density: float = SERVING_MAX_DENSITY,
    target_modules: Union[str, Sequence[str], None] = None,
    filter_fn: Optional[FilterFn] = None,
) -> nn.Module:
    """Replace, in place, each linear layer (all but the LM head by default) whose nonzero b x b blocks are at
    most ``max_density`` of its grid by a ``BlockSparseLinear`` holding only those blocks; return the model.

    Meant for inference (``generate``, evaluation): the layers carry no sparsity config, so no controller updates
    their topology, and their ``values`` do not require grad, so the CPU kernels keep the weights packed between
    calls. Change them only through tensor operations (``load_state_dict``, ``copy_``), not through ``.data``.
    ``unsparsify`` gives the plain model back.
    """
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    if sparse_layers(model):
        raise ValueError("this model already has sparse layers; block_sparse_for_serving takes a plain model "
                         "(call sparse_nlp.unsparsify(model) first).")
    targets = find_target_layers(model, target_modules, None, filter_fn)
    check_divisible(targets, block_size)
    replaced = 0
    for name, layer in targets:
        mask = nonzero_block_mask(layer, block_size)
        if mask.float().mean().item() > max_density:
            continue
        sparse = BlockSparseLinear.from_dense(layer, mask, block_size)
        sparse.values.requires_grad_(False)  # nothing trains it: its packed weights are kept between calls
        replace_module(model, name, sparse)
        replaced += 1
    if replaced == 0:
        shapes = sorted({out_in_shape(layer) for _, layer in targets})
        raise ValueError(
            f"no linear layer has at most {max_density:.0%} of its {block_size}x{block_size} blocks nonzero "
            f"(shapes {shapes}); was the model trained with block_size={block_size}? Pass that block size, or raise "
            "max_density."
        )
    return model
